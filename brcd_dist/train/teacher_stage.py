"""Stage A: the teacher. Loaded when the config names one (MLflow URI or checkpoint file), otherwise a timm
backbone + hash head trained with the CIBHash loss (DESIGN §2 "Teacher")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from brcd_dist import storage
from brcd_dist.codes import probs_and_codes
from brcd_dist.losses.cibhash import cibhash_loss
from brcd_dist.models import HashModel, build_teacher, load_hash_model, save_hash_model
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.engine import make_engine
from brcd_dist.train.epochs import run_epochs, two_view_forward
from brcd_dist.train.state import ENGINE_TAG, TrainState

log = logging.getLogger("brcd_dist.train")


def teacher_stage(ctx: WorkerContext, state: TrainState, resume_dir: Optional[Path]) -> HashModel:
    cfg = ctx.cfg
    if state.teacher_uri:  # stage A finished before the restart: the run's teacher file
        teacher = load_hash_model(state.teacher_uri)
    elif resume_dir is not None and (resume_dir / "teacher.pt").is_file():  # a checkpoint that carries it
        teacher = load_hash_model(resume_dir / "teacher.pt")
    elif cfg.train.kept_teacher:  # teacher_reuse: an earlier run's teacher of the same content key
        teacher = load_hash_model(cfg.train.kept_teacher)
    elif cfg.teacher.uri and (
        storage.scheme(cfg.teacher.uri) in storage.OBJECT_SCHEMES or Path(cfg.teacher.uri).is_file()
    ):
        teacher = load_hash_model(cfg.teacher.uri)  # a checkpoint file (local or s3://): no MLflow involved
    elif cfg.teacher.uri:
        from brcd_dist.tracking import load_model  # models:/NAME@alias, runs:/...

        teacher = load_model(cfg.teacher.uri)
    else:
        teacher = train_teacher(ctx, state, resume_dir)
    teacher = teacher.to(ctx.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if ctx.run_dir and not state.teacher_uri:  # the frozen teacher once per run, not again in every checkpoint
        state.teacher_uri = storage.join(ctx.run_dir, "teacher.pt")
        if ctx.is_chief:
            save_hash_model(teacher, state.teacher_uri)
    elif not ctx.run_dir:
        ctx.checkpoint_files.teacher = teacher
    return teacher


def train_teacher(ctx: WorkerContext, state: TrainState, resume_dir: Optional[Path]) -> HashModel:
    cfg = ctx.cfg
    model = build_teacher(cfg).to(ctx.device)
    if cfg.train.teacher_epochs == 0:
        log.warning("train.teacher_epochs=0: the teacher keeps its initial weights")
        return model
    engine = make_engine(model, cfg.train, cfg.train.teacher_lr, ctx.device)
    if resume_dir is not None and state.stage == "teacher" and (resume_dir / "engine").is_dir():
        engine.load_checkpoint(str(resume_dir / "engine"), tag=ENGINE_TAG)

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
