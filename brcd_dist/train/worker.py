"""The function every Ray Train worker runs: stages A–D of DESIGN §1 in order, each skipped when the latest
checkpoint shows it finished (so a restarted run never redoes the teacher or the clustering)."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path

import ray.train
import torch

from brcd_dist import storage
from brcd_dist.config import config_digest, from_dict
from brcd_dist.data import load_manifest
from brcd_dist.data.manifest import manifest_location
from brcd_dist.models import load_hash_model
from brcd_dist.redact import apply_credential_env
from brcd_dist.storage import use_s3_endpoint
from brcd_dist.teacher_reuse import TeacherPlan
from brcd_dist.train.checkpoint import CheckpointWriter
from brcd_dist.train.clustering_stage import clustering_metrics, clustering_stage
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.evaluation import Evaluator
from brcd_dist.train.progress import quiet_worker_logs, setup_worker_process
from brcd_dist.train.state import CheckpointFiles, Clustering, TrainState, read_state
from brcd_dist.train.step_log import StepLogger
from brcd_dist.train.student_stage import student_stage
from brcd_dist.train.teacher_cache import TeacherCodes
from brcd_dist.train.teacher_stage import teacher_stage

log = logging.getLogger("brcd_dist.train")


def make_context(config: dict) -> WorkerContext:
    cfg = from_dict(config["cfg"])
    # train.s3_endpoint reaches a worker by its job's runtime env only when connect_ray started Ray; a run launched
    # on a Ray that the caller started (a notebook's or a test's ray.init) needs it set here.
    use_s3_endpoint(cfg.train.s3_endpoint)
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DeepSpeed also broadcasts rank 0's weights)
    # Where each rank runs (placement checks, e.g. STRICT_SPREAD over nodes, read it from the job's logs).
    log.info(
        "rank %d of %d: node %s, pid %d",
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.get_runtime_context().get_node_id(),
        os.getpid(),
    )
    quiet_worker_logs(root=True)  # after the placement line, which the job's log must keep
    rank, files = ctx.get_world_rank(), CheckpointFiles()
    manifest = load_manifest(manifest_location(cfg.data.shards_dir, cfg.data.shards_url))
    return WorkerContext(
        cfg=cfg,
        manifest=manifest,
        rank=rank,
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        checkpoint_files=files,
        checkpoint=CheckpointWriter(is_chief=rank == 0, files=files),
        step_log=StepLogger(run_id=config.get("run_id"), is_chief=rank == 0),
        run_dir=config.get("run_dir", ""),
    )


def begin_attempt(state: TrainState, resumed: bool) -> list:
    """Record this start of the workers in state.history["attempts"]: where it resumed and which stages it
    runs (appended to the returned list as they start), so that a checkpoint shows that a restart did not redo
    the teacher or the clustering."""
    ran: list = []
    at = {k: getattr(state, k) for k in ("stage", "epoch", "step_in_epoch", "global_step")} if resumed else None
    state.history.setdefault("attempts", []).append({"resumed_at": at, "ran": ran})
    return ran


def run_stages(config: dict) -> None:
    """Stages A–D of DESIGN §1 on this worker (`driver.launch` hands it to TorchTrainer).
    config = {"cfg": Config as dict, "teacher": teacher_reuse.TeacherPlan as dict, "run_id": MLflow run or None,
    "stages": "all" | "teacher", "run_dir": where the run's teacher is written once, "env": the driver's credential
    variables (redact.credential_env)}.

    A stage runs when `state.stage` says it has not finished, and is skipped otherwise: its product is read from the
    checkpoint. The stages return their products; this function alone puts them into the checkpoint files."""
    setup_worker_process()
    apply_credential_env(config.get("env"))
    ctx = make_context(config)
    files = ctx.checkpoint_files
    plan = TeacherPlan(**config["teacher"]) if config.get("teacher") else TeacherPlan.of_config(ctx.cfg)
    with ExitStack() as stack:
        stack.callback(ctx.step_log.flush)  # queued step metrics reach MLflow whether the stages end or fail
        checkpoint = ray.train.get_checkpoint()
        resume_dir = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        state = read_state(resume_dir) if resume_dir else TrainState(config_digest=config_digest(ctx.cfg))
        if resume_dir:
            log.info(
                "rank %d resumes at stage %s, epoch %d, step %d",
                ctx.rank,
                state.stage,
                state.epoch,
                state.step_in_epoch,
            )
        resumed_stage = state.stage if resume_dir else None
        ran = begin_attempt(state, resumed=resume_dir is not None)

        # Stage A: teacher.
        if state.stage == "teacher":
            ran.append("teacher")
        model, kept_at = teacher_stage(ctx, state, plan, resume_dir)
        if not kept_at:
            files.teacher = model  # no run directory: every checkpoint carries it
        if state.stage == "teacher":
            state.teacher_uri = kept_at
            state.stage, state.epoch, state.step_in_epoch = "clustering", 0, 0
            ctx.checkpoint.report(state, {"teacher/done": 1})
        if config.get("stages", "all") == "teacher":
            return
        teacher = TeacherCodes(ctx, model, plan.cache)

        def keep(clustering: Clustering) -> Clustering:
            """Once a round beside the checkpoints, named by the state (or, without a run directory, in every
            checkpoint): a round's pseudo-labels hold every training key."""
            if ctx.run_dir:
                state.clustering_uri = storage.join(ctx.run_dir, f"clustering-r{state.cluster_round}.pt")
                if ctx.is_chief:
                    clustering.save(state.clustering_uri)
            else:
                files.clustering = clustering
            return clustering

        # Stage B: distributed k-means, pseudo-labels, bit masks.
        if state.stage == "clustering":
            ran.append("clustering")
            clustering = keep(clustering_stage(ctx, teacher, state.cluster_round))
            state.stage = "student"
            ctx.checkpoint.report(state, clustering_metrics(clustering))
        else:
            clustering = Clustering.load(state.clustering_uri or resume_dir / "clustering.pt")
            if not state.clustering_uri:  # a checkpoint that carries it: the next ones carry it too
                files.clustering = clustering

        # Stage C: the student.
        evaluator = Evaluator(ctx, teacher)
        if state.stage == "student":
            ran.append("student")
            resumed = resume_dir if resumed_stage == "student" else None  # else its engine/ is another stage's
            if resumed is not None and (resumed / "best_student.pt").is_file():
                # carried into the next checkpoints, or a second restart loses it
                files.best_student = torch.load(resumed / "best_student.pt", weights_only=True)

            def recluster() -> tuple[Clustering, dict]:
                state.cluster_round += 1
                again = keep(clustering_stage(ctx, teacher, state.cluster_round))
                return again, clustering_metrics(again)

            student = student_stage(
                ctx,
                state,
                model,
                clustering,
                evaluator,
                resumed,
                recluster=recluster,
                keep_best=lambda weights: setattr(files, "best_student", weights),
                best_weights=files.best_student,
            )
        else:  # the run had finished; a restart only re-reports
            student = load_hash_model(resume_dir / "student.pt").to(ctx.device)

        # Stage D: test queries, curves, throughput.
        ran.append("test")
        test = evaluator.evaluate(student, "test_query", with_curves=ctx.cfg.eval.pr_curves)
        curves = test.pop("curves", None)
        state.stage = "done"
        if ctx.use_gpu:  # this attempt's peak, rank 0's device
            test["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        state.history["test"] = {**test, **evaluator.throughput}
        files.student, files.curves = student, curves
        ctx.checkpoint.report(state, {**test, **evaluator.throughput})
