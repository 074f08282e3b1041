"""Where relative outputs land (storage.output_root, driver.absolute_paths): a submitted Ray job runs in a temporary
copy of --working-dir (under the node's runtime_resources/, removed when the job ends), so its relative
train.storage_path, k-means cache and default sqlite tracking store must resolve elsewhere: $BRCD_HOME if set,
else ~/brcd-dist; a job started from a directory keeps using that directory. Inputs (shards) stay relative to it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEFAULT_CONFIG

from brcd_dist import storage
from brcd_dist.config import load_config
from brcd_dist.driver import absolute_paths


@pytest.fixture
def job_working_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    d.mkdir(parents=True)
    monkeypatch.chdir(d)
    monkeypatch.delenv("BRCD_HOME", raising=False)
    return d


def _resolved(overrides=()):
    return absolute_paths(load_config(DEFAULT_CONFIG, ["train.teacher_cache=cache", *overrides]))


def test_a_plain_run_resolves_outputs_in_its_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRCD_HOME", raising=False)
    cfg = _resolved()
    assert cfg.train.storage_path == str(tmp_path.resolve() / "runs")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_a_submitted_job_puts_outputs_under_brcd_home_not_its_working_dir(job_working_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("BRCD_HOME", str(home))
    cfg = _resolved()
    assert cfg.train.storage_path == str(home / "runs")
    assert cfg.train.teacher_cache == str(home / "cache")
    assert cfg.tracking.uri == f"sqlite:///{home}/mlflow.db"


def test_a_submitted_job_without_brcd_home_uses_brcd_dist_in_the_home_directory(job_working_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert storage.output_root() == Path.home() / "brcd-dist"
    assert _resolved().train.storage_path == str(Path.home() / "brcd-dist" / "runs")


def test_a_submitted_jobs_inputs_stay_relative_to_its_working_dir(job_working_dir):
    assert _resolved().data.shards_dir == str(job_working_dir.resolve() / "data" / "fashion_mnist")


def test_remote_outputs_are_left_as_they_are(job_working_dir):
    cfg = _resolved(["train.storage_path=s3://b/runs", "train.teacher_cache=s3://b/cache"])
    assert (cfg.train.storage_path, cfg.train.teacher_cache) == ("s3://b/runs", "s3://b/cache")
