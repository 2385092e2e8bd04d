"""Throughput of ``camkit.explain_dataset`` against plain batched inference on the same loader.

    python benchmarks/bench_dataset.py [--images 512] [--size 64] [--batch-size 32]
                                       [--shard-size 128]

Configurations, in images per second (median of ``--repeats``):

* ``forward``: the model over the loader under ``torch.no_grad()`` (plain inference);
* ``cam loop``: ``GradCAM`` called on each batch, results dropped (the compute floor);
* ``explain_dataset`` with 1 process, ``keep="maps"`` (float16) and ``keep="stats"``;
* ``explain_dataset`` with 2 processes (gloo over 127.0.0.1, each with half the threads), timed
  inside the processes from a barrier to the end of the call (start-up excluded).

Shards are the unit of distribution, so ``--shard-size`` (default four batches) is kept well
below ``--images``: with the library's default of about 1024 images a 512-image run is one
shard, and the second process would have nothing to do.

The single-process configurations are interleaved (A B C D A B C D ...) so drift in the
machine's load hits all of them; the load average is printed before and after. The model is
torchvision's ResNet-18 (``weights=None``) on random images; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset


def build(num_images: int, size: int, seed: int = 0):
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (num_images,), generator=g)
    return model, TensorDataset(images, labels)


def time_forward(model, loader) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for images, _ in loader:
            model(images)
    return time.perf_counter() - start


def time_cam_loop(cam, loader) -> float:
    start = time.perf_counter()
    for images, _ in loader:
        cam(images)
    return time.perf_counter() - start


def time_explain(cam, dataset, batch_size: int, shard_size: int, keep: str, out: Path) -> float:
    from camkit.dataset import explain_dataset

    start = time.perf_counter()
    explain_dataset(cam, dataset, out, batch_size=batch_size, shard_size=shard_size, keep=keep,
                    progress=False, report=False)
    return time.perf_counter() - start


def _rank(rank: int, world: int, port: int, args, root: str, results) -> None:
    import torch.distributed as dist

    from camkit import GradCAM

    torch.set_num_threads(max(1, args.threads // world))
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model, dataset = build(args.images, args.size)
        cam = GradCAM(model, target_layer="layer4")
        cam(dataset[0][0][None])  # resolve the layer, warm up
        times = []
        for repeat in range(args.repeats):
            out = Path(root) / f"two-{repeat}"
            dist.barrier()
            times.append(time_explain(cam, dataset, args.batch_size, args.shard_size, "maps",
                                      out))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(out)
        results.put((rank, times))
    finally:
        dist.destroy_process_group()


def two_processes(args, root: Path) -> list[float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(_rank, args=(2, port, args, str(root), results), nprocs=2, join=True)
    per_rank = dict(results.get() for _ in range(2))
    # A repeat lasts as long as its slowest rank.
    return [max(pair) for pair in zip(per_rank[0], per_rank[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=None,
                        help="images per shard (default: four batches)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-two", action="store_true", help="skip the 2-process runs")
    args = parser.parse_args()
    if args.shard_size is None:
        args.shard_size = 4 * args.batch_size
    torch.set_num_threads(args.threads)

    from camkit import GradCAM

    model, dataset = build(args.images, args.size)
    cam = GradCAM(model, target_layer="layer4")
    loader = DataLoader(dataset, batch_size=args.batch_size)
    cam(dataset[0][0][None])
    time_forward(model, [next(iter(loader))])  # warm-up

    root = Path(tempfile.mkdtemp(prefix="camkit-bench-"))
    timings: dict[str, list[float]] = {"forward": [], "cam loop": [],
                                       "explain_dataset maps, 1 proc": [],
                                       "explain_dataset stats, 1 proc": []}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        timings["forward"].append(time_forward(model, loader))
        timings["cam loop"].append(time_cam_loop(cam, loader))
        for keep in ("maps", "stats"):
            out = root / f"one-{keep}-{repeat}"
            timings[f"explain_dataset {keep}, 1 proc"].append(
                time_explain(cam, dataset, args.batch_size, args.shard_size, keep, out))
            shutil.rmtree(out)
    if not args.skip_two:
        timings["explain_dataset maps, 2 procs"] = two_processes(args, root)
    load_after = os.getloadavg()
    shutil.rmtree(root, ignore_errors=True)

    print(f"resnet18, {args.images} images 3x{args.size}x{args.size}, batch {args.batch_size}, "
          f"shards of {args.shard_size}, {args.threads} threads in total, "
          f"{args.repeats} repeats")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    floor = statistics.median(timings["cam loop"])
    forward = statistics.median(timings["forward"])
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:32s} {args.images / median:8.1f} img/s  (median {median:.3f} s; "
              f"{median / floor:.2f}x cam loop, {median / forward:.2f}x forward; "
              f"runs {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
