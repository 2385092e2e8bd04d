"""A short Markdown report of an ``explain_dataset`` run, with figures when matplotlib is there.

Figures are drawn on a private Agg canvas (no pyplot, no change to the user's backend).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camkit._dataset_index import CLASS_MEANS, MISCLASSIFIED
from camkit._dataset_io import ShardFiles

__all__ = ["REPORT", "write_report"]

REPORT = "report.md"
_MAX_CLASSES_SHOWN = 40
_MAX_WRONG_SHOWN = 16
_log = logging.getLogger("camkit.dataset")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _class_label(row: dict[str, Any]) -> str:
    return f"{row['class']} ({row['name']})" if "name" in row else str(row["class"])


def write_report(
    out: Path,
    header: dict[str, Any],
    aggregates: dict[str, Any],
    load_image: Callable[[int], Any] | None,
    plots: bool,
) -> None:
    """Write ``report.md`` (and ``class_mean_maps.png``, ``misclassified.png`` if possible)."""
    figures = []
    if plots and importlib.util.find_spec("matplotlib") is not None:
        try:
            figures.append(("Mean map per class", _plot_class_means(out, aggregates)))
            if aggregates["misclassified"] and load_image is not None:
                figures.append(("Misclassified images, most confident first",
                                _plot_misclassified(out, aggregates, load_image)))
        except Exception as err:  # a figure is a convenience; the numbers are already written
            _log.warning("camkit.explain_dataset: a report figure could not be drawn: %s", err)

    overall = aggregates["overall"]
    group_by = "explained class" if aggregates["group_by"] == "target" else "label"
    lines = [
        "# Explanations of a dataset",
        "",
        f"- images: {overall['images']}; method {header['arguments']['method']}, "
        f"layer `{header['layer']}`, targets `{header['arguments']['targets']}`, "
        f"kept `{header['arguments']['keep']}`",
        f"- accuracy on labelled images: {_fmt(overall['accuracy'])} "
        f"({overall['correct']} of {overall['labelled']})",
        f"- maps without positive evidence (all zero): {overall['degenerate']}",
        f"- focus (share of pixels above half the peak): mean {_fmt(overall['focus_mean'])}, "
        f"std {_fmt(overall['focus_std'])}; entropy (normalised): mean "
        f"{_fmt(overall['entropy_mean'])}, std {_fmt(overall['entropy_std'])}",
        "",
        f"## Per class (grouped by {group_by})",
        "",
        "| class | images | accuracy | focus mean | focus std | entropy mean | all-zero maps |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in aggregates["per_class"]:
        lines.append(
            f"| {_class_label(row)} | {row['images']} | {_fmt(row['accuracy'])} | "
            f"{_fmt(row['focus_mean'])} | {_fmt(row['focus_std'])} | "
            f"{_fmt(row['entropy_mean'])} | {row['degenerate']} |"
        )
    wrong = sorted(aggregates["misclassified"], key=_confidence)
    lines += ["", f"## Misclassified images ({len(wrong)})", ""]
    if wrong:
        lines += ["| index | label | predicted | score | focus |", "|---|---|---|---|---|"]
        for row in wrong[:_MAX_WRONG_SHOWN]:
            lines.append(f"| {row['index']} | {row['label']} | {row['pred']} | "
                         f"{_fmt(row['score'])} | {_fmt(row['focus'])} |")
        if len(wrong) > _MAX_WRONG_SHOWN:
            lines.append(f"\n{len(wrong) - _MAX_WRONG_SHOWN} more in aggregates.json.")
    for title, name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    lines += ["", f"Arrays: `{CLASS_MEANS}` (rows in the order of `classes` in aggregates.json), "
              f"`{MISCLASSIFIED}` (rows in the order of `misclassified`).", ""]
    path = out / "report.md"
    temp = ShardFiles.temporary(path)
    temp.write_text("\n".join(lines))
    os.replace(temp, path)


def _confidence(row: dict[str, Any]) -> float:
    """Sort key: highest explained score first, undefined scores last."""
    return -row["score"] if row["score"] is not None else float("inf")


def _new_figure(rows: int, cols: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.6 * cols, 1.8 * rows), dpi=100)
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(rows, cols, squeeze=False)).ravel()
    for axis in axes:
        axis.set_axis_off()
    return figure, axes


def _save(figure: Any, path: Path) -> str:
    temp = ShardFiles.temporary(path)
    figure.savefig(temp, format="png", metadata={"Software": None})
    os.replace(temp, path)
    return path.name


def _plot_class_means(out: Path, aggregates: dict[str, Any]) -> str:
    means = np.load(out / CLASS_MEANS, mmap_mode="r")
    rows = aggregates["per_class"][:_MAX_CLASSES_SHOWN]
    cols = min(8, len(rows))
    figure, axes = _new_figure(-(-len(rows) // cols), cols)
    for axis, mean, row in zip(axes, means, rows):
        axis.imshow(mean, cmap="jet", vmin=0.0, vmax=1.0)
        axis.set_title(f"{_class_label(row)}\nn={row['images']}", fontsize=7)
    return _save(figure, out / "class_mean_maps.png")


def _plot_misclassified(
    out: Path, aggregates: dict[str, Any], load_image: Callable[[int], Any]
) -> str:
    from camkit.viz import overlay

    maps = np.load(out / MISCLASSIFIED, mmap_mode="r")
    wrong = aggregates["misclassified"]
    order = sorted(range(len(wrong)), key=lambda i: _confidence(wrong[i]))[:_MAX_WRONG_SHOWN]
    cols = min(8, len(order))
    figure, axes = _new_figure(-(-len(order) // cols), cols)
    for axis, position in zip(axes, order):
        row = aggregates["misclassified"][position]
        axis.imshow(overlay(_displayable(load_image(row["index"])), np.asarray(maps[position])))
        axis.set_title(f"#{row['index']}: {row['label']} as {row['pred']}", fontsize=7)
    return _save(figure, out / "misclassified.png")


def _displayable(image: Any) -> np.ndarray:
    """A ``(C, H, W)`` or ``(H, W)`` image scaled to ``[0, 1]`` (inputs are often normalised)."""
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) \
        else np.asarray(image, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)
