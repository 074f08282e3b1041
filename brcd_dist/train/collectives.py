"""Plain torch.distributed collectives the package shares (no Ray, no DeepSpeed): each is the identity when no
process group of more than one rank exists, so the same code runs in one process, on gloo test ranks and under
Ray Train.

Every tensor collective of the package goes through `all_reduce`, `all_gather` or `broadcast` here: each moves its
tensor to the process group's device and back. Ray Train's NCCL group maps only `cuda` to a backend, so a CPU
tensor handed straight to `dist.all_reduce` fails there (and only there: gloo takes it), which no CPU test sees."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed(group=None) -> bool:
    """A process group of more than one rank exists (else the collectives below are identities)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def device_for_backend(backend: str) -> torch.device:
    """The device a backend's collectives take tensors on: CUDA for NCCL (the current device), else the CPU.
    A group that maps several device types ("cpu:gloo,cuda:nccl") takes CPU tensors."""
    backend = backend.lower()
    if backend == "nccl" or ("cuda:nccl" in backend and "cpu:" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_device(group=None) -> torch.device:
    """The device the process group's collectives take tensors on (the CPU without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return device_for_backend(str(dist.get_backend(group)))


def all_reduce(t: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """The elementwise reduction (default: sum) of `t` over ranks, as a new tensor on `t`'s device."""
    if not _distributed(group):
        return t
    buf = t.to(group_device(group), copy=True)
    dist.all_reduce(buf, op=op or dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `t` (same shape on every rank) stacked in rank order: (world, *t.shape) on `t`'s device."""
    if not _distributed(group):
        return t.unsqueeze(0)
    buf = t.to(group_device(group)).contiguous()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buf, group=group)
    return torch.stack(out).to(t.device)


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """Rank `src`'s `t` copied into `t` in place on every rank (returned for convenience)."""
    if not _distributed(group):
        return t
    buf = t.to(group_device(group)).contiguous()
    dist.broadcast(buf, src=src, group=group)
    if buf.data_ptr() != t.data_ptr():
        t.copy_(buf)
    return t


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank. DeepSpeed averages gradients but,
    unlike DDP, never syncs buffers, so each rank's BN statistics drift apart on its own data; encoding a split
    across ranks would then mix differently-normalised models, and the saved model (rank 0's) would differ from
    the one that was evaluated."""
    if not _distributed():
        return
    for buf in module.buffers():
        broadcast(buf.data, src=src)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value on every rank (decisions such as early stopping must agree everywhere). torch pickles it
    into a tensor on the group's device itself."""
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
