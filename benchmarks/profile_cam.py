"""Where the time and memory of one camkit Grad-CAM call go.

Replays ``camkit.CAM.__call__`` stage by stage with camkit's own (private) pieces, and times
each stage next to a plain no-grad forward, a grad-enabled forward and the public call, all
interleaved in one process per (model, allocator), after a warm-up on one image:

* ``prepare``: ``cam._prepare`` (dtype / device move of the batch);
* ``forward_to_layer``: the forward up to the target layer's hook (no autograd graph);
* ``head``: the rest of the forward, recorded for autograd;
* ``scores``: picking the target logits;
* ``backward``: ``autograd.grad`` from the scores to the layer's activation;
* ``weights``, ``combine`` (weighted sum + ReLU), ``upsample``, ``scale``: the map maths;
* ``resolve``: resolving the target layer on a new ``GradCAM`` (once per object; a dry run
  when the layer is found automatically).

Peak memory per stage is the growth of the resident high-water mark over the resident size
at the start of the stage.

    .venv/bin/python benchmarks/profile_cam.py                 # resnet18, mobilenet_v2, b32
    .venv/bin/python benchmarks/profile_cam.py --batch 8 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# CAMKIT_BENCH_RESULTS redirects the output (the smoke test writes to a temporary folder)
RESULTS = os.environ.get("CAMKIT_BENCH_RESULTS", os.path.join(HERE, "results"))


class _Clock:
    """Stage timer: wall seconds and resident high-water growth per named stage."""

    def __init__(self):
        from _worker import hwm_mib, reset_peak, rss_mib

        self._hwm, self._reset, self._rss = hwm_mib, reset_peak, rss_mib
        self.times: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self._name = None

    def start(self, name):
        self._reset()
        self._base = self._rss()
        self._name = name
        self._t = time.perf_counter()

    def stop(self):
        self.times[self._name] = time.perf_counter() - self._t
        self.peaks[self._name] = self._hwm() - self._base


def staged_call(cam, images, targets, clock):
    """camkit's Grad-CAM call, split into stages (mirrors ``CAM.__call__`` for one layer)."""
    import torch
    import torch.nn.functional as F

    from camkit import cam as cam_module
    from camkit._hooks import LayerCapture, ModelState
    from camkit.targets import select_output, target_scores

    clock.start("prepare")
    x = cam._prepare(images)
    layers = cam._resolve(x[:1])
    clock.stop()
    (name, module), = layers
    marks = {}
    handle = None
    state = ModelState(cam.model)
    try:
        cam.model.eval()
        with torch.inference_mode(False), torch.no_grad(), LayerCapture(layers) as capture:
            # registered after LayerCapture's hook, so it runs right after the capture

            def mark(*_):
                marks["layer"] = (time.perf_counter(), clock._hwm())

            handle = module.register_forward_hook(mark)
            clock.start("forward")
            start = time.perf_counter()
            output = cam.model(x)
            end = time.perf_counter()
            clock.stop()
            clock.times["forward_to_layer"] = marks["layer"][0] - start
            clock.times["head"] = end - marks["layer"][0]
            clock.peaks["forward_to_layer"] = marks["layer"][1] - clock._base
            clock.start("scores")
            scores, _ = target_scores(targets, select_output(output, None))
            clock.stop()
            clock.start("backward")
            activation = capture.activations[name]
            (gradient,) = cam_module._gradients(scores, [activation], [name])
            clock.stop()
    finally:
        if handle is not None:
            handle.remove()
        state.restore()
    a, g = activation.detach(), gradient
    clock.start("weights")
    weights = type(cam).weights(a, g)
    clock.stop()
    clock.start("combine")
    positive = torch.einsum("nc,nchw->nhw", weights, a).clamp(min=0)
    clock.stop()
    clock.start("upsample")
    up = F.interpolate(positive[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                       align_corners=False)[:, 0]
    clock.stop()
    clock.start("scale")
    flat = positive.amax(dim=(-2, -1)) == positive.amin(dim=(-2, -1))
    maps, _ = cam_module._scale(up, flat)
    clock.stop()
    return maps


def run_one(model_name: str, batch: int, size: int, reps: int, threads: int) -> dict:
    import _runners
    import torch

    import camkit

    torch.set_num_threads(threads)
    model = _runners.build_model(model_name)
    layer = _runners.TARGET_LAYERS[model_name]
    images, targets = _runners.make_inputs(batch, size)
    cam = camkit.GradCAM(model, target_layer=layer)
    nograd = _runners.make_runner("forward_nograd", "-", model, layer, size)
    grad = _runners.make_runner("forward_grad", "-", model, layer, size)

    # equality of the replay with the public call (the replay must not drift from cam.py)
    from _worker import hwm_mib, reset_peak, rss_mib

    replay_diff = float((staged_call(cam, images[:2], targets[:2], _Clock())
                         - cam(images[:2], targets[:2]).maps).abs().max())
    start = time.perf_counter()
    fresh = camkit.GradCAM(model, target_layer=layer)
    fresh.layers  # noqa: B018  (resolution happens on first use)
    resolve_s = time.perf_counter() - start
    start = time.perf_counter()
    auto = camkit.GradCAM(model)
    try:
        auto_layer = auto.layer
        auto_resolve_s = time.perf_counter() - start
    except Exception as err:  # the interim layer resolver needs an explicit layer
        auto_layer, auto_resolve_s = f"unavailable: {type(err).__name__}", None

    for fn in (nograd, grad):
        fn(images[:1], targets[:1])
    rows = {"forward_nograd": [], "forward_grad": [], "camkit_call": []}
    stage_times, stage_peaks = {}, {}
    peaks = {"forward_nograd": [], "forward_grad": [], "camkit_call": []}
    for _ in range(reps):
        for label, fn in (("forward_nograd", nograd), ("forward_grad", grad),
                          ("camkit_call", lambda x, t: cam(x, t).maps)):
            reset_peak()
            base = rss_mib()
            start = time.perf_counter()
            out = fn(images, targets)
            rows[label].append(time.perf_counter() - start)
            peaks[label].append(hwm_mib() - base)
            del out
        clock = _Clock()
        start = time.perf_counter()
        out = staged_call(cam, images, targets, clock)
        clock.times["staged_total"] = time.perf_counter() - start
        del out
        for key, value in clock.times.items():
            stage_times.setdefault(key, []).append(value)
        for key, value in clock.peaks.items():
            stage_peaks.setdefault(key, []).append(value)
    med = statistics.median
    return {
        "model": model_name, "batch": batch, "size": size, "reps": reps, "threads": threads,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "replay_max_abs_diff": replay_diff,
        "resolve_explicit_s": resolve_s,
        "resolve_auto_s": auto_resolve_s, "auto_layer": auto_layer,
        "time_s": {k: med(v) for k, v in {**rows, **stage_times}.items()},
        "peak_mib": {k: med(v) for k, v in {**peaks, **stage_peaks}.items()},
        "load": os.getloadavg(),
    }


STAGES = ("prepare", "forward_to_layer", "head", "scores", "backward", "weights", "combine",
          "upsample", "scale")


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        env = " ".join(f"{k}={v}" for k, v in r["malloc_env"].items()) or "default allocator"
        t, p = r["time_s"], r["peak_mib"]
        lines += [
            f"#### {r['model']}, batch {r['batch']}, {r['size']} px, {env} "
            f"(load {r['load'][0]:.2f}; replay vs public call max abs diff "
            f"{r['replay_max_abs_diff']:.1e})",
            "",
            "| part | median s | share of call | peak MiB |",
            "|---|---:|---:|---:|",
        ]
        total = t["staged_total"]
        for key in ("forward_nograd", "forward_grad", "camkit_call", "staged_total", *STAGES):
            share = f"{t[key] / total:.0%}" if key in STAGES else ""
            peak = p.get(key)
            lines.append(f"| {key} | {t[key]:.4f} | {share} | "
                         f"{'' if peak is None else format(peak, '.0f')} |")
        auto = ("n/a" if r["resolve_auto_s"] is None else f"{r['resolve_auto_s']:.3f} s")
        lines += ["", f"Layer resolution: explicit {r['resolve_explicit_s'] * 1e3:.2f} ms; "
                  f"automatic ({r['auto_layer']}) {auto}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    from _pool import ALLOCATORS, worker_env

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS),
                        choices=list(ALLOCATORS))
    parser.add_argument("--tag", default="profile")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.size, args.reps, args.threads)))
        return
    results = []
    for allocator in args.allocators:
        for model in args.models:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", model, "--batch", str(args.batch),
                 "--size", str(args.size), "--reps", str(args.reps),
                 "--threads", str(args.threads)],
                env=worker_env(allocator, args.threads), capture_output=True, text=True,
                check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                print(f"{model} / {allocator} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append({**json.loads(lines[-1]), "allocator": allocator})
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.tag + ".json"), "w") as handle:
        json.dump(results, handle, indent=1)
    text = markdown(results)
    with open(os.path.join(RESULTS, args.tag + ".md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
