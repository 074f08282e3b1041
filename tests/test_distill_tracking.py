"""What `python jobs/distill.py` leaves in MLflow, on a real sqlite store in a temp dir and a real
local Ray instance that the job starts itself (DESIGN §1: params, metrics per step/epoch, plots, checkpoints;
student and teacher registered as NAME@candidate), and how it refuses bad input before anything starts.

One tiny run serves every check of the run (`distill_run`): conftest's tiny run (80 images to train on, 2
DeepSpeed workers x 16 images a step, 4 steps an epoch) with tracking on, 3 teacher epochs so that the teacher
too reaches a per-step logging step (one every LOG_EVERY = 10 global steps), and checkpoints at epoch ends
only. The final checkpoint is the run's in-memory result (student.pt, test mAPs): MLflow must hold the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DEFAULT_CONFIG, REPO, free_port, sqlite_uri, tiny_overrides
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DISTILL = REPO / "jobs" / "distill.py"
EVALUATE = REPO / "jobs" / "evaluate.py"
STUDENT_URI = "models:/brcd-student@candidate"
TEACHER_URI = "models:/brcd-teacher@candidate"
TEST_MAPS = ("test_query/sshp_map", "test_query/ashp_map", "test_query/teacher_map")
PLOTS = (
    "plots/loss_curves.png",
    "plots/map_per_epoch.png",
    "plots/precision_recall.png",
    "plots/bit_agreement.png",
    "plots/throughput.png",
)
TEACHER_EPOCHS, STUDENT_EPOCHS = 3, 2
# A pre-flight failure costs the interpreter's imports (15-25 s on the loaded 2-core machine); MLflow's REST
# client alone, with its default retries, would keep trying an unreachable server for minutes.
QUICK_FAILURE_S = 60


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def job_env(ray_tmp: Path | None = None) -> dict:
    """The caller's environment, minus what would point the job at another Ray or MLflow; Ray's temp root in
    `ray_tmp` if given (so that a test can see whether Ray started, and Ray leaves nothing in /tmp/ray)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def run_job(args: list, cwd: Path, env: dict, timeout: float = 600) -> Job:
    """`python ARGS` in cwd; on timeout its whole process group (Ray's processes included) is killed."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args[0]} did not finish in {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}")
    return Job(proc.returncode, out, err, time.monotonic() - t0)


def short_tmp() -> Path:
    """Ray's socket paths live under its temp root and must stay under 108 characters: not under pytest's."""
    return Path(tempfile.mkdtemp(prefix="brcd-r-"))


def distill_overrides(shards: Path, work: Path) -> list[str]:
    tiny = [o for o in tiny_overrides(shards, work / "runs", "tracked") if not o.startswith("tracking.enabled=")]
    return [
        *tiny,
        "tracking.enabled=true",
        f"tracking.uri={sqlite_uri(work)}",
        f"train.teacher_epochs={TEACHER_EPOCHS}",
        f"train.epochs={STUDENT_EPOCHS}",
        "train.checkpoint_every=1000",
    ]


def snapshot(directory: Path) -> dict:
    """Every file and directory under `directory`: relative path -> (size, mtime_ns, sha256) or 'dir'."""
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_dir():
            out[rel] = "dir"
        else:
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ----------------------------------------------------------------------------- the tracked run


@dataclass
class DistillRun:
    job: Job
    work: Path  # the job's cwd; holds mlflow.db, mlruns/ and runs/
    cfg: object  # the resolved Config the job should have run with
    run: object  # mlflow.entities.Run
    outputs: object  # brcd_dist.driver.Outputs of the final checkpoint
    shards: Path

    @property
    def uri(self) -> str:
        return sqlite_uri(self.work)

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def final_checkpoint(storage: Path) -> Path:
    """The run's last checkpoint: the one whose state says stage D is done."""
    from brcd_dist.train.state import read_state

    done = [d for d in sorted(storage.glob("checkpoint_*")) if d.is_dir() and read_state(d).stage == "done"]
    assert len(done) == 1, f"expected one finished checkpoint under {storage}, got {done}"
    return done[0]


