"""What a GPU run needs and a CPU run does not show, pinned on the CPU.

- A teacher can arrive with bf16 weights (DeepSpeed's bf16 mode leaves them so), which numpy has no dtype for: the
  weight digest that names cached codes and k-means results must not go through numpy's dtypes.
- train.precision=bf16, what a GPU run computes in, is pinned on the CPU: a bf16 forward under DeepSpeed with fp32
  weights and BatchNorm statistics.
- Ray Train's NCCL group maps only `cuda` to a backend: a CPU tensor handed to `dist.all_reduce` fails there and
  passes under gloo. Every tensor collective of the package therefore goes through train/collectives.py, which
  moves the tensor to the group's device and back. A CPU machine has no second device to put a tensor on the
  wrong side of, so the strict group below refuses what NCCL would be at risk of refusing: any tensor collective
  that does not come through that one helper.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO
from dist_utils import run_on_ranks

from brcd_dist.models import HashModel
from brcd_dist.train import collectives
from brcd_dist.train.teacher_cache import teacher_digest

HELPER = str(Path(collectives.__file__).resolve())
TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
)


# ----------------------------------------------------------------------------- the weight digest


def _teacher() -> HashModel:
    torch.manual_seed(0)
    model = HashModel("resnet10t", 16, 1, 32)  # BatchNorm: float buffers and an int64 counter
    model.train()(torch.randn(4, 1, 32, 32))  # running statistics that are not the initial ones
    return model.eval()


def test_the_digest_of_a_bf16_teacher_is_that_of_its_exact_fp32_copy():
    """A teacher trained in DeepSpeed's bf16 mode and the fp32 file a restarted worker loads are one teacher."""
    bf16 = _teacher().to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    assert teacher_digest(bf16) == teacher_digest(fp32)
    assert teacher_digest(bf16) != teacher_digest(_teacher())  # rounding to bf16 changed the weights


def test_the_digest_of_an_fp32_teacher_is_unchanged_so_kept_caches_stay_valid():
    """Hashing the fp32 bytes through a uint8 view gives the digest that numpy's bytes gave."""
    import hashlib

    model = _teacher()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    assert teacher_digest(model) == h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the group's device


def test_nccl_takes_cuda_tensors_and_gloo_cpu_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.device_for_backend("nccl") == torch.device("cuda", 3)
    assert collectives.device_for_backend("cuda:nccl") == torch.device("cuda", 3)
    assert collectives.device_for_backend("gloo") == torch.device("cpu")
    assert collectives.device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cpu")
    assert collectives.group_device() == torch.device("cpu")  # no process group


def test_no_tensor_collective_is_called_outside_the_helper():
    """Read, not run: a `dist.all_reduce(...)` added anywhere else in the package would reach NCCL unmoved."""
    call = re.compile(r"\bdist\.(" + "|".join(TENSOR_COLLECTIVES) + r")\(")
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sorted((REPO / "brcd_dist").rglob("*.py"))
        if p.resolve() != Path(HELPER)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if call.search(line)
    ]
    assert offenders == []


def _strict_group() -> list:
    """Wrap torch.distributed's tensor collectives so that a call from anywhere but the helper raises, as NCCL
    raises on a tensor that nobody moved to its device. Returns the refused call sites."""
    refused: list = []

    def guard(name, real):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if str(Path(caller).resolve()) != HELPER:
                refused.append(f"{name} from {caller}")
                raise RuntimeError(f"strict group: {name} called from {caller}, not through train/collectives")
            return real(*args, **kwargs)

        return call

    for name in TENSOR_COLLECTIVES:
        setattr(dist, name, guard(name, getattr(dist, name)))
    return refused


def _bf16_step() -> dict:
    """One DeepSpeed step with train.precision=bf16 on this CPU rank: what the forward computed in, and what the
    weights and BatchNorm's statistics are kept in."""
    import os
    from types import SimpleNamespace

    from brcd_dist.train.engine import make_engine

    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed reads it (Ray Train sets it)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    train = SimpleNamespace(batch_size=4, grad_accum=1, weight_decay=0.0, zero_stage=0, precision="bf16")
    engine = make_engine(model, train, 1e-2, torch.device("cpu"))
    out = engine(torch.randn(4, 4))
    engine.backward(out.float().pow(2).mean())
    engine.step()
    return {
        "forward": str(out.dtype),
        "weights": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "bn_stats": str(engine.module[1].running_var.dtype),
    }


