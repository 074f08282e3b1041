"""Stage C: the student, trained with kd_weight × KD loss (BRCD or a baseline) + λ_self × its own CIBHash
loss on streamed two-view batches; the frozen teacher's codes of both views computed on the fly without
gradient; validation mAP every E epochs for model selection and early stopping (DESIGN §2 "Loss")."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from brcd_dist.clustering.pseudo_labels import assign_nearest
from brcd_dist.codes import probs_and_codes
from brcd_dist.config import Config
from brcd_dist.losses import KDInputs, kd_loss
from brcd_dist.losses.cibhash import cibhash_loss
from brcd_dist.models import HashModel, build_student
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.engine import load_engine, make_engine
from brcd_dist.train.epochs import run_epochs, two_view_forward
from brcd_dist.train.evaluation import Evaluator
from brcd_dist.train.precision import autocast, train_dtype
from brcd_dist.train.selection import ModelSelection
from brcd_dist.train.state import Clustering, TrainState


def full_state_dict(engine) -> dict:
    """The student's weights as a plain CPU state_dict (gathered first under ZeRO-3)."""
    gather = nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    with gather:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def student_step(batch: dict, teacher, student, clustering: Clustering, cfg: Config, device: torch.device) -> dict:
    """One training step's losses: the frozen teacher's codes of both views (no gradient), the student's two
    views, each view's nearest centroid, KDInputs, kd_weight × KD + λ_self × CIBHash. `student` is a DeepSpeed
    engine or a plain module; `clustering`'s centroids and masks are on `device`."""
    b = cfg.brcd
    with torch.no_grad(), autocast(device, train_dtype(cfg.train, device)):
        v1, v2 = batch["view1"].to(device), batch["view2"].to(device)
        t_logits = teacher(torch.cat([v1, v2]).to(next(teacher.parameters()).dtype)).float()
    q, t = probs_and_codes(t_logits)
    n = len(v1)
    l1, l2 = two_view_forward(student, batch, device)
    p1, s1 = probs_and_codes(l1)
    p2, s2 = probs_and_codes(l2)
    view_clusters = assign_nearest(t, clustering.centroids, spherical=cfg.kmeans.spherical)
    # a key the clustering does not know (shards changed since) gets its first view's nearest centroid
    labels = torch.from_numpy(clustering.pseudo_labels.lookup(batch["key"])).to(device)
    labels = torch.where(labels < 0, view_clusters[:n], labels)
    inputs = KDInputs(
        s1=s1,
        s2=s2,
        p1=p1,
        p2=p2,
        t1=t[:n],
        t2=t[n:],
        q1=q[:n],
        q2=q[n:],
        labels=labels,
        view_clusters1=view_clusters[:n],
        view_clusters2=view_clusters[n:],
        masks=clustering.masks,
    )
    kd = kd_loss(b.kd, inputs, b)
    own = cibhash_loss(p1, s1, p2, s2, tau=b.tau)
    offset = (view_clusters[n:] != labels).float().mean() + (view_clusters[:n] != labels).float().mean()
    return {
        "loss": b.kd_weight * kd + b.lambda_self * own,
        "kd": kd.detach(),
        "self": own.detach(),
        "offset_rate": offset.detach() / 2,
    }


def on_device(clustering: Clustering, device: torch.device) -> Clustering:
    """The centroids and masks that every step reads, moved once per clustering round."""
    return replace(clustering, centroids=clustering.centroids.to(device), masks=clustering.masks.to(device))


def student_stage(
    ctx: WorkerContext,
    state: TrainState,
    teacher: HashModel,
    clustering: Clustering,
    evaluator: Evaluator,
    resume_dir: Optional[Path],
    *,
    recluster: Callable[[], tuple[Clustering, dict]],
    keep_best: Callable[[dict], None],
    best_weights: Optional[dict] = None,
) -> HashModel:
    """Train the student from `clustering`; `recluster()` (run_stages's) runs the next k-means round every
    brcd.recluster_every epochs and returns it with its metrics; `keep_best(weights)` hands each new best student
    to the checkpoints; `best_weights` is the best so far of a resumed run."""
    cfg, b = ctx.cfg, ctx.cfg.brcd
    # The student's initial weights depend on the seed only, not on what this process ran before (a restart
    # at the start of stage C loads the teacher instead of building and training it).
    torch.manual_seed(cfg.train.seed)
    model = build_student(ctx.cfg).to(ctx.device)
    engine = make_engine(model, cfg.train, cfg.train.lr, ctx.device)
    selection = ModelSelection(state, cfg.train.early_stop_patience, best_weights)
    if resume_dir is not None and (resume_dir / "engine").is_dir():
        load_engine(engine, str(resume_dir / "engine"))
    current = on_device(clustering, ctx.device)  # replaced when k-means is re-run every R epochs

    def on_epoch_end(epoch: int) -> tuple[dict, bool]:
        nonlocal current
        metrics: dict = {}
        if b.recluster_every and (epoch + 1) % b.recluster_every == 0 and epoch + 1 < cfg.train.epochs:
            reclustered, metrics = recluster()
            current = on_device(reclustered, ctx.device)
        stop = False
        last = epoch + 1 == cfg.train.epochs
        if cfg.train.eval_every and ((epoch + 1) % cfg.train.eval_every == 0 or last):
            result = evaluator.evaluate(engine.module, "val_query")
            metrics.update(result)
            state.history["eval"].append({"epoch": epoch + 1, **result})
            if selection.offer(result["val_query/sshp_map"], lambda: full_state_dict(engine)):
                keep_best(selection.best_weights)
            stop = selection.should_stop
        return metrics, stop

    run_epochs(
        ctx,
        state,
        engine,
        split="train",
        epochs=cfg.train.epochs,
        prefix="student",
        step_fn=lambda batch: student_step(batch, teacher, engine, current, cfg, ctx.device),
        on_epoch_end=on_epoch_end,
    )
    student = copy.deepcopy(engine.module).float().cpu()
    if selection.best_weights is not None:  # model selection on validation mAP (DESIGN §3)
        student.load_state_dict(selection.best_weights)
    return student.to(ctx.device).eval()
