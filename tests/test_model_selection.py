"""train/selection.ModelSelection: best score, patience, snapshot of the best weights (DESIGN §3)."""

from __future__ import annotations

from brcd_dist.train.selection import ModelSelection
from brcd_dist.train.state import TrainState


def snapshots():
    taken = []

    def take(value):
        def weights():
            taken.append(value)
            return {"w": value}

        return weights

    return taken, take


def test_first_evaluation_improves_on_a_fresh_state_and_snapshots_the_weights():
    sel = ModelSelection(TrainState(), patience=0)
    assert sel.offer(0.0, lambda: {"w": 1})
    assert sel.best_weights == {"w": 1} and sel.state.best_metric == 0.0


def test_weights_are_snapshotted_only_on_a_strict_improvement():
    taken, take = snapshots()
    sel = ModelSelection(TrainState(), patience=0)
    results = [sel.offer(score, take(i)) for i, score in enumerate([0.5, 0.4, 0.5, 0.6])]
    assert results == [True, False, False, True]
    assert taken == [0, 3] and sel.best_weights == {"w": 3}


def test_improvement_resets_the_count_of_evaluations_without_improvement():
    state = TrainState()
    sel = ModelSelection(state, patience=0)
    for score in (0.5, 0.4, 0.3):
        sel.offer(score, dict)
    assert state.evals_without_improvement == 2
    sel.offer(0.7, dict)
    assert state.evals_without_improvement == 0 and state.best_metric == 0.7


def test_stops_after_patience_evaluations_without_improvement():
    sel = ModelSelection(TrainState(), patience=2)
    stops = []
    for score in (0.5, 0.5, 0.4):
        sel.offer(score, dict)
        stops.append(sel.should_stop)
    assert stops == [False, False, True]


def test_patience_zero_never_stops():
    sel = ModelSelection(TrainState(), patience=0)
    for _ in range(10):
        sel.offer(-1.0, dict)
    assert not sel.should_stop


def test_a_restart_from_the_saved_state_continues_the_count():
    state = TrainState()
    sel = ModelSelection(state, patience=3)
    for score in (0.5, 0.4, 0.4):
        sel.offer(score, dict)
    resumed = ModelSelection(TrainState.from_json(state.to_json()), patience=3, best_weights={"w": 0})
    resumed.offer(0.5, dict)  # equal to the best: not an improvement
    assert resumed.should_stop and resumed.best_weights == {"w": 0}
