"""Stable descriptions of the callables given to ``explain_dataset`` (targets, output, reshape).

A description names the callable and adds a digest of what decides its results: a function's
code, the plain values it reads (closure cells, defaults, the module globals it names), the
arguments a ``functools.partial`` binds, and the attributes of the object a method or callable
instance belongs to. Two lambdas, or a function edited between two runs, are told apart; the
same function in two processes is described alike, since nothing that holds a memory address
enters the digest.
"""

from __future__ import annotations

import functools
import hashlib
import re
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["describe_callable", "without_digests"]

_DIGEST = re.compile(r" \(digest [0-9a-f]{12}\)")
_MAX_DEPTH = 6  # containers nested deeper (or holding themselves) are cut off here
_MAX_HASHED = 1 << 16  # elements of an array hashed by value; larger ones by shape only


def describe_callable(fn: Callable[..., Any] | None) -> str | None:
    """``module.qualname (digest <12 hex>)`` for ``fn``; ``None`` for ``None``."""
    if fn is None:
        return None
    target, parts = fn, []
    while isinstance(target, functools.partial):
        parts.append(_plain_text((target.args, target.keywords)))
        target = target.func
    owner = getattr(target, "__self__", None)  # a bound method's object
    function = getattr(target, "__func__", target)
    if owner is not None and not isinstance(owner, types.ModuleType):
        parts.append(_object_text(owner))
    code = getattr(function, "__code__", None)
    if isinstance(code, types.CodeType):
        parts.append(_function_text(function, code))
    elif not isinstance(function, (types.BuiltinFunctionType, type)):
        parts.append(_object_text(function))  # a callable instance
    module = getattr(function, "__module__", None) or type(function).__module__
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    return f"{module}.{name} (digest {digest})"


def without_digests(value: Any) -> Any:
    """``value`` (a description) with the digests of :func:`describe_callable` removed.

    What the ranks of a distributed run must agree on: the same callables everywhere, though
    what they close over may differ per rank (its device, say); rank 0's full description
    is the one recorded.
    """
    if isinstance(value, dict):
        return {k: without_digests(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_digests(v) for v in value]
    return _DIGEST.sub("", value) if isinstance(value, str) else value


def _function_text(function: Any, code: types.CodeType) -> str:
    cells = [_cell_value(c) for c in getattr(function, "__closure__", None) or ()]
    defaults = (getattr(function, "__defaults__", None),
                getattr(function, "__kwdefaults__", None))
    namespace = getattr(function, "__globals__", {})
    read = {n: namespace[n] for n in _names(code) if n in namespace}
    return _code_text(code) + _plain_text((cells, defaults, read))


def _names(code: types.CodeType) -> list[str]:
    """The global names ``code`` and the code nested in it refer to."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _names(const)
    return sorted(set(names))


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return None


def _code_text(code: types.CodeType) -> str:
    """What a code object computes, without the addresses or line numbers in its repr."""
    consts = [_code_text(c) if isinstance(c, types.CodeType) else _plain_text(c)
              for c in code.co_consts]
    return f"{code.co_code.hex()}|{consts}|{code.co_names}"


def _object_text(obj: Any) -> str:
    """An object by its type and the plain values of its attributes."""
    attributes = getattr(obj, "__dict__", None)
    return type(obj).__qualname__ + (_plain_text(attributes) if attributes else "")


def _plain_text(value: Any, depth: int = 0) -> str:
    """``repr`` of numbers and strings, values of arrays, and containers of those; only the
    type name for anything else (whose default ``repr`` holds a changing address)."""
    if depth > _MAX_DEPTH:
        return "..."
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        small = value.numel() <= _MAX_HASHED and not value.is_meta
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() \
            if small else None  # bytes: every dtype, bfloat16 included
        return _array_text(data, tuple(value.shape), str(value.dtype))
    if isinstance(value, np.ndarray):
        return _array_text(value if value.size <= _MAX_HASHED else None, value.shape,
                           str(value.dtype))
    if isinstance(value, (tuple, list, frozenset, set)):
        items = [_plain_text(v, depth + 1) for v in value]
        if isinstance(value, (set, frozenset)):
            items.sort()
        return f"{type(value).__name__}({', '.join(items)})"
    if isinstance(value, dict):
        items = sorted(f"{_plain_text(k, depth + 1)}: {_plain_text(v, depth + 1)}"
                       for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return type(value).__qualname__


def _array_text(values: np.ndarray | None, shape: tuple[int, ...], dtype: str) -> str:
    head = f"array{shape}{dtype}"
    if values is None or values.dtype == object:
        return head
    return head + hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:16]
