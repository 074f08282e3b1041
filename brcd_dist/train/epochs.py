"""The epoch/step loop shared by teacher (stage A) and student (stage C) training: streamed two-view batches,
DeepSpeed step, step metrics, a checkpoint every C steps and at each epoch end, and mid-epoch resume."""

from __future__ import annotations

import time
from typing import Callable

import torch

from brcd_dist.data import train_batches
from brcd_dist.train.collectives import sync_buffers
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.progress import EpochProgress
from brcd_dist.train.state import TrainState

LOG_EVERY = 10  # steps between reads of the step losses on the host (bar, MLflow step metrics)


def run_epochs(
    ctx: WorkerContext,
    state: TrainState,
    engine,
    *,
    split: str,
    epochs: int,
    prefix: str,
    step_fn: Callable[[dict], dict],
    on_epoch_end: Callable[[int], tuple[dict, bool]],
) -> None:
    """Train `engine` for epochs [state.epoch, epochs). `step_fn(batch)` returns named loss tensors with "loss"
    among them; `on_epoch_end(epoch)` returns (metrics, stop). Every rank runs the same number of steps, since
    train_batches has the same length on every rank."""
    cfg = ctx.cfg.train
    progress = EpochProgress(prefix, epochs, chief=ctx.is_chief)
    for epoch in range(state.epoch, epochs):
        loader = train_batches(
            ctx.manifest,
            split,
            batch_size=cfg.batch_size,
            epoch=epoch,
            seed=cfg.seed,
            max_steps=cfg.max_steps_per_epoch,
            **ctx.loader_kwargs(),
        )
        engine.train()
        sums: dict[str, torch.Tensor] = {}  # float64 running sums on the device: no host sync per step
        shown, shown_steps = 0.0, 0  # the part of sums["loss"] the bar has been given, and over how many steps
        n_steps, n_images, t0 = 0, 0, time.perf_counter()
        skip = state.step_in_epoch  # batches this epoch already trained before a restart
        progress.start_epoch(epoch, len(loader), skip)
        for i, batch in enumerate(loader):
            if i < skip:
                continue  # replays the loader (and its seeded augmentations) up to the resume point
            losses = step_fn(batch)
            engine.backward(losses["loss"])
            engine.step()
            state.step_in_epoch = i + 1
            state.global_step += 1
            n_steps += 1
            n_images += len(batch["key"])
            for k, v in losses.items():
                v = v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
            log_now = state.global_step % LOG_EVERY == 0
            checkpoint_now = state.global_step % cfg.checkpoint_every == 0
            if log_now or checkpoint_now:
                values = {k: float(v.detach()) for k, v in losses.items()}  # the host waits here, not every step
                shown = _show_losses(progress, float(sums["loss"]), shown, n_steps - shown_steps)
                shown_steps = n_steps
                if log_now:
                    ctx.step_log.log({f"{prefix}/{k}": v for k, v in values.items()}, state.global_step)
                if checkpoint_now:
                    ctx.checkpoint.report(state, {f"{prefix}/{k}": v for k, v in values.items()}, engine=engine)
        if sums:
            _show_losses(progress, float(sums["loss"]), shown, n_steps - shown_steps)
        seconds = time.perf_counter() - t0
        metrics = {f"{prefix}/epoch_{k}": float(v) / max(n_steps, 1) for k, v in sums.items()}
        metrics[f"{prefix}/images_per_s"] = n_images / seconds if seconds > 0 else 0.0
        metrics[f"{prefix}/epoch"] = epoch + 1
        state.epoch, state.step_in_epoch = epoch + 1, 0
        sync_buffers(engine.module)  # evaluation and the saved model use rank 0's BN statistics everywhere
        eval_metrics, stop = on_epoch_end(epoch)
        metrics.update(eval_metrics)
        progress.end_epoch(metrics)
        state.history["train"].append({k: v for k, v in metrics.items()})
        ctx.step_log.log(metrics, state.global_step)
        ctx.checkpoint.report(state, metrics, engine=engine)
        if stop:
            break
    progress.close()
    ctx.step_log.flush()  # the stage's queued step metrics are in MLflow before the next stage starts


def _show_losses(progress: EpochProgress, total: float, shown: float, steps: int) -> float:
    """Give the bar the `steps` steps it has not seen, at their mean loss (total − shown over steps); returns the
    loss sum the bar has now seen."""
    for _ in range(steps):
        progress.step((total - shown) / steps)
    return total


def two_view_forward(engine, batch: dict, device: torch.device):
    """One forward over both views concatenated (BatchNorm sees both, as in the authors' code); returns fp32
    logits of view 1 and view 2. `engine` is a DeepSpeed engine or a plain module."""
    v1, v2 = batch["view1"].to(device), batch["view2"].to(device)
    dtype = next(getattr(engine, "module", engine).parameters()).dtype  # bf16 under DeepSpeed's bf16 mode
    logits = engine(torch.cat([v1, v2]).to(dtype)).float()
    return logits[: len(v1)], logits[len(v1) :]
