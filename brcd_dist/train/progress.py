"""Where the main job is, drawn in the driver: one progress bar a stage (teacher and student epochs and steps,
encoding, k-means iterations, evaluation encodes) with tqdm's rate and ETA, the running loss and the latest
validation mAP in its description; each stage's end prints one line.

Rank 0 of the Ray Train workers owns the bars. `ray.experimental.tqdm_ray` sends their state through the
worker's output to the driver, which draws them (the driver's `log_to_driver` must be on); outside a Ray worker
the same calls draw plain tqdm bars. BRCD_PROGRESS=0 turns bars and stage lines off; BRCD_VERBOSE=1 (jobs'
`-v`) keeps Ray's, DeepSpeed's and torch's own log lines, which `quiet_worker_logs` otherwise lowers to errors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time

PROGRESS_ENV = "BRCD_PROGRESS"
VERBOSE_ENV = "BRCD_VERBOSE"
# Loggers whose INFO lines are noise to a user watching the job: Ray's (Train's reports, Data's
# plans), DeepSpeed's set-up; and two whose warnings are noise on CPU machines: torch's extension builder ("No
# CUDA runtime is found") and DeepSpeed's accelerator guess. Ray Train's own per-report INFO line comes from a
# logger named by its file: connect_ray's logging_config lowers Ray's processes as a whole.
NOISY_LOGGERS = {
    "ray": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
    "DeepSpeed": logging.ERROR,
    "torch.utils.cpp_extension": logging.ERROR,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..." on a new store
}

# Single messages dropped from a logger that otherwise keeps its level: Ray's notice, at every local ray.init, that
# token authentication is on (the secure default). Its warning that authentication is *disabled* stays.
QUIET_MESSAGES = {
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def enabled() -> bool:
    return os.environ.get(PROGRESS_ENV, "1") != "0"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def quiet_worker_logs(root: bool = False) -> None:
    """Raise the noisy loggers of this process to their NOISY_LOGGERS level, unless BRCD_VERBOSE is set; with
    `root` (a Ray Train worker), every INFO line too: Ray Train's per-report line comes from a logger named by its
    file path, FAISS's loader and our own per-stage INFO lines are what the bars show."""
    if verbose():
        return
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, prefixes in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    if root:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("brcd_dist").setLevel(logging.WARNING)


def setup_worker_process() -> None:
    """What a Ray Train worker sets before it imports DeepSpeed (train/engine.py imports it late, for this):
    DeepSpeed JIT-compiles its CPU shm comm op on first use, so keep the build next to the venv's torch (a different
    torch never reuses, and dead-locks on, a stale build: docs/troubleshooting.md); and, at default verbosity,
    the noisy loggers lowered and DS_ACCELERATOR named on a machine without CUDA (else torch's extension builder
    warns "No CUDA runtime is found" and DeepSpeed logs its guess)."""
    import sys
    from pathlib import Path

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    quiet_worker_logs()
    if not verbose():
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def quiet_stdout():
    """Drop what the block prints to stdout unless BRCD_VERBOSE: DeepSpeed's engine set-up prints "DeepSpeed
    deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every rank with print(), not its logger."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - no Ray, or no runtime context: a plain process
        return False


def _bar(desc: str, total: int | None, unit: str):
    if _in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(desc=desc, total=total, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, unit=unit, leave=False)


def _fmt(values: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def stage_line(text: str, chief: bool = True) -> None:
    """One line at a stage boundary (rank 0 only)."""
    if chief and enabled():
        print(text, flush=True)


class StageBar:
    """One stage's bar: `update(n, **shown)` advances it and replaces the values shown after its name."""

    def __init__(self, name: str, total: int | None, unit: str, chief: bool = True):
        self.name, self.unit, self.total = name, unit, total
        self.shown: dict = {}
        self.count, self.t0 = 0, time.perf_counter()
        self.bar = _bar(name, total, unit) if chief and enabled() else None

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total

    def update(self, n: int = 1, **shown) -> None:
        self.count += n
        if self.bar is None:
            return
        if shown:
            self.shown.update(shown)
            self.bar.set_description(f"{self.name}  {_fmt(self.shown)}")
        self.bar.update(n)

    def close(self, summary: str = "", line: bool = True) -> None:
        """Close the bar and (with `line`) print the stage's one line: name, count, seconds, rate, `summary`."""
        if self.bar is None:
            return
        self.bar.close()
        if not line:
            self.bar = None
            return
        seconds = time.perf_counter() - self.t0
        rate = self.count / seconds if seconds > 0 else 0.0
        tail = f"; {summary}" if summary else (f"; {_fmt(self.shown)}" if self.shown else "")
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s")) else "s")
        stage_line(f"[{self.name}] done: {self.count} {units} in {seconds:.1f} s ({rate:.1f}/s){tail}")
        self.bar = None


class EpochProgress:
    """A training stage's bar over all its epochs' steps, showing the epoch, the epoch's running mean loss and
    the latest validation mAP (student: SSHP on val_query)."""

    MAP_KEY = "val_query/sshp_map"

    def __init__(self, prefix: str, epochs: int, chief: bool = True):
        self.prefix, self.epochs, self.chief = prefix, epochs, chief
        self.bar: StageBar | None = None
        self.loss_sum, self.steps, self.latest_map = 0.0, 0, None

    def start_epoch(self, epoch: int, steps: int, skip: int = 0) -> None:
        """Epoch `epoch` (0-based) of `steps` steps, of which `skip` were trained before a restart."""
        if self.bar is None:
            self.bar = StageBar(self.prefix, steps * (self.epochs - epoch) - skip, "step", chief=self.chief)
        self.epoch, self.loss_sum, self.steps = epoch, 0.0, 0

    def step(self, loss: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        shown = {"epoch": f"{self.epoch + 1}/{self.epochs}", "loss": self.loss_sum / self.steps}
        if self.latest_map is not None:
            shown["val mAP"] = self.latest_map
        self.bar.update(1, **shown)

    def end_epoch(self, metrics: dict) -> None:
        if self.MAP_KEY in metrics:
            self.latest_map = float(metrics[self.MAP_KEY])

    def close(self) -> None:
        if self.bar is not None:
            summary = {"epochs": self.epochs, "last epoch loss": self.loss_sum / max(self.steps, 1)}
            if self.latest_map is not None:
                summary["val mAP"] = self.latest_map
            self.bar.close(_fmt(summary))
