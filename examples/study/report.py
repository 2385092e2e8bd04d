"""``report.md``: the study's tables, figures and verdicts, rendered from ``metrics.json``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from study import verdict

FIGURES = {
    "learning_curves": "learning_curves.png",
    "gradcam_grid": "gradcam_grid.png",
    "map_stats": "map_stats.png",
    "receptive_fields": "receptive_fields.png",
    "erf": "erf.png",
}


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _spread(stat: dict[str, Any], digits: int = 3) -> str:
    """``mean ± sd`` (with the min-max range when there are several seeds)."""
    if len(stat["values"]) == 1:
        return _num(stat["mean"], digits)
    return (f"{_num(stat['mean'], digits)} ± {_num(stat['std'], digits)} "
            f"({_num(stat['min'], digits)}-{_num(stat['max'], digits)})")


def _pair(values: list[int] | None) -> str:
    if not values:
        return "n/a"
    return str(values[0]) if values[0] == values[1] else f"{values[0]}x{values[1]}"


def render(m: dict[str, Any], figure_dir: str = "") -> str:
    """The report as Markdown; ``figure_dir`` is prefixed to the figure file names."""
    fig = {k: f"{figure_dir}{v}" for k, v in FIGURES.items()}
    models = m["models"]
    ds, cfg, rules = m["dataset"], m["config"], m["rules"]
    seeds = cfg["seeds"]
    n_seeds = len(seeds)
    out: list[str] = []
    add = out.append

    add("# Three-model study: ResNet-18, MobileNetV2, ResNet-10\n")
    v = m["versions"]
    wall = m.get("wall_seconds")
    add(f"Produced by `{m['command']}`"
        + (f" in {wall / 60:.1f} min" if wall else "")
        + f" on {m['machine']['device']} ({m['machine']['threads']} threads; "
        f"{m['machine']['processor']}), with camkit {v['camkit']}, torch {v['torch']}, "
        f"torchvision {v['torchvision']}, numpy {v['numpy']}, Python {v['python']}.\n")

    add("## Setup\n")
    add(f"- **Data**: {ds['source']}; {len(ds['classes'])} classes, images "
        f"{'x'.join(map(str, ds['image_shape']))} (C x H x W). Each seed trains on "
        f"{ds['train_size']} images drawn (stratified) from a pool of {ds['train_pool']}; all "
        f"seeds validate on the same {ds['val_size']} held-out images (stratified from "
        f"{ds['val_pool']}). Pixels are scaled per channel with the training subset's "
        "mean and standard deviation.")
    add(f"- **Models**: torchvision ResNet-18, MobileNetV2 and ResNet-10 "
        "(`ResNet(BasicBlock, [1, 1, 1, 1])`), untrained, with one change applied to all "
        f"three so that the target layer keeps a spatial map: {cfg['stem']}. The ImageNet stems "
        "(total stride 32) would leave a 1x1 map, whose Grad-CAM is a constant. The first "
        "convolution takes the data's channels directly (1 for Fashion-MNIST). Parameter "
        f"counts are of these models with their {len(ds['classes'])}-class heads; the "
        "original study's 11M / 3.4M / ~5M count ImageNet's 1000-class heads.")
    add(f"- **Schedule** (the same for all): {cfg['optimizer']}, {cfg['schedule']}, batch "
        f"{cfg['batch_size']}, {cfg['epochs']} epochs, augmentation: {cfg['augmentation']}. "
        f"Seeds {', '.join(map(str, seeds))}: each seed sets the training subset, the "
        "initialisation and the batch order, shared by the three models.")
    add(f"- **Maps**: {cfg['cam']}. Training loss and accuracy per epoch are the means over "
        "the epoch's batches in training mode; validation numbers are measured in eval mode "
        "after each epoch.\n")

    add("## Fit: learning curves and verdicts\n")
    add(f"Rule (applied to the mean over seeds of the last epoch, and to each seed): a model "
        f"**underfits** if its training accuracy is below {rules['train_acc_underfit']:.2f}; "
        f"otherwise it **overfits** if training minus validation accuracy exceeds "
        f"{rules['gap_overfit']:.2f}; otherwise it **fits**.\n")
    spread_note = ("mean ± sd over seeds (min-max)" if n_seeds > 1 else "one seed")
    add(f"Values: {spread_note}.\n")
    add("| model | params | train acc | val acc | gap | best val acc | val loss (min / last) "
        "| verdict | per seed |")
    add("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for info in models.values():
        s = info["summary"]
        add(f"| {info['label']} | {info['params'] / 1e6:.2f}M | {_spread(s['train_acc'])} | "
            f"{_spread(s['val_acc'])} | {_spread(s['gap'])} | {_spread(s['best_val_acc'])} | "
            f"{_num(s['min_val_loss']['mean'])} / {_num(s['val_loss']['mean'])} | "
            f"**{info['verdict']}** | {', '.join(info['verdict_per_seed'])} |")
    add("")
    add(f"![Learning curves]({fig['learning_curves']})\n")
    bn_note = _batchnorm_note(models)
    if bn_note:
        add(bn_note + "\n")

    add("## Grad-CAM of each model\n")
    add(f"Rows: the first validation image of each of the first {cfg['grid_images']} classes; "
        f"columns: the models of seed {seeds[0]}. Each "
        "title gives the true label, the prediction and its softmax probability (red: wrong).\n")
    add(f"![Grad-CAM grid]({fig['gradcam_grid']})\n")

    add("## Map statistics\n")
    any_run = next(iter(models.values()))["runs"][0]["map_stats"]
    add(f"Over the validation images ({any_run['focus_images']} maps per model and seed for "
        f"focus share and entropy; {any_run['curve_images']} images for the deletion and "
        f"insertion curves, {len(any_run['fractions']) - 1} steps). Focus share: share of "
        "pixels at or above half the map's maximum; entropy: of the map as a distribution, "
        "divided by its maximum log(H*W); deletion (insertion): area under the predicted "
        "class's probability as the highest-ranked pixels are removed (revealed); "
        f"deletion baseline: {cfg['deletion_baseline']}, insertion start: "
        f"{cfg['insertion_baseline']}. *Relative* areas divide each curve by the unaltered "
        "image's probability first: a model that is never confident has low raw areas "
        "whatever its map shows, so the claims use the relative ones.\n")
    add("| model | focus share | entropy | deletion AUC | insertion AUC | "
        "relative deletion AUC (lower: better) | relative insertion AUC (higher: better) | "
        "degenerate maps |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for info in models.values():
        s = info["summary"]
        degenerate = sum(r["map_stats"]["degenerate_maps"] for r in info["runs"])
        add(f"| {info['label']} | {_spread(s['focus_share'])} | {_spread(s['entropy'])} | "
            f"{_spread(s['deletion_auc'])} | {_spread(s['insertion_auc'])} | "
            f"{_spread(s['deletion_auc_rel'])} | {_spread(s['insertion_auc_rel'])} | "
            f"{degenerate} |")
    add("")
    add(f"![Map statistics]({fig['map_stats']})\n")

    add("## Receptive fields\n")
    add("Theoretical receptive field of each target layer (`camkit.receptive_field`; per "
        "axis, cell i sees input rows stride*i - padding to stride*i - padding + size - 1) and "
        "the effective receptive field (`camkit.effective_receptive_field`, Luo et al. 2016: "
        "the input gradient of the centre cell, averaged over validation images), whose "
        "standard deviation says how far from the centre the cell is actually sensitive.\n")
    add("| model | target layer | map | RF size | stride | padding | least image share one "
        "cell sees | ERF sd (px) | note |")
    add("|---|---|---|---:|---:|---:|---:|---:|---|")
    image_hw = ds["image_shape"][1:]
    coverage = {}
    for name, info in models.items():
        rf = info["receptive_field"]
        erf_sd = info["summary"].get("erf_std")
        notes = [n for n in (rf.get("note"), info["effective_receptive_field"].get("note")) if n]
        grid = "x".join(map(str, info["target_map_size"]))
        coverage[name] = least_coverage(rf, info["target_map_size"], image_hw)
        add(f"| {info['label']} | `{info['target_layer']}` | {grid} | "
            f"{_pair(rf['size'])} | {_pair(rf['stride'])} | {_pair(rf['padding'])} | "
            f"{_num(coverage[name], 2)} | {_spread(erf_sd, 2) if erf_sd else 'n/a'} | "
            f"{'; '.join(notes)} |")
    add("")
    whole = [models[k]["label"] for k, v in coverage.items() if v == 1.0]
    if whole:
        names = " and ".join([", ".join(whole[:-1]), whole[-1]] if len(whole) > 1 else whole)
        add(f"Every cell of {names} sees the whole {image_hw[0]}x{image_hw[1]} image, so on "
            "this data the size of the theoretical field cannot explain differences in where "
            "the models look" + _erf_range(models) + ".\n")
    add("The hottest cell of each map and the input box it sees, on a few validation images "
        f"(seed {seeds[0]}):\n")
    add(f"![Receptive fields]({fig['receptive_fields']})\n")
    add(f"![Effective receptive fields]({fig['erf']})\n")

    add("## The original study's claims\n")
    add("Each claim becomes tests on measured numbers. A comparison is decided on the paired "
        "per-seed differences: **supported** if every seed's difference points the claimed way "
        f"and the mean difference exceeds {rules['min_effect']}, **contradicted** if every seed "
        "points the other way by that margin, **inconclusive** otherwise. A verdict claim is "
        "supported when the verdict on the means and every seed's verdict agree with it, "
        "contradicted when none does.\n")
    add("| claim | test | measured | per seed | outcome |")
    add("|---|---|---|---|---|")
    for c in m["claims"]:
        if "measured" in c:
            measured, per_seed = c["measured"], ", ".join(c["per_seed"])
        else:
            measured = f"mean difference {_num(c['mean_difference'], 4)}"
            per_seed = ", ".join(_num(d, 4) for d in c["per_seed_difference"])
        add(f"| {c['claim']} | {c['test']} | {measured} | {per_seed} | **{c['outcome']}** |")
    add("")
    add(_conclusion(m))
    add("## Limits of this run\n")
    add(f"- {n_seeds} seed{'s' if n_seeds != 1 else ''}: "
        + ("a single run cannot show spread; differences may be noise."
           if n_seeds == 1 else
           "spreads are over few runs; the paired rule asks every seed to agree."))
    add(f"- {ds['train_size']} training images and {cfg['epochs']} epochs: sized to finish on "
        "two CPU cores; the verdicts describe this regime, not the models in general.")
    h, w = next(iter(models.values()))["target_map_size"]
    add(f"- The target layers' maps are {h}x{w} cells, so statements about where a model looks "
        "are coarse; the upsampled maps interpolate between cells.")
    add("")
    return "\n".join(out) + "\n"


BN_GAP = 0.1  # accuracy points between eval mode and recomputed statistics worth a remark


def _batchnorm_note(models: dict[str, Any]) -> str:
    """What the recomputed-BatchNorm diagnostic says about the eval-mode validation curves."""
    histories = {i["label"]: i["history"] for i in models.values()}
    if not all("val_acc_bn_recomputed" in h for h in histories.values()):
        return ""  # a run from before the diagnostic
    lines = []
    for label, h in histories.items():
        evald, recomputed = np.array(h["val_acc"]), np.array(h["val_acc_bn_recomputed"])
        low = np.flatnonzero(recomputed - evald >= BN_GAP) + 1
        if len(low) == 0:
            continue
        worst = int(np.argmax(recomputed - evald))
        if len(low) == 1:
            span = f"epoch {low[0]}"
        elif low[-1] - low[0] == len(low) - 1:  # a run of consecutive epochs
            span = f"epochs {low[0]}-{low[-1]}"
        else:
            span = f"epochs {', '.join(map(str, low))}"
        lines.append(f"{label}, {span} (epoch {worst + 1}: {evald[worst]:.2f} against "
                     f"{recomputed[worst]:.2f}; last epoch: {evald[-1]:.2f} against "
                     f"{recomputed[-1]:.2f})")
    head = ("Dashed: validation accuracy of the same weights with each BatchNorm layer's "
            "running statistics recomputed over the training images (mean over seeds). It "
            "tells whether the eval-mode curve measures the weights or running statistics "
            "that lag them. ")
    if not lines:
        return head + (f"It stays within {BN_GAP:.2f} of the eval-mode curve for every model "
                       "and epoch, so the curves above measure the weights.")
    return head + (f"The eval-mode accuracy is {BN_GAP:.2f} or more below it for "
                   + "; ".join(lines) + ". Those epochs understate what the weights can do; "
                   "the verdicts use the last epoch.")


def _erf_range(models: dict[str, Any]) -> str:
    """``; the effective fields' standard deviations span a-b px``, or nothing if unknown."""
    sds = [info["summary"]["erf_std"]["mean"] for info in models.values()
           if info["summary"].get("erf_std")]
    if not sds:
        return ""
    return (f"; the effective fields are narrower, with standard deviations of "
            f"{min(sds):.1f}-{max(sds):.1f} px")


