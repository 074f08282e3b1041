"""Stage A alone: train the teacher (CIBHash) under Ray Train + DeepSpeed, log it to MLflow and register it
(brcd-teacher@candidate), so that later runs and sweeps reuse it with teacher.uri=models:/brcd-teacher@candidate.

    python jobs/train_teacher.py [--config X.yaml] [key=value ...]
"""
from __future__ import annotations

import shutil
from pathlib import Path

from _cli import config_from_args, fail, parser, setup_logging

from brcd_dist import tracking
from brcd_dist.data import ensure_shards
from brcd_dist.pipeline import absolute_paths, connect_ray, launch, read_outputs, result_checkpoint_dir, run_name
from brcd_dist.reporting import publish


def train_teacher(cfg, address=None) -> tuple[Path, dict]:
    """Returns (path of the teacher's checkpoint file, registered versions)."""
    uri = None
    if cfg.tracking.enabled:
        try:
            uri = tracking.check_tracking(cfg.tracking)
        except tracking.TrackingError as err:
            fail(str(err))
    try:
        manifest = ensure_shards(cfg)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    connect_ray(address, env={"MLFLOW_TRACKING_URI": uri})
    name = run_name(cfg) + "-teacher"
    run_id = tracking.start_run(cfg, run_name=name, manifest_digest=manifest.digest(),
                                tags={"brcd.job": "train_teacher"}) if uri else None
    try:
        out = read_outputs(result_checkpoint_dir(launch(cfg, run_id=run_id, stages="teacher", name=name)))
        versions = publish(run_id, cfg, out) if run_id else {}
    except BaseException as err:
        if run_id:
            tracking.fail_run(run_id, err)
        raise
    # A stable copy outside the rolling checkpoints (Ray keeps only the last two).
    path = Path(cfg.train.storage_path) / name / "teacher.pt"
    shutil.copyfile(out.checkpoint_dir / "teacher.pt", path)
    return path, versions


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_intermixed_args(argv)
    setup_logging()
    cfg = absolute_paths(config_from_args(args))
    path, versions = train_teacher(cfg, args.address)
    print(f"teacher: {path}")
    if "teacher" in versions:
        print(f"registered: models:/{cfg.tracking.teacher_name}@{cfg.tracking.alias} (version {versions['teacher']})")


if __name__ == "__main__":
    main()
