"""The student used, not only scored (DESIGN §5): jobs/index.py encodes a shard split with Ray Data on
the session's local Ray into a FAISS index logged to the model's MLflow run; jobs/search.py queries it.

The student is the embedded default's architecture (mobilenetv3_small_050, 1x32x32, 64 bits), random-init with
its hash head centred on the data so that its codes spread out (a random-init head gives nearly one code to
every image), logged and registered as brcd-student@champion in a real sqlite MLflow registry in a temp dir.
The database is conftest's tiny shards' database split (400 images).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STUDENT = "models:/brcd-student@champion"


def load_job(name: str):
    """jobs/NAME.py as a module (jobs/ is not a package; its _cli puts the repo on sys.path)."""
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def database_images(shards, n: int = 128) -> torch.Tensor:
    from brcd_dist.data import eval_batches, load_manifest

    batch = next(
        iter(
            eval_batches(
                load_manifest(shards),
                "database",
                rank=0,
                world_size=1,
                batch_size=n,
                num_workers=0,
                image_size=32,
                in_chans=1,
            )
        )
    )
    return batch["image"]


@pytest.fixture(scope="module")
def registry(tiny_shards, tmp_path_factory):
    """(tracking uri, run id, student): the centred student logged to a run and registered @champion."""
    from mlflow import MlflowClient

    from brcd_dist import tracking
    from brcd_dist.models import HashModel

    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work}/mlflow.db"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    torch.manual_seed(0)
    student = HashModel("mobilenetv3_small_050", 64, in_chans=1, img_size=32).eval()
    with torch.no_grad():
        student.head.bias -= student.head(student.backbone(database_images(tiny_shards))).mean(0)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("index", artifact_location=(work / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model_uri = tracking.log_hash_model(run_id, student, "student", torch.zeros(2, 1, 32, 32), tracking_uri=uri)
    tracking.register_model(model_uri, "brcd-student", "champion", {"run_id": run_id}, "student", tracking_uri=uri)
    client.set_terminated(run_id)
    yield uri, run_id, student
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def built(local_ray, tiny_shards, registry, tmp_path_factory):
    """jobs/index.py on the registered student over the tiny database split: (summary, out dir)."""
    uri = registry[0]
    out = tmp_path_factory.mktemp("indexes") / "tiny"
    summary = load_job("index").main(
        [STUDENT, "--images", str(tiny_shards), "--out", str(out), "--tracking-uri", uri, "--batch-size", "64"]
    )
    return summary, out


def test_ray_data_encoding_equals_the_evaluation_loop_over_the_same_split(local_ray, tiny_shards, registry):
    from brcd_dist.batch_encoding import encode_images, image_source
    from brcd_dist.codes import pack_codes
    from brcd_dist.data import eval_batches, load_manifest
    from brcd_dist.retrieval import encode_batches

    student = registry[2]
    encoded = encode_images(student, image_source(str(tiny_shards), "database"), batch_size=64)
    batches = eval_batches(
        load_manifest(tiny_shards),
        "database",
        rank=0,
        world_size=1,
        batch_size=64,
        num_workers=0,
        image_size=32,
        in_chans=1,
    )
    codes, keys, labels = encode_batches(student, batches, "cpu")
    order = np.argsort(np.array(keys), kind="stable")
    assert list(encoded.keys) == [keys[i] for i in order]
    assert np.array_equal(encoded.labels, labels[order])
    assert np.array_equal(encoded.codes, pack_codes(codes[order]))


def test_index_job_writes_an_exact_index_of_every_database_image(built, tiny_shards):
    from brcd_dist.data import load_manifest
    from brcd_dist.index import Index

    summary, out = built
    index = Index.load(out)
    db = load_manifest(tiny_shards).splits["database"]
    assert summary["kind"] == index.kind == "flat" and len(index) == db.count
    assert sorted(index.keys.tolist()) == sorted(db.keys)
    assert dict(zip(index.keys.tolist(), index.labels.tolist())) == dict(zip(db.keys, db.labels))


def test_index_records_the_registered_version_and_run_that_made_it(built, registry):
    from brcd_dist.index import Index

    meta = Index.load(built[1]).meta
    assert (meta["model_uri"], meta["registered_model"], meta["version"], meta["run_id"]) == (
        STUDENT,
        "brcd-student",
        "1",
        registry[1],
    )


def test_index_is_logged_to_the_model_s_run_and_tagged_on_its_version(built, registry):
    from mlflow import MlflowClient

    uri, run_id, _ = registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    logged = {a.path for a in client.list_artifacts(run_id, "index/tiny")}
    assert {
        f"index/tiny/{f}" for f in ("meta.json", "index.faiss", "codes.npy", "keys.npy", "labels.npy", "model.pt")
    } <= logged
    assert client.get_model_version("brcd-student", "1").tags["brcd.index"] == f"runs:/{run_id}/index/tiny"


def test_search_job_finds_a_database_image_itself_at_distance_zero(built, tiny_shards, tmp_path, capsys):
    """The query is a database image's stored PNG, as a file, one whose code no other database image shares
    (random-init codes collide now and then), so the image itself is the one hit at distance 0, ranked first."""
    from brcd_dist.index import Index

    out = built[1]
    index = Index.load(out)
    _, inverse, counts = np.unique(index.codes, axis=0, return_inverse=True, return_counts=True)
    unique_keys = set(index.keys[counts[inverse.ravel()] == 1].tolist())
    assert len(unique_keys) >= len(index) - 10  # the premise: codes spread out
    with tarfile.open(tiny_shards / "database-000003.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png") and m.name[:-4] in unique_keys)
        key = member.name[: -len(".png")]
        (tmp_path / "query.png").write_bytes(tar.extractfile(member).read())
    capsys.readouterr()
    load_job("search").main([str(out), "--query", str(tmp_path / "query.png"), "--k", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query\trank\tkey\tdistance\tlabel" and len(lines) == 6
    _, rank, hit, distance, _ = lines[1].split("\t")
    assert (rank, hit, distance) == ("1", key, "0")
    assert all(int(line.split("\t")[3]) > 0 for line in lines[2:])


def test_evaluate_job_scores_the_ray_data_codes_as_the_one_process_loop_does(
    local_ray, tiny_shards, registry, tmp_path
):
    """jobs/evaluate.py encodes with Ray Data now; its SSHP mAP must be the one of the one-process loop's codes."""
    from brcd_dist.data import eval_batches, load_manifest
    from brcd_dist.models import save_hash_model
    from brcd_dist.retrieval import encode_batches, mean_average_precision

    uri, _, student = registry
    save_hash_model(student, tmp_path / "student.pt")
    result = load_job("evaluate").main(
        [
            str(tmp_path / "student.pt"),
            "data.source=shards",
            f"data.shards_dir={tiny_shards}",
            "eval.topk=50",
            f"tracking.uri={uri}",
        ]
    )

    def loop(split):
        batches = eval_batches(
            load_manifest(tiny_shards),
            split,
            rank=0,
            world_size=1,
            batch_size=64,
            num_workers=0,
            image_size=32,
            in_chans=1,
        )
        codes, keys, labels = encode_batches(student, batches, "cpu")
        order = np.argsort(np.array(keys), kind="stable")
        return codes[order], labels[order]

    (q, q_labels), (db, db_labels) = loop("test_query"), loop("database")
    assert result == {"test_query/sshp_map": float(mean_average_precision(q, db, q_labels, db_labels, 50))}