def least_coverage(rf: dict[str, Any], cells: list[int], image_hw: list[int]) -> float | None:
    """The smallest share of the image that one cell of the target layer sees.

    Per axis, cell ``i`` sees input rows ``[S i - P, S i - P + r)`` clipped to the image; the
    least share is the product over the axes of the shortest clipped extent over the cells,
    divided by the image's extent. ``None`` when the field is unknown.
    """
    if not rf.get("size"):
        return None
    share = 1.0
    for r, s, p, n, length in zip(rf["size"], rf["stride"], rf["padding"], cells, image_hw):
        seen = [min(s * i - p + r, length) - max(s * i - p, 0) for i in range(n)]
        share *= max(min(seen), 0) / length
    return share


def _conclusion(m: dict[str, Any]) -> str:
    models = m["models"]
    claims = m["claims"]
    counts = {k: sum(c["outcome"] == k for c in claims)
              for k in ("supported", "contradicted", "inconclusive")}
    measured = ", ".join(f"{info['label']} {info['verdict']}" for info in models.values())
    expected = {c.model: c.expected for c in verdict.VERDICT_CLAIMS}
    pattern = all(models[k]["verdict"] == v for k, v in expected.items())
    lines = ["### What the data shows\n"]
    lines.append(f"Measured verdicts: {measured}. " + (
        "This is the original study's pattern (ResNet-18 overfits, MobileNetV2 underfits, "
        "ResNet-10 fits)." if pattern else
        "This is **not** the original study's pattern (ResNet-18 overfits, MobileNetV2 "
        "underfits, ResNet-10 fits)."))
    lines[-1] += (f" Of {len(claims)} tests, {counts['supported']} are supported, "
                 f"{counts['contradicted']} contradicted and {counts['inconclusive']} "
                 "inconclusive:\n")
    by_claim: dict[str, list[str]] = {}
    for c in claims:
        by_claim.setdefault(c["claim"], []).append(c["outcome"])
    for claim, outcomes in by_claim.items():
        if all(o == "supported" for o in outcomes):
            word = "supported"
        elif all(o == "contradicted" for o in outcomes):
            word = "contradicted"
        elif any(o == "contradicted" for o in outcomes) and any(o == "supported"
                                                                for o in outcomes):
            word = "mixed (some tests supported, some contradicted)"
        elif any(o == "contradicted" for o in outcomes):
            word = "not supported (contradicted or inconclusive)"
        elif any(o == "supported" for o in outcomes):
            word = "partly supported (other tests inconclusive)"
        else:
            word = "inconclusive"
        lines.append(f"- *{claim}*: {word}.")
    lines.append("")
    return "\n".join(lines) + "\n"
