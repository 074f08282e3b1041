"""Shared command-line front for the jobs: one parser style (--config plus key=value where a job has a config,
--address where it starts Ray, -v / -q everywhere), one-line errors with exit code 2.

Light on purpose (argparse, yaml, brcd_dist.config): a job checks its arguments and config with these, then imports
torch, Ray and MLflow inside main(), so that bad input is refused in about a second (tests/test_cli_door.py asserts
that a refusal imported none of them)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python jobs/X.py` from a checkout, installed or not

from brcd_dist.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "fashion_mnist.yaml"
VERBOSE_ENV, PROGRESS_ENV = "BRCD_VERBOSE", "BRCD_PROGRESS"  # as brcd_dist.train.progress reads them
EXIT_CODES = "exit codes: 0 done, 1 the run failed after it started, 2 bad input (one line, nothing written)"


def doc_parts(doc: str) -> tuple[str, str]:
    """A job's module docstring -> (its first paragraph as one line, the rest as --help's epilog)."""
    first, _, rest = doc.strip().partition("\n\n")
    return textwrap.fill(" ".join(first.split()), width=100), rest.rstrip()


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the jobs' one-line form (`error: ...`, exit code 2)."""

    def error(self, message: str) -> None:
        fail(f"{message} (see {self.prog} --help)")


def parser(
    doc: str,
    *,
    config: bool = True,
    ray: bool = True,
    resume: bool = False,
    alias: bool = False,
    retrain: bool = False,
    prog: str | None = None,
    first: tuple[str, str] | None = None,
) -> argparse.ArgumentParser:
    """The parser every job starts from. `config`: --config and key=value overrides; `ray`: --address; `resume`:
    --resume-anyway; `alias`: --force-alias; `retrain`: --retrain-teacher; `first`: (name, help) of a positional
    before the overrides. A job gets only the flags it reads."""
    description, epilog = doc_parts(doc)
    p = _Parser(
        prog=prog,
        description=description,
        epilog=f"{epilog}\n\n{EXIT_CODES}" if epilog else EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    loud = p.add_mutually_exclusive_group()
    loud.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="keep Ray's, DeepSpeed's and torch's own log lines (BRCD_VERBOSE=1)",
    )
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage lines (BRCD_PROGRESS=0)")
    if config:
        p.add_argument(
            "--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/fashion_mnist.yaml)"
        )
    if ray:
        p.add_argument(
            "--address",
            default=None,
            help="Ray cluster to attach to, HOST:6379 or auto (default: RAY_ADDRESS, else a local Ray)",
        )
    if resume:
        p.add_argument(
            "--resume-anyway",
            action="store_true",
            help="resume a run of the same train.name even if it was started with another config",
        )
    if alias:
        p.add_argument(
            "--force-alias",
            action="store_true",
            help="move the registry alias to the new version even if its test mAP is below the holder's",
        )
    if retrain:
        p.add_argument(
            "--retrain-teacher",
            action="store_true",
            help="train the teacher even when an earlier run kept one with the same content key",
        )
    if first:
        p.add_argument(first[0], help=first[1])
    if config:
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="config overrides, e.g. brcd.alpha=0.7 train.workers=2 (docs/reference/config.md)",
        )
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then set the verbosity variables that the driver and (through Ray's runtime env) the workers read."""
    args = p.parse_intermixed_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    if args.quiet:
        os.environ[PROGRESS_ENV] = "0"
    return args


def fail(message: str, code: int = 2) -> None:
    from brcd_dist.redact import redact  # a tracking URI or shard URL in the message may carry credentials

    print(f"error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def config_from_args(args, training: bool = True):
    """The job's config: --config, then key=value, then the flags; tracking.uri="" takes MLFLOW_TRACKING_URI."""
    flags = []
    if getattr(args, "resume_anyway", False):
        flags.append("train.resume_anyway=true")
    if getattr(args, "force_alias", False):
        flags.append("tracking.force_alias=true")
    try:
        cfg = load_config(args.config, [*args.overrides, *flags], training=training)
    except ConfigError as err:
        fail(str(err))
    if not cfg.tracking.uri and os.environ.get("MLFLOW_TRACKING_URI"):
        cfg.tracking = replace(cfg.tracking, uri=os.environ["MLFLOW_TRACKING_URI"])
    from brcd_dist.storage import use_s3_endpoint

    use_s3_endpoint(cfg.train.s3_endpoint)  # before anything opens an s3:// path; workers get it from the driver
    return cfg


def unvalidated_config(args):
    """The config as the file and the overrides set it, without its checks (some import torch), or None when it
    does not even parse (config_from_args then reports why)."""
    try:
        return load_config(args.config, args.overrides, validate=False)
    except ConfigError:
        return None


def tracking_uri(uri: str = "") -> str:
    """The tracking store a job will use, without importing MLflow: `uri`, else MLFLOW_TRACKING_URI, else
    sqlite:///<output root>/mlflow.db (as brcd_dist.tracking resolves "")."""
    from brcd_dist.storage import output_root

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_root()}/mlflow.db"


def check_model_reachable(model: str, uri: str, what: str) -> None:
    """Refuse, before MLflow is imported (which would create an empty sqlite store), a model that cannot exist:
    a file path that is not there, or a models:/ / runs:/ URI while the sqlite tracking store has no file."""
    if model.startswith(("models:/", "runs:/")):
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
            fail(f"{what} {model}: no tracking store at {uri} (set tracking.uri or MLFLOW_TRACKING_URI)")
    elif "://" not in model and not Path(model).is_file():
        fail(
            f"{what} {model!r}: no such file "
            "(expected models:/NAME@alias, models:/NAME/VERSION, runs:/RUN/PATH or a file)"
        )


def check_web_shards(cfg, manifest) -> None:
    """Shards over http(s): the first shard of each split answers (credentials right, host known, file there), or
    the job ends now with the shard and the status, before any worker starts."""
    from brcd_dist import storage
    from brcd_dist.data.manifest import shard_url

    if storage.scheme(cfg.data.shards_url) not in ("http", "https"):
        return
    for split in manifest.splits.values():
        if split.shards:
            try:
                storage.probe(shard_url(split.shards[0], manifest.shards_dir, cfg.data.shards_url))
            except storage.UnreadableError as err:
                fail(str(err))


def setup_logging() -> None:
    level = logging.WARNING if os.environ.get(PROGRESS_ENV) == "0" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def preflight(cfg, name=None, timings: dict | None = None):
    """What can be wrong with the input, checked before any worker starts (attach to Ray after it, with
    `connect`): the run name (not resumed under another config), the tracking store and registry names, then the
    shards (made when missing). Returns (tracking uri or None, manifest); a problem ends the job with one line.
    `timings`, if given, gets the seconds the shards took under "shards"."""
    import time

    from brcd_dist import tracking
    from brcd_dist.data import ensure_shards
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
    t0 = time.perf_counter()
    try:
        manifest = ensure_shards(cfg)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    if timings is not None:
        timings["shards"] = time.perf_counter() - t0
    check_web_shards(cfg, manifest)
    return uri, manifest


def connect(address, tracking_uri) -> None:
    """Attach to Ray (a cluster at `address`, or a local instance), the tracking store named to its processes."""
    from brcd_dist.driver import connect_ray

    connect_ray(address, env={"MLFLOW_TRACKING_URI": tracking_uri})
