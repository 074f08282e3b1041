"""DeepSpeed engines built from our TrainConfig: ZeRO stage, micro-batch, accumulation, bf16 on GPU, fp32 on CPU."""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from brcd_dist.config import TrainConfig
from brcd_dist.train.engine_checkpoint import load_weights_only
from brcd_dist.train.progress import quiet_stdout


def train_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype the models are trained and run in (`train.precision`): "auto" is bf16 on a GPU that supports it
    and fp32 elsewhere; "bf16" also on the CPU (what a GPU run does, so a CPU test can pin it)."""
    if train.precision == "bf16":
        return torch.bfloat16
    if train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def deepspeed_config(train: TrainConfig, lr: float, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON config. The optimizer is torch's AdamW: DeepSpeed's default "Adam" is FusedAdam, a
    compiled op that costs about 90 s to build on CPU and needs nothing we gain from it here. In bf16 mode
    DeepSpeed casts the parameters only; the buffers (BatchNorm's running statistics) follow, or batch_norm gets
    bf16 weights beside fp32 statistics and refuses them."""
    bf16 = dtype == torch.bfloat16
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": train.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"buffer_dtype": "bf16"}
    return config


def make_engine(model: nn.Module, train: TrainConfig, lr: float, device: torch.device):
    """Wrap a model in a DeepSpeed engine on the process group that Ray Train already set up."""
    params = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(train, lr, train_dtype(train, device))
    with quiet_stdout():  # its shm op's "built successfully" print on every rank: -v only
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=config, dist_init_required=False
        )
    load_weights_only(engine)  # its checkpoints are read with torch.load(weights_only=True): no code from storage
    return engine


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on a GPU for forward passes that are not under a DeepSpeed engine (the frozen teacher, the
    final student), when the run trains in bf16; on the CPU the modules are cast instead (`train_dtype`)."""
    on = device.type == "cuda" and dtype == torch.bfloat16
    return torch.autocast("cuda" if on else "cpu", dtype=torch.bfloat16, enabled=on)
