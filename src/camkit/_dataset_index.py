"""Rank 0's last step: the JSON index and the aggregates, built from the finished shards.

Everything is read one shard at a time, in shard order, and summed in that order, so memory
does not grow with the number of images (beyond the list of misclassified images) and the
files do not depend on how many processes computed the shards.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from camkit._dataset_io import ShardFiles, read_npz
from camkit._dataset_plan import Plan
from camkit.errors import CamkitError

__all__ = ["AGGREGATES", "CLASS_MEANS", "INDEX", "MISCLASSIFIED", "build_index"]

INDEX = "index.json"
AGGREGATES = "aggregates.json"
CLASS_MEANS = "class_mean_maps.npy"
MISCLASSIFIED = "misclassified_maps.npy"


def _number(value: float) -> str:
    """Shortest text that reads back as the same float32; ``null`` for NaN and infinities."""
    value = np.float32(value)
    return str(value) if np.isfinite(value) else "null"


def _mean_std(total: float, squares: float, count: int) -> tuple[float | None, float | None]:
    if count == 0:
        return None, None
    mean = total / count
    return mean, math.sqrt(max(0.0, squares / count - mean * mean))


@dataclass
class _Group:
    """Running sums of one class."""

    map_sum: np.ndarray
    images: int = 0
    labelled: int = 0
    correct: int = 0
    degenerate: int = 0
    sums: dict[str, list[float]] = field(default_factory=dict)  # name -> [n, sum, sum of sq]

    def add_values(self, name: str, values: np.ndarray) -> None:
        values = values[np.isfinite(values)].astype(np.float64)
        entry = self.sums.setdefault(name, [0, 0.0, 0.0])
        entry[0] += int(values.size)
        entry[1] += float(values.sum())
        entry[2] += float((values * values).sum())

    def summary(self, key: int, names: dict[int, str]) -> dict[str, Any]:
        row: dict[str, Any] = {"class": key}
        if key in names:
            row["name"] = names[key]
        row.update(images=self.images, labelled=self.labelled, correct=self.correct,
                   accuracy=self.correct / self.labelled if self.labelled else None,
                   degenerate=self.degenerate)
        for name in ("focus", "entropy"):
            count, total, squares = self.sums.get(name, (0, 0.0, 0.0))
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(total, squares, count)
        return row


def _record_lines(records: dict[str, np.ndarray], shard: int) -> str:
    lines = []
    for row in range(len(records["index"])):
        lines.append(
            f'{{"index": {int(records["index"][row])}, "shard": {shard}, "row": {row}, '
            f'"label": {int(records["label"][row])}, "pred": {int(records["pred"][row])}, '
            f'"target": {int(records["target"][row])}, '
            f'"score": {_number(records["score"][row])}, '
            f'"degenerate": {"true" if records["degenerate"][row] else "false"}, '
            f'"focus": {_number(records["focus"][row])}, '
            f'"entropy": {_number(records["entropy"][row])}}}'
        )
    return ",\n".join(lines)


class _AtomicText:
    """A text file written under a temporary name and renamed when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temp = ShardFiles.temporary(path)
        self.handle = open(self.temp, "w", encoding="utf-8", newline="\n")

    def write(self, text: str) -> None:
        self.handle.write(text)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        self.handle.close()
        self.temp.unlink(missing_ok=True)


