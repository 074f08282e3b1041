"""Ray Tune sweeps over BRCD's α, δ and K (the library side of jobs/tune.py): search spaces from the command
line, the trial function (a real Ray Train run of the student stage, a child MLflow run), the trial table, and
the registration of the best student. Lives in the library so that Tune's workers can import the trial function."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Iterable

from brcd_dist.config import ConfigError, from_dict

SEARCHED = {"alpha": "brcd.alpha", "delta": "brcd.delta", "clusters": "brcd.clusters"}
TRIAL_TAG = "brcd.trial"
STOPPED_TAG = "brcd.stopped_by"


def parse_range(text: str, key: str, integer: bool) -> tuple[list, bool]:
    """'0:1' -> ([0, 1], True) (a range, inclusive for integers); '5,10,20' -> ([5, 10, 20], False) (a choice);
    anything else a one-line ConfigError. Needs no Ray: jobs/tune.py checks its arguments before importing it."""
    cast = int if integer else float
    try:
        if ":" in text:
            lo, hi = (cast(v) for v in text.split(":", 1))
            if lo > hi:
                raise ValueError
            return [lo, hi], True
        return [cast(v) for v in text.split(",")], False
    except ValueError:
        raise ConfigError(
            f"--{key} {text!r}: expected LO:HI or a comma-separated list of {'integers' if integer else 'numbers'}"
        ) from None


def search_space(text: str, key: str, integer: bool):
    """'0:1' -> uniform (randint for integers, inclusive); '5,10,20' -> choice; '0.5' -> a fixed value."""
    values, is_range = parse_range(text, key, integer)
    from ray import tune

    if is_range:
        lo, hi = values
        return tune.randint(lo, hi + 1) if integer else tune.uniform(lo, hi)
    return tune.choice(values) if len(values) > 1 else values[0]


def check_bounds(cfg, args) -> None:
    """Every end of every range must itself be a valid config value (one-line errors before any trial). The
    model and KD-loss names are the config's own, checked already (their registries import torch)."""
    for key, dotted in SEARCHED.items():
        values, _ = parse_range(getattr(args, key), key, key == "clusters")
        for v in values:
            section, field = dotted.split(".")
            probe = copy.deepcopy(cfg)
            setattr(probe, section, replace(getattr(probe, section), **{field: v}))
            probe.validate(names=False)


def apply(cfg_dict: dict, config: dict):
    cfg = from_dict(cfg_dict)
    for key, value in config.items():
        section, field = key.split(".")
        setattr(cfg, section, replace(getattr(cfg, section), **{field: value}))
    return cfg


def make_trainable(base: dict, parent_run_id: str | None, sweep: str, teacher=None):
    """A Tune trainable: one distillation run of `base` with the trial's α, δ and K, its teacher from `teacher`
    (teacher_reuse.TeacherPlan: the sweep's, loaded, never trained again)."""

    def trainable(config: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from brcd_dist import tracking
        from brcd_dist.reporting import launch_and_publish

        trial_id = tune.get_context().get_trial_id()
        cfg = apply(base, config)
        cfg.tracking = replace(cfg.tracking, register=False)
        run_id = (
            tracking.start_run(
                cfg, run_name=f"{sweep}-{trial_id}", parent_run_id=parent_run_id, tags={TRIAL_TAG: trial_id}
            )
            if parent_run_id
            else None
        )
        out = launch_and_publish(
            cfg, run_id, f"{sweep}-{trial_id}", roles=("student",), callbacks=[TuneReportCallback()], teacher=teacher
        )
        evals = out.state.history.get("eval", [])
        best = {f"best_val_{p}": max((e[f"val_query/{p}_map"] for e in evals), default=0.0) for p in ("sshp", "ashp")}
        tune.report({**best, **out.test, "finished": 1, "mlflow_run_id": run_id or ""})

    return trainable


def trial_table(grid, metric: str) -> list[dict]:
    rows = []
    for r in grid:
        cfg = r.config or {}
        df = r.metrics_dataframe
        val = float(df[metric].max()) if df is not None and metric in df else float("nan")
        m = r.metrics or {}
        # Full precision here (the champion is chosen from these rows, and trials.json keeps them); format_table
        # rounds for display.
        rows.append(
            {
                "trial": m.get("trial_id", ""),
                "alpha": cfg.get("brcd.alpha", float("nan")),
                "delta": cfg.get("brcd.delta", float("nan")),
                "K": cfg.get("brcd.clusters"),
                f"best {metric}": val,
                "test sshp": m.get("test_query/sshp_map", float("nan")),
                "test ashp": m.get("test_query/ashp_map", float("nan")),
                "status": "error" if r.error else ("finished" if m.get("finished") else "stopped (ASHA)"),
                "mlflow_run_id": m.get("mlflow_run_id", ""),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    cells = [{c: str(round(r[c], 4) if isinstance(r[c], float) else r[c]) for c in cols} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in cells]
    return "\n".join(lines)


def input_example(cfg):
    import torch

    return torch.zeros(2, cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size)


def close_stopped_trials(parent_run_id: str, stopped: Iterable[str] = ()) -> None:
    """Mark KILLED the child runs still RUNNING (trials cut off) and those of the trials in `stopped` (ids of the
    trials ASHA stopped). Tune stops a trial by removing its placement group: the trial's Train controller dies
    with it, and the trial's own error handler may first mark the run FAILED with an ActorDiedError."""
    from mlflow import MlflowClient

    from brcd_dist import tracking

    client = MlflowClient()
    stopped = set(stopped)
    exp = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        if run.data.tags.get(TRIAL_TAG) in stopped:
            if tracking.ERROR_TAG in run.data.tags:  # the controller's death was the stop, not an error
                client.delete_tag(run.info.run_id, tracking.ERROR_TAG)
            tracking.set_tags(run.info.run_id, {STOPPED_TAG: "ASHA"})
        elif run.info.status != "RUNNING":
            continue
        if run.info.status != "KILLED":
            tracking.end_run(run.info.run_id, status="KILLED")
