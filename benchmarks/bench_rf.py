"""Receptive-field computation time on large models: camkit.receptive_field vs torchscan.

Each (model, tool) runs in a fresh interpreter: build the model (random init, eval), call the
tool once (``first_s``: it includes tracing or hooking), then ``--reps`` more times (median).
torchscan's ``summary(..., receptive_field=True)`` is timed with its printing sent to
/dev/null. A tool that is missing or fails is recorded with its error, not fatal: camkit's
receptive-field module may not exist yet in a given checkout.

    .venv/bin/python benchmarks/bench_rf.py            # four models, 3 reps
    .venv/bin/python benchmarks/bench_rf.py --quick    # resnet152 only, 1 rep
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
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
MODELS = ["resnet152", "densenet201", "efficientnet_b7", "convnext_large"]
TOOLS = ["camkit", "torchscan"]
#: The layer whose receptive field is reported next to the timing (both tools' value); other
#: models use the layer camkit's Grad-CAM would pick.
PROBE = {
    "resnet152": "layer4",
    "densenet201": "features",
    "efficientnet_b7": "features",
    "convnext_large": "features",
}


def _camkit(model, size):
    import camkit

    def run():
        return camkit.receptive_field(model, input_size=(3, size, size))

    def probe(result, layer):
        field = result[layer]
        return {"size": _first(field.size), "stride": _first(field.stride),
                "padding": _first(field.padding)}

    return run, probe


def _torchscan(model, size):
    from torchscan import summary

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            return summary(model, (3, size, size), receptive_field=True)

    def probe(report, layer):
        return _torchscan_probe(report, layer)

    return run, probe


def _default_layer(model) -> str:
    """The target layer camkit picks for ``model`` (outside the timed calls)."""
    import camkit

    return camkit.GradCAM(model).layer


def _first(value):
    """First axis of a per-axis value (or the value itself)."""
    if isinstance(value, (tuple, list)):
        return value[0]
    return value


def _torchscan_probe(report, layer):
    """torchscan's receptive field of ``layer``, if its report has one.

    torchscan 0.2 reports each leaf module's own extent (a 7x7 stride-2 conv: 7 / 2 / 3), not
    the field in input pixels, and nothing for containers such as ``layer4``: ``None`` then.
    """
    for entry in report["layers"]:
        if entry["path"] == layer:
            metrics = entry["metrics"]
            keys = ("receptive_field", "effective_stride", "effective_padding")
            if all(k in metrics for k in keys):
                size, stride, padding = (metrics[k]["value"] for k in keys)
                return {"size": size, "stride": stride, "padding": padding}
    return None


def run_one(model_name: str, tool: str, size: int, reps: int, threads: int) -> dict:
    """In this process: build, time, and report one (model, tool)."""
    import torch
    import torchvision
    from _worker import hwm_mib, loadavg, reset_peak, rss_mib

    torch.set_num_threads(threads)
    record = {"model": model_name, "tool": tool, "size": size, "load_before": loadavg()}
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    try:
        run, probe = {"camkit": _camkit, "torchscan": _torchscan}[tool](model, size)
        reset_peak()
        baseline = rss_mib()
        start = time.perf_counter()
        result = run()
        record["first_s"] = time.perf_counter() - start
        record["peak_mib"] = hwm_mib() - baseline
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - start)
        record["times_s"] = times
        layer = PROBE.get(model_name) or _default_layer(model)
        try:
            record["probe"] = {"layer": layer, **(probe(result, layer) or {})}
        except Exception as err:  # the value is informative only
            record["probe"] = {"layer": layer, "error": repr(err)}
        record["ok"] = True
    except Exception as err:
        record.update(ok=False, error=f"{type(err).__name__}: {err}")
    record["load_after"] = loadavg()
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if args.one:
        print(json.dumps(run_one(*args.one, args.size, reps, args.threads)))
        return
    models = args.models or (["resnet152"] if args.quick else MODELS)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    records = []
    for model_name in models:
        for tool in TOOLS:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", model_name, tool, "--reps", str(reps),
                 "--size", str(args.size), "--threads", str(args.threads)],
                capture_output=True, text=True, env=env, check=False,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if lines:
                record = json.loads(lines[-1])
            else:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                record = {"model": model_name, "tool": tool, "ok": False, "error": tail[0]}
            records.append(record)
            print(_line(record), flush=True)
    tag = "rf_quick" if args.quick else "rf"
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"started": dt.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
            "size": args.size, "reps": reps}
    with open(os.path.join(RESULTS, tag + ".json"), "w") as handle:
        json.dump({"meta": meta, "records": records}, handle, indent=1)
    text = markdown(meta, records)
    with open(os.path.join(RESULTS, tag + ".md"), "w") as handle:
        handle.write(text)
    print(text)


def _line(r: dict) -> str:
    if not r.get("ok"):
        return f"{r['model']} {r['tool']}: not available ({r.get('error')})"
    return (f"{r['model']} {r['tool']}: first {r['first_s']:.2f} s, median "
            f"{statistics.median(r['times_s']):.2f} s, +{r['peak_mib']:.0f} MiB, "
            f"probe {r.get('probe')}")


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [
        f"Receptive-field run of {meta['started']}, {meta['size']} px input, "
        f"{meta['threads']} threads, median of {meta['reps']} calls after a first one.",
        "",
        "| model | tool | first call s | median s | peak MiB | RF of probe layer (size / stride / "
        "padding) | load 1 min |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in records:
        if not r.get("ok"):
            lines.append(f"| {r['model']} | {r['tool']} | n/a | n/a | n/a | "
                         f"{r.get('error', '')[:90]} | |")
            continue
        probe = r.get("probe") or {}
        if "error" in probe:
            value = "error: " + probe["error"][:60]
        elif probe.get("size") is None:
            value = f"{probe.get('layer')}: not reported"
        else:
            value = (f"{probe['layer']}: {probe['size']} / {probe.get('stride')} / "
                     f"{probe.get('padding')}")
        median = statistics.median(r["times_s"]) if r["times_s"] else float("nan")
        lines.append(
            f"| {r['model']} | {r['tool']} | {r['first_s']:.2f} | {median:.2f} | "
            f"{r['peak_mib']:.0f} | {value} | {max(r['load_before'][0], r['load_after'][0]):.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
