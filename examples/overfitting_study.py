"""Train ResNet-18, MobileNetV2 and ResNet-10 on the same data and explain what they learned.

    python examples/overfitting_study.py                  # embedded Fashion-MNIST, 3 seeds
    python examples/overfitting_study.py --quick          # a one-minute smoke run
    python examples/overfitting_study.py --data-root /usr/share/datasets/fashion-mnist \\
        --train-size 5000 --val-size 2000
    python examples/overfitting_study.py --dataset cifar10 --data-root ~/data --download \\
        --classes cat,dog
    python examples/overfitting_study.py --dataset folder --data-root ~/photos

Writes into ``--out`` (default ``study-output/``): ``learning_curves.png``,
``gradcam_grid.png``, ``map_stats.png``, ``receptive_fields.png``, ``erf.png``,
``metrics.json`` and ``report.md``. The folder appears only when the run is complete.
Bad input ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study.data import DATASETS
from study.errors import StudyInputError

# (train images per seed, validation images, epochs, seeds)
DEFAULTS = {"train_size": 500, "val_size": 300, "epochs": 8, "seeds": 3}
QUICK = {"train_size": 120, "val_size": 100, "epochs": 2, "seeds": 1}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="overfitting_study.py",
                description="The three-model over/under-fitting study with Grad-CAM evidence.")
    p.add_argument("--dataset", default="fmnist", metavar="{" + ",".join(DATASETS) + "}",
                   help="fmnist (default: the embedded subset, or the full IDX files with "
                        "--data-root), cifar10 (torchvision) or folder (an ImageFolder)")
    p.add_argument("--data-root", help="full Fashion-MNIST IDX folder, CIFAR-10 folder, or "
                                       "ImageFolder root")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download CIFAR-10 into --data-root")
    p.add_argument("--classes", help="comma-separated class names to keep, e.g. cat,dog")
    p.add_argument("--image-size", type=_positive, default=64,
                   help="side in pixels for --dataset folder (default 64)")
    p.add_argument("--train-size", type=_positive,
                   help=f"training images per seed (default {DEFAULTS['train_size']}, "
                        f"quick {QUICK['train_size']})")
    p.add_argument("--val-size", type=_positive,
                   help=f"validation images (default {DEFAULTS['val_size']}, "
                        f"quick {QUICK['val_size']})")
    p.add_argument("--epochs", type=_positive,
                   help=f"epochs (default {DEFAULTS['epochs']}, quick {QUICK['epochs']})")
    p.add_argument("--seeds", type=_positive,
                   help=f"number of seeds, run one after another (default {DEFAULTS['seeds']}, "
                        f"quick {QUICK['seeds']})")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=_positive,
                   help="CPU threads for torch (default: the CPUs this process may use)")
    p.add_argument("--out", default="study-output", help="output folder (default study-output)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (about a minute on two cores) that exercises everything")
    return p


def _device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise StudyInputError(
            f"--device {requested!r} is not a torch device; pass cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StudyInputError(f"--device {requested} asked for CUDA, which is not available "
                              "here; pass --device cpu")
    return str(device)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except StudyInputError as exc:
        print(f"overfitting_study.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("overfitting_study.py: interrupted; nothing was written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # Cheap checks first: a bad flag must not cost a torch import or a training run.
    if args.dataset not in DATASETS:
        raise StudyInputError(
            f"unknown dataset {args.dataset!r}; pass --dataset with one of {', '.join(DATASETS)}"
        )
    if args.dataset in ("cifar10", "folder") and args.data_root is None:
        raise StudyInputError(
            f"--dataset {args.dataset} needs --data-root DIR ("
            + ("the folder holding cifar-10-batches-py; add --download to fetch it there)"
               if args.dataset == "cifar10" else
               "a folder with one sub-folder of images per class)")
        )
    from study.output import StagedOutput

    staged = StagedOutput(args.out)
    try:
        from study.data import check_sizes, load_pools, select_classes

        profile = QUICK if args.quick else DEFAULTS
        pick = {k: getattr(args, k) if getattr(args, k) is not None else v
                for k, v in profile.items()}
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        pools = select_classes(
            load_pools(args.dataset, args.data_root, download=args.download,
                       image_size=args.image_size),
            classes,
        )
        check_sizes(pools, pick["train_size"], pick["val_size"])

        import torch  # after the cheap checks: importing torch takes seconds
        from study.run import StudyConfig, python_command, run_study

        device = _device(args.device)
        threads = args.threads or len(os.sched_getaffinity(0))
        cfg = StudyConfig(
            train_size=pick["train_size"], val_size=pick["val_size"], epochs=pick["epochs"],
            seeds=tuple(range(args.seed, args.seed + pick["seeds"])), device=device,
            threads=threads, curve_images=16 if args.quick else 64,
            curve_steps=8 if args.quick else 16, erf_images=8 if args.quick else 32,
            grid_images=6, rf_images=3, quick=args.quick, command=python_command(),
        )
        print(f"{pools.source}: {cfg.train_size} training and {cfg.val_size} validation "
              f"images, {cfg.epochs} epochs, seeds {list(cfg.seeds)}, {device}, "
              f"{threads} threads (torch {torch.__version__})", flush=True)
        run_study(cfg, pools, staged.path)
        out = staged.commit()
    except BaseException:
        staged.discard()
        raise
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s: see {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