@pytest.fixture(scope="module")
def distill_run(tiny_shards, tmp_path_factory) -> DistillRun:
    from mlflow import MlflowClient

    from brcd_dist.config import load_config
    from brcd_dist.driver import absolute_paths, read_outputs

    work = tmp_path_factory.mktemp("distill")
    overrides = distill_overrides(tiny_shards, work)
    ray_tmp = short_tmp()
    try:
        job = run_job([DISTILL, *overrides], cwd=work, env=job_env(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert job.returncode == 0, f"distill.py failed ({job.seconds:.0f} s):\n{job.stdout[-3000:]}\n{job.stderr[-5000:]}"
    cfg = absolute_paths(load_config(DEFAULT_CONFIG, overrides))  # as jobs/distill.py resolves it
    client = MlflowClient(tracking_uri=sqlite_uri(work))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, runs
    outputs = read_outputs(final_checkpoint(work / "runs" / "tracked"))
    print(f"tracked tiny distill run: {job.seconds:.1f} s")
    return DistillRun(job=job, work=work, cfg=cfg, run=runs[0], outputs=outputs, shards=tiny_shards)


def steps_per_epoch(run: DistillRun, split: str, epochs: int) -> list[int]:
    """Steps of each epoch, as the loader gives every rank (DESIGN §1 streamed batches)."""
    from brcd_dist.data import load_manifest, train_batches

    manifest, cfg = load_manifest(run.shards), run.cfg
    return [
        len(
            train_batches(
                manifest,
                split,
                rank=0,
                world_size=cfg.train.workers,
                batch_size=cfg.train.batch_size,
                num_workers=0,
                image_size=cfg.data.image_size,
                in_chans=cfg.data.in_chans,
                epoch=e,
                seed=cfg.train.seed,
            )
        )
        for e in range(epochs)
    ]


def epoch_end_steps(run: DistillRun) -> tuple[list[int], list[int]]:
    """Global steps at the end of each teacher epoch and of each student epoch."""
    teacher = np.cumsum(steps_per_epoch(run, run.cfg.train.teacher_split, TEACHER_EPOCHS))
    student = teacher[-1] + np.cumsum(steps_per_epoch(run, "train", STUDENT_EPOCHS))
    return [int(s) for s in teacher], [int(s) for s in student]


def history(run: DistillRun, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in run.client.get_metric_history(run.run.info.run_id, key))


def artifact_files(run: DistillRun, path: str | None = None) -> set[str]:
    files = set()
    for a in run.client.list_artifacts(run.run.info.run_id, path):
        files |= artifact_files(run, a.path) if a.is_dir else {a.path}
    return files


def download(run: DistillRun, path: str, dst: Path) -> Path:
    return Path(run.client.download_artifacts(run.run.info.run_id, path, str(dst)))


def test_distill_job_succeeds_prints_the_result_table_and_finishes_its_run(distill_run):
    assert re.search(r"^student \(SSHP\) +student +student +0\.\d{4}", distill_run.job.stdout, re.MULTILINE)
    assert distill_run.run.info.status == "FINISHED"
    assert distill_run.run.info.run_name == "tracked"


def test_distill_job_says_which_stage_runs_and_ends_with_what_it_did_and_what_to_do_next(distill_run):
    """The run's lines as a user reads them: stage i of 4 as each starts, then a summary naming the sizes and
    splits evaluated, the time per stage, the MLflow run, the registered versions and the alias decision, and the
    index and search commands for the student just registered."""
    from brcd_dist.data import load_manifest

    out, splits = distill_run.job.stdout, load_manifest(distill_run.shards).splits
    starts = [line.split("  (run ")[0] for line in out.splitlines() if line.startswith("stage ")]
    assert starts == ["stage 1/4 teacher", "stage 2/4 clustering", "stage 3/4 student", "stage 4/4 evaluation"]
    summary = out[out.index("Test retrieval: ") :].splitlines()
    db, test = splits["database"].count, splits["test_query"].count
    assert summary[0] == (
        f"Test retrieval: {test:,} test queries against {db:,} database images, 64-bit codes, mAP@50 by Hamming ranking"
    )
    labels = {line.split("  ", 1)[0] for line in summary if line and not line.startswith(" ")}
    assert {"data", "trained", "time", "mlflow", "registered", "checkpoint", "next"} <= labels
    (time_line,) = [line for line in summary if line.startswith("time ")]
    assert all(f"{stage} " in time_line for stage in ("shards", "teacher", "clustering", "student", "evaluation"))
    run_id = distill_run.run.info.run_id
    assert f"run {run_id} in experiment {distill_run.cfg.tracking.experiment}" in out
    assert "models:/brcd-student/1 (@candidate moved to it)" in out  # the first versions: the alias moves
    assert "models:/brcd-teacher/1 (@candidate moved to it)" in out
    assert ".venv/bin/python jobs/index.py models:/brcd-student@candidate --images " in out
    assert f"jobs/search.py indexes/brcd-student --query-key {splits['database'].keys[0]} --k 10" in out


def test_run_params_are_the_flattened_resolved_config(distill_run):
    from brcd_dist.config import flatten

    expected = {k: str(v) for k, v in flatten(distill_run.cfg).items()}
    assert distill_run.run.data.params == expected


def test_config_artifact_is_the_resolved_config(distill_run, tmp_path):
    from brcd_dist.config import to_dict

    logged = yaml.safe_load(download(distill_run, "config.yaml", tmp_path).read_text())
    assert logged == to_dict(distill_run.cfg)


def test_the_steps_of_the_run_are_those_of_its_epochs(distill_run):
    """The premise of the metric checks below: teacher then student epochs, 4 steps each, one global count."""
    teacher_ends, student_ends = epoch_end_steps(distill_run)
    assert teacher_ends == [4, 8, 12] and student_ends == [16, 20]
    assert distill_run.outputs.state.global_step == student_ends[-1]


def test_each_loss_term_is_logged_every_log_every_steps_of_its_stage(distill_run):
    from brcd_dist.train.epochs import LOG_EVERY

    teacher_ends, student_ends = epoch_end_steps(distill_run)
    teacher_steps = list(range(LOG_EVERY, teacher_ends[-1] + 1, LOG_EVERY))
    student_steps = [s for s in range(LOG_EVERY, student_ends[-1] + 1, LOG_EVERY) if s > teacher_ends[-1]]
    assert teacher_steps and student_steps  # the run is long enough for the check to mean something
    expected = {
        "teacher/loss": teacher_steps,
        "student/loss": student_steps,
        "student/kd": student_steps,
        "student/self": student_steps,
    }
    for key, steps in expected.items():
        logged = history(distill_run, key)
        assert [s for s, _ in logged] == steps, key
        assert all(math.isfinite(v) for _, v in logged), (key, logged)


def test_student_loss_is_kd_plus_self_at_each_logged_step(distill_run):
    """kd_weight = λ_self = 1 here (DESIGN §2 total student loss)."""
    kd, own, total = (dict(history(distill_run, f"student/{k}")) for k in ("kd", "self", "loss"))
    for step, value in total.items():
        assert value == pytest.approx(kd[step] + own[step], rel=1e-5), step


def test_each_epoch_logs_its_mean_losses_at_its_last_step(distill_run):
    teacher_ends, student_ends = epoch_end_steps(distill_run)
    expected = {
        "teacher/epoch_loss": teacher_ends,
        "student/epoch_loss": student_ends,
        "student/epoch_kd": student_ends,
        "student/epoch_self": student_ends,
    }
    rows = distill_run.outputs.state.history["train"]
    for key, steps in expected.items():
        logged = history(distill_run, key)
        assert [s for s, _ in logged] == steps, key
        assert [v for _, v in logged] == pytest.approx([r[key] for r in rows if key in r], rel=1e-12), key


def test_each_evaluation_logs_validation_map_in_both_paradigms(distill_run):
    _, student_ends = epoch_end_steps(distill_run)
    evals = distill_run.outputs.state.history["eval"]
    assert [e["epoch"] for e in evals] == list(range(1, STUDENT_EPOCHS + 1))  # train.eval_every=1
    for key in ("val_query/sshp_map", "val_query/ashp_map"):
        assert history(distill_run, key) == [(s, e[key]) for s, e in zip(student_ends, evals)], key


def test_test_maps_are_logged_as_the_final_checkpoint_holds_them(distill_run):
    test, metrics = distill_run.outputs.test, distill_run.run.data.metrics
    for key in TEST_MAPS:
        assert 0.0 <= test[key] <= 1.0
        assert metrics[key] == test[key], key


def test_every_artifact_is_logged(distill_run):
    assert {"config.yaml", "clustering/clustering.npz", *PLOTS} <= artifact_files(distill_run)


def test_plots_are_png_images(distill_run, tmp_path):
    for name in PLOTS:
        with Image.open(download(distill_run, name, tmp_path)) as im:
            assert im.format == "PNG" and im.width >= 200 and im.height >= 200, name


def test_clustering_artifact_is_the_run_s_clustering(distill_run, tmp_path):
    c = distill_run.outputs.clustering
    with np.load(download(distill_run, "clustering/clustering.npz", tmp_path)) as npz:
        for name in ("centroids", "masks", "agreement", "counts"):
            assert np.array_equal(npz[name], getattr(c, name).numpy()), name


def test_student_and_teacher_are_logged_models_of_the_run(distill_run):
    run = distill_run.run
    logged = distill_run.client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted((m.name, m.source_run_id) for m in logged) == [
        ("student", run.info.run_id),
        ("teacher", run.info.run_id),
    ]


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_candidate_alias_names_this_run_s_model_with_its_test_maps(distill_run, role):
    client, run, cfg = distill_run.client, distill_run.run, distill_run.cfg
    mv = client.get_model_version_by_alias(f"brcd-{role}", "candidate")
    (logged,) = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id]) if m.name == role]
    assert mv.source == f"models:/{logged.model_id}"
    assert mv.tags["run_id"] == run.info.run_id and mv.tags["brcd.role"] == role
    assert mv.tags["arch"] == getattr(cfg, role).name and mv.tags["bits"] == str(cfg.brcd.bits)
    for key in TEST_MAPS:
        assert float(mv.tags[key.replace("/", ".")]) == round(distill_run.outputs.test[key], 5), key


