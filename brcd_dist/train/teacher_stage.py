"""Stage A: the teacher. Loaded when the driver's plan names one (a kept teacher, an MLflow URI or a checkpoint
file: teacher_reuse.resolve), otherwise a timm backbone + hash head trained with the CIBHash loss (DESIGN §2
"Teacher")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from brcd_dist import storage
from brcd_dist.codes import probs_and_codes
from brcd_dist.losses.cibhash import cibhash_loss
from brcd_dist.models import HashModel, build_teacher, load_hash_model, save_hash_model
from brcd_dist.teacher_reuse import TeacherPlan, keep_teacher
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.engine import load_engine, make_engine
from brcd_dist.train.epochs import run_epochs, two_view_forward
from brcd_dist.train.state import TrainState

log = logging.getLogger("brcd_dist.train")


def teacher_source(state: TrainState, plan: TeacherPlan, resume_dir: Optional[Path]) -> str:
    """Where stage A takes the teacher from, in this order ("" = train it):
    1. stage A finished before a restart: the run's teacher (`state.teacher_uri`, written once when it finished),
       or the `teacher.pt` of a checkpoint that carries it (a run without a run directory);
    2. the plan's teacher (teacher_reuse.resolve): a teacher kept by an earlier run of the same key, or
       teacher.uri (a checkpoint file, local or s3://, or an MLflow URI)."""
    if state.stage != "teacher":
        return state.teacher_uri or str(resume_dir / "teacher.pt")
    return plan.load


def load_teacher(uri: str) -> HashModel:
    if uri.startswith(("models:/", "runs:/")):
        from brcd_dist.tracking import load_model

        return load_model(uri)
    return load_hash_model(uri)  # a checkpoint file (local or s3://): no MLflow involved


def teacher_stage(
    ctx: WorkerContext, state: TrainState, plan: TeacherPlan, resume_dir: Optional[Path]
) -> tuple[HashModel, str]:
    """The frozen teacher on this worker's device, and where the run keeps it ("" = in every checkpoint, for a
    run without a run directory). Rank 0 writes it there once, unless it was loaded from there."""
    source = teacher_source(state, plan, resume_dir)
    teacher = load_teacher(source) if source else train_teacher(ctx, state, resume_dir)
    teacher = teacher.to(ctx.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    keep = state.teacher_uri or plan.keep or (storage.join(ctx.run_dir, "teacher.pt") if ctx.run_dir else "")
    if keep and keep != source and ctx.is_chief:
        if keep == plan.keep:
            keep_teacher(plan, teacher)  # the content-keyed file, beside what its key was made of
        else:
            save_hash_model(teacher, keep)
    return teacher, keep


def train_teacher(ctx: WorkerContext, state: TrainState, resume_dir: Optional[Path]) -> HashModel:
    cfg = ctx.cfg
    model = build_teacher(cfg).to(ctx.device)
    if cfg.train.teacher_epochs == 0:
        log.warning("train.teacher_epochs=0: the teacher keeps its initial weights")
        return model
    engine = make_engine(model, cfg.train, cfg.train.teacher_lr, ctx.device)
    if resume_dir is not None and state.stage == "teacher" and (resume_dir / "engine").is_dir():
        load_engine(engine, str(resume_dir / "engine"))

    def step(batch: dict) -> dict:
        l1, l2 = two_view_forward(engine, batch, ctx.device)
        p1, s1 = probs_and_codes(l1)
        p2, s2 = probs_and_codes(l2)
        return {"loss": cibhash_loss(p1, s1, p2, s2, tau=cfg.brcd.tau)}

    run_epochs(
        ctx,
        state,
        engine,
        split=cfg.train.teacher_split,
        epochs=cfg.train.teacher_epochs,
        prefix="teacher",
        step_fn=step,
        on_epoch_end=lambda epoch: ({}, False),
    )
    return engine.module
