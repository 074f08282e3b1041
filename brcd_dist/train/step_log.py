"""Step metrics of the workers into the job's MLflow run: rank 0 logs, the other ranks do nothing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("brcd_dist.train")


@dataclass
class StepLogger:
    run_id: Optional[str]  # MLflow run that rank 0 logs step metrics to (None: no tracking)
    is_chief: bool

    def log(self, metrics: dict, step: int) -> None:
        """Rank 0 streams step metrics to MLflow; a tracking hiccup must not kill a training run."""
        if not (self.is_chief and self.run_id):
            return
        try:
            from brcd_dist import tracking

            tracking.log_metrics(self.run_id, metrics, step)
        except Exception as err:  # noqa: BLE001 - logged, training goes on
            log.warning("MLflow log_metrics failed at step %d: %s", step, err)