def _on_strict_group(rank, world_size):
    """A bf16 DeepSpeed step; then stage B's k-means and bit statistics, a buffer sync, and each tensor helper, on a
    strict gloo group (DeepSpeed's own collectives run before the group turns strict)."""
    from dataclasses import replace

    from brcd_dist.clustering.pseudo_labels import PseudoLabels
    from brcd_dist.config import Config
    from brcd_dist.train.clustering_stage import kmeans_on_codes
    from brcd_dist.train.context import WorkerContext

    bf16 = _bf16_step()
    refused = _strict_group()
    cfg = Config()
    cfg.brcd = replace(cfg.brcd, clusters=3)
    cfg.kmeans = replace(cfg.kmeans, iters=5)
    ctx = WorkerContext(cfg=cfg, manifest=None, rank=rank, world_size=world_size, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    codes = torch.where(torch.rand(40, 16, generator=gen) > 0.5, 1.0, -1.0).numpy()
    km = kmeans_on_codes(ctx, codes, [f"r{rank}-{i}" for i in range(40)], cluster_round=0)
    bn = torch.nn.BatchNorm1d(4)
    bn.train()(torch.randn(8, 4) + rank)
    collectives.sync_buffers(bn)

    t = torch.tensor([1.0, 2.0]) * (rank + 1)
    b = torch.full((3,), float(rank))
    return {
        "bf16": bf16,
        "refused": refused,
        "counts": km["counts"].tolist(),
        "labelled": len(PseudoLabels.of(km["pseudo_labels"])),
        "running_mean": bn.running_mean.tolist(),
        "summed": collectives.all_reduce(t).tolist(),
        "input": t.tolist(),
        "max": collectives.all_reduce(torch.tensor([rank]), op=dist.ReduceOp.MAX).tolist(),
        "stacked": collectives.all_gather(torch.tensor([rank, 10 + rank])).tolist(),
        "broadcast_in_place": collectives.broadcast(b, src=1) is b,
        "broadcast": b.tolist(),
    }


@pytest.fixture(scope="module")
def strict_ranks():
    return [o.unwrap() for o in run_on_ranks(_on_strict_group, 2)]


def test_stage_b_and_buffer_sync_pass_a_group_that_refuses_unmoved_tensors(strict_ranks):
    r0, r1 = strict_ranks
    assert r0["refused"] == r1["refused"] == []
    assert r0["counts"] == r1["counts"] and sum(r0["counts"]) == 80  # bit statistics all-reduced over both ranks
    assert r0["labelled"] == r1["labelled"] == 80 and r0["running_mean"] == r1["running_mean"]


def test_bf16_computes_the_forward_in_bf16_and_keeps_weights_and_batchnorm_statistics_in_fp32(strict_ranks):
    """train.precision=bf16 is DeepSpeed's torch_autocast mode (train/engine.py says why not its bf16 mode)."""
    for r in strict_ranks:
        assert r["bf16"] == {"forward": "torch.bfloat16", "weights": ["torch.float32"], "bn_stats": "torch.float32"}


def test_all_reduce_returns_a_new_tensor_all_gather_stacks_in_rank_order_and_broadcast_fills_in_place(strict_ranks):
    for rank, r in enumerate(strict_ranks):
        assert r["input"] == [float(rank + 1), 2.0 * (rank + 1)]  # the input is left as it was
        assert r["summed"] == [3.0, 6.0] and r["max"] == [1]
        assert r["stacked"] == [[0, 10], [1, 11]]
        assert r["broadcast"] == [1.0, 1.0, 1.0] and r["broadcast_in_place"]


def test_without_a_process_group_the_tensor_helpers_are_identities():
    t = torch.arange(3)
    assert collectives.all_reduce(t) is t and collectives.broadcast(t) is t
    assert torch.equal(collectives.all_gather(t), t.unsqueeze(0))
