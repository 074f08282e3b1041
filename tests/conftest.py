"""Shared fixtures of the end-to-end tests (tests/test_pipeline.py, test_fault_resume.py, test_job_submit.py):
tiny Fashion-MNIST shards made once per session, the tiny run's config overrides, one local Ray instance for
the session, and the uninterrupted tiny run that several tests read.

The tiny run: 400 training / 400 test images, 80 to train on (8 per class), resnet10t teacher for 1 epoch,
mobilenetv3_small_050 student for 2 epochs, 2 workers x 16 images a step (4 steps an epoch), a checkpoint every
3 steps and at each epoch end. Most of its minute is start-up (Ray, worker processes, DeepSpeed).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Telemetry off in every process the tests start (Ray, MLflow inherit it): nothing may try to leave the machine.
for _key, _value in (("RAY_USAGE_STATS_ENABLED", "0"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_CONFIG = REPO / "configs" / "fashion_mnist.yaml"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlite_uri(directory: Path) -> str:
    """A SQLite MLflow tracking store in `directory`."""
    return f"sqlite:///{directory}/mlflow.db"


def tiny_overrides(shards_dir: Path, storage: Path, name: str, *, max_failures: int = 0) -> list[str]:
    """key=value overrides of the tiny run (on top of configs/fashion_mnist.yaml), as jobs/distill.py takes them."""
    return [
        "data.source=shards",
        f"data.shards_dir={shards_dir}",
        "teacher.name=resnet10t",
        "student.name=mobilenetv3_small_050",
        "train.teacher_epochs=1",
        "train.teacher_split=train",
        "train.epochs=2",
        "train.batch_size=16",
        "train.checkpoint_every=3",
        "train.eval_every=1",
        "eval.topk=50",
        "brcd.clusters=4",
        "tracking.enabled=false",
        f"train.max_failures={max_failures}",
        f"train.storage_path={storage}",
        f"train.name={name}",
    ]


def tiny_config(shards_dir: Path, storage: Path, name: str, *, max_failures: int = 0):
    from brcd_dist.config import load_config
    from brcd_dist.driver import absolute_paths

    return absolute_paths(
        load_config(DEFAULT_CONFIG, tiny_overrides(shards_dir, storage, name, max_failures=max_failures))
    )


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    from brcd_dist.data import write_shards

    d = tmp_path_factory.mktemp("tiny_shards")
    write_shards(
        d, "fashion_mnist", FASHION_MNIST, train_per_class=8, max_images=400, samples_per_shard=50, progress=False
    )
    return d


@dataclass
class LocalRay:
    temp_dir: Path
    dashboard: str  # URL, for the state API (pass it: other Ray instances on the host make "auto" ambiguous)


@pytest.fixture(scope="session")
def local_ray(object_store) -> LocalRay:
    """A local Ray instance of this session only: 2 CPUs (one per train worker), its own temp dir (short: Ray's
    socket paths under it must stay < 108 chars) and ports, so that other Ray instances on the host neither
    see nor disturb it; the dashboard runs for the state API (list_actors) that the fault test uses. Started
    after the session's object store, so that its processes (Ray Train's controller, Tune's trials) find the
    store by the standard AWS variables, as a cluster's nodes find theirs (a run may keep its checkpoints there)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="brcd-ray-")
    port = free_port()
    address = os.environ.pop("RAY_ADDRESS", None)  # a new local instance, not a cluster named by the caller
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    try:
        yield LocalRay(temp_dir=Path(temp_dir), dashboard=f"http://127.0.0.1:{port}")
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


@dataclass
class TinyRun:
    cfg: object  # brcd_dist.config.Config
    result: object  # ray.train.Result
    seconds: float

    @property
    def storage(self) -> Path:
        return Path(self.cfg.train.storage_path) / self.cfg.train.name


def run_tiny(shards_dir: Path, storage: Path | str, name: str, *, max_failures: int = 0, during=None) -> TinyRun:
    """The tiny run under TorchTrainer on the session's Ray (`storage` a local path or an s3:// URI);
    `during(run_dir, finished)`, if given, runs in a thread beside it (the fault test's killer; run_dir a path or
    URI) and should return once the threading.Event `finished` is set."""
    import threading

    from brcd_dist import storage as store
    from brcd_dist.driver import launch

    cfg = tiny_config(shards_dir, storage, name, max_failures=max_failures)
    finished = threading.Event()
    thread = None
    if during is not None:
        run_dir = store.join(cfg.train.storage_path, name)
        thread = threading.Thread(target=during, args=(run_dir, finished), daemon=True)
        thread.start()
    t0 = time.perf_counter()
    try:
        result = launch(cfg)
    finally:
        finished.set()
        if thread is not None:
            thread.join(timeout=30)
    return TinyRun(cfg=cfg, result=result, seconds=time.perf_counter() - t0)


@pytest.fixture(scope="session")
def uninterrupted_run(local_ray, tiny_shards, tmp_path_factory) -> TinyRun:
    """The tiny run, start to end without a failure (max_failures=1 like the fault test's run, so that the two
    differ only by the kill)."""
    return run_tiny(tiny_shards, tmp_path_factory.mktemp("runs"), "uninterrupted", max_failures=1)


@pytest.fixture(scope="session")
def object_store():
    """SeaweedFS on 127.0.0.1 for this session (tests/object_store.py), its endpoint and keys in os.environ by the
    standard AWS variable names while it runs, so that the project's own client code reaches it."""
    from object_store import start_seaweedfs

    store = start_seaweedfs()
    before = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    try:
        yield store
    finally:
        store.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_shards(object_store) -> str:
    """The tiny shards (as tiny_shards) and their manifest written to the session's bucket: their s3:// URL."""
    from brcd_dist.data import write_shards

    url = object_store.url("tiny_shards")
    write_shards(
        url, "fashion_mnist", FASHION_MNIST, train_per_class=8, max_images=400, samples_per_shard=50, progress=False
    )
    return url
