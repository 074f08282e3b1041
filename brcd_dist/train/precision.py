"""The dtype a run computes in (`train.precision`) and the autocast of the forward passes that no DeepSpeed engine
wraps (the frozen teacher, encoding). Kept apart from train/engine.py so that evaluation and encoding do not
import DeepSpeed."""

from __future__ import annotations

import torch

from brcd_dist.config import TrainConfig


def train_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype the models compute in (the weights stay fp32): "auto" is bf16 on a GPU that supports it and fp32
    elsewhere; "bf16" also on the CPU (what a GPU run does, so a CPU run can pin it)."""
    if train.precision == "bf16":
        return torch.bfloat16
    if train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on the CPU and the GPU alike when the run computes in bf16 (`train_dtype`); a no-op in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
