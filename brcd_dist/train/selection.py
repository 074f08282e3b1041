"""Model selection on validation mAP (DESIGN §3) and early stopping. The best score and the count of evaluations
without improvement live in TrainState, so a restarted run continues them; the best weights live here (and in the
checkpoint's best_student.pt)."""

from __future__ import annotations

from typing import Callable, Optional

from brcd_dist.train.state import TrainState


class ModelSelection:
    def __init__(self, state: TrainState, patience: int, best_weights: Optional[dict] = None):
        self.state, self.patience = state, patience
        self.best_weights = best_weights  # state_dict of the best model so far, None before the first evaluation

    def offer(self, score: float, weights: Callable[[], dict]) -> bool:
        """Record one evaluation's score; `weights()` is called (a snapshot taken) only when the score beats the
        best so far, strictly. Returns whether it did."""
        if score > self.state.best_metric:
            self.state.best_metric, self.state.evals_without_improvement = score, 0
            self.best_weights = weights()
            return True
        self.state.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        """`patience` evaluations in a row without improvement (patience 0: never)."""
        return bool(self.patience and self.state.evals_without_improvement >= self.patience)
