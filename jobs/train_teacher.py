"""Stage A alone: train the teacher (CIBHash) under Ray Train + DeepSpeed, log it to MLflow and register it
(brcd-teacher@candidate), so that later runs and sweeps reuse it with teacher.uri=models:/brcd-teacher@candidate.

    python jobs/train_teacher.py [--config X.yaml] [key=value ...]

A teacher kept by an earlier run with the same content key is loaded instead of trained, as jobs/distill.py does
(brcd_dist/teacher_reuse.py); --retrain-teacher trains it.
"""

from __future__ import annotations

from _cli import config_from_args, connect, parse, parser, preflight, setup_logging


def make_parser():
    return parser(__doc__, resume=True, alias=True, retrain=True, prog="train_teacher.py")


def main(argv=None):
    args = parse(make_parser(), argv)
    cfg = config_from_args(args)  # before the imports below (torch, Ray, MLflow): bad input is refused in a second
    from brcd_dist import teacher_reuse, tracking
    from brcd_dist.driver import absolute_paths, launch_teacher_job, run_name
    from brcd_dist.reporting import publish

    setup_logging()
    cfg = absolute_paths(cfg)
    name = run_name(cfg) + "-teacher"
    uri, manifest = preflight(cfg, name)
    connect(args.address, uri)
    run_id = (
        tracking.start_run(cfg, run_name=name, manifest_digest=manifest.digest(), tags={"brcd.job": "train_teacher"})
        if uri
        else None
    )
    teacher = teacher_reuse.resolve(cfg, manifest.digest(), retrain=args.retrain_teacher)
    if teacher.reused:
        print(f"teacher: reusing {teacher.load} (an earlier run's; --retrain-teacher trains it again)", flush=True)
    with tracking.failing_run(run_id):
        path, out = launch_teacher_job(cfg, run_id=run_id, name=name, teacher=teacher)
        versions = publish(run_id, cfg, out) if run_id else {}
    print(f"teacher: {path}")
    if "teacher" in versions:
        print(f"registered: models:/{cfg.tracking.teacher_name}@{cfg.tracking.alias} (version {versions['teacher']})")


if __name__ == "__main__":
    main()
