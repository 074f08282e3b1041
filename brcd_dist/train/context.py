"""Per-worker context: rank, device, config, shards; the record of what this worker's checkpoints hold, the
checkpoint writer and the step logger. Imports no Ray: the stages can run on plain torch.distributed ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from brcd_dist.config import Config
from brcd_dist.data import Manifest
from brcd_dist.train.state import CheckpointFiles
from brcd_dist.train.step_log import StepLogger

if TYPE_CHECKING:
    from brcd_dist.train.checkpoint import CheckpointWriter


@dataclass
class WorkerContext:
    cfg: Config
    manifest: Manifest
    rank: int
    world_size: int
    device: torch.device
    # Files rank 0 writes into every checkpoint; stages set theirs as they finish.
    checkpoint_files: CheckpointFiles = field(default_factory=CheckpointFiles)
    checkpoint: Optional[CheckpointWriter] = None  # writes checkpoint_files + state and reports them to Ray Train
    step_log: StepLogger = field(default_factory=lambda: StepLogger(run_id=None, is_chief=False))
    run_dir: str = ""  # storage_path/name (local or s3://...): files written once per run (the teacher)

    @property
    def use_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def loader_kwargs(self) -> dict:
        d = self.cfg.data
        return dict(
            rank=self.rank,
            world_size=self.world_size,
            num_workers=d.loader_workers,
            image_size=d.image_size,
            in_chans=d.in_chans,
            shards_url=d.shards_url,
            device=self.device,
            max_member_bytes=d.max_member_bytes,
        )  # a GPU decodes and augments its batches itself (data/decoding.py)
