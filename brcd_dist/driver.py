"""Driver side of a distillation job: resolve paths, attach to Ray, run the Ray Train workers, and read what
the final checkpoint holds. jobs/distill.py, jobs/train_teacher.py, jobs/tune.py and the benchmarks call this."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from brcd_dist import storage
from brcd_dist.config import Config, to_dict
from brcd_dist.models import HashModel, load_hash_model
from brcd_dist.redact import credential_env, redact_env
from brcd_dist.run_guard import check_resume, unique_run_name
from brcd_dist.teacher_reuse import TeacherPlan
from brcd_dist.train.progress import PROGRESS_ENV, VERBOSE_ENV, verbose
from brcd_dist.train.state import Clustering, TrainState, read_state

log = logging.getLogger("brcd_dist")


def absolute_paths(cfg: Config) -> Config:
    """Workers run in other directories (and on other nodes): hand them absolute paths. Inputs resolve against
    the current directory; outputs (checkpoints, the k-means cache) against storage.output_root(), which is not
    the temporary working dir of a submitted job."""

    def ab(p: str, root: Path | None = None) -> str:
        return str(((root or Path.cwd()) / Path(p).expanduser()).resolve()) if p and "://" not in p else p

    out = storage.output_root()
    cfg.data = replace(cfg.data, shards_dir=ab(cfg.data.shards_dir), source_path=ab(cfg.data.source_path))
    cfg.train = replace(cfg.train, storage_path=ab(cfg.train.storage_path, out))
    cfg.train = replace(cfg.train, teacher_cache=ab(cfg.train.teacher_cache, out))
    from brcd_dist.tracking import resolve_tracking_uri  # "" means ./mlflow.db of the driver, not of a worker

    cfg.tracking = replace(cfg.tracking, uri=resolve_tracking_uri(cfg.tracking.uri))
    for role in ("teacher", "student"):
        m = getattr(cfg, role)
        uri = m.uri if (not m.uri or m.uri.startswith(("models:/", "runs:/"))) else ab(m.uri)
        setattr(cfg, role, replace(m, weights_path=ab(m.weights_path), uri=uri))
    return cfg


def connect_ray(address: Optional[str] = None, env: Optional[dict] = None) -> None:
    """Attach to RAY_ADDRESS / --address, or start a local Ray instance (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {k: v for k, v in (env or {}).items() if v}
    # where the object store is (not who may use it: credentials come from each node's own chain)
    for key in (
        "TORCH_EXTENSIONS_DIR",
        "MLFLOW_TRACKING_URI",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        VERBOSE_ENV,
        PROGRESS_ENV,
    ):
        if os.environ.get(key):
            env_vars.setdefault(key, os.environ[key])
    # Ray Train gives up on a worker group that has not started in 60 s; a busy 2-core machine (and the first
    # DeepSpeed op build) can take longer than that without anything being wrong.
    env_vars.setdefault(
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    )
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Ray Train's PlacementGroupCleaner (which frees the CPUs of a run whose controller died, e.g. a trial that ASHA
    # stopped) finds its cluster by RAY_ADDRESS, else by looking for GCS processes on the host, and fails where it
    # sees several. Name the cluster to every Ray worker when we know it (a local instance cannot be named before
    # it starts: see docs/troubleshooting.md).
    if address and address != "auto" and "://" not in address:
        env_vars.setdefault("RAY_ADDRESS", address)
    env_vars = redact_env(env_vars)  # the dashboard shows runtime_env: credentials travel with credential_env()
    # Quiet by default (progress bars and stage lines say where the job is); BRCD_VERBOSE=1 (-v) for Ray's lines.
    level = logging.INFO if verbose() else logging.WARNING
    ray.init(
        address=address,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        log_to_driver=True,
        configure_logging=True,
        logging_level=level,
        logging_config=ray.LoggingConfig(log_level=logging.getLevelName(level)),
    )


def run_name(cfg: Config) -> str:
    return cfg.train.name or unique_run_name("distill")


def launch(
    cfg: Config,
    *,
    run_id: Optional[str] = None,
    stages: str = "all",
    name: Optional[str] = None,
    callbacks: Optional[list] = None,
    teacher: Optional[TeacherPlan] = None,
):
    """Run the workers under a TorchTrainer; returns ray.train.Result. A run with the same name and storage path
    resumes from its latest checkpoint (Ray Train V2), and FailureConfig restarts failed workers from it.
    `teacher`: where stage A takes the teacher from and keeps it (teacher_reuse.resolve; default: the config's
    teacher.uri or a trained one, no reuse)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from brcd_dist import storage
    from brcd_dist.train.worker import run_stages

    t = cfg.train
    name = name or run_name(cfg)
    check_resume(cfg, name)  # the jobs check it before Ray starts; this guards every other caller
    trainer = TorchTrainer(
        run_stages,
        train_loop_config={
            "cfg": to_dict(cfg),
            "teacher": (teacher or TeacherPlan.of_config(cfg)).to_dict(),
            "run_id": run_id,
            "stages": stages,
            "run_dir": storage.join(t.storage_path, name),
            "env": credential_env(tracking_uri=cfg.tracking.uri),
        },
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
            placement_strategy=t.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=t.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # Ray Train's controller and workers print their set-up steps and reports at INFO: -v only.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    # TorchTrainer.fit() registers a SIGINT handler that holds the controller actor's handle, and the controller
    # holds its workers' placement group: restoring the previous handler lets both go when the run ends, instead
    # of keeping their CPUs from the next run of this driver (a sweep's trials after its teacher, say).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        return trainer.fit()
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


@dataclass
class Outputs:
    """What the final checkpoint of a distillation run holds."""

    checkpoint_dir: Path
    state: TrainState
    teacher: HashModel
    student: Optional[HashModel]
    clustering: Optional[Clustering]
    curves: dict

    @property
    def test(self) -> dict:
        return self.state.history.get("test", {})


def read_outputs(checkpoint_dir: Path) -> Outputs:
    d = Path(checkpoint_dir)
    curves = json.loads((d / "pr_curves.json").read_text()) if (d / "pr_curves.json").is_file() else {}
    state = read_state(d)
    teacher = d / "teacher.pt" if (d / "teacher.pt").is_file() else state.teacher_uri  # written once per run
    return Outputs(
        checkpoint_dir=d,
        state=state,
        teacher=load_hash_model(teacher),
        student=load_hash_model(d / "student.pt") if (d / "student.pt").is_file() else None,
        clustering=Clustering.load(d / "clustering.pt")
        if (d / "clustering.pt").is_file()
        else Clustering.load(state.clustering_uri)
        if state.clustering_uri
        else None,
        curves=curves,
    )


def result_checkpoint_dir(result) -> Path:
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("the run reported no checkpoint")
    ckpt = result.checkpoint
    if ckpt.filesystem.type_name == "local":
        return Path(ckpt.path)
    return Path(ckpt.to_directory())  # remote storage (s3://, gs://): a local copy to read the outputs from


def launch_teacher_job(
    cfg: Config, *, run_id: Optional[str] = None, name: Optional[str] = None, teacher: Optional[TeacherPlan] = None
) -> tuple[str, Outputs]:
    """Stage A alone. Returns the teacher's file (the plan's kept teacher, or written once beside the run's
    checkpoints under train.storage_path: Ray keeps only the last two checkpoints), and the run's outputs."""
    name = name or run_name(cfg) + "-teacher"
    out = read_outputs(result_checkpoint_dir(launch(cfg, run_id=run_id, stages="teacher", name=name, teacher=teacher)))
    return out.state.teacher_uri, out
