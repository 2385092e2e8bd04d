"""The study's figures (matplotlib, written as PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

import camkit

DPI = 110
COLOURS = {"train": "tab:blue", "val": "tab:orange"}
MODEL_COLOURS = {"resnet18": "tab:red", "mobilenet_v2": "tab:green", "resnet10": "tab:blue"}


def _display(image_u8: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` uint8 as an RGB ``(H, W, 3)`` array."""
    hwc = np.moveaxis(np.asarray(image_u8), 0, -1)
    return np.ascontiguousarray(np.repeat(hwc, 3, axis=-1) if hwc.shape[-1] == 1 else hwc)


def _band(ax, epochs, runs: np.ndarray, colour: str, label: str) -> None:
    mean = runs.mean(axis=0)
    ax.plot(epochs, mean, color=colour, marker="o", markersize=3, label=label)
    if len(runs) > 1:
        ax.fill_between(epochs, runs.min(axis=0), runs.max(axis=0), color=colour, alpha=0.2,
                        linewidth=0)


def learning_curves(path: Path, models: Mapping[str, Mapping[str, Any]]) -> None:
    """Loss (top row) and accuracy (bottom row) per epoch, one column per model.

    ``models[name]`` holds ``label``, ``verdict`` and ``histories`` (one dict per seed).
    Lines are the mean over seeds, the band their min-max range.
    """
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False,
                             sharex=True)
    loss_max = max(max(max(h["train_loss"] + h["val_loss"]) for h in m["histories"])
                   for m in models.values())
    n_seeds = 1
    for col, (_name, info) in enumerate(models.items()):
        hist = info["histories"]
        n_seeds = len(hist)
        epochs = np.arange(1, len(hist[0]["train_loss"]) + 1)
        for row, kind in enumerate(("loss", "acc")):
            ax = axes[row, col]
            for split in ("train", "val"):
                runs = np.array([h[f"{split}_{kind}"] for h in hist])
                _band(ax, epochs, runs, COLOURS[split], "training" if split == "train"
                      else "validation")
            if kind == "acc" and all("val_acc_bn_recomputed" in h for h in hist):
                recomputed = np.mean([h["val_acc_bn_recomputed"] for h in hist], axis=0)
                ax.plot(epochs, recomputed, color=COLOURS["val"], linestyle="--",
                        linewidth=1, label="validation, BatchNorm\nstatistics recomputed")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if kind == "loss":
                ax.set_title(f"{info['label']}: {info['verdict']}", fontsize=11)
                ax.set_ylim(0, loss_max * 1.05)
                if col == 0:
                    ax.set_ylabel("cross-entropy")
            else:
                ax.set_ylim(0, 1.02)
                ax.set_xlabel("epoch")
                if col == 0:
                    ax.set_ylabel("accuracy")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[1, 0].legend(loc="lower right", fontsize=8)
    spread = f"mean of {n_seeds} seeds, band: min-max" if n_seeds > 1 else "one seed"
    fig.suptitle(f"Learning curves ({spread})", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def gradcam_grid(
    path: Path,
    images: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    columns: Mapping[str, Mapping[str, Any]],
) -> None:
    """Rows: validation images; first column the image, then one Grad-CAM overlay per model.

    ``columns[name]`` holds ``label``, ``maps`` (k, H, W), ``preds`` (k,), ``confidence`` (k,).
    A title in red marks a wrong prediction.
    """
    rows, cols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.25 * rows), squeeze=False)
    for r in range(rows):
        rgb = _display(images[r])
        axes[r, 0].imshow(rgb, interpolation="nearest")
        axes[r, 0].set_title(f"true: {classes[labels[r]]}", fontsize=8)
        for c, (_name, info) in enumerate(columns.items(), start=1):
            ax = axes[r, c]
            ax.imshow(camkit.overlay(rgb, info["maps"][r]), interpolation="nearest")
            pred = int(info["preds"][r])
            colour = "black" if pred == labels[r] else "red"
            ax.set_title(f"true {classes[labels[r]]}\npred {classes[pred]} "
                         f"({float(info['confidence'][r]):.2f})", fontsize=7, color=colour)
            if r == 0:
                ax.text(0.5, 1.35, info["label"], transform=ax.transAxes, ha="center",
                        fontsize=10, fontweight="bold")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    # "tight" keeps the column headers, which sit above the axes that tight_layout knows of
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


METRIC_TITLES = {
    "focus_share": "focus share (higher: broader)",
    "entropy": "map entropy (higher: broader)",
    "deletion_auc_rel": "relative deletion AUC\n(lower: more faithful)",
    "insertion_auc_rel": "relative insertion AUC\n(higher: more faithful)",
}


