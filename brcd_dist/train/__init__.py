"""Ray Train + DeepSpeed worker loops (the edge of the library: the only place that imports ray.train and deepspeed)."""

import os
import sys
from pathlib import Path

# DeepSpeed JIT-compiles its CPU shm comm op on first use; keep the build next to the venv's torch so that a
# different torch never reuses (and dead-locks on) a stale build (docs/troubleshooting.md).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

from brcd_dist.train.progress import quiet_worker_logs, verbose

# Before deepspeed's import: torch's extension builder warns "No CUDA runtime is found" and DeepSpeed logs its
# accelerator guess ("Setting accelerator to CPU") unless told; both are noise at default verbosity.
quiet_worker_logs()
if not verbose():
    import torch  # deepspeed imports it next anyway

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
