"""The manifest of an ``explain_dataset`` output folder: what produced it.

A run writes ``manifest.json`` with a description of its arguments, the model (a digest of
its parameters and buffers) and the dataset (type and length), plus a coarse thumbnail of
the first image to explain. A later run into the same folder goes on only when its
description is the same and its first image matches the thumbnail (other files or another
transform change it; float rounding on another machine does not), so finished shards are
reused only by the run that would have written them identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camkit._version import __version__
from camkit.errors import CamkitError

__all__ = [
    "FORMAT",
    "check_or_create",
    "fingerprint",
    "image_probe",
    "model_digest",
    "write_atomic",
]

FORMAT = "camkit-explanations/1"
MANIFEST = "manifest.json"


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the model's state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(description: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON form of ``description``."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


_THUMBNAIL = (8, 8)


def image_probe(images: torch.Tensor) -> dict[str, Any]:
    """A coarse summary of the first image of ``images``: its shape and 8 x 8 channel means.

    Stored in the manifest and compared with a tolerance, not hashed: a rerun on other files
    or with other preprocessing moves it far, float rounding of the same preprocessing on
    another CPU moves it by far less than the tolerance.
    """
    x = images[:1].detach().to("cpu", torch.float64)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # NaN != NaN would never match
    x = x.reshape(1, -1, *x.shape[-2:]) if x.ndim >= 3 else x.reshape(1, 1, 1, -1)
    thumbnail = F.adaptive_avg_pool2d(x, _THUMBNAIL).flatten()
    return {"shape": list(images.shape[1:]), "thumbnail": [round(v, 6) for v in thumbnail.tolist()]}


def _probes_match(stored: Any, probe: dict[str, Any] | None) -> bool:
    if probe is None or not isinstance(stored, dict):
        return True  # nothing to compare (an older manifest, or no probe given)
    if stored.get("shape") != probe["shape"]:
        return False
    before, now = torch.tensor(stored.get("thumbnail", [])), torch.tensor(probe["thumbnail"])
    if before.shape != now.shape:
        return False
    scale = max(1.0, float(now.abs().max())) if now.numel() else 1.0
    return bool(((before - now).abs() <= 1e-3 * scale).all())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    before, after = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            lines.append(f"{key}: {before.get(key)!r} there, {after.get(key)!r} now")
    return lines


def check_or_create(
    out: Path, description: dict[str, Any], probe: dict[str, Any] | None = None
) -> None:
    """Accept ``out`` for a run described by ``description``, or raise.

    ``out`` is accepted when it does not exist, is empty, holds a manifest with the same
    description and a matching first-image ``probe`` (see :func:`image_probe`; a resumed
    run), or holds only the manifest of a run that finished nothing (which is replaced). A
    manifest is created for a new run. A folder that cannot be created or written raises
    :class:`~camkit.errors.CamkitError`.
    """
    if out.exists() and not out.is_dir():
        raise CamkitError(f"out={str(out)!r} is a file; pass a folder for the results.")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            stored = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise CamkitError(
                f"{manifest} cannot be read ({err}); the folder is damaged: delete it or pass "
                "another out."
            ) from err
        if stored.get("format") != FORMAT:
            raise CamkitError(
                f"{manifest} has format {stored.get('format')!r}, this camkit writes "
                f"{FORMAT!r}; pass another out or delete the folder."
            )
        same = stored.get("fingerprint") == fingerprint(description)
        if same and _probes_match(stored.get("first_image"), probe):
            return
        if not _holds_results(out):
            # An earlier run stopped before finishing anything (a wrong option, a bad first
            # batch): there is nothing to reuse or protect, so this run starts afresh.
            _write_manifest(out, manifest, description, probe)
            return
        if same:
            raise CamkitError(
                f"out={str(out)!r} holds results for other images: the first image to explain "
                "is not the one that run saw (other files, another transform, or a random "
                "transform; explanations need a deterministic one). Pass another out, or "
                "delete the folder to start again."
            )
        changes = _differences(stored.get("arguments", {}), description)
        raise CamkitError(
            f"out={str(out)!r} holds results of different arguments, so they cannot be "
            "resumed or reused; what differs:\n  " + "\n  ".join(changes or ["(unknown)"])
            + "\nTo resume, call again with the values shown as 'there' (batch_size and "
            "shard_size count too: they can change results in the last bits); otherwise pass "
            "another out, or delete the folder to start again."
        )
    if out.is_dir() and any(out.iterdir()):
        raise CamkitError(
            f"out={str(out)!r} is not empty and holds no {MANIFEST} from explain_dataset; pass "
            "a new or empty folder so that no other files are mixed with (or lost to) the "
            "results."
        )
    _write_manifest(out, manifest, description, probe)


def _holds_results(out: Path) -> bool:
    """Whether ``out`` holds anything a run finished (beyond its manifest and temporaries)."""
    finished = [p for p in out.iterdir() if p.name != MANIFEST and ".tmp-" not in p.name
                and p.name != "shards"]
    shards = out / "shards"
    if shards.is_dir():
        finished += [p for p in shards.iterdir() if ".tmp-" not in p.name]
    return bool(finished)


def _write_manifest(
    out: Path, manifest: Path, description: dict[str, Any], probe: dict[str, Any] | None
) -> None:
    record = {
        "format": FORMAT,
        "fingerprint": fingerprint(description),
        "arguments": description,
        "first_image": probe,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(manifest, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    except OSError as err:
        raise CamkitError(
            f"cannot create the results folder out={str(out)!r}: {err}. Pass a folder that "
            "can be created and written."
        ) from err


def library_version() -> str:
    return __version__
