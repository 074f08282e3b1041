"""The cloud cluster files follow the object-store recipe of docs/guides/cluster.md: valid YAML; the job they show reads
shards and manifest from the bucket and keeps checkpoints and the k-means cache there, with the recipe's keys, and
parses as a config; the object store's region / endpoint are in their env and its credentials come from the node's
identity (instance profile, IRSA) or a secret, never from the files; Ray's token auth is still on."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from conftest import REPO

from brcd_dist.config import load_config

RAY_CLUSTER = REPO / "ray_cluster.yaml"
KUBERAY = REPO / "cluster" / "kuberay.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
CREDENTIAL = re.compile(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)\s*[=:]\s*[\"']?[A-Za-z0-9/+]{8,}")


def overrides(words: list[str]) -> dict[str, str]:
    """key=value words of a jobs/distill.py command line."""
    return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))


def readme_recipe() -> dict[str, str]:
    """The overrides of the cluster guide's object-store `ray job submit`."""
    text = (REPO / "docs" / "guides" / "cluster.md").read_text()
    block = re.search(r"ray job submit --address http://HEAD:8265 --working-dir \. -- \\\n(.*?)\n```", text, re.DOTALL)
    assert block, "docs/guides/cluster.md: the object-store recipe's `ray job submit` is gone"
    return overrides(block.group(1).replace("\\\n", " ").split())


def kuberay_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(KUBERAY.read_text()) if d["kind"] != "NetworkPolicy"}


def kuberay_pods() -> list[dict]:
    spec = kuberay_docs()["RayJob"]["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def ray_cluster_job() -> list[str]:
    """The `python jobs/distill.py ...` that ray_cluster.yaml's header tells the user to submit."""
    lines = [ln[1:].strip() for ln in RAY_CLUSTER.read_text().splitlines() if ln.startswith("#")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("ray job submit "))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    command = " ".join(ln.rstrip("\\") for ln in lines[start : end + 1])
    return command.split(" -- ", 1)[1].split()


def assert_follows_the_recipe(words: list[str]) -> None:
    got, recipe = overrides(words), readme_recipe()
    assert set(recipe) <= set(got), sorted(set(recipe) - set(got))
    for key, value in recipe.items():
        if value.startswith("s3://"):
            assert got[key].startswith("s3://"), (key, got[key])
    assert got["data.source"] == "shards"
    config = words[words.index("--config") + 1]
    load_config(REPO / config, [f"{k}={v}" for k, v in got.items()])  # valid keys and values


def test_cluster_files_are_valid_yaml():
    assert yaml.safe_load(RAY_CLUSTER.read_text())["provider"]["type"] == "aws"
    assert {"ServiceAccount", "RayJob"} <= set(kuberay_docs())


def test_kuberay_job_follows_the_readme_object_store_recipe():
    assert_follows_the_recipe(shlex.split(kuberay_docs()["RayJob"]["spec"]["entrypoint"]))


def test_ray_cluster_job_follows_the_readme_object_store_recipe():
    assert_follows_the_recipe(ray_cluster_job())


def test_kuberay_pods_get_the_bucket_from_their_identity_and_region_and_share_no_disk():
    account = kuberay_docs()["ServiceAccount"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]  # IRSA
    for pod in kuberay_pods():
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert "volumes" not in pod  # no shared shards volume: everything is on the bucket
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env.get("AWS_REGION")
            assert not {k for k in env if "SECRET" in k or "ACCESS_KEY" in k or "TOKEN" in k}, env
            assert all(s["secretRef"]["optional"] for s in container["envFrom"])  # keys, if any, from a secret


def test_ray_cluster_nodes_get_the_bucket_from_an_instance_profile_and_the_region_from_docker():
    cfg = yaml.safe_load(RAY_CLUSTER.read_text())
    assert any("AWS_REGION=" in o for o in cfg["docker"]["run_options"])
    assert "Arn" in cfg["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]


@pytest.mark.parametrize("path", [RAY_CLUSTER, KUBERAY, DOCKERFILE], ids=lambda p: p.name)
def test_no_credentials_in_the_cluster_files(path):
    assert not CREDENTIAL.search(path.read_text())


def test_token_auth_is_still_on_everywhere():
    assert kuberay_docs()["RayJob"]["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    cfg = yaml.safe_load(RAY_CLUSTER.read_text())
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert re.search(r"^ENV RAY_AUTH_MODE=token", DOCKERFILE.read_text(), re.MULTILINE)