def map_statistics(path: Path, models: Mapping[str, Mapping[str, Any]]) -> None:
    """One panel per map statistic: the mean over seeds as a bar, each seed as a dot."""
    fig, axes = plt.subplots(1, len(METRIC_TITLES), figsize=(3.4 * len(METRIC_TITLES), 3.4))
    labels = [info["label"] for info in models.values()]
    for ax, (key, title) in zip(axes, METRIC_TITLES.items()):
        for x, (name, info) in enumerate(models.items()):
            values = np.array(info["map_stats"][key], dtype=float)
            ax.bar(x, np.nanmean(values), color=MODEL_COLOURS.get(name, "grey"), alpha=0.6)
            ax.scatter(np.full(len(values), x), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=9)
        top = max(1.0, max(np.nanmax(np.asarray(i["map_stats"][key], dtype=float))
                           for i in models.values()) * 1.1)
        ax.set_ylim(0, top)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Grad-CAM statistics over the validation images (bar: mean, dots: seeds)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _draw_box(ax, box, colour: str, style: str = "-") -> None:
    top, left, bottom, right = box
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                           edgecolor=colour, linewidth=1.6, linestyle=style))


def receptive_fields(
    path: Path,
    images: np.ndarray,
    columns: Mapping[str, Mapping[str, Any]],
) -> None:
    """Each model's Grad-CAM with its hottest cell and the input box that cell sees.

    ``columns[name]`` holds ``label``, ``maps`` (k, H, W), ``cells`` (k pairs or None),
    ``boxes`` (k clipped boxes or None), ``full_boxes`` (the same boxes unclipped) and ``rf``
    (size, stride) or None. The view is widened to the unclipped box, so a field larger than
    the image shows as a frame around it.
    """
    rows, cols = len(images), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows + 0.4), squeeze=False)
    for c, (_name, info) in enumerate(columns.items()):
        for r in range(rows):
            ax = axes[r, c]
            rgb = _display(images[r])
            h, w = rgb.shape[:2]
            ax.imshow(camkit.overlay(rgb, info["maps"][r], alpha=0.35), interpolation="nearest")
            ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="grey",
                                   linewidth=1))
            if r == 0:
                size = f" (RF {info['rf'][0][0]} px)" if info.get("rf") and info["rf"][0] else ""
                ax.text(0.5, 1.22, f"{info['label']}{size}", transform=ax.transAxes,
                        ha="center", fontsize=9, fontweight="bold")
            if info.get("boxes") is None:
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
                ax.set_title("receptive field unavailable", fontsize=7)
                continue
            (i, j), box, full = info["cells"][r], info["boxes"][r], info["full_boxes"][r]
            stride = info["rf"][1]
            _draw_box(ax, full, "limegreen")
            _draw_box(ax, (i * stride[0], j * stride[1], (i + 1) * stride[0],
                           (j + 1) * stride[1]), "magenta", "--")
            top, left, bottom, right = full
            ax.set_xlim(min(left, 0) - 1.5, max(right, w) + 0.5)
            ax.set_ylim(max(bottom, h) + 0.5, min(top, 0) - 1.5)
            ax.set_title(f"cell ({i},{j}) sees rows {box[0]}-{box[2] - 1}, "
                         f"cols {box[1]}-{box[3] - 1}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Hottest map cell (dashed: its stride-sized patch) and the input box it sees "
                 "(green, unclipped; grey: the image)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def effective_fields(path: Path, columns: Mapping[str, Mapping[str, Any]]) -> None:
    """Each model's effective receptive field with the theoretical field of the same cell.

    ``columns[name]`` holds ``label``, ``erf`` (H, W) or None, ``box`` the unclipped
    theoretical box of the cell or None, ``std`` per-axis standard deviation or None.
    """
    cols = len(columns)
    fig, axes = plt.subplots(1, cols, figsize=(3.6 * cols, 3.8), squeeze=False)
    for ax, (_name, info) in zip(axes[0], columns.items()):
        erf = info.get("erf")
        if erf is None:
            ax.set_title(f"{info['label']}: ERF unavailable", fontsize=9)
            ax.axis("off")
            continue
        h, w = erf.shape
        ax.imshow(erf, cmap="magma", interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5,
                                                                       -0.5))
        ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="grey", linewidth=1))
        box = info.get("box")
        if box is not None:
            _draw_box(ax, box, "cyan", "--")
            top, left, bottom, right = box
            ax.set_xlim(min(left, 0) - 1.5, max(right, w) + 0.5)
            ax.set_ylim(max(bottom, h) + 0.5, min(top, 0) - 1.5)
        std = info.get("std")
        std_text = f", ERF sd {std[0]:.1f} px" if std else ""
        rf_text = f"RF {bottom - top} px" if box is not None else "RF unavailable"
        ax.set_title(f"{info['label']}\n{rf_text}{std_text}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Effective receptive field of the centre cell (image area: grey frame; "
                 "theoretical field: dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
