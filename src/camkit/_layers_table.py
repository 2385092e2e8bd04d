"""The table :func:`camkit.list_layers` returns: rows of layers, printable."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LayerInfo", "LayerTable", "shape_text"]


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`camkit.list_layers`.

    Attributes
    ----------
    index
        Position in execution order (order of first call), from 1.
    name
        Dotted name, as accepted by ``target_layer``.
    type
        Class name of the module.
    output
        Shape of its (last) output as a tuple for a tensor; a tuple of those for tuple
        outputs; the type name otherwise.
    calls
        How many times it ran in one forward (more than 1: not usable as a target layer).
    is_map
        Its output is a 4-D map with H, W > 1 (a usable Grad-CAM layer without ``reshape``).
    picked
        It is the layer camkit picks when ``target_layer`` is None.
    """

    index: int
    name: str
    type: str
    output: Any
    calls: int
    is_map: bool
    picked: bool


class LayerTable:
    """The layers that ran in one forward, in execution order; ``str()`` gives a table.

    Iterate for :class:`LayerInfo` rows; index by position or by name.
    """

    def __init__(
        self,
        model_name: str,
        input_shape: tuple[int, ...],
        rows: Sequence[LayerInfo],
        picked: str | None,
        reason: str,
        not_run: Sequence[str],
    ) -> None:
        self.model_name = model_name
        self.input_shape = input_shape
        self.rows = tuple(rows)
        self.picked = picked
        self.reason = reason
        self.not_run = tuple(not_run)

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> LayerInfo:
        if isinstance(key, str):
            for row in self.rows:
                if row.name == key:
                    return row
            raise KeyError(f"{key!r} did not run in this forward (or is not a layer name)")
        return self.rows[key]

    def __str__(self) -> str:
        header = ("#", "layer", "type", "output", "calls", "")
        body = [
            (
                str(row.index),
                row.name,
                row.type,
                shape_text(row.output),
                f"x{row.calls}" if row.calls > 1 else "",
                "<- picked" if row.picked else "",
            )
            for row in self.rows
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [
            f"{self.model_name} on input {self.input_shape}: {len(self.rows)} modules ran",
        ]
        for cells in [header, *body]:
            padded = [
                cells[0].rjust(widths[0]),
                *(cell.ljust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)),
            ]
            lines.append("  ".join(padded).rstrip())
        if self.picked is not None:
            lines.append(f"picked: {self.picked!r} ({self.reason})")
        else:
            lines.append(f"picked: none ({self.reason})")
        if any(row.calls > 1 for row in self.rows):
            lines.append("xN: ran N times per forward; hook a block that runs once instead")
        if self.not_run:
            shown = ", ".join(map(repr, self.not_run[:5]))
            more = f" and {len(self.not_run) - 5} more" if len(self.not_run) > 5 else ""
            lines.append(f"did not run in eval mode: {shown}{more}")
        return "\n".join(lines)

    __repr__ = __str__


def shape_text(output: Any) -> str:
    """``(1, 512, 7, 7)`` for a shape, nested for tuples and dicts, else the text as is."""
    if isinstance(output, tuple) and all(isinstance(v, int) for v in output):
        return "(" + ", ".join(map(str, output)) + ")"
    if isinstance(output, tuple):
        return "(" + ", ".join(shape_text(v) for v in output) + ")"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {shape_text(v)}" for k, v in output.items()) + "}"
    return str(output)
