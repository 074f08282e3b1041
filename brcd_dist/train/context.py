"""Per-worker context: rank, device, config, shards, and the checkpoint + report call that every rank makes
the same number of times (Ray Train's rule; a report is a barrier)."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import ray.train
import torch
import torch.distributed as dist

from brcd_dist.config import Config
from brcd_dist.data import Manifest
from brcd_dist.train.state import ENGINE_TAG, TrainState, write_state

log = logging.getLogger("brcd_dist.train")


@dataclass
class WorkerContext:
    cfg: Config
    manifest: Manifest
    rank: int
    world_size: int
    device: torch.device
    run_id: Optional[str] = None  # MLflow run that rank 0 logs step metrics to
    run_dir: str = ""  # storage_path/name (local or s3://...): files written once per run (the teacher)
    # Files rank 0 writes into every checkpoint: name -> writer(path). Stages add theirs as they finish.
    artifacts: dict = field(default_factory=dict)

    @property
    def use_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def loader_kwargs(self) -> dict:
        d = self.cfg.data
        return dict(rank=self.rank, world_size=self.world_size, num_workers=d.loader_workers,
                    image_size=d.image_size, in_chans=d.in_chans, shards_url=d.shards_url)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Rank 0 streams step metrics to MLflow; a tracking hiccup must not kill a training run."""
        if not (self.is_chief and self.run_id):
            return
        try:
            from brcd_dist import tracking
            tracking.log_metrics(self.run_id, metrics, step)
        except Exception as err:  # noqa: BLE001 - logged, training goes on
            log.warning("MLflow log_metrics failed at step %d: %s", step, err)

    def report(self, state: TrainState, metrics: dict, engine=None,
               extra: Optional[dict[str, Callable[[Path], None]]] = None) -> None:
        """Write a checkpoint (state + finished-stage files on rank 0, the DeepSpeed engine on every rank) and
        hand it to Ray Train with the metrics."""
        with tempfile.TemporaryDirectory(prefix="brcd-ckpt-") as tmp:
            d = Path(tmp)
            if self.is_chief:
                write_state(d, state)
                for name, writer in {**self.artifacts, **(extra or {})}.items():
                    writer(d / name)
            if engine is not None:
                sync_buffers(engine.module)  # a resumed run loads rank 0's module state on every rank
                engine.save_checkpoint(str(d / "engine"), tag=ENGINE_TAG)
            ray.train.report({**metrics, "stage": state.stage, "global_step": state.global_step},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))


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
