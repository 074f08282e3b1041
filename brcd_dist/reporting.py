"""After a run: its artifacts, pictures and models in MLflow (student registered as NAME@alias), and the summary
that jobs/distill.py prints: what was evaluated, the result table, the time per stage, the MLflow run, the
registered versions and where the alias went, and the next commands."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brcd_dist import plots, tracking
from brcd_dist.config import Config, to_yaml
from brcd_dist.driver import Outputs, launch, read_outputs, result_checkpoint_dir
from brcd_dist.models import count_flops
from brcd_dist.redact import redact
from brcd_dist.teacher_reuse import TeacherPlan


def log_config(run_id: str, cfg: Config) -> None:
    """The resolved config as the run's config.yaml artifact, credentials redacted."""
    tracking.log_text(run_id, redact(to_yaml(cfg)), "config.yaml")


def publish(run_id: str, cfg: Config, out: Outputs, roles: tuple = ("teacher", "student")) -> dict:
    """Log the resolved config, clustering, pictures and the models of `roles` to the run; register them and
    close the run. Returns the registered versions {"student": v, "teacher": v} (empty when tracking.register is
    off)."""
    test, hist = out.test, out.state.history
    log_config(run_id, cfg)
    tracking.log_metrics(run_id, {k: float(v) for k, v in test.items()}, out.state.global_step)
    figures = {}
    train_rows = hist.get("train", [])
    losses = {}
    for key in ("teacher/epoch_loss", "student/epoch_loss", "student/epoch_kd", "student/epoch_self"):
        x = [i + 1 for i, r in enumerate(train_rows) if key in r]
        if x:
            losses[key.replace("/epoch_", " ")] = (x, [r[key] for r in train_rows if key in r])
    if losses:
        figures["plots/loss_curves.png"] = plots.loss_curves(losses, title="epoch-mean loss (per run epoch)")
    evals = hist.get("eval", [])
    if evals:
        maps = {name: [e[f"val_query/{name}_map"] for e in evals] for name in ("sshp", "ashp")}
        if "val_query/teacher_map" in evals[0]:
            maps["teacher"] = evals[0]["val_query/teacher_map"]
        figures["plots/map_per_epoch.png"] = plots.map_curves([e["epoch"] for e in evals], maps, topk=cfg.eval.topk)
    if out.curves:
        figures["plots/precision_recall.png"] = plots.pr_curves(out.curves)
    if out.clustering is not None:
        c = out.clustering
        figures["plots/bit_agreement.png"] = plots.bit_agreement_heatmap(
            c.agreement.numpy(), c.masks.numpy(), delta=cfg.brcd.delta
        )
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(
                Path(tmp) / "clustering.npz",
                centroids=c.centroids.numpy(),
                masks=c.masks.numpy(),
                agreement=c.agreement.numpy(),
                counts=c.counts.numpy(),
            )
            tracking.log_artifact(run_id, Path(tmp) / "clustering.npz", "clustering")
    rates = {k.replace("_images_per_s", ""): v for k, v in test.items() if k.endswith("_images_per_s")}
    if rates:
        figures["plots/throughput.png"] = plots.throughput_bars(rates, title="encode throughput per worker")
    for name, fig in figures.items():
        tracking.log_figure(run_id, fig, name)

    versions: dict = {}
    example = torch.zeros(2, cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size)
    t = cfg.tracking
    for role, model, name in (("teacher", out.teacher, t.teacher_name), ("student", out.student, t.student_name)):
        if model is None or role not in roles:
            continue
        model_uri = tracking.log_hash_model(run_id, model, role, example)
        if t.register:
            tags = {
                "run_id": run_id,
                "bits": model.bits,
                "arch": model.arch,
                **{k.replace("/", "."): round(float(v), 5) for k, v in test.items()},
            }
            versions[role] = tracking.register_model(model_uri, name, t.alias, tags, role, force_alias=t.force_alias)
    tracking.end_run(run_id)
    return versions


@dataclass
class Report:
    """What a run did, for its summary: registered versions, where each alias points now, seconds per part."""

    run_id: str | None = None
    versions: dict = field(default_factory=dict)  # role -> registered version
    holders: dict = field(default_factory=dict)  # role -> version the alias points at after registering
    seconds: dict = field(default_factory=dict)  # part of the run -> seconds, in order
    teacher: TeacherPlan | None = None  # where stage A took the teacher from (launch_and_publish sets it)


