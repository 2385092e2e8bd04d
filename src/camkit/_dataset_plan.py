"""What ``explain_dataset`` explains and in which pieces: the data source, shards and batches.

The plan depends only on the dataset and the arguments, never on the number of processes:
shard ``k`` always holds the same images, cut into the same batches, so a shard computed by
any rank of any run has the same content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate

from camkit.errors import CamkitError

__all__ = ["Plan", "Source", "resolve_source"]

DEFAULT_BATCH_SIZE = 32
#: A shard holds about this many images unless ``shard_size`` says otherwise.
DEFAULT_SHARD_IMAGES = 1024


@dataclass(frozen=True)
class Source:
    """A map-style dataset, the positions to explain and how to load them."""

    dataset: Any
    positions: np.ndarray  # int64 dataset indices, ascending, unique
    subset: bool  # True when positions are not simply range(len(dataset))
    batch_size: int
    num_workers: int
    loader_kwargs: dict[str, Any] = field(default_factory=dict)

    def loader(self, batches: Sequence[list[int]], pin_memory: bool) -> DataLoader:
        """A loader that yields exactly ``batches`` (lists of dataset indices), in order."""
        kwargs = dict(self.loader_kwargs)
        kwargs.setdefault("pin_memory", pin_memory)
        return DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers, **kwargs
        )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CamkitError(f"{name}={value!r}; expected a positive integer.")
    return int(value)


def resolve_source(data: Any, batch_size: int | None, num_workers: int | None) -> Source:
    """Turn the user's ``data`` (a Dataset or a DataLoader) into a :class:`Source`.

    For a DataLoader, its dataset, collate function, worker settings and batch size (unless
    given) are reused; its order is not: images are explained in ascending dataset index so
    that the result does not depend on shuffling. A sampler that selects a subset (such as a
    ``SubsetRandomSampler``) limits the images to that subset; a ``DistributedSampler``
    stands for the whole dataset (the work is split over the ranks here); a sampler whose
    passes pick different images (random sampling with replacement) is refused. A loader
    built with ``batch_size=None`` keeps its per-sample ``collate_fn`` and gains batching.
    """
    loader_kwargs: dict[str, Any] = {}
    if isinstance(data, DataLoader):
        dataset = data.dataset
        _check_map_style(dataset, "the DataLoader's dataset")
        if batch_size is None:
            batch_size = data.batch_size or getattr(data.batch_sampler, "batch_size", None)
        if num_workers is None:
            num_workers = data.num_workers
        loader_kwargs = {
            "collate_fn": _batch_collate(data),
            "pin_memory": data.pin_memory,
            "worker_init_fn": data.worker_init_fn,
            "multiprocessing_context": data.multiprocessing_context,
        }
        if data.num_workers > 0 and (num_workers or 0) > 0:
            loader_kwargs["prefetch_factor"] = data.prefetch_factor
        positions, subset = _loader_positions(data, len(dataset))
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        dataset = data
        _check_map_style(dataset, "data")
        positions, subset = np.arange(len(dataset), dtype=np.int64), False
    else:
        raise CamkitError(
            f"data must be a torch Dataset (with __len__ and __getitem__) or a DataLoader, got "
            f"{type(data).__name__}."
        )
    if positions.size == 0:
        raise CamkitError("data holds no images (length 0); nothing to explain.")
    batch_size = _positive_int(DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                               "batch_size")
    num_workers = 0 if num_workers is None else num_workers
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise CamkitError(f"num_workers={num_workers!r}; expected an integer >= 0.")
    return Source(dataset, positions, subset, batch_size, num_workers, loader_kwargs)


def _check_map_style(dataset: Any, what: str) -> None:
    if isinstance(dataset, IterableDataset):
        raise CamkitError(
            f"{what} is an IterableDataset; explain_dataset needs a map-style dataset (with "
            "__len__ and __getitem__) so that every image has an index that a resumed or "
            "distributed run can find again."
        )
    try:
        len(dataset)
    except TypeError as err:
        raise CamkitError(f"{what} ({type(dataset).__name__}) has no length (__len__).") from err


class _CollateSamples:
    """Apply a per-sample function, then batch with ``default_collate``.

    A DataLoader built with ``batch_size=None`` does no batching: its ``collate_fn``
    converts one sample at a time. ``explain_dataset`` batches itself, so it keeps that
    conversion and adds the batching. (A class, not a closure, so that it pickles for
    worker processes.)
    """

    def __init__(self, convert: Callable[[Any], Any]) -> None:
        self.convert = convert

    def __call__(self, samples: list[Any]) -> Any:
        return default_collate([self.convert(sample) for sample in samples])


def _batch_collate(loader: DataLoader) -> Callable[[list[Any]], Any]:
    """The function that turns a list of samples into a batch, as ``loader`` would."""
    if loader.batch_sampler is not None:  # automatic batching: collate_fn takes a list
        return loader.collate_fn
    return _CollateSamples(loader.collate_fn)


def _sampled(source: Any) -> np.ndarray:
    """The distinct dataset indices that one pass over a sampler or batch sampler yields."""
    indices = getattr(source, "indices", None)
    if indices is None:
        indices = [i for item in source for i in (item if isinstance(item, list) else [item])]
    return np.unique(np.asarray(list(indices), dtype=np.int64))


def _loader_positions(loader: DataLoader, length: int) -> tuple[np.ndarray, bool]:
    sampler = loader.sampler
    # A DistributedSampler hands each rank its part; explain_dataset splits the work over
    # the ranks itself, so such a loader stands for the whole dataset.
    whole = isinstance(sampler, (SequentialSampler, DistributedSampler)) or (
        isinstance(sampler, RandomSampler)
        and not sampler.replacement
        and sampler.num_samples == length
    )
    if whole and (loader.batch_sampler is None or type(loader.batch_sampler) is BatchSampler):
        return np.arange(length, dtype=np.int64), False
    source = loader.batch_sampler if loader.batch_sampler is not None else sampler
    positions = _sampled(source)
    if not hasattr(source, "indices") and not np.array_equal(positions, _sampled(source)):
        raise CamkitError(
            f"the DataLoader's {type(source).__name__} picks different images on each pass "
            "(random sampling with replacement?), so the set of images to explain is not "
            "fixed and a resumed or distributed run could not find them again. Use "
            "shuffle=True or no sampler for the whole dataset, or a SubsetRandomSampler or "
            "torch.utils.data.Subset for a part of it."
        )
    if positions.size and (positions[0] < 0 or positions[-1] >= length):
        raise CamkitError(
            f"the DataLoader's sampler yields index {int(positions[-1])}, outside its dataset "
            f"of length {length}."
        )
    return positions, not np.array_equal(positions, np.arange(length))


@dataclass(frozen=True)
class Plan:
    """Shards of ``shard_size`` consecutive positions, each cut into batches of ``batch_size``.

    Shard ``k`` belongs to rank ``k % world_size``.
    """

    num_images: int
    shard_size: int
    batch_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Positions (into ``Source.positions``) that shard ``shard`` holds."""
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_images))

    def shards_of(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_shards, world_size))

    def batches(self, shards: Sequence[int]) -> Iterator[tuple[int, bool, range]]:
        """``(shard, last_batch_of_shard, positions)`` for every batch of ``shards``, in order."""
        for shard in shards:
            rows = self.shard_range(shard)
            for start in range(0, len(rows), self.batch_size):
                piece = rows[start : start + self.batch_size]
                yield shard, start + self.batch_size >= len(rows), piece


def default_shard_size(batch_size: int) -> int:
    """About :data:`DEFAULT_SHARD_IMAGES` images, a whole number of batches."""
    return batch_size * max(1, DEFAULT_SHARD_IMAGES // batch_size)