def build_index(
    out: Path,
    files: ShardFiles,
    plan: Plan,
    header: dict[str, Any],
    small_shape: tuple[int, int],
    class_names: dict[int, str],
) -> dict[str, Any]:
    """Write ``index.json``, ``aggregates.json`` and the aggregate arrays; return the aggregates.

    ``header`` holds the run's description for the top of the index (format, fingerprint,
    layer, arguments).
    """
    for shard in range(plan.num_shards):
        if not files.done(shard):
            raise CamkitError(
                f"shard {shard} of {plan.num_shards} is missing from {files.folder}; the run "
                "did not finish. Run explain_dataset again with the same arguments to complete it."
            )
    # What a process killed while writing these files left behind (only this function
    # writes temporary files next to the manifest).
    for stale in out.glob("*.tmp-*"):
        stale.unlink(missing_ok=True)
    groups: dict[int, _Group] = {}
    wrong: list[dict[str, Any]] = []
    shapes: set[tuple[tuple[int, ...], tuple[int, ...], int]] = set()
    index = _AtomicText(out / INDEX)
    try:
        shard_rows = []
        for shard in range(plan.num_shards):
            shard_rows.append(len(plan.shard_range(shard)))
        # The header needs the shapes, which the first shard states (all must agree).
        first = read_npz(files.records(0))
        top = dict(header)
        top.update(
            num_images=plan.num_images,
            num_outputs=int(first["num_outputs"]),
            image_size=first["image_size"].tolist(),
            map_shape=first["map_shape"].tolist() if files.keep != "stats" else None,
            shards=[
                {
                    "records": files.records(k).relative_to(out).as_posix(),
                    "maps": None if files.maps(k) is None
                    else files.maps(k).relative_to(out).as_posix(),
                    "rows": rows,
                }
                for k, rows in enumerate(shard_rows)
            ],
        )
        text = json.dumps(top, indent=1, sort_keys=True)
        index.write(text[: text.rindex("}")].rstrip() + ',\n "images": [\n')
        for shard in range(plan.num_shards):
            records = first if shard == 0 else read_npz(files.records(shard))
            if len(records["index"]) != shard_rows[shard]:
                raise CamkitError(
                    f"{files.records(shard)} holds {len(records['index'])} images, the plan "
                    f"{shard_rows[shard]}; the folder is damaged: delete it and run again."
                )
            shapes.add((tuple(records["image_size"].tolist()),
                        tuple(records["map_shape"].tolist()), int(records["num_outputs"])))
            index.write(("" if shard == 0 else ",\n") + _record_lines(records, shard))
            _accumulate(groups, wrong, records, small_shape)
        index.write("\n]}\n")
        if len(shapes) > 1:
            raise CamkitError(
                "the shards disagree on image size, map shape or number of outputs "
                f"({sorted(shapes)}); every image of the dataset must have the same size: resize "
                "them in the dataset's transform."
            )
        keys = sorted(groups)
        means = np.stack([groups[k].map_sum / groups[k].images for k in keys]).astype(np.float32)
        _save_npy(out / CLASS_MEANS, means)
        _write_misclassified(out / MISCLASSIFIED, files, plan, len(wrong), small_shape)

        overall = _Group(np.zeros(small_shape))
        for group in (groups[k] for k in keys):
            overall.images += group.images
            overall.labelled += group.labelled
            overall.correct += group.correct
            overall.degenerate += group.degenerate
            for name, (n, total, squares) in group.sums.items():
                entry = overall.sums.setdefault(name, [0, 0.0, 0.0])
                entry[0] += n
                entry[1] += total
                entry[2] += squares
        summary = overall.summary(-1, {})
        del summary["class"]
        aggregates = {
            "group_by": header["group_by"],
            "aggregate_size": list(small_shape),
            "classes": keys,
            "per_class": [groups[k].summary(k, class_names) for k in keys],
            "overall": summary,
            "misclassified": wrong,
        }
        target = out / AGGREGATES
        temp = ShardFiles.temporary(target)
        temp.write_text(json.dumps(aggregates, indent=1, sort_keys=True, allow_nan=False) + "\n")
        os.replace(temp, target)
        index.commit()  # last: an index means the folder is complete
    except BaseException:
        index.discard()
        raise
    return aggregates


def _accumulate(
    groups: dict[int, _Group],
    wrong: list[dict[str, Any]],
    records: dict[str, np.ndarray],
    small_shape: tuple[int, int],
) -> None:
    label, pred = records["label"], records["pred"]
    for position, key in enumerate(records["class_keys"].tolist()):
        group = groups.setdefault(key, _Group(np.zeros(small_shape, dtype=np.float64)))
        group.map_sum += records["class_sum"][position]
        members = records["group"] == key
        group.images += int(records["class_count"][position])
        labelled = members & (label >= 0) & (pred >= 0)
        group.labelled += int(labelled.sum())
        group.correct += int((labelled & (label == pred)).sum())
        group.degenerate += int(records["degenerate"][members].sum())
        group.add_values("focus", records["focus"][members])
        group.add_values("entropy", records["entropy"][members])
    for row in np.flatnonzero((label >= 0) & (pred >= 0) & (label != pred)).tolist():
        wrong.append({
            "index": int(records["index"][row]),
            "label": int(label[row]),
            "pred": int(pred[row]),
            "target": int(records["target"][row]),
            "score": _finite(records["score"][row]),
            "focus": _finite(records["focus"][row]),
        })


def _finite(value: np.floating) -> float | None:
    """A JSON-safe float: ``None`` for NaN and infinities."""
    return float(value) if np.isfinite(value) else None


def _save_npy(path: Path, array: np.ndarray) -> None:
    temp = ShardFiles.temporary(path)
    with open(temp, "wb") as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _write_misclassified(
    path: Path, files: ShardFiles, plan: Plan, count: int, small_shape: tuple[int, int]
) -> None:
    """Stream every shard's misclassified fixed-size maps into one ``(M, h, w)`` array."""
    temp = ShardFiles.temporary(path)
    try:
        with open(temp, "wb") as handle:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                      "fortran_order": False, "shape": (count, *small_shape)}
            np.lib.format.write_array_header_1_0(handle, header)
            for shard in range(plan.num_shards):
                rows = read_npz(files.records(shard))["wrong"]
                handle.write(np.ascontiguousarray(rows, dtype=np.float32).data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