def alias_holders(cfg: Config, versions: dict) -> dict:
    """The version each role's alias points at now (it moved when that is the version just registered)."""
    from mlflow import MlflowClient

    names = {"teacher": cfg.tracking.teacher_name, "student": cfg.tracking.student_name}
    out = {}
    for role in versions:
        try:
            out[role] = str(MlflowClient().get_model_version_by_alias(names[role], cfg.tracking.alias).version)
        except Exception:  # noqa: BLE001 - no holder: the alias was not set
            out[role] = None
    return out


def launch_and_publish(
    cfg: Config,
    run_id: str | None,
    name: str,
    roles: tuple = ("teacher", "student"),
    callbacks: list | None = None,
    progress=None,
    report: Report | None = None,
    teacher: TeacherPlan | None = None,
) -> Outputs:
    """One distillation run (`driver.launch`) and its outputs published to its MLflow run, if it has one; a run
    that fails is marked FAILED with its error before the error goes on. `progress` (run_progress.RunProgress)
    watches the workers' bars on the way; `report` gets the versions, alias holders and seconds per stage. `teacher`:
    where stage A takes the teacher from (teacher_reuse.resolve; default: the config's teacher.uri or trained)."""
    from contextlib import nullcontext

    from brcd_dist.run_progress import watch

    report = report if report is not None else Report()
    report.run_id = run_id
    report.teacher = teacher or TeacherPlan.of_config(cfg)
    with tracking.failing_run(run_id):
        t0 = time.perf_counter()
        with watch(progress) if progress is not None else nullcontext():
            result = launch(cfg, run_id=run_id, name=name, callbacks=callbacks, teacher=report.teacher)
        run_s = time.perf_counter() - t0
        if progress is not None:
            stages = progress.stage_seconds()
            report.seconds.update(stages)
            report.seconds["start-up"] = max(0.0, run_s - sum(stages.values()))
        else:
            report.seconds["run"] = run_s
        out = read_outputs(result_checkpoint_dir(result))
        if run_id:
            t1 = time.perf_counter()
            report.versions = publish(run_id, cfg, out, roles=roles)
            report.holders = alias_holders(cfg, report.versions) if report.versions else {}
            report.seconds["MLflow"] = time.perf_counter() - t1
    return out


def shown_path(path) -> str:
    """A path as the summary shows it: relative to the current directory when under it."""
    text = str(path)
    if "://" in text:
        return text
    try:
        return os.path.relpath(text) if Path(text).resolve().is_relative_to(Path.cwd()) else text
    except ValueError:
        return text


