"""Step metrics of the workers into the job's MLflow run: rank 0 logs, the other ranks do nothing.

Rank 0 queues each step's batch for MLflow's background thread (`synchronous=False`) instead of waiting for the
tracking server on every call (10.7 ms a call to a server on 127.0.0.1, more to a remote one; 0.04 ms queued:
docs/benchmarks/throughput.md); `flush` waits for the queue, at the end of each training stage and when the worker
fails."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("brcd_dist.train")


@dataclass
class StepLogger:
    run_id: Optional[str]  # MLflow run that rank 0 logs step metrics to (None: no tracking)
    is_chief: bool

    @property
    def active(self) -> bool:
        return bool(self.is_chief and self.run_id)

    def log(self, metrics: dict, step: int) -> None:
        """Queue step metrics for MLflow; a tracking hiccup must not kill a training run."""
        if not self.active:
            return
        try:
            from brcd_dist import tracking

            tracking.log_metrics(self.run_id, metrics, step, synchronous=False)
        except Exception as err:  # noqa: BLE001 - logged, training goes on
            log.warning("MLflow log_metrics failed at step %d: %s", step, err)

    def flush(self) -> None:
        """Wait until every queued metric is written (a stage's end, a failing worker)."""
        if not self.active:
            return
        try:
            from brcd_dist import tracking

            tracking.flush()
        except Exception as err:  # noqa: BLE001 - logged, training goes on
            log.warning("MLflow flush failed: %s", err)
