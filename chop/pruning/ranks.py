"""Data-parallel ranks while pruning: each rank gathers curvature on its share of the calibration batches, the sums
are added over ranks, and rank 0's decisions and weights are the ones every rank keeps (one model, not N)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(batches: Sequence[T]) -> Sequence[T]:
    """This rank's batches: every world-th, from its rank on."""
    rank, world = rank_and_world()
    return batches[rank::world]


def _wire(t: torch.Tensor) -> torch.device:
    """Where a collective can take ``t``: NCCL needs the rank's GPU, gloo takes host tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _in_place(tensors: Sequence[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """Run ``collective`` on each tensor in place, through the device the backend needs (a no-op on one process)."""
    if rank_and_world()[1] == 1:
        return
    for t in tensors:
        t = t.detach()
        on = t.to(_wire(t))  # ``t`` itself where it already is on that device: no copy back
        collective(on)
        if on is not t:
            t.copy_(on)


def sum_over_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """Add each tensor over ranks, in place."""
    _in_place(tensors, dist.all_reduce)


def from_rank0(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place."""
    _in_place(tensors, lambda t: dist.broadcast(t, 0))


def object_from_rank0(obj: Any) -> Any:
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]