def run_summary(cfg: Config, out: Outputs, report: Report, manifest, *, shards_seconds: float = 0.0) -> str:
    """The end of jobs/distill.py's output: what was evaluated, the result table, the time per stage, the MLflow
    run, the registered versions and the alias decision, the checkpoint, and the commands to run next."""
    from brcd_dist.redact import redact
    from brcd_dist.run_progress import duration

    t, e, d, k = out.test, cfg.eval, cfg.data, cfg.eval.topk
    splits = manifest.splits
    n_db = splits["database"].count if "database" in splits else 0
    n_test = splits["test_query"].count if "test_query" in splits else 0
    n_db_used = min(n_db, e.max_database) if e.max_database else n_db
    n_q_used = min(n_test, e.max_queries) if e.max_queries else n_test
    # a capped test set is said, never silent: seeded and even across the classes (train/encoding.capped_keys)
    queries = f"{n_q_used:,} test queries" + (f" (of {n_test:,}: eval.max_queries)" if n_q_used < n_test else "")
    database = f"{n_db_used:,} database images" + (f" (of {n_db:,}: eval.max_database)" if n_db_used < n_db else "")
    bits = out.student.bits if out.student is not None else out.teacher.bits
    lines = [
        f"Test retrieval: {queries} against {database}, {bits}-bit codes, mAP@{k} by Hamming ranking",
    ]
    shape = (d.in_chans, d.image_size)
    tf = count_flops(out.teacher, *shape)
    sf = count_flops(out.student, *shape) if out.student is not None else 0
    s_rate, t_rate = t.get("student_images_per_s", 0.0), t.get("teacher_images_per_s", 0.0)
    reused = report.teacher is not None and report.teacher.reused
    kept = " (kept)" if reused else ""
    rows = [
        ("", "queries by", "database by", f"mAP@{k}", "encode img/s/worker", "MFLOPs/img"),
        ("teacher", "teacher", "teacher", f"{t.get('test_query/teacher_map', float('nan')):.4f}",
         f"{t_rate:,.0f}{kept}" if t_rate else "", f"{tf / 1e6:,.1f}"),
        ("student (SSHP)", "student", "student", f"{t.get('test_query/sshp_map', float('nan')):.4f}",
         f"{s_rate:,.0f}" if s_rate else "", f"{sf / 1e6:,.1f}"),
        ("student (ASHP)", "student", "teacher", f"{t.get('test_query/ashp_map', float('nan')):.4f}", "", ""),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if s_rate and t_rate:
        lines.append(
            f"student: {s_rate / t_rate:.2f}x the teacher's encode rate, {tf / max(sf, 1):.1f}x fewer FLOPs per image"
        )
    n_train = splits["train"].count if "train" in splits else 0
    teacher_from = (
        f"loaded from {redact(cfg.teacher.uri)}" if cfg.teacher.uri
        else f"kept from an earlier run ({shown_path(report.teacher.load)})" if reused
        else f"{cfg.train.teacher_epochs} epoch{'s' * (cfg.train.teacher_epochs != 1)} on the "
        f"{cfg.train.teacher_split} split"
    )  # fmt: skip
    n_val = splits["val_query"].count if "val_query" in splits else 0
    student_arch = out.student.arch if out.student is not None else cfg.student.name
    rest = [
        (
            "data",
            f"{shown_path(d.shards_url or d.shards_dir)}: {n_train:,} train, {n_db:,} database, "
            f"{n_val:,} validation, {n_test:,} test images",
        ),
        (
            "trained",
            f"teacher {cfg.teacher.name}, {teacher_from}; student {student_arch}, {cfg.train.epochs} "
            f"epoch{'s' * (cfg.train.epochs != 1)} of "
            f"{n_train:,} images, kd={cfg.brcd.kd}",
        ),
    ]
    parts = ({"shards": shards_seconds} if shards_seconds else {}) | report.seconds
    total = sum(parts.values())
    rest.append(("time", f"{duration(total)}: " + ", ".join(f"{p} {duration(s)}" for p, s in parts.items())))
    if report.run_id:
        uri = cfg.tracking.uri
        if uri.startswith("sqlite:///"):
            uri = "sqlite:///" + shown_path(uri[len("sqlite:///") :])  # relative to the current directory: valid
        view = (
            f".venv/bin/mlflow ui --backend-store-uri {redact(uri)}" if uri.startswith("sqlite:")
            else f"{redact(uri)}/#/experiments"
        )  # fmt: skip
        rest.append(("mlflow", f"run {report.run_id} in experiment {cfg.tracking.experiment}; view: {view}"))
    names = {"teacher": cfg.tracking.teacher_name, "student": cfg.tracking.student_name}
    registered = []
    for role in ("student", "teacher"):
        if role in report.versions:
            v, holder, alias = report.versions[role], report.holders.get(role), cfg.tracking.alias
            decision = (
                f"@{alias} moved to it" if holder == str(v)
                else f"@{alias} stays on version {holder}: its test mAP is higher (--force-alias moves it)"
            )  # fmt: skip
            registered.append(f"models:/{names[role]}/{v} ({decision})")
    if registered:
        rest.append(("registered", registered[0]))
        rest += [("", r) for r in registered[1:]]
    rest.append(("checkpoint", shown_path(out.checkpoint_dir)))
    if "student" in report.versions:
        model = f"models:/{names['student']}@{cfg.tracking.alias}"
        index = f"indexes/{names['student']}"
        key = splits["database"].keys[0] if "database" in splits and splits["database"].keys else "KEY"
        images = shown_path(d.shards_url or d.shards_dir)
        rest.append(("next", f".venv/bin/python jobs/index.py {model} --images {images} --out {index}"))
        rest.append(("", f".venv/bin/python jobs/search.py {index} --query-key {key} --k 10"))
    width = max(len(label) for label, _ in rest)
    lines += [f"{label.ljust(width)}  {text}" for label, text in rest]
    return "\n".join(lines)
