"""After a run: its artifacts, pictures and models in MLflow (student registered as NAME@alias), and the short
result table that jobs/distill.py prints."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from brcd_dist import plots, tracking
from brcd_dist.config import Config, to_yaml
from brcd_dist.driver import Outputs, launch, read_outputs, result_checkpoint_dir
from brcd_dist.models import count_flops
from brcd_dist.redact import redact


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


def launch_and_publish(
    cfg: Config, run_id: str | None, name: str, roles: tuple = ("teacher", "student"), callbacks: list | None = None
) -> Outputs:
    """One distillation run (`driver.launch`) and its outputs published to its MLflow run, if it has one; a run
    that fails is marked FAILED with its error before the error goes on."""
    with tracking.failing_run(run_id):
        out = read_outputs(result_checkpoint_dir(launch(cfg, run_id=run_id, name=name, callbacks=callbacks)))
        if run_id:
            publish(run_id, cfg, out, roles=roles)
    return out


def result_table(cfg: Config, out: Outputs) -> str:
    """Teacher, student SSHP and ASHP mAP@K on the test queries, and student vs teacher encode throughput."""
    t, k = out.test, cfg.eval.topk
    shape = (cfg.data.in_chans, cfg.data.image_size)
    tf = count_flops(out.teacher, *shape)
    sf = count_flops(out.student, *shape) if out.student is not None else 0
    s_rate, t_rate = t.get("student_images_per_s", 0.0), t.get("teacher_images_per_s", 0.0)
    rows = [
        (
            "teacher (teacher → teacher)",
            f"{t.get('test_query/teacher_map', float('nan')):.4f}",
            f"{t_rate:,.0f}",
            f"{tf / 1e6:,.1f}",
        ),
        (
            "student SSHP (student → student)",
            f"{t.get('test_query/sshp_map', float('nan')):.4f}",
            f"{s_rate:,.0f}",
            f"{sf / 1e6:,.1f}",
        ),
        ("student ASHP (student → teacher db)", f"{t.get('test_query/ashp_map', float('nan')):.4f}", "", ""),
    ]
    head = ("model / paradigm", f"mAP@{k}", "encode img/s/worker", "MFLOPs/img")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    text = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    if s_rate and t_rate:
        text.append(
            f"student encodes {s_rate / t_rate:.2f}x faster than the teacher "
            f"({tf / max(sf, 1):.1f}x fewer FLOPs); checkpoint: {out.checkpoint_dir}"
        )
    return "\n".join(text)
