"""DeepSpeed engines built from our TrainConfig: ZeRO stage, micro-batch, accumulation, bf16 autocast or fp32."""

from __future__ import annotations

import torch
from torch import nn

from brcd_dist.config import TrainConfig
from brcd_dist.train.precision import train_dtype
from brcd_dist.train.progress import quiet_stdout, setup_worker_process
from brcd_dist.train.state import ENGINE_TAG


def deepspeed_config(train: TrainConfig, lr: float, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON config. The optimizer is torch's AdamW: DeepSpeed's default "Adam" is FusedAdam, a
    compiled op that costs about 90 s to build on CPU and needs nothing we gain from it here.

    bf16 is DeepSpeed's torch_autocast mode, not its bf16 mode: the weights, their optimizer state and BatchNorm's
    running statistics stay fp32 and the matmuls and convolutions run in bf16. The bf16 mode casts the weights
    (DeepSpeed 0.19 leaves the buffers in fp32, which batch_norm refuses beside bf16 weights); with the buffers cast
    too it cost the student 0.020 SSHP mAP against fp32 (mean of three seeds, each one lower), autocast 0.003
    (docs/benchmarks/throughput.md, bench/precision.py)."""
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": train.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def make_engine(model: nn.Module, train: TrainConfig, lr: float, device: torch.device):
    """Wrap a model in a DeepSpeed engine on the process group that Ray Train already set up. DeepSpeed is imported
    here, after the worker's set-up (train.progress.setup_worker_process), which its import reads."""
    setup_worker_process()  # idempotent; run_stages has called it already, a test or bench may not have
    import deepspeed

    from brcd_dist.train.engine_checkpoint import load_weights_only

    params = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(train, lr, train_dtype(train, device))
    with quiet_stdout():  # its shm op's "built successfully" print on every rank: -v only
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=config, dist_init_required=False
        )
    load_weights_only(engine)  # its checkpoints are read with torch.load(weights_only=True): no code from storage
    return engine


def save_engine(engine, directory: str) -> None:
    """The engine's checkpoint without its frozen parameters (a frozen pretrained backbone is rebuilt from its
    weights file; each checkpoint would otherwise carry it again)."""
    engine.save_checkpoint(directory, tag=ENGINE_TAG, exclude_frozen_parameters=True)


def load_engine(engine, directory: str) -> None:
    """Resume from `save_engine`'s checkpoint: strictly, unless the model has frozen parameters, which it lacks."""
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    engine.load_checkpoint(directory, tag=ENGINE_TAG, load_module_strict=not frozen)
