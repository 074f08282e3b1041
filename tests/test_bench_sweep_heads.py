"""bench/sweep_heads.py's pure parts: the per-method search spaces, the trial configs, selection and the table."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import frozen_heads
import sweep_heads


def _corner(spec, hi: bool):
    return spec[1][-1 if hi else 0] if spec[0] == "choice" else spec[2 if hi else 1]


def test_every_frozen_heads_method_has_a_search_space():
    assert set(sweep_heads.SPACES) == set(frozen_heads.METHODS)


@pytest.mark.parametrize("hi", [False, True])
@pytest.mark.parametrize("method", [m for m in sweep_heads.SPACES if sweep_heads.SPACES[m]])
def test_every_corner_of_a_space_is_a_valid_config(method, hi):
    params = {k: _corner(spec, hi) for k, spec in sweep_heads.SPACES[method].items()}
    cfg = sweep_heads.config_for(method, params, bits=32)
    assert all(getattr(cfg, k) == v for k, v in params.items()) and cfg.bits == 32


def test_brcd_searches_the_issues_ranges():
    space = sweep_heads.SPACES["brcd"]
    assert space["tau"][1:] == (0.1, 0.6) and space["delta"][1:] == (0.1, 0.6)
    assert space["alpha"][1:] == (0.0, 1.0) and space["clusters"] == ("choice", [10, 20, 40])


def test_every_kd_method_searches_kd_weight_and_the_student_alone_nothing():
    assert sweep_heads.SPACES["student_alone"] == {}
    assert all("kd_weight" in s for m, s in sweep_heads.SPACES.items() if m != "student_alone")


def test_a_knob_outside_the_methods_space_is_refused():
    with pytest.raises(ValueError, match=r"kl_bits: knobs \['alpha'\] are not searched"):
        sweep_heads.config_for("kl_bits", {"alpha": 0.5}, bits=64)


def test_the_method_row_survives_the_trial_knobs():
    cfg = sweep_heads.config_for("brcd_authors_release", {"kd_weight": 2.0, "tau": 0.2}, bits=64)
    assert cfg.authors_release and cfg.negatives == "authors" and cfg.kd_weight == 2.0 and cfg.tau == 0.2


def test_best_params_takes_the_highest_validation_score_per_method():
    rows = [
        {"method": "a", "params": {"x": 1}, "val_sshp_best": 0.5},
        {"method": "a", "params": {"x": 2}, "val_sshp_best": 0.7},
        {"method": "a", "params": {"x": 3}, "val_sshp_best": 0.7},
        {"method": "b", "params": {"x": 4}, "val_sshp_best": 0.1},
    ]
    assert sweep_heads.best_params(rows) == {"a": {"x": 2}, "b": {"x": 4}}


def test_summarise_gives_mean_and_sample_std_per_method_and_length():
    rows = [{"method": "m", "bits": 16, "test_sshp": v, "test_ashp": 0.5} for v in (0.1, 0.2, 0.3)]
    rows.append({"method": "m", "bits": 32, "test_sshp": 0.4, "test_ashp": 0.6})
    out = sweep_heads.summarise(rows)
    mean, std, n = out[("m", 16)]["test_sshp"]
    assert (round(mean, 12), round(std, 12), n) == (0.2, 0.1, 3)
    assert out[("m", 32)]["test_ashp"] == (0.6, 0.0, 1)


def test_format_table_has_a_cell_per_length_and_paradigm_and_a_dash_when_missing():
    summary = {("m", 16): {"test_sshp": (0.25, 0.01, 3), "test_ashp": (0.5, 0.02, 3)}}
    table = sweep_heads.format_table(summary, ["m"], [16, 32]).splitlines()
    assert table[0] == "| method | 16 bits SSHP | 16 bits ASHP | 32 bits SSHP | 32 bits ASHP |"
    assert table[2] == "| m | 0.250 ± 0.010 | 0.500 ± 0.020 | – | – |"


def test_sample_trials_draws_the_budget_per_method_inside_its_space():
    trials = sweep_heads.sample_trials(["student_alone", "brcd", "kl_bits"], samples=5, seed=0)
    assert [t["method"] for t in trials] == ["brcd"] * 5 + ["kl_bits"] * 5
    for t in trials:
        for knob, spec in sweep_heads.SPACES[t["method"]].items():
            v = t["params"][knob]
            assert v in spec[1] if spec[0] == "choice" else spec[1] <= v <= spec[2]


def test_a_methods_trials_do_not_depend_on_the_other_methods():
    alone = sweep_heads.sample_trials(["kl_bits"], samples=4, seed=3)
    mixed = sweep_heads.sample_trials(["brcd", "kl_bits"], samples=4, seed=3)
    assert alone == [t for t in mixed if t["method"] == "kl_bits"]
    assert alone != sweep_heads.sample_trials(["kl_bits"], samples=4, seed=4)


def test_final_trials_run_every_method_at_every_length_and_seed_with_its_chosen_knobs():
    trials = sweep_heads.final_trials(["student_alone", "kl_bits"], {"kl_bits": {"kd_weight": 2.0}}, [16, 64], [0, 1])
    assert len(trials) == 8
    assert {"method": "kl_bits", "params": {"kd_weight": 2.0}, "bits": 64, "seed": 1} in trials
    assert {"method": "student_alone", "params": {}, "bits": 16, "seed": 0} in trials


def test_final_trials_refuse_a_method_that_was_not_swept():
    with pytest.raises(ValueError, match=r"no sweep result for \['brcd'\]"):
        sweep_heads.final_trials(["brcd"], {}, [64], [0])


def test_format_table_shows_a_single_seed_without_a_spread():
    summary = {("m", 64): {"test_sshp": (0.25, 0.0, 1), "test_ashp": (0.5, 0.0, 1)}}
    assert sweep_heads.format_table(summary, ["m"], [64]).splitlines()[2] == "| m | 0.250 | 0.500 |"