def test_registered_student_loads_by_alias_in_a_fresh_process_and_encodes_like_the_run_s_student(distill_run, tmp_path):
    from brcd_dist.data import eval_batches, load_manifest

    cfg = distill_run.cfg
    batch = next(
        iter(
            eval_batches(
                load_manifest(distill_run.shards),
                "test_query",
                rank=0,
                world_size=1,
                batch_size=64,
                num_workers=0,
                image_size=cfg.data.image_size,
                in_chans=cfg.data.in_chans,
            )
        )
    )
    torch.save(batch["image"], tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import torch
        from brcd_dist import tracking
        from brcd_dist.models import HashModel
        model = tracking.load_model({STUDENT_URI!r}, tracking_uri={distill_run.uri!r})
        assert isinstance(model, HashModel) and not model.training, type(model)
        torch.save(model.encode(torch.load("images.pt")), "codes.pt")
    """)
    job = run_job(["-c", script], cwd=tmp_path, env=job_env(), timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    loaded = torch.load(tmp_path / "codes.pt")
    expected = distill_run.outputs.student.eval().encode(batch["image"])
    assert loaded.shape == (64, cfg.brcd.bits)
    assert torch.equal(loaded, expected)


def test_evaluate_job_reproduces_the_run_s_test_maps_from_the_registered_student(distill_run):
    cfg = distill_run.cfg
    job = run_job(
        [
            EVALUATE,
            STUDENT_URI,
            "data.source=shards",
            f"data.shards_dir={distill_run.shards}",
            f"eval.topk={cfg.eval.topk}",
            f"tracking.uri={distill_run.uri}",
        ],
        cwd=distill_run.work,
        env=job_env(),
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    printed = json.loads(job.stdout[job.stdout.index("{") : job.stdout.rindex("}") + 1])
    assert printed == {key: distill_run.outputs.test[key] for key in TEST_MAPS}


# ----------------------------------------------------------------------------- refusals before anything starts


def test_unreachable_tracking_server_fails_fast_in_one_line_before_ray_or_any_run(tiny_shards, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # free_port closes its socket: nothing listens there
    overrides = [
        o
        for o in tiny_overrides(tiny_shards, tmp_path / "runs", "unreachable")
        if not o.startswith("tracking.enabled=")
    ]
    ray_tmp = short_tmp()
    try:
        job = run_job(
            [DISTILL, *overrides, "tracking.enabled=true", f"tracking.uri={uri}"],
            cwd=tmp_path,
            env=job_env(ray_tmp),
            timeout=300,
        )
        ray_files = list(ray_tmp.iterdir())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"unreachable tracking server: exit {job.returncode} after {job.seconds:.1f} s")
    assert job.returncode != 0
    lines = job.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and uri in lines[0], job.stderr
    assert job.seconds < QUICK_FAILURE_S
    assert ray_files == []  # no Ray session was started
    assert list(tmp_path.iterdir()) == []  # no fallback mlflow.db, no mlruns/, no run storage


def test_bad_config_value_exits_2_with_one_line_and_changes_nothing(tiny_shards, tmp_path):
    """In a working directory that already holds a tracking store and shards at the default paths."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    client.create_run(client.create_experiment("earlier", artifact_location=(tmp_path / "mlruns").as_uri()))
    shutil.copytree(tiny_shards, tmp_path / "data" / "fashion_mnist")
    before = snapshot(tmp_path)
    ray_tmp = short_tmp()
    try:
        job = run_job([DISTILL, "brcd.alpha=2"], cwd=tmp_path, env=job_env(ray_tmp), timeout=300)
        ray_files = list(ray_tmp.iterdir())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"bad config value: exit {job.returncode} after {job.seconds:.1f} s")
    assert job.returncode == 2
    assert job.stderr.splitlines() == ["error: brcd.alpha=2.0: must be in [0, 1]"]
    assert ray_files == []
    assert snapshot(tmp_path) == before


def test_the_trained_teacher_is_kept_once_under_its_content_key(distill_run):
    """Stage A writes the teacher it trains straight to teachers/KEY.pt (teacher_reuse.resolve's plan), which the
    run's state names: no second copy beside the checkpoints, none rewritten by the driver."""
    from brcd_dist import teacher_reuse
    from brcd_dist.data import load_manifest

    key = teacher_reuse.teacher_key(distill_run.cfg, load_manifest(distill_run.shards).digest())
    kept = distill_run.work / "runs" / "teachers" / f"{key}.pt"
    assert kept.is_file() and kept.with_suffix(".json").is_file()
    assert distill_run.outputs.state.teacher_uri == str(kept)
    assert not (distill_run.work / "runs" / "tracked" / "teacher.pt").exists()
    assert "teacher: kept as" in distill_run.job.stdout
    assert sorted(p.name for p in (distill_run.work / "runs" / "teachers" / "cache").iterdir())  # codes, k-means
