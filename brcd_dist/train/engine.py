"""DeepSpeed engines built from our TrainConfig: ZeRO stage, micro-batch, accumulation, bf16 on GPU, fp32 on CPU."""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from brcd_dist.config import TrainConfig
from brcd_dist.train.engine_checkpoint import load_weights_only
from brcd_dist.train.progress import quiet_stdout


def deepspeed_config(train: TrainConfig, lr: float, use_gpu: bool) -> dict:
    """The DeepSpeed JSON config. The optimizer is torch's AdamW: DeepSpeed's default "Adam" is FusedAdam, a
    compiled op that costs about 90 s to build on CPU and needs nothing we gain from it here."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": train.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": bool(use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_engine(model: nn.Module, train: TrainConfig, lr: float, use_gpu: bool):
    """Wrap a model in a DeepSpeed engine on the process group that Ray Train already set up."""
    params = [p for p in model.parameters() if p.requires_grad]
    with quiet_stdout():  # its shm op's "built successfully" print on every rank: -v only
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=deepspeed_config(train, lr, use_gpu), dist_init_required=False
        )
    load_weights_only(engine)  # its checkpoints are read with torch.load(weights_only=True): no code from storage
    return engine


def autocast(use_gpu: bool):
    """bf16 autocast for forward passes that are not under a DeepSpeed engine (the frozen teacher) on GPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
