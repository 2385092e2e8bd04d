"""Scaling plots from a results summary: time and peak memory against batch size and resolution.

    .venv/bin/python benchmarks/plot.py benchmarks/results/full.json
"""

from __future__ import annotations

import json
import os
import sys

STYLE = {
    "forward_nograd": ("forward, no grad", "0.55", ":"),
    "forward_grad": ("forward, grad on", "0.35", "--"),
    "forward_backward": ("forward + full backward", "0.15", "-."),
    "camkit": ("camkit", "tab:red", "-"),
    "pytorch-grad-cam": ("pytorch-grad-cam", "tab:blue", "-"),
    "torchcam": ("torchcam", "tab:green", "-"),
    "captum": ("captum", "tab:purple", "-"),
}


def _series(rows, allocator, x_key, **fixed):
    """competitor -> sorted [(x, time, peak)] for Grad-CAM rows and the floors."""
    out: dict[str, list] = {}
    for r in rows:
        if r["allocator"] != allocator or r["method"] not in ("-", "gradcam"):
            continue
        if any(r[k] != v for k, v in fixed.items()):
            continue
        out.setdefault(r["competitor"], []).append((r[x_key], r["time_s"], r["peak_mib"]))
    return {name: sorted(points) for name, points in out.items()}


def _draw(axes_time, axes_mem, series, title):
    for name, (label, color, style) in STYLE.items():
        points = series.get(name)
        if not points:
            continue
        xs, times, peaks = zip(*points)
        kw = {"color": color, "linestyle": style, "marker": "o", "markersize": 3, "label": label,
              "linewidth": 2.2 if name == "camkit" else 1.2}
        axes_time.plot(xs, times, **kw)
        axes_mem.plot(xs, [max(p, 1.0) for p in peaks], **kw)
    axes_time.set_title(title, fontsize=9)
    for ax in (axes_time, axes_mem):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)


def make_plots(rows: list[dict], base: str) -> list[str]:
    """Write ``<base>_batch.png`` and ``<base>_resolution.png``; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return []
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    allocators = {r["allocator"] for r in rows}
    allocator = "default" if "default" in allocators else rows[0]["allocator"]
    written = []

    models = sorted({r["model"] for r in rows if r["size"] == 224})
    batch_series = {m: _series(rows, allocator, "batch", model=m, size=224) for m in models}
    if any(len(p) > 1 for s in batch_series.values() for p in s.values()):
        fig, axes = plt.subplots(2, len(models), figsize=(4 * len(models), 6.5), squeeze=False)
        for col, model in enumerate(models):
            _draw(axes[0, col], axes[1, col], batch_series[model], f"{model}, 224 px")
            axes[1, col].set_xlabel("batch size")
        axes[0, 0].set_ylabel("median time per call (s)")
        axes[1, 0].set_ylabel("peak RSS growth (MiB)")
        axes[0, -1].legend(fontsize=7)
        fig.suptitle(f"Grad-CAM and floors vs batch size (allocator: {allocator})", fontsize=10)
        fig.tight_layout()
        written.append(base + "_batch.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    sweep = {(r["model"], r["batch"]) for r in rows if r["size"] != 224}
    if sweep:
        fig, axes = plt.subplots(2, len(sweep), figsize=(4.5 * len(sweep), 6.5), squeeze=False)
        for col, (model, batch) in enumerate(sorted(sweep)):
            series = _series(rows, allocator, "size", model=model, batch=batch)
            _draw(axes[0, col], axes[1, col], series, f"{model}, batch {batch}")
            axes[1, col].set_xlabel("input size (px, square)")
        axes[0, 0].set_ylabel("median time per call (s)")
        axes[1, 0].set_ylabel("peak RSS growth (MiB)")
        axes[0, -1].legend(fontsize=7)
        fig.suptitle(f"Grad-CAM and floors vs resolution (allocator: {allocator})", fontsize=10)
        fig.tight_layout()
        written.append(base + "_resolution.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "results", "full.json")
    with open(path) as handle:
        summary = json.load(handle)["summary"]
    for written_path in make_plots(summary, os.path.splitext(path)[0]):
        print(written_path)
