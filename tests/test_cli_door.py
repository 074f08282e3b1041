"""Bad input ends a job at the door: one line on stderr naming the key, value or path and what
is allowed, exit code 2, within seconds, before Ray starts and with nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A refusal imports no torch, Ray or MLflow (asserted below): a median 0.8 s at load 20 on 2 cores, 16 s seen at
# load 28; it took 19 s (idle) to 4 min (load 20) when the jobs imported their stack first.
DOOR_SECONDS = 30
HEAVY = ("torch", "timm", "ray", "mlflow", "deepspeed", "faiss", "webdataset")


def run_job(job: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python jobs/JOB ARGS` in `cwd`, run by a wrapper that prints on stdout, as the job exits, which of the HEAVY
    modules it had imported."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{job!r}, *{args!r}]\n"
        f"sys.path.insert(0, {str(REPO / 'jobs')!r})\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'jobs' / job)!r}, run_name='__main__')\n"
        "finally:\n"
        f"    print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_TMPDIR": str(cwd / "ray_tmp"),
        "RAY_ADDRESS": "",
        "MLFLOW_TRACKING_URI": "",
    }
    return subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _bad_yaml(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("brcd:\n  tau: [0.3\n")
    return ["--config", str(tmp / "bad.yaml")]


def _shards_dir_is_a_file(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("x")
    return [f"data.shards_dir={tmp / 'a_file'}"]


def _one_class_folder(tmp: Path) -> list[str]:
    from PIL import Image

    (tmp / "folder" / "only").mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8)).save(tmp / "folder" / "only" / f"{i}.png")
    return [
        "data.source=imagefolder",
        f"data.source_path={tmp / 'folder'}",
        "brcd.clusters=2",
        "data.train_per_class=2",
    ]


# One case per kind of check (parsing, a value, the disk, the source); tests/test_config.py has every rule.
CASES = {
    "yaml_file": (_bad_yaml, "not valid YAML (line 3"),
    "clusters_above_split": (lambda t: ["brcd.clusters=1000000"], "brcd.clusters=1000000: must be <= 5000"),
    "shards_dir_file": (_shards_dir_is_a_file, "is a file; expected a directory"),
    "one_class": (_one_class_folder, "holds 1 class folder(s)"),
}


@pytest.mark.parametrize("case", CASES)
def test_distill_refuses_bad_input_with_one_line_exit_2_before_ray(case, tmp_path):
    make_args, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(tmp_path)
    before = sorted(work.iterdir())
    t0 = time.monotonic()
    done = run_job("distill.py", args + ["data.shards_dir=shards"] * (not any("shards_dir" in a for a in args)), work)
    seconds = time.monotonic() - t0
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0]
    assert done.stdout.strip() == "[]"  # refused before torch, Ray or MLflow were imported
    assert seconds < DOOR_SECONDS
    assert sorted(work.iterdir()) == before  # no mlflow.db, no runs/, no shards, no Ray temp dir


def test_make_shards_refuses_train_per_class_above_a_class(tmp_path):
    done = run_job("make_shards.py", ["data.train_per_class=7000", f"data.shards_dir={tmp_path / 's'}"], tmp_path)
    assert done.returncode == 2
    expected = "error: data.train_per_class=7000: must be <= 6000 (the images of each Fashion-MNIST class)"
    assert done.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "s").exists()


# Bad arguments or values, at least one per job; each is refused before the job imports its stack, and the line
# names what was wrong.
BAD_INPUT = {
    "distill: a value": ("distill.py", ["train.lr=inf"], "train.lr='inf': expected a finite number"),
    "distill: an unknown flag": ("distill.py", ["--bogus"], "unrecognized arguments: --bogus"),
    "train_teacher: a value": ("train_teacher.py", ["brcd.tau=inf"], "brcd.tau='inf'"),
    "tune: a value": ("tune.py", ["train.cpus_per_worker=inf"], "train.cpus_per_worker='inf'"),
    "tune: a flag that it does not read": ("tune.py", ["--resume-anyway"], "--resume-anyway"),
    "make_shards: a value": ("make_shards.py", ["data.image_size=100000"], "data.image_size=100000"),
    "make_shards: shards as the source": (
        "make_shards.py",
        ["data.source=shards"],
        "data.source=shards: this job makes shards; set data.source to one of fashion_mnist, imagefolder, "
        "object_store_folder",
    ),
    "make_shards: a flag that it does not read": ("make_shards.py", ["--address", "auto"], "--address"),
    "evaluate: a value": (
        "evaluate.py",
        [str(REPO / "README.md"), "eval.batch_size=0"],  # a file that exists: the value is what is wrong
        "eval.batch_size=0",
    ),
    "evaluate: a registered model without a store": (
        "evaluate.py",
        ["models:/nope@x"],
        "student models:/nope@x: no tracking store at sqlite:///",
    ),
    "evaluate: a missing file": ("evaluate.py", ["nope.pt"], "student 'nope.pt': no such file"),
    "index: a value": (
        "index.py",
        ["student.pt", "--images", "imgs", "--out", "out", "--batch-size", "0"],
        "--batch-size=0: must be >= 1",
    ),
    "index: an index kind": (
        "index.py",
        ["student.pt", "--images", "imgs", "--out", "out", "--kind", "bogus"],
        "argument --kind: invalid choice: 'bogus' (choose from 'auto', 'flat', 'ivf', 'hnsw')",
    ),
    "index: a registered model without a store": (
        "index.py",
        ["models:/nope@x", "--images", str(REPO / "configs"), "--out", "out"],  # a directory that exists
        "model models:/nope@x: no tracking store",
    ),
    "index: images that are not there": (
        "index.py",
        ["models:/nope@x", "--images", "imgs", "--out", "out"],
        "--images imgs: no such directory",
    ),
    "search: a value": ("search.py", ["idx", "--query", "q.png", "--k", "0"], "--k=0: must be >= 1"),
    "search: no query": ("search.py", ["idx"], "no query: give --query IMAGE ... or --query-key KEY ..."),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_every_job_refuses_bad_input_before_importing_torch_ray_or_mlflow(case, tmp_path):
    job, args, message = BAD_INPUT[case]
    t0 = time.monotonic()
    done = run_job(job, args, tmp_path)
    seconds = time.monotonic() - t0
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr[-2000:]
    assert message in done.stderr
    assert done.stdout.strip() == "[]"
    assert seconds < DOOR_SECONDS
    assert list(tmp_path.iterdir()) == []  # nothing written: no mlflow.db, no Ray temp dir


def job_flags(job: str) -> set[str]:
    import importlib.util

    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"door_{job}", REPO / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {f for a in module.make_parser()._actions for f in a.option_strings if f.startswith("--")}


# What every job's flags are: a flag that nothing reads is not offered.
FLAGS = {
    "distill": {"--config", "--address", "--resume-anyway", "--force-alias", "--retrain-teacher"},
    "train_teacher": {"--config", "--address", "--resume-anyway", "--force-alias", "--retrain-teacher"},
    "make_shards": {"--config", "--procs", "--ray"},
    "evaluate": {"--config", "--address", "--teacher", "--split"},
    "tune": {"--config", "--address", "--force-alias", "--alpha", "--delta", "--clusters", "--samples"}
    | {"--max-concurrent", "--paradigm", "--champion-alias"},
    "index": {"--address", "--images", "--out", "--split", "--kind", "--nlist", "--nprobe", "--batch-size"}
    | {"--actors", "--tracking-uri", "--no-log"},
    "search": {"--query", "--query-key", "--k"},
}


@pytest.mark.parametrize("job", FLAGS)
def test_every_job_has_verbose_and_quiet_and_only_the_flags_it_reads(job):
    assert job_flags(job) == FLAGS[job] | {"--help", "--verbose", "--quiet"}


def test_index_kinds_are_the_index_modules_kinds():
    import importlib.util

    from brcd_dist.index import KINDS

    spec = importlib.util.spec_from_file_location("door_index", REPO / "jobs" / "index.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "jobs"))
    spec.loader.exec_module(module)
    assert tuple(module.KINDS) == tuple(KINDS)


def test_an_empty_tracking_uri_takes_mlflow_tracking_uri_from_the_environment(monkeypatch):
    sys.path.insert(0, str(REPO / "jobs"))
    import _cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    args = _cli.parse(_cli.parser("Doc.", prog="x"), ["data.shards_dir=shards"])
    assert _cli.config_from_args(args).tracking.uri == "http://tracking.example:5000"
    args = _cli.parse(_cli.parser("Doc.", prog="x"), ["tracking.uri=http://other:5000"])
    assert _cli.config_from_args(args).tracking.uri == "http://other:5000"  # the config's own value wins


def test_a_refusal_naming_a_url_with_a_password_prints_no_password(tmp_path):
    done = run_job("distill.py", ["data.shards_url=[https://alice:s3cr3t-pw@shards.example/x]"], tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "data.shards_url=" in line and "expected a string" in line
    assert "s3cr3t-pw" not in done.stderr + done.stdout


@pytest.mark.parametrize("job", FLAGS)
def test_help_shows_the_whole_first_paragraph_the_examples_and_the_exit_codes(job):
    import importlib.util

    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"help_{job}", REPO / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.make_parser().format_help()
    first = " ".join(module.__doc__.strip().split("\n\n")[0].split())
    assert first.endswith(".") and first in " ".join(text.split())  # not cut at the docstring's first line
    assert f"python jobs/{job}.py" in text  # the docstring's examples
    assert "exit codes: 0 done, 1 the run failed after it started, 2 bad input" in text


def test_an_empty_tracking_uri_flag_takes_mlflow_tracking_uri_then_mlflow_db(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "jobs"))
    import _cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert _cli.tracking_uri("") == "http://tracking.example:5000"
    assert _cli.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("BRCD_HOME", str(tmp_path))
    assert _cli.tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
