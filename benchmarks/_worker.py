"""Run one benchmark configuration in a process of its own.

Two ways to get a fresh process per configuration:

``python benchmarks/_worker.py --config JSON``
    a new interpreter (pays ``import torch`` every time);
``python benchmarks/_worker.py --serve``
    a "zygote": it imports torch and the peers once, then, for each JSON request read on
    stdin, forks a child that builds the model and runs the configuration. The child starts
    with no tensor allocated, so its heap and page-fault behaviour are those of a new process;
    the imports are shared copy-on-write. The zygote itself never runs a tensor operation
    (a forked child of a process that started OpenMP threads could hang).

glibc reads ``MALLOC_*`` settings when the process starts, so each allocator setting needs a
zygote of its own, started with that environment.

A configuration (``kind: "time"``) measures, after building the model and warming the runner
on one image:

* ``peak_mib``: the growth of the resident set's high-water mark over the baseline (reset via
  ``/proc/self/clear_refs`` = 5, read from ``VmHWM``) across the first full-batch call and the
  timed calls; ``peak_first_mib`` for the first call alone;
* ``first_s`` (the first full-batch call, which faults its memory in) and ``times_s``;
* minor page faults, user and system (kernel) CPU seconds per timed call (``getrusage``);
  the kernel time is where page faults are paid, and it does not depend on other processes'
  load the way wall time does;
* how much of the two cores other processes used meanwhile (``/proc/stat`` busy time minus
  this process's CPU time, plus steal), and the load averages before and after.

``kind: "check"`` compares camkit's maps with each peer's on one batch (max-abs-diff, at the
input size and at the layer's resolution).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_MIB = 1024 * 1024


# --------------------------------------------------------------------------- /proc readers
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset this process's resident-set high-water mark to its current size."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def hwm_mib() -> float:
    return _status_kib("VmHWM") / 1024


def loadavg() -> list[float]:
    with open("/proc/loadavg") as handle:
        return [float(v) for v in handle.read().split()[:3]]


def _cpu_snapshot() -> tuple[float, float, float, float]:
    """(wall, machine busy seconds, machine steal seconds, this process's CPU seconds)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (
        time.perf_counter(),
        (user + nice + system + irq + softirq) / _CLOCK_TICKS,
        steal / _CLOCK_TICKS,
        usage.ru_utime + usage.ru_stime,
    )


def _outside_share(start, end) -> tuple[float, float]:
    """Shares of the machine's CPU time used by other processes, and stolen by the host."""
    wall = max(end[0] - start[0], 1e-9) * os.cpu_count()
    outside = (end[1] - start[1]) - (end[3] - start[3])
    return max(outside, 0.0) / wall, (end[2] - start[2]) / wall


