"""The dry run: what one forward pass executes, module by module.

Layer resolution works from what *runs*, not from the order in which modules were defined
(GoogLeNet defines auxiliary heads that never run in eval mode). :func:`trace_forward` runs
the model once, in eval mode and without an autograd graph, with a pre-hook and a forward hook
on every submodule, and records for each module

* when it was first called (the table order of ``camkit.list_layers``),
* how many times it ran,
* the shape of its last output,

and, for every call, in the order the calls *finished*, the output tensor together with its
version counter. Two calls that return the same tensor object at the same version produced the
same values (a block, its last child, the in-place ReLU closing it); an in-place op in between
(``out += identity``) bumps the version and tells them apart.

Every hook is removed and every module's ``training`` flag is put back in ``finally``, also when
the forward raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Call", "ModuleRecord", "Trace", "describe_output", "trace_forward"]


@dataclass
class Call:
    """One finished module call.

    Attributes
    ----------
    name
        Dotted name of the module.
    tensor
        The output if it is a tensor (held so that ``id`` stays unique during the trace),
        else ``None``.
    version
        The tensor's version counter when the call returned (``None`` without a tensor).
    """

    name: str
    tensor: torch.Tensor | None
    version: int | None

    @property
    def key(self) -> tuple[int, int] | None:
        """Identity of the produced values: (tensor object, version)."""
        if self.tensor is None or self.version is None:
            return None
        return (id(self.tensor), self.version)


@dataclass
class ModuleRecord:
    """What one module did during the traced forward."""

    name: str
    module: nn.Module
    first_call: int
    calls: int = 0
    output: Any = None  # shape description of the last output, see describe_output


@dataclass
class Trace:
    """The record of one forward pass.

    Attributes
    ----------
    records
        Name -> record for every submodule that ran, in the order of first call.
    calls
        Every finished call, in finishing order (children finish before their parents).
    not_run
        Names of submodules that were hooked but never called (auxiliary heads...).
    """

    records: dict[str, ModuleRecord] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)

    def calls_of(self, module: nn.Module) -> int:
        """How many times ``module`` ran (0 if it did not run or was not hooked)."""
        for record in self.records.values():
            if record.module is module:
                return record.calls
        return 0


def describe_output(output: Any) -> Any:
    """A printable, reference-free summary of a module output.

    Tensors give their shape as a tuple of ints; tuples and lists give a tuple of
    summaries; dicts a dict of summaries; anything else gives its type name.
    """
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return tuple(describe_output(item) for item in output)
    if isinstance(output, dict):
        return {key: describe_output(value) for key, value in output.items()}
    return type(output).__name__


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _hookable(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules to hook: every eager module once, nothing inside a TorchScript module."""
    chosen: list[tuple[str, nn.Module]] = []
    scripted: list[str] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in scripted):
            continue
        if isinstance(module, torch.jit.ScriptModule):
            scripted.append(name)
            continue
        chosen.append((name, module))
    return chosen


def trace_forward(model: nn.Module, inputs: torch.Tensor) -> Trace:
    """Run ``model(inputs)`` once in eval mode, without grad, and record what ran.

    Parameters
    ----------
    model
        An eager ``nn.Module``. Its mode (every submodule's ``training`` flag) is restored.
    inputs
        The batch to run, already on the model's device and dtype.

    Returns
    -------
    Trace
        The record. It holds references to every output tensor of the pass; drop it
        once done.

    Raises
    ------
    Exception
        Whatever the forward raises, unchanged, after cleanup.
    """
    trace = Trace()
    targets = _hookable(model)
    counter = {"start": 0}

    def pre_hook_for(name: str, module: nn.Module):
        def pre_hook(_module: nn.Module, _args: Any) -> None:
            if name not in trace.records:
                trace.records[name] = ModuleRecord(name, module, counter["start"])
                counter["start"] += 1

        return pre_hook

    def hook_for(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            record = trace.records[name]
            record.calls += 1
            record.output = describe_output(output)
            if isinstance(output, torch.Tensor):
                trace.calls.append(Call(name, output, _version(output)))
            else:
                trace.calls.append(Call(name, None, None))

        return hook

    flags = [(module, module.training) for module in model.modules()]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, module in targets:
            handles.append(module.register_forward_pre_hook(pre_hook_for(name, module)))
            handles.append(module.register_forward_hook(hook_for(name)))
        model.eval()
        with torch.inference_mode(False), torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    trace.not_run = [name for name, _ in targets if name not in trace.records]
    return trace
