"""Runs are not silently reused or replaced, on the driver, before the workers start:
a run name is resumed only under the config it was started with, default run names are unique, and a
registry alias moves only to a version at least as good as the one holding it."""

from __future__ import annotations

import json
import secrets
import time

from brcd_dist.config import Config, config_digest


class RunReuseError(ValueError):
    """Resuming this run name would mix two configs; the message is one line for the user."""


def unique_run_name(prefix: str = "distill") -> str:
    """`distill-YYYYmmdd-HHMMSS-xxxxxx`: two jobs started in the same second get different names."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _states(storage_path: str, name: str) -> list[dict]:
    """state.json of every checkpoint under storage_path/name (a local path or s3:// / gs://)."""
    from brcd_dist import storage

    run_dir = storage.join(storage_path, name)
    out = []
    for entry in storage.listdir(run_dir):  # empty when there is none
        path = storage.join(run_dir, entry, "state.json")
        if entry.startswith("checkpoint_") and storage.is_file(path):
            try:
                out.append(json.loads(storage.read_bytes(path)))
            except ValueError:
                continue
    return out


def check_resume(cfg: Config, name: str) -> str | None:
    """None for a new run name or a resume under the same config; raises RunReuseError (one line) when the
    checkpoints under this name were written under another config, unless train.resume_anyway. Returns the
    stored digest when a differing one is let through."""
    digest = config_digest(cfg)
    stored = {s.get("config_digest", "") for s in _states(cfg.train.storage_path, name)}
    other = sorted(d for d in stored if d != digest)
    if not other:
        return None
    if cfg.train.resume_anyway:
        return other[0]
    shown = other[0] or "none recorded"
    raise RunReuseError(
        f"train.name={name!r}: {cfg.train.storage_path}/{name} holds checkpoints of another config (digest {shown}, "
        f"this one {digest}); pick another train.name, or resume it anyway with --resume-anyway"
    )


def alias_may_move(holder_score: float | None, new_score: float | None, force: bool) -> bool:
    """The alias moves to the new version when forced, when nothing holds it, or when the new version's test mAP
    is at least the holder's; a version without a score never displaces one that has one."""
    if force or holder_score is None:
        return True
    return new_score is not None and new_score >= holder_score


# The version tag (reporting.publish tags each version with its run's test metrics) that ranks a role's versions.
SCORE_TAGS = {"student": "test_query.sshp_map", "teacher": "test_query.teacher_map"}


def _score(tags: dict, role: str) -> float | None:
    try:
        return float(tags[SCORE_TAGS[role]])
    except (KeyError, TypeError, ValueError):
        return None


def alias_scores(client, name: str, alias: str, role: str, new_tags: dict) -> tuple[float | None, float | None]:
    """(test mAP of the version that holds models:/name@alias now or None, test mAP of the new version or None)."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, _score(new_tags, role)
    return _score(holder.tags, role), _score(new_tags, role)
