"""Ray Tune sweep over BRCD's α, δ and K with ASHA on validation mAP; every trial is a real Ray Train run of the
student stage, reusing one teacher (trained once, or teacher.uri) and the k-means result of each K.

    python jobs/tune.py --samples 8 --alpha 0:1 --delta 0:1 --clusters 5,10,20 [--config X.yaml] [key=value ...]

The teacher is decided as jobs/distill.py decides it (brcd_dist/teacher_reuse.py): teacher.uri, or a teacher kept
by an earlier run with the same content key, or trained once for the sweep and kept under that key; its codes and
k-means results are cached under train.teacher_cache (default: train.storage_path/teachers/cache), so trials with
the same K cluster once. Each trial is a child MLflow run of the sweep's run; the best finished trial's student is
registered as NAME@champion. Ranges are LO:HI (uniform; integers for K), lists are comma-separated (a choice).
"""

from __future__ import annotations

import os
from dataclasses import replace

from _cli import config_from_args, connect, fail, parse, parser, preflight, setup_logging

from brcd_dist.config import ConfigError, to_dict
from brcd_dist.sweep import (
    SEARCHED,
    check_bounds,
    close_stopped_trials,
    format_table,
    input_example,
    make_trainable,
    search_space,
    trial_table,
)


def make_parser():
    p = parser(__doc__, alias=True, prog="tune.py")
    p.add_argument("--alpha", default="0:1", help="α range LO:HI or list (default 0:1)")
    p.add_argument("--delta", default="0:1", help="δ range LO:HI or list (default 0:1)")
    p.add_argument("--clusters", default="5,10,20", help="K range LO:HI or list (default 5,10,20)")
    p.add_argument("--samples", type=int, default=8, help="number of trials (default 8)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials at once (default 1)")
    p.add_argument(
        "--paradigm", default="ashp", choices=["ashp", "sshp"], help="validation mAP that ASHA ranks by (default ashp)"
    )
    p.add_argument(
        "--champion-alias", default="champion", help="registry alias of the best trial's student (default champion)"
    )
    return p


def main(argv=None) -> list[dict]:
    args = parse(make_parser(), argv)
    cfg = config_from_args(args)
    try:
        check_bounds(cfg, args)
    except ConfigError as err:
        fail(str(err))
    if args.samples < 1 or args.max_concurrent < 1:
        fail(f"--samples {args.samples} / --max-concurrent {args.max_concurrent}: must be >= 1")
    # the input is checked: now the heavy imports (torch, Ray, MLflow); bad input was refused in a second
    from brcd_dist import teacher_reuse, tracking
    from brcd_dist.driver import absolute_paths, launch_teacher_job, run_name

    setup_logging()
    cfg = absolute_paths(cfg)
    space = {dotted: search_space(getattr(args, key), key, key == "clusters") for key, dotted in SEARCHED.items()}
    uri, manifest = preflight(cfg)
    connect(args.address, uri)

    # Validation mAP is only in the epoch reports that evaluate; ASHA skips the others (it returns CONTINUE on a
    # result without its metric), but Tune's strict check would reject them first.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    sweep = run_name(cfg).replace("distill-", "sweep-")
    parent = (
        tracking.start_run(cfg, run_name=sweep, manifest_digest=manifest.digest(), tags={"brcd.job": "tune"})
        if uri
        else None
    )
    metric = f"val_query/{args.paradigm}_map"
    with tracking.failing_run(parent, on_failure=close_stopped_trials):
        teacher_run = None
        teacher = teacher_reuse.resolve(cfg, manifest.digest())
        if teacher.trains:  # stage A once for the whole sweep, kept under its key
            path, out = launch_teacher_job(cfg, run_id=parent, name=f"{sweep}-teacher", teacher=teacher)
            teacher = replace(teacher, load=path, keep=path)
            if parent:
                tracking.log_hash_model(parent, out.teacher, "teacher", input_example(cfg))
                teacher_run = parent
        if teacher.load:  # every trial's MLflow params name the teacher it loads
            cfg.teacher = replace(cfg.teacher, uri=teacher.load)
        evals = max(cfg.train.eval_every, 1)
        tuner = tune.Tuner(
            tune.with_resources(make_trainable(to_dict(cfg), parent, sweep, teacher), {"CPU": 0.01}),
            param_space=space,
            tune_config=tune.TuneConfig(
                num_samples=args.samples,
                max_concurrent_trials=args.max_concurrent,
                # stop_last_trials=False: by default ASHA stops every trial whose epoch reaches max_t, i.e. at its
                # last epoch's report, before the test stage and the trial's final report.
                scheduler=ASHAScheduler(
                    metric=metric,
                    mode="max",
                    time_attr="student/epoch",
                    max_t=cfg.train.epochs,
                    grace_period=evals,
                    reduction_factor=2,
                    stop_last_trials=False,
                ),
            ),
            run_config=tune.RunConfig(name=sweep, storage_path=cfg.train.storage_path),
        )
        grid = tuner.fit()
        rows = trial_table(grid, metric)
        print(format_table(rows))
        finished = [r for r in rows if r["status"] == "finished" and r["mlflow_run_id"]]
        if parent:
            tracking.log_dict(parent, {"trials": rows}, "trials.json")
            tracking.log_text(parent, format_table(rows), "trials.txt")
            if finished:
                best = max(finished, key=lambda r: r[f"best {metric}"])
                version = tracking.register_model(
                    f"runs:/{best['mlflow_run_id']}/student",
                    cfg.tracking.student_name,
                    args.champion_alias,
                    {
                        "run_id": teacher_run or best["mlflow_run_id"],
                        "trial_run_id": best["mlflow_run_id"],
                        "alpha": best["alpha"],
                        "delta": best["delta"],
                        "K": best["K"],
                        metric: best[f"best {metric}"],
                    },
                    "student",
                    force_alias=cfg.tracking.force_alias,
                )
                tracking.log_metrics(parent, {f"best_{metric}": best[f"best {metric}"]}, 0)
                print(
                    f"champion: models:/{cfg.tracking.student_name}@{args.champion_alias} (version {version}, "
                    f"trial {best['trial']}, α={best['alpha']:.4g}, δ={best['delta']:.4g}, K={best['K']})"
                )
            close_stopped_trials(parent, [r["trial"] for r in rows if r["status"] == "stopped (ASHA)"])
            tracking.end_run(parent)
    return rows


if __name__ == "__main__":
    main()
