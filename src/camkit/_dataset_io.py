"""Writing shards: deterministic files, temporary names, atomic renames, a writer thread.

Shard ``k`` is two files under ``out/shards``:

* ``shard-0000k.maps.npy`` (or ``.raw.npy``): the maps, ``(rows, H, W)``, streamed batch by
  batch into a temporary file whose header already states the final shape;
* ``shard-0000k.npz``: the per-image records and the shard's partial aggregates, written
  after the maps file is complete. Its presence marks the shard as finished.

Both are byte-for-byte reproducible: a ``.npz`` is written with fixed zip timestamps and no
compression, so a shard computed again gives the same bytes.
"""

from __future__ import annotations

import os
import queue
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camkit.errors import CamkitError

__all__ = ["ShardFiles", "ShardWriter", "read_npz", "write_npz"]

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
#: Per-image fields of a shard's records, with their stored dtypes.
RECORD_FIELDS = {
    "index": np.int64,
    "label": np.int64,
    "pred": np.int64,
    "target": np.int64,
    "score": np.float32,
    "degenerate": np.bool_,
    "focus": np.float32,
    "entropy": np.float32,
    "group": np.int64,
}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` with fixed timestamps (reproducible bytes), fsync'ed."""
    with open(path, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                with archive.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(
                        entry, np.asarray(array, order="C"), allow_pickle=False
                    )
        handle.flush()
        os.fsync(handle.fileno())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


@dataclass(frozen=True)
class ShardFiles:
    """Names of the files of each shard in ``out/shards``."""

    out: Path
    keep: str

    @property
    def folder(self) -> Path:
        return self.out / "shards"

    def records(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.npz"

    def maps(self, shard: int) -> Path | None:
        if self.keep == "stats":
            return None
        return self.folder / f"shard-{shard:05d}.{self.keep}.npy"

    def done(self, shard: int) -> bool:
        maps = self.maps(shard)
        return self.records(shard).is_file() and (maps is None or maps.is_file())

    def clear_temporaries(self, shard: int) -> None:
        """Remove what an interrupted run left of ``shard`` (temporary files only)."""
        for stale in self.folder.glob(f"shard-{shard:05d}.*.tmp-*"):
            stale.unlink(missing_ok=True)

    @staticmethod
    def temporary(path: Path) -> Path:
        return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@dataclass
class _OpenShard:
    """A shard being written: its maps stream and the records gathered so far."""

    shard: int
    rows: int
    files: ShardFiles
    map_dtype: np.dtype
    handle: Any = None
    temp: Path | None = None
    written: int = 0
    map_shape: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    records: dict[str, list[np.ndarray]] = field(default_factory=dict)
    class_sums: dict[int, np.ndarray] = field(default_factory=dict)
    class_counts: dict[int, int] = field(default_factory=dict)
    wrong: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        n = len(batch["index"])
        if self.written + n > self.rows:
            raise CamkitError(
                f"internal error: shard {self.shard} received more than its {self.rows} rows."
            )
        self.image_size = tuple(int(v) for v in batch["image_size"])
        kept = batch.get("kept")
        if kept is not None:
            if self.map_shape is None:
                self.map_shape = tuple(kept.shape[1:])
                self._open_maps()
            self.handle.write(np.ascontiguousarray(kept, dtype=self.map_dtype).data)
        for name in RECORD_FIELDS:
            self.records.setdefault(name, []).append(batch[name])
        small, groups = batch["small"], batch["group"]
        for group in np.unique(groups).tolist():
            rows = small[groups == group]
            total = rows.sum(axis=0, dtype=np.float64)
            if group in self.class_sums:
                self.class_sums[group] += total
            else:
                self.class_sums[group] = total
            self.class_counts[group] = self.class_counts.get(group, 0) + len(rows)
        wrong = (batch["label"] >= 0) & (batch["pred"] >= 0) & (batch["label"] != batch["pred"])
        if wrong.any():
            self.wrong.append(small[wrong])
        self.written += n

    def _open_maps(self) -> None:
        final = self.files.maps(self.shard)
        self.temp = ShardFiles.temporary(final)
        self.handle = open(self.temp, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.map_dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.map_shape),
        }
        np.lib.format.write_array_header_1_0(self.handle, header)

    def finish(self, small_shape: tuple[int, int], num_outputs: int) -> None:
        if self.written != self.rows:
            raise CamkitError(
                f"internal error: shard {self.shard} got {self.written} of {self.rows} rows."
            )
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None
            os.replace(self.temp, self.files.maps(self.shard))
            self.temp = None
        arrays = {
            name: np.concatenate(self.records[name]).astype(dtype, copy=False)
            for name, dtype in RECORD_FIELDS.items()
        }
        groups = sorted(self.class_sums)
        empty = np.zeros((0, *small_shape))
        arrays["class_keys"] = np.asarray(groups, dtype=np.int64)
        arrays["class_sum"] = (
            np.stack([self.class_sums[g] for g in groups]) if groups else empty
        ).astype(np.float64)
        arrays["class_count"] = np.asarray([self.class_counts[g] for g in groups], np.int64)
        arrays["wrong"] = (np.concatenate(self.wrong) if self.wrong else empty).astype(np.float32)
        arrays["map_shape"] = np.asarray(self.map_shape or (0, 0), dtype=np.int64)
        arrays["image_size"] = np.asarray(self.image_size, dtype=np.int64)
        arrays["num_outputs"] = np.asarray(num_outputs, dtype=np.int64)
        final = self.files.records(self.shard)
        temp = ShardFiles.temporary(final)
        try:
            write_npz(temp, arrays)
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
            self.temp = None


_STOP = object()


class ShardWriter:
    """Writes batches to shard files on a background thread.

    The compute loop hands over each batch's tensors (on any device) with :meth:`put`; at most
    ``max_pending`` batches wait, so memory stays bounded while the copy to the host, the
    conversion and the disk writes overlap with the next batch's compute. A failure on the
    writer thread is raised in the compute loop at its next :meth:`put` or at :meth:`close`.
    """

    def __init__(
        self,
        files: ShardFiles,
        shard_rows: dict[int, int],
        map_dtype: np.dtype,
        small_shape: tuple[int, int],
        max_pending: int = 2,
    ) -> None:
        self.files = files
        self.shard_rows = shard_rows
        self.map_dtype = np.dtype(map_dtype)
        self.small_shape = small_shape
        self.num_outputs = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="camkit-shard-writer", daemon=True)
        self._thread.start()

    def put(self, shard: int, last: bool, batch: dict[str, Any]) -> None:
        """Queue one batch of ``shard`` (``last``: the shard's final batch)."""
        while True:
            self._raise_if_failed()
            try:
                self._queue.put((shard, last, batch), timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait until every queued batch is written; raise the writer's error, if any."""
        self._stop()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop after the batches already queued (at most ``max_pending``) are written.

        Shards whose last batch was queued are finished, so a rerun need not compute them
        again; the shard left open is not, and its temporary file is removed.
        """
        self._stop()

    def _stop(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise CamkitError("internal error: the shard writer thread stopped unexpectedly.")

    def _run(self) -> None:
        current: _OpenShard | None = None
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                shard, last, batch = item
                arrays = {
                    name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                    else value
                    for name, value in batch.items()
                }
                self.num_outputs = int(arrays.pop("num_outputs", self.num_outputs))
                if current is None:
                    current = _OpenShard(
                        shard, self.shard_rows[shard], self.files, self.map_dtype
                    )
                current.add(arrays)
                if last:
                    current.finish(self.small_shape, self.num_outputs)
                    current = None
        except BaseException as err:  # handed to the compute loop
            self._error = err
        finally:
            if current is not None:
                current.discard()
