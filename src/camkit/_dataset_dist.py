"""The process group of a distributed ``explain_dataset`` run (or a stand-in for one process).

Under ``torchrun`` the caller may have initialised the default process group already; if
not, and the ``torchrun`` environment variables are set, one is created here (``nccl`` for a
CUDA model, ``gloo`` otherwise) and destroyed again at the end. Control messages (errors,
fingerprints) travel as Python objects over a ``gloo`` group, which works for both backends.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from camkit.errors import CamkitError

__all__ = ["Group", "join_group"]


class Group:
    """Rank, world size and the few collectives ``explain_dataset`` needs."""

    def __init__(self, rank: int = 0, world_size: int = 1, control: Any = None,
                 created: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self._control = control
        self._created = created

    def all_gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self._control)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and self._control is not None and not self._created:
            dist.destroy_process_group(self._control)
        if self._created:
            dist.destroy_process_group()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _torchrun_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def join_group(device: torch.device) -> Group:
    """The running process group, one created from ``torchrun``'s variables, or a single rank."""
    created = False
    if not dist.is_available():
        if _torchrun_world() > 1:
            raise CamkitError(
                "WORLD_SIZE > 1 (a torchrun launch?) but this PyTorch build has no "
                "torch.distributed; run one process or use a build with distributed support."
            )
        return Group()
    if not dist.is_initialized():
        if _torchrun_world() <= 1:
            return Group()
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise CamkitError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; "
                "launch with torchrun, or call torch.distributed.init_process_group first."
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, init_method="env://")
        created = True
    world_size = dist.get_world_size()
    if world_size == 1:
        if created:
            dist.destroy_process_group()
        return Group()
    control = None
    if dist.get_backend() != "gloo":
        control = dist.new_group(backend="gloo")
    return Group(dist.get_rank(), world_size, control, created)
