"""Runs are not silently reused or replaced: a run name resumes only under its own config,
default names are unique, an alias moves only to a version at least as good as its holder, and the teacher copy
is atomic."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from brcd_dist.config import Config, config_digest
from brcd_dist.run_guard import (
    RunReuseError,
    alias_may_move,
    check_resume,
    unique_run_name,
)


def _cfg(storage: Path, **brcd) -> Config:
    cfg = Config()
    cfg.train.storage_path = str(storage)
    cfg.brcd = dataclasses.replace(cfg.brcd, **brcd)
    return cfg


def _checkpoint(storage: Path, name: str, digest: str) -> None:
    d = storage / name / "checkpoint_2026-11-29_12-00-00.000000"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"stage": "student", "config_digest": digest}))


def test_resume_under_the_same_config_is_allowed(tmp_path):
    cfg = _cfg(tmp_path)
    _checkpoint(tmp_path, "run", config_digest(cfg))
    assert check_resume(cfg, "run") is None
    assert check_resume(cfg, "new-name") is None


def test_digest_ignores_keys_that_only_name_place_or_log_a_run(tmp_path):
    a, b = _cfg(tmp_path), _cfg(tmp_path / "elsewhere")
    b.train.max_failures, b.tracking.uri, b.train.name = 7, "http://127.0.0.1:1", "x"
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest(_cfg(tmp_path, alpha=0.7))


def test_resume_under_another_config_is_refused_with_one_line(tmp_path):
    _checkpoint(tmp_path, "run", config_digest(_cfg(tmp_path)))
    with pytest.raises(RunReuseError) as err:
        check_resume(_cfg(tmp_path, alpha=0.7), "run")
    assert str(err.value).startswith("train.name='run': ") and "--resume-anyway" in str(err.value)
    assert "\n" not in str(err.value)


def test_resume_anyway_lets_it_through(tmp_path):
    _checkpoint(tmp_path, "run", "0123456789abcdef")
    cfg = _cfg(tmp_path, alpha=0.7)
    cfg.train.resume_anyway = True
    assert check_resume(cfg, "run") == "0123456789abcdef"


def test_distill_refuses_a_reused_name_before_ray(tmp_path):
    storage = tmp_path / "runs"
    _checkpoint(storage, "mine", "0123456789abcdef")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            str(repo / "jobs" / "distill.py"),
            f"train.storage_path={storage}",
            "train.name=mine",
            f"data.shards_dir={tmp_path / 'shards'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: train.name='mine': ")
    assert not (tmp_path / "shards").exists() and not (tmp_path / "mlflow.db").exists()


def test_default_run_names_are_unique_within_a_second():
    names = {unique_run_name() for _ in range(100)}
    assert len(names) == 100 and all(n.startswith("distill-") for n in names)


@pytest.mark.parametrize(
    "holder, new, force, moves",
    [
        (None, 0.5, False, True),
        (0.6, 0.6, False, True),
        (0.6, 0.7, False, True),
        (0.6, 0.5, False, False),
        (0.6, None, False, False),
        (0.6, 0.5, True, True),
    ],
)
def test_alias_moves_only_to_a_version_at_least_as_good(holder, new, force, moves):
    assert alias_may_move(holder, new, force) is moves


def test_registry_alias_stays_on_the_better_version(tmp_path, monkeypatch):
    import torch

    from brcd_dist import tracking
    from brcd_dist.models import HashModel

    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = HashModel("resnet10t", 16, 1, 32)
    versions = []
    run_id = tracking.start_run(cfg, run_name="guard")
    uri = tracking.log_hash_model(run_id, model, "student", torch.zeros(2, 1, 32, 32))
    for score, force, holds in ((0.6, False, 0), (0.5, False, 0), (0.5, True, 2)):
        versions.append(
            tracking.register_model(
                uri, "guarded", "candidate", {"test_query.sshp_map": score}, "student", force_alias=force
            )
        )
        client = tracking.client._client(cfg.tracking.uri)
        holder = client.get_model_version_by_alias("guarded", "candidate").version
        assert str(holder) == versions[holds]


def test_an_atomic_write_leaves_the_old_file_when_the_disk_fills(tmp_path):
    """storage.open_write, which every kept file goes through (the teacher, caches, shards), on a local path."""
    src, dst = tmp_path / "big.pt", tmp_path / "teacher.pt"
    src.write_bytes(b"x" * 1_000_000)
    dst.write_bytes(b"old")
    # RLIMIT_FSIZE stands in for a full disk: writes past 100 kB fail (SIGXFSZ ignored -> EFBIG)
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
        "from pathlib import Path; from brcd_dist import storage; "
        "storage.write_bytes(sys.argv[2], Path(sys.argv[1]).read_bytes())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(src), str(dst)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode != 0 and "File too large" in done.stderr
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pt", "teacher.pt"]
    from brcd_dist import storage

    storage.write_bytes(str(dst), src.read_bytes())
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.slow
def test_state_json_records_the_config_digest_of_the_run(uninterrupted_run):
    cfg = uninterrupted_run.cfg
    states = [json.loads(p.read_text()) for p in uninterrupted_run.storage.glob("checkpoint_*/state.json")]
    assert states and {s["config_digest"] for s in states} == {config_digest(cfg)}
    other = dataclasses.replace(cfg, brcd=dataclasses.replace(cfg.brcd, alpha=0.1))
    with pytest.raises(RunReuseError):
        check_resume(other, cfg.train.name)
