"""Explaining a whole dataset: streamed to shards, resumable, spread over processes.

:func:`explain_dataset` runs a CAM over every image of a map-style dataset and writes, under
``out``:

* ``manifest.json``: what produced the folder (arguments, model digest, dataset length);
* ``shards/shard-NNNNN.{maps,raw}.npy``: the maps, ``(rows, H, W)``, one file per shard
  (absent for ``keep="stats"``), and ``shards/shard-NNNNN.npz``: the shard's per-image records
  and partial sums;
* ``index.json``: one record per image (dataset index, shard, row, label, prediction,
  target, score, focus, entropy, whether the map is all zero), in dataset-index order;
* ``aggregates.json``, ``class_mean_maps.npy``, ``misclassified_maps.npy``: per-class mean maps
  at a fixed size and focus statistics, and the images the model gets wrong with their maps;
* ``report.md`` (plus figures when matplotlib is installed).

:func:`load_explanations` reads such a folder back.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from camkit import metrics
from camkit._dataset_callables import describe_callable, without_digests
from camkit._dataset_dist import Group, join_group
from camkit._dataset_index import AGGREGATES, CLASS_MEANS, INDEX, MISCLASSIFIED, build_index
from camkit._dataset_io import ShardFiles, ShardWriter
from camkit._dataset_manifest import (
    FORMAT,
    check_or_create,
    fingerprint,
    image_probe,
    library_version,
    model_digest,
)
from camkit._dataset_plan import Plan, Source, default_shard_size, resolve_source
from camkit._dataset_report import write_report
from camkit.cam import CAM
from camkit.errors import CamkitError

__all__ = ["DatasetExplanations", "explain_dataset", "load_explanations"]

#: What ``targets`` may be for :func:`explain_dataset`.
DatasetTargets = str | int | Callable[[torch.Tensor], torch.Tensor]

_KEEP = ("maps", "raw", "stats")
_MAP_DTYPES = ("float16", "float32")


# --------------------------------------------------------------------------- reading back
class DatasetExplanations:
    """The results of :func:`explain_dataset` in a folder, read back lazily.

    Attributes
    ----------
    out
        The folder.
    info
        The index's header: format, fingerprint, layer, arguments, shapes, shard list.
    records
        Per-image columns as NumPy arrays, in dataset-index order: ``index``, ``shard``,
        ``row``, ``label`` (-1 if the data has none), ``pred`` (the top class), ``target``
        (the explained class, -1 for callable targets), ``score`` (the explained logit),
        ``degenerate``, ``focus`` and ``entropy`` (NaN for an all-zero map).
    aggregates
        The contents of ``aggregates.json``: ``classes``, ``per_class`` statistics,
        ``overall`` and the ``misclassified`` images.
    """

    def __init__(self, out: Path, info: dict[str, Any], records: dict[str, np.ndarray],
                 aggregates: dict[str, Any]) -> None:
        self.out = out
        self.info = info
        self.records = records
        self.aggregates = aggregates

    def __len__(self) -> int:
        return len(self.records["index"])

    def __repr__(self) -> str:
        return (f"DatasetExplanations(out={str(self.out)!r}, images={len(self)}, "
                f"layer={self.layer!r}, keep={self.keep!r})")

    @property
    def layer(self) -> str:
        """Dotted name of the explained layer."""
        return self.info["layer"]

    @property
    def keep(self) -> str:
        """What was stored per image: ``"maps"``, ``"raw"`` or ``"stats"``."""
        return self.info["arguments"]["keep"]

    @property
    def class_mean_maps(self) -> np.ndarray:
        """``(C, h, w)`` float32 mean map of each class in ``aggregates["classes"]``."""
        return np.load(self.out / CLASS_MEANS)

    @property
    def misclassified(self) -> np.ndarray:
        """Dataset indices of the images whose prediction differs from their label."""
        return np.asarray([r["index"] for r in self.aggregates["misclassified"]], np.int64)

    @property
    def misclassified_maps(self) -> np.ndarray:
        """``(M, h, w)`` float32 fixed-size maps of :attr:`misclassified`, in that order."""
        return np.load(self.out / MISCLASSIFIED)

    def rows(self, indices: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions in :attr:`records` of the given dataset indices."""
        wanted = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        known = self.records["index"]
        found = np.searchsorted(known, wanted)
        bad = (found >= len(known)) | (known[np.minimum(found, len(known) - 1)] != wanted)
        if bad.any():
            raise CamkitError(
                f"dataset index {int(wanted[bad][0])} was not explained in {self.out}; "
                f"explained indices run from {int(known[0])} to {int(known[-1])} "
                f"({len(known)} images)."
            )
        return found

    def maps(self, indices: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored maps (or raw maps) of the given dataset indices, as float32.

        Returns
        -------
        numpy.ndarray
            ``(len(indices), H, W)``; ``(H, W)`` for a single int index.
        """
        if self.keep == "stats":
            raise CamkitError(
                f"{self.out} was written with keep='stats': no maps were stored. Run "
                "explain_dataset with keep='maps' (or 'raw') into another folder."
            )
        positions = self.rows(indices)
        shards, rows = self.records["shard"][positions], self.records["row"][positions]
        result = np.empty((len(positions), *self.info["map_shape"]), dtype=np.float32)
        for shard in np.unique(shards).tolist():
            stored = np.load(self.out / self.info["shards"][shard]["maps"], mmap_mode="r")
            chosen = shards == shard
            result[chosen] = stored[rows[chosen]]
        return result[0] if np.ndim(indices) == 0 else result


def load_explanations(out: str | os.PathLike[str]) -> DatasetExplanations:
    """Read the results that :func:`explain_dataset` wrote to ``out``.

    Parameters
    ----------
    out
        The folder given to :func:`explain_dataset`.

    Returns
    -------
    DatasetExplanations
    """
    out = Path(out)
    index_path = out / INDEX
    if not index_path.is_file():
        hint = (
            "the run did not finish; run explain_dataset again with the same arguments to "
            "complete it" if (out / "manifest.json").is_file()
            else "it is not an explain_dataset output folder"
        )
        raise CamkitError(f"{out} holds no {INDEX}: {hint}.")
    info = json.loads(index_path.read_text())
    if info.get("format") != FORMAT:
        raise CamkitError(f"{index_path} has format {info.get('format')!r}, expected {FORMAT!r}.")
    images = info.pop("images")
    records: dict[str, np.ndarray] = {}
    for name, dtype in (("index", np.int64), ("shard", np.int64), ("row", np.int64),
                        ("label", np.int64), ("pred", np.int64), ("target", np.int64),
                        ("score", np.float32), ("degenerate", np.bool_),
                        ("focus", np.float32), ("entropy", np.float32)):
        values = [r[name] for r in images]
        if dtype is np.float32:
            values = [np.nan if v is None else v for v in values]
        records[name] = np.asarray(values, dtype=dtype)
    aggregates = json.loads((out / AGGREGATES).read_text())
    return DatasetExplanations(out, info, records, aggregates)


# --------------------------------------------------------------------------- the run
def explain_dataset(
    cam: CAM,
    data: Dataset | DataLoader,
    out: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    targets: DatasetTargets = "pred",
    keep: str = "maps",
    shard_size: int | None = None,
    map_dtype: str = "float16",
    aggregate_size: int | tuple[int, int] = 32,
    report: bool = True,
    progress: bool | None = None,
) -> DatasetExplanations:
    """Explain every image of a dataset, streaming the results to shards under ``out``.

    The run is resumable and can be spread over processes: a run interrupted for any reason
    keeps the shards it finished (each is written under a temporary name and renamed when
    complete); calling again with the same arguments computes only the missing shards, and
    the folder then holds exactly the bytes an uninterrupted run writes. Under ``torchrun``
    (or with a ``torch.distributed`` process group initialised), shard ``k`` is computed by
    rank ``k % world_size`` and rank 0 writes the index once all are done; the files are the
    same as a single-process run's.

    Parameters
    ----------
    cam
        A CAM (``GradCAM(model, ...)``), with the model on the device to compute on.
    data
        A map-style :class:`~torch.utils.data.Dataset` yielding ``(image, label)`` (or just
        images), or a :class:`~torch.utils.data.DataLoader` over one: its collate function,
        workers and batch size are reused, its order is not (images are explained in
        ascending index; a subset sampler limits which, a ``DistributedSampler`` counts as
        the whole dataset, and a sampler drawing with replacement is refused).
    out
        Folder for the results: new, empty, or holding a previous run of the same arguments.
    batch_size
        Images per CAM call (default: the DataLoader's, else 32). Peak memory is about that
        of one call plus two batches waiting to be written.
    num_workers
        DataLoader worker processes (default: the DataLoader's, else 0).
    targets
        ``"pred"`` (each image's top class), ``"label"`` (its label), an int (that class for
        every image) or a callable ``f(output) -> (N,)`` scores (see :class:`~camkit.GradCAM`).
    keep
        What is stored per image besides its record: ``"maps"`` (the ``(H, W)`` maps at the
        input's size, in ``[0, 1]``), ``"raw"`` (the layer-resolution maps before scaling,
        float32) or ``"stats"`` (records only).
    shard_size
        Images per shard (default: about 1024, a whole number of batches). The unit of
        resumption and of distribution.
    map_dtype
        ``"float16"`` (default) or ``"float32"``: how ``keep="maps"`` stores maps.
    aggregate_size
        Size ``h`` or ``(h, w)`` of the per-class mean maps and of the stored maps of
        misclassified images; maps are area-averaged (adaptive average pooling) to it.
    report
        Write ``report.md`` (with figures if matplotlib is installed).
    progress
        Show a tqdm progress bar (rank 0 only): ``None`` when stderr is a terminal and tqdm
        is installed, ``True`` whenever tqdm is installed, ``False`` never.

    Returns
    -------
    DatasetExplanations
        The results read back from ``out`` (on every rank).

    Notes
    -----
    The per-class aggregates group images by the explained class (``target``), or by label
    when ``targets`` is a callable. ``out`` is refused when it holds results of different
    arguments, model parameters, dataset type or length, or camkit version; the model's
    device is not part of that check, but results computed on different devices may differ
    in the last bits.
    """
    if not isinstance(cam, CAM):
        hint = " Wrap the model: explain_dataset(GradCAM(model), ...)." if isinstance(
            cam, torch.nn.Module) else ""
        raise CamkitError(f"cam must be a camkit CAM (GradCAM, GradCAMPlusPlus), got "
                          f"{type(cam).__name__}.{hint}")
    source = resolve_source(data, batch_size, num_workers)
    targets_text = _check_targets(targets)
    keep = _choice(keep, _KEEP, "keep")
    map_dtype = _choice(map_dtype, _MAP_DTYPES, "map_dtype")
    small_shape = _pair(aggregate_size, "aggregate_size")
    shard_size = default_shard_size(source.batch_size) if shard_size is None else shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise CamkitError(f"shard_size={shard_size!r}; expected a positive integer.")
    plan = Plan(len(source.positions), shard_size, source.batch_size)
    out = Path(out)
    device = _model_device(cam)

    with join_group(device) as group:
        first_image = _first_image(source)
        _resolve_layer(cam, first_image)
        description = {
            "camkit": library_version(),
            "method": f"{type(cam).__module__}.{type(cam).__qualname__}",
            "layer": cam.layer,
            "output": cam.output if isinstance(cam.output, (int, str, type(None)))
            else describe_callable(cam.output),
            "reshape": describe_callable(cam.reshape),
            "model": {"class": f"{type(cam.model).__module__}.{type(cam.model).__qualname__}",
                      "digest": model_digest(cam.model)},
            "dataset": {
                "class": f"{type(source.dataset).__module__}.{type(source.dataset).__qualname__}",
                "length": len(source.dataset),
                "images": plan.num_images,
                "subset": _digest(source.positions) if source.subset else None,
                **_dataset_settings(source.dataset),
            },
            "batch_size": plan.batch_size,
            "shard_size": plan.shard_size,
            "targets": targets_text,
            "keep": keep,
            "map_dtype": map_dtype if keep == "maps" else None,
            "aggregate_size": list(small_shape),
        }
        key = fingerprint(description)
        _agree(group, fingerprint(without_digests(description)))
        failure: BaseException | None = None
        if group.rank == 0:
            try:
                check_or_create(out, description, image_probe(first_image))
            except Exception as err:  # every rank must hear of it, or the others wait
                failure = err
        error = group.broadcast(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if error is not None:
            raise CamkitError(error)

        files = ShardFiles(out, keep)
        files.folder.mkdir(exist_ok=True)
        settings = _Settings(targets, keep, np.dtype(map_dtype) if keep == "maps"
                             else np.dtype(np.float32), small_shape)
        try:
            _run_rank(cam, source, plan, files, settings, group, device, progress)
        except BaseException as err:
            failure = err
        statuses = group.all_gather(None if failure is None else _summary(failure))
        if failure is not None:
            raise failure
        _raise_for_peers(statuses)

        if group.rank == 0:
            header = {"format": FORMAT, "fingerprint": key, "layer": cam.layer,
                      "group_by": "label" if callable(targets) else "target",
                      "arguments": description}
            try:
                aggregates = build_index(out, files, plan, header, small_shape,
                                         _class_names(source.dataset))
                if report:
                    write_report(out, header, aggregates, _image_loader(source), plots=True)
            except BaseException as err:
                failure = err
        statuses = group.broadcast(None if failure is None else _summary(failure))
        if failure is not None:
            raise failure
        _raise_for_peers([statuses])
    return load_explanations(out)


@dataclass(frozen=True)
class _Settings:
    """What each batch needs to know about the run."""

    targets: DatasetTargets
    keep: str
    map_dtype: np.dtype
    small_shape: tuple[int, int]


class _Batches:
    """The batch sampler of one rank: lists of dataset indices, computed lazily from the plan."""

    def __init__(self, plan: Plan, shards: list[int], positions: np.ndarray) -> None:
        self.plan, self.shards, self.positions = plan, shards, positions

    def tagged(self) -> Iterator[tuple[int, bool, list[int]]]:
        for shard, last, rows in self.plan.batches(self.shards):
            yield shard, last, self.positions[rows.start : rows.stop].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (indices for _, _, indices in self.tagged())

    def __len__(self) -> int:
        size = self.plan.batch_size
        return sum(-(-len(self.plan.shard_range(s)) // size) for s in self.shards)


def _run_rank(cam: CAM, source: Source, plan: Plan, files: ShardFiles, settings: _Settings,
              group: Group, device: torch.device, progress: bool | None) -> None:
    """Compute this rank's unfinished shards."""
    mine = plan.shards_of(group.rank, group.world_size)
    pending = [s for s in mine if not files.done(s)]
    for shard in pending:
        files.clear_temporaries(shard)
    if not pending:
        return
    batches = _Batches(plan, pending, source.positions)
    loader = source.loader(batches, pin_memory=device.type == "cuda")
    total = sum(len(plan.shard_range(s)) for s in pending)
    bar = _progress_bar(total, progress, group)
    writer = ShardWriter(files, {s: len(plan.shard_range(s)) for s in pending},
                         settings.map_dtype, settings.small_shape)
    image_size = None
    try:
        for (shard, last, indices), batch in zip(batches.tagged(), loader):
            payload = _explain_batch(cam, batch, indices, settings)
            if image_size is None:
                image_size = payload["image_size"]
            elif payload["image_size"] != image_size:
                raise CamkitError(
                    f"images of dataset indices {indices[0]}..{indices[-1]} have size "
                    f"{payload['image_size']}, earlier ones {image_size}; all images must "
                    "have one size: resize them in the dataset's transform."
                )
            writer.put(shard, last, payload)
            if bar is not None:
                bar.update(len(indices))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


def _explain_batch(cam: CAM, batch: Any, indices: list[int], settings: _Settings) -> dict:
    images, labels = _split_batch(batch, len(indices))
    if settings.targets == "label":
        if labels is None:
            raise CamkitError(
                "targets='label' but the data yields no integer class labels (expected "
                "(image, label) pairs with one int label per image); use targets='pred'."
            )
        chosen: Any = labels
    elif settings.targets == "pred":
        chosen = None
    else:
        chosen = settings.targets
    result = cam(images, chosen)
    maps = result.maps
    if maps.ndim != 3:
        raise CamkitError(
            f"the targets callable gave {tuple(result.scores.shape)} scores; explain_dataset "
            "explains one score per image: return (N,) scores."
        )
    device, n = maps.device, maps.shape[0]
    missing = torch.full((n,), -1, dtype=torch.long, device=device)
    output = result.output
    pred = output.argmax(dim=1) if output.ndim == 2 else missing
    target = result.targets if result.targets is not None else missing
    label = labels.to(device) if labels is not None else missing
    small = F.interpolate(maps[:, None], size=settings.small_shape, mode="area")[:, 0]
    payload: dict[str, Any] = {
        "index": np.asarray(indices, dtype=np.int64),
        "label": label,
        "pred": pred,
        "target": target,
        "score": result.scores,
        "degenerate": result.degenerate,
        "focus": metrics.focus_share(maps),
        "entropy": metrics.entropy(maps),
        "group": torch.where(target >= 0, target, label),
        "small": small,
        "image_size": tuple(maps.shape[-2:]),
        "num_outputs": output.shape[1] if output.ndim == 2 else 0,
    }
    if settings.keep == "maps":
        payload["kept"] = maps
    elif settings.keep == "raw":
        payload["kept"] = result.raw.float()
    return payload


def _split_batch(batch: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], _labels(batch[1], n) if len(batch) > 1 else None
    raise CamkitError(
        f"the data yields {type(batch).__name__} batches; expected an images tensor or an "
        "(images, labels) pair. Give the dataset a transform that returns (tensor, int)."
    )


def _labels(value: Any, n: int) -> torch.Tensor | None:
    """One integer label per image, or ``None`` when the second item is something else.

    Labels stored as one-element tensors (``torch.tensor([3])``) collate to ``(n, 1)``;
    they are read as ``(n,)``.
    """
    try:
        labels = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.ndim == 2 and labels.shape == (n, 1):
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.is_floating_point \
            or labels.dtype in (torch.bool, torch.complex64, torch.complex128):
        return None
    return labels.long()


# --------------------------------------------------------------------------- small helpers
def _check_targets(targets: Any) -> str:
    if isinstance(targets, str):
        if targets not in ("pred", "label"):
            raise CamkitError(
                f"targets={targets!r}; expected 'pred', 'label', a class index or a callable."
            )
        return targets
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        if targets < 0:
            raise CamkitError(f"targets={targets}; a class index must be >= 0.")
        return f"class {int(targets)}"
    if callable(targets):
        return f"callable {describe_callable(targets)}"
    raise CamkitError(
        f"targets of type {type(targets).__name__}; expected 'pred', 'label', a class index "
        "(int) or a callable f(output) -> (N,) scores."
    )


def _choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise CamkitError(
            f"{name}={value!r}; expected one of {', '.join(map(repr, allowed))}."
        )
    return value


def _pair(value: Any, name: str) -> tuple[int, int]:
    items = (value, value) if isinstance(value, (int, np.integer)) else tuple(value) \
        if isinstance(value, (tuple, list)) else ()
    if len(items) != 2 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in items
    ):
        raise CamkitError(f"{name}={value!r}; expected a positive int or a pair (h, w).")
    return int(items[0]), int(items[1])


def _digest(positions: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(positions, dtype=np.int64).tobytes()).hexdigest()


def _dataset_settings(dataset: Any) -> dict[str, Any]:
    """What a dataset made by camkit itself (the command line's) says about its contents.

    Such a dataset has a ``_camkit_settings()`` method returning JSON-serialisable values
    (which files, which preprocessing), so that a rerun on other images or with other
    preprocessing is refused rather than resumed. Other datasets add nothing.
    """
    describe = getattr(dataset, "_camkit_settings", None)
    return {"settings": describe()} if callable(describe) else {}


def _model_device(cam: CAM) -> torch.device:
    for tensor in (*cam.model.parameters(), *cam.model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _first_image(source: Source) -> torch.Tensor:
    """The first image to be explained, as the dataset and its collate function give it."""
    first = int(source.positions[0])
    collate = source.loader_kwargs.get("collate_fn") or default_collate
    images, _ = _split_batch(collate([source.dataset[first]]), 1)
    return images


def _resolve_layer(cam: CAM, first_image: torch.Tensor) -> None:
    """Make ``cam.layer`` the layer of this data's image size (and check that one image
    goes through) before anything is written."""
    cam(first_image)


def _agree(group: Group, key: str) -> None:
    keys = group.all_gather(key)
    if len(set(keys)) > 1:
        odd = [rank for rank, k in enumerate(keys) if k != keys[0]]
        raise CamkitError(
            f"the ranks disagree on the run (model parameters, dataset or arguments differ "
            f"between rank 0 and rank(s) {odd}); every rank must make the same call."
        )


def _summary(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _raise_for_peers(statuses: list[str | None]) -> None:
    for rank, status in enumerate(statuses):
        if status is not None:
            raise CamkitError(
                f"rank {rank} failed ({status}); the shards finished so far are kept: run "
                "again with the same arguments to resume."
            )


def _progress_bar(total: int, progress: bool | None, group: Group) -> Any:
    if group.rank != 0 or progress is False:
        return None
    if progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    desc = "camkit" if group.world_size == 1 else f"camkit rank 0/{group.world_size}"
    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)


def _class_names(dataset: Any) -> dict[int, str]:
    names = getattr(dataset, "classes", None)
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return dict(enumerate(names))
    return {}


def _image_loader(source: Source) -> Callable[[int], Any]:
    collate = source.loader_kwargs.get("collate_fn") or default_collate

    def load(index: int) -> Any:
        images, _ = _split_batch(collate([source.dataset[index]]), 1)
        return images[0]

    return load
