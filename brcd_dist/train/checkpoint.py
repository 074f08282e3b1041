"""Writing a checkpoint: the write + report that every rank makes the same number of times (Ray Train's rule; a
report is a barrier). What goes into it is train/state.py's: TrainState, and the `CheckpointFiles` record that the
stages fill in as they finish."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train

from brcd_dist.train.collectives import sync_buffers
from brcd_dist.train.engine import save_engine
from brcd_dist.train.state import CheckpointFiles, TrainState, write_state


@dataclass
class CheckpointWriter:
    is_chief: bool
    files: CheckpointFiles

    def report(self, state: TrainState, metrics: dict, engine=None) -> None:
        """Write a checkpoint (state + finished-stage files on rank 0, the DeepSpeed engine on every rank) and
        hand it to Ray Train with the metrics."""
        with tempfile.TemporaryDirectory(prefix="brcd-ckpt-") as tmp:
            d = Path(tmp)
            if self.is_chief:
                write_state(d, state)
                self.files.write(d)
            if engine is not None:
                sync_buffers(engine.module)  # a resumed run loads rank 0's module state on every rank
                save_engine(engine, str(d / "engine"))
            ray.train.report(
                {**metrics, "stage": state.stage, "global_step": state.global_step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )
