"""Shared command-line front for the jobs: --config, --address, key=value overrides, one-line errors.

Light on purpose (argparse, yaml, brcd_dist.config): a job checks its arguments and config with these, then imports
torch, Ray and MLflow inside main(), so that bad input is refused in about a second (tests/test_cli_door.py asserts
that a refusal imported none of them)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python jobs/X.py` from a checkout, installed or not

from brcd_dist.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "fashion_mnist.yaml"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the embedded Fashion-MNIST config)"
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--resume-anyway",
        action="store_true",
        help="resume a run of the same train.name even if it was started with another config",
    )
    p.add_argument(
        "--force-alias",
        action="store_true",
        help="move the registry alias to the new version even if its test mAP is below the holder's",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. brcd.alpha=0.7 train.workers=2")
    return p


def fail(message: str, code: int = 2) -> None:
    from brcd_dist.redact import redact  # a tracking URI or shard URL in the message may carry credentials

    print(f"error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def config_from_args(args, training: bool = True):
    flags = [
        f"train.resume_anyway={getattr(args, 'resume_anyway', False)}",
        f"tracking.force_alias={getattr(args, 'force_alias', False)}",
    ]
    try:
        cfg = load_config(args.config, [*args.overrides, *flags], training=training)
    except ConfigError as err:
        fail(str(err))
    from brcd_dist.storage import use_s3_endpoint

    use_s3_endpoint(cfg.train.s3_endpoint)  # before anything opens an s3:// path; workers get it from the driver
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def preflight(cfg, address=None, name=None):
    """What can be wrong with the input, checked before any worker starts, then the attachment to Ray:
    the run name (not resumed under another config), the tracking store and registry names, then the shards
    (made when missing). Returns (tracking uri or None, manifest); a problem ends the job with one line."""
    from brcd_dist import tracking
    from brcd_dist.data import ensure_shards
    from brcd_dist.driver import connect_ray
    from brcd_dist.run_guard import RunReuseError, check_resume

    if name:
        try:
            check_resume(cfg, name)
        except RunReuseError as err:
            fail(str(err))
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
    return uri, manifest
