"""Capturing target-layer activations for one call, and putting the model back afterwards.

The capture follows design.md, step 2: the forward up to the first target layer runs with
grad mode off (no autograd graph, no saved tensors), and that layer's forward hook

* turns the layer's output into a fresh leaf that requires grad (the activation ``A``),
* switches grad mode on, so only the rest of the forward (the head) records a graph,
* hands a *clone* of ``A`` to the rest of the network, so that later in-place operations
  (``out += identity``, ``relu_``) cannot alter the captured activation.

The caller leaves the ``with`` block as soon as the model's forward returns, so the hooks never
see anything else (a nested call of another CAM on the same model, for instance); grad mode is
then put back as it was on entry. Hooks live only inside the ``with`` block.

Gradients are then taken with :func:`torch.autograd.grad` against ``A`` alone: no parameter's
``.grad`` is touched and no graph outlives the call.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

from camkit.errors import CamkitError

__all__ = ["LayerCapture", "ModelState"]


class LayerCapture:
    """Forward hooks on the target layers for the duration of one ``with`` block.

    Parameters
    ----------
    layers
        ``(dotted_name, module)`` pairs, in any order.

    Attributes
    ----------
    activations
        ``name -> A``: each layer's output as a tensor that requires grad and is part of the
        graph from ``A`` to the model's output.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self._layers = list(layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.activations: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._grad_mode = torch.is_grad_enabled()

    def __enter__(self) -> LayerCapture:
        self._grad_mode = torch.is_grad_enabled()
        try:
            for name, module in self._layers:
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()
        torch.set_grad_enabled(self._grad_mode)

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> torch.Tensor | None:
            count = self._calls.get(name, 0) + 1
            self._calls[name] = count
            if count > 1:
                # Leave later calls alone and let the forward finish, so that the caller can
                # report the true number of calls (see ``repeated``).
                return None
            if not isinstance(output, torch.Tensor):
                raise CamkitError(
                    f"target layer {name!r} returned a {type(output).__name__}, not a tensor; "
                    "choose a layer whose output is a (N, C, h, w) feature map "
                    "(camkit.list_layers(model) lists them)."
                )
            if output.requires_grad and torch.is_grad_enabled():
                # Downstream of an earlier target layer: already on the graph.
                activation = output
            else:
                activation = output.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            self.activations[name] = activation
            return activation.clone()

        return hook

    def missing(self) -> list[str]:
        """Names of target layers that did not run during the block."""
        return [name for name, _ in self._layers if name not in self.activations]

    def repeated(self) -> dict[str, int]:
        """``name -> number of calls`` for target layers that ran more than once.

        Such a layer's activation is ambiguous (a shared module such as torchvision's
        ``BasicBlock.relu``); only its first call was captured.
        """
        return {name: count for name, count in self._calls.items() if count > 1}


class ModelState:
    """The per-module ``training`` flags of a model, to put back after a call."""

    def __init__(self, model: nn.Module) -> None:
        self._flags = [(module, module.training) for module in model.modules()]

    def restore(self) -> None:
        for module, flag in self._flags:
            module.training = flag
