"""DeepSpeed's engine checkpoint (`engine/` in every checkpoint) read with `torch.load(weights_only=True)`.

DeepSpeed writes and reads its checkpoint through the engine's `checkpoint_engine`; its default
(`TorchCheckpointEngine`) loads with `weights_only=False`, so a crafted file in checkpoint storage would run code on
every rank at resume. `make_engine` swaps in `WeightsOnlyCheckpointEngine`: the same files, written the same way
and read by the same DeepSpeed code (so a resume stays bit-exact, at every ZeRO stage), only unpickled by torch's
weights-only unpickler. It admits tensors and plain Python, plus the few DeepSpeed classes named in
`DEEPSPEED_GLOBALS` that DeepSpeed stores in its own state (rebuilt from their fields, none of them calls code).

Why not our own format (module + optimizer state dicts): from ZeRO stage 1 on, the optimizer state is partitioned
across ranks and merged on load by DeepSpeed (also when the world size changes); writing it ourselves would
re-implement that for no gain in safety.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _deepspeed_globals() -> list:
    """The non-torch classes in DeepSpeed's checkpoints of our engines: ZeRO 1-3 optimizer state holds LossScaler,
    ZeroStageEnum and fragment_address (listed from the files that the tests write on CPU, fp32); DynamicLossScaler
    is fp16's. A class not listed here fails the resume with an UnpicklingError naming it, it is never run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


DEEPSPEED_GLOBALS = _deepspeed_globals()


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """TorchCheckpointEngine whose `load` uses torch's weights-only unpickler (saving is unchanged)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def load_weights_only(engine) -> None:
    """Make `engine` read its checkpoints with the weights-only unpickler (after deepspeed.initialize)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:  # a Nebula / fast / decoupled engine: not ours to change
        raise TypeError(
            f"unexpected DeepSpeed checkpoint engine {type(current).__name__}; expected TorchCheckpointEngine"
        )
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # same name, serialization settings
    engine.checkpoint_engine = safe
