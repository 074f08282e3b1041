"""Plain torch.distributed collectives the stages share (no Ray, no DeepSpeed): each is the identity when no
process group of more than one rank exists, so the same code runs in one process, on gloo test ranks and under
Ray Train."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed() -> bool:
    """A process group of more than one rank exists (else the collectives below are identities)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank. DeepSpeed averages gradients but,
    unlike DDP, never syncs buffers, so each rank's BN statistics drift apart on its own data; encoding a split
    across ranks would then mix differently-normalised models, and the saved model (rank 0's) would differ from
    the one that was evaluated."""
    if not _distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value on every rank (decisions such as early stopping must agree everywhere)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
