"""The README's smoke demo and the own-images guide, run as written: their commands are read from the documents,
run in order through the jobs' own main() on the test session's Ray, with only the sizes made tiny by key=value
overrides appended to the distill and make_shards lines. A changed document changes what runs here.

The smoke demo: `jobs/distill.py --config configs/smoke.yaml`, then the README's index and search commands on the
student it registered. The guide: an image folder of three classes -> photos.yaml as the guide shows it ->
make_shards -> distill -> index -> search with one of the folder's files.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Tiny sizes on top of what the documents say (nothing else changes): a few images, one epoch, small batches.
SMOKE_TINY = [
    "data.max_images=400",
    "data.train_per_class=8",
    "data.samples_per_shard=50",
    "train.epochs=1",
    "train.eval_every=1",
    "train.batch_size=16",
    "brcd.clusters=4",
    "eval.topk=50",
    "eval.max_queries=0",
]
GUIDE_TINY = [
    "data.image_size=32",
    "data.train_per_class=8",
    "data.samples_per_shard=20",
    "data.shard_shorter_side=32",
    "train.teacher_epochs=1",
    "train.epochs=1",
    "train.eval_every=1",
    "train.batch_size=8",
    "brcd.clusters=3",
    "eval.topk=10",
]


def job(name: str):
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"guide_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands(text: str) -> list[list[str]]:
    """The `python jobs/...` lines of the document's bash blocks, in order, as argv words after the job."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if "python jobs/" in line:
                out.append(shlex.split(line[line.index("python jobs/") :])[1:])
    return out


def run(words: list[str], tiny: list[str] = ()):
    """One document command through its job's main(), the tiny sizes appended."""
    name = words[0][len("jobs/") : -len(".py")]
    return job(name).main([*words[1:], *tiny])


@pytest.fixture
def home(tmp_path, monkeypatch, local_ray):
    """A user's working directory: cwd and BRCD_HOME, no tracking store named by the environment. A job run in this
    process makes its store MLflow's current one and exports it as MLFLOW_TRACKING_URI: both are undone afterwards,
    or the processes of later tests (a local cluster's jobs) would register their models in this store."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BRCD_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # so that teardown restores the variable as it was before
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_the_readme_smoke_demo_then_its_index_and_search(home, capsys):
    readme = (REPO / "README.md").read_text()
    smoke = readme[readme.index("## A two-minute smoke run") : readme.index("## The full demo")]
    distill, index, search = commands(smoke)
    assert distill == ["jobs/distill.py", "--config", "configs/smoke.yaml"]
    test = run([distill[0], "--config", str(REPO / distill[2])], SMOKE_TINY)
    assert set(test) >= {"test_query/sshp_map", "test_query/ashp_map", "test_query/teacher_map"}
    out = capsys.readouterr().out
    assert "registered  models:/brcd-smoke-student/1 (@candidate moved to it)" in out
    assert f".venv/bin/python {shlex.join(index)}" in out  # the summary's next step is the README's
    summary = run(index)
    assert summary["count"] == 400 and summary["model"]["registered_model"] == "brcd-smoke-student"
    results = run(search)
    assert len(results) == 1 and len(results[0]) == int(search[search.index("--k") + 1])
    assert results[0][0].distance == 0  # the key's own code is its nearest neighbour


def image_folder(root, classes=("cats", "dogs", "birds"), per_class=20):
    """Three classes of 48x48 RGB pictures that differ by colour, with some noise; names 001.jpg, 002.jpg, ..."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(1, per_class + 1):
            pixels = np.full((48, 48, 3), 40, np.uint8)
            pixels[..., c] = 200
            pixels = np.clip(pixels + rng.integers(-30, 30, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.jpg", quality=90)


def test_the_own_images_guide_from_a_folder_to_a_search(home, capsys):
    guide = (REPO / "docs" / "guides" / "own-images.md").read_text()
    (config,) = re.findall(r"Save this as `photos.yaml`.*?```yaml\n(.*?)```", guide, re.DOTALL)
    (home / "photos.yaml").write_text(config)
    image_folder(home / "photos")
    make_shards, distill, index, search = commands(guide)
    assert [c[0] for c in (make_shards, distill, index, search)] == [
        "jobs/make_shards.py",
        "jobs/distill.py",
        "jobs/index.py",
        "jobs/search.py",
    ]
    run(make_shards, GUIDE_TINY)
    assert "train" in capsys.readouterr().out
    run(distill, GUIDE_TINY)
    assert "registered  models:/photos-student/1 (@candidate moved to it)" in capsys.readouterr().out
    built = run(index)
    assert built["count"] == 54  # 18 kept of each class's 20 (10% held out as queries)
    (query,) = search[search.index("--query") + 1 : search.index("--k")]
    assert (home / query).is_file()
    (hits,) = run(search)
    assert len(hits) == int(search[search.index("--k") + 1])
    assert hits[0].label == 1  # cats/001.jpg: its nearest images are cats (class folders sorted: birds, cats, dogs)