# --------------------------------------------------------------------------- configurations
def run_timing(cfg: dict) -> dict:
    import _runners
    import torch

    torch.set_num_threads(cfg["threads"])
    load_before = loadavg()
    model = _runners.build_model(cfg["model"])
    layer = _runners.TARGET_LAYERS[cfg["model"]]
    runner = _runners.make_runner(cfg["competitor"], cfg["method"], model, layer, cfg["size"])
    images, targets = _runners.make_inputs(cfg["batch"], cfg["size"])
    one_image, one_target = images[:1].clone(), targets[:1].clone()

    runner(one_image, one_target)  # warm up on a small input only
    gc.collect()
    reset_peak()
    baseline = rss_mib()

    cpu_start = _cpu_snapshot()
    start = time.perf_counter()
    out = runner(images, targets)
    first = time.perf_counter() - start
    del out
    peak_first = hwm_mib() - baseline

    times, faults, user, system = [], [], [], []
    for _ in range(cfg["reps"]):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        out = runner(images, targets)
        times.append(time.perf_counter() - start)
        del out
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        user.append(after.ru_utime - before.ru_utime)
        system.append(after.ru_stime - before.ru_stime)
    cpu_end = _cpu_snapshot()
    outside, steal = _outside_share(cpu_start, cpu_end)
    return {
        **cfg,
        "threads_used": torch.get_num_threads(),
        "baseline_rss_mib": baseline,
        "peak_first_mib": peak_first,
        "peak_mib": hwm_mib() - baseline,
        "first_s": first,
        "times_s": times,
        "minor_faults": faults,
        "user_cpu_s": user,
        "sys_cpu_s": system,
        "outside_cpu_share": outside,
        "steal_share": steal,
        "load_before": load_before,
        "load_after": loadavg(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def run_check(cfg: dict) -> dict:
    """Max-abs-diff of camkit's maps against each peer's on the same batch and targets."""
    import _runners
    import torch

    torch.set_num_threads(cfg["threads"])
    model = _runners.build_model(cfg["model"])
    layer = _runners.TARGET_LAYERS[cfg["model"]]
    images, targets = _runners.make_inputs(cfg["batch"], cfg["size"], seed=7)
    method = cfg["method"]

    import camkit

    cls = {"gradcam": camkit.GradCAM, "gradcampp": camkit.GradCAMPlusPlus}[method]
    reference = cls(model, target_layer=layer)(images, targets)
    ref_maps = reference.maps
    ref_layer = _runners.minmax(reference.raw)

    rows = {}
    for peer in ("pytorch-grad-cam", "torchcam", "captum"):
        if not _runners.supports(peer, method):
            continue
        runner = _runners.make_runner(peer, method, model, layer, cfg["size"])
        maps = _as_tensor(runner(images, targets))
        layer_maps = _peer_layer_maps(peer, runner, images, targets, layer, model)
        rows[peer] = {
            "maps_max_abs_diff": float((maps - ref_maps).abs().max()),
            "layer_max_abs_diff": float((_runners.minmax(layer_maps) - ref_layer).abs().max()),
        }
    return {**cfg, "peers": rows, "camkit_degenerate": int(reference.degenerate.sum())}


def _as_tensor(maps):
    import numpy as np
    import torch

    if isinstance(maps, torch.Tensor):
        return maps.detach()
    return torch.from_numpy(np.asarray(maps))


def _peer_layer_maps(peer, runner, images, targets, layer, model):
    """The peer's map at the layer's resolution (ReLU'd, unscaled or self-scaled)."""
    import numpy as np
    import torch

    if peer == "pytorch-grad-cam":
        cam = runner.extractor  # activations and gradients of the call just made
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(images, model.get_submodule(layer), None, acts, grads)
        return torch.as_tensor(np.maximum(raw, 0))
    if peer == "torchcam":
        with torch.enable_grad():
            scores = model(images)
            return runner.extractor(class_idx=targets.tolist(), scores=scores)[0].detach()
    return runner.explainer.attribute(images, target=targets, relu_attributions=True)[:, 0].detach()


def run(cfg: dict) -> dict:
    kind = cfg.get("kind", "time")
    try:
        result = run_timing(cfg) if kind == "time" else run_check(cfg)
        result["ok"] = True
    except Exception:  # reported to the driver, which records and goes on
        result = {**cfg, "ok": False, "error": traceback.format_exc()}
    return result


def _write(result: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle)


# --------------------------------------------------------------------------- process modes
def serve() -> None:
    """Fork one child per request line; report ``pid`` and then ``done`` per request."""
    import _runners  # noqa: F401
    import torch  # noqa: F401  (imports only: no tensor op may run in the zygote)
    import torchvision  # noqa: F401

    import camkit  # noqa: F401

    for name in ("pytorch_grad_cam", "torchcam.methods", "captum.attr"):
        __import__(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cfg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)  # the child's chatter must not mix with the protocol
            code = 0
            try:
                _write(run(cfg), cfg["out"])
            except BaseException:
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"done": os.waitstatus_to_exitcode(status)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--serve", action="store_true", help="fork a child per stdin request")
    group.add_argument("--config", help="run one JSON configuration in this process")
    args = parser.parse_args()
    if args.serve:
        serve()
    else:
        cfg = json.loads(args.config)
        _write(run(cfg), cfg["out"])


if __name__ == "__main__":
    main()
