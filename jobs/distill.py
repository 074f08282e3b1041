"""BRCD distillation, stages A–D of DESIGN §1, as one Ray Train job.

The stages run in `brcd_dist.train.worker.run_stages` on every Ray Train worker; this script checks the input,
opens the MLflow run and calls `brcd_dist.reporting.launch_and_publish` (-> `brcd_dist.driver.launch`).

    python jobs/distill.py                                   # embedded default: Fashion-MNIST, local Ray, CPU
    python jobs/distill.py --config X.yaml brcd.alpha=0.7    # any config + overrides
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/distill.py --config X.yaml

Everything that can be wrong with the input is checked before a worker starts: the config, the tracking store and
registry names, the shards (made here when missing).

A teacher trained by an earlier run with the same teacher config, data and seed is reused instead of trained again
(brcd_dist/teacher_reuse.py: kept under train.storage_path/teachers/ by a content key), and so are its codes and
k-means result (teachers/cache/, unless train.teacher_cache is set); --retrain-teacher trains it.
-v keeps Ray's and DeepSpeed's own log lines, which the default hides behind one progress bar a stage; -q hides
the bars too.
"""

from __future__ import annotations

from _cli import config_from_args, connect, parse, parser, preflight, setup_logging


def make_parser():
    return parser(__doc__, resume=True, alias=True, retrain=True, prog="distill.py")


def main(argv=None) -> dict:
    args = parse(make_parser(), argv)
    cfg = config_from_args(args)  # before the imports below (torch, Ray, MLflow): bad input is refused in a second
    from brcd_dist import teacher_reuse, tracking
    from brcd_dist.driver import absolute_paths, run_name
    from brcd_dist.reporting import Report, launch_and_publish, run_summary, shown_path
    from brcd_dist.run_progress import Plan, RunProgress

    setup_logging()
    cfg = absolute_paths(cfg)
    name = run_name(cfg)
    timings: dict = {}
    uri, manifest = preflight(cfg, name, timings)
    connect(args.address, uri)
    teacher = teacher_reuse.resolve(cfg, manifest.digest(), retrain=args.retrain_teacher)
    if teacher.reused:
        print(
            f"teacher: reusing {teacher.load} (an earlier run's, same teacher config, data and seed; "
            "--retrain-teacher trains it again)",
            flush=True,
        )
    run_id = tracking.start_run(cfg, run_name=name, manifest_digest=manifest.digest()) if uri else None
    report = Report()
    progress = RunProgress(Plan.of(cfg, manifest, trains_teacher=teacher.trains))
    outputs = launch_and_publish(cfg, run_id, name, progress=progress, report=report, teacher=teacher)
    if teacher.trains and teacher.keep:
        shown = shown_path(teacher.keep)
        print(f"teacher: kept as {shown} for later runs with the same teacher config, data and seed", flush=True)
    print(run_summary(cfg, outputs, report, manifest, shards_seconds=timings.get("shards", 0.0)))
    return outputs.test


if __name__ == "__main__":
    main()
