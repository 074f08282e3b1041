"""train/collectives on 2 real gloo ranks, and as identities without a process group."""

from __future__ import annotations

import torch
from dist_utils import run_on_ranks
from torch import nn

from brcd_dist.train.collectives import all_gather_objects, broadcast_object, sync_buffers


def _broadcast(rank, world_size):
    return broadcast_object({"from": rank}, src=0), broadcast_object(f"rank {rank}", src=1)


def _gather(rank, world_size):
    return all_gather_objects(("keys", list(range(rank + 1))))


def _sync(rank, world_size):
    torch.manual_seed(rank)  # different parameters on each rank
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()(torch.randn(8, 3) + rank)  # different running statistics on each rank
    params = [p.detach().clone() for p in model.parameters()]
    sync_buffers(model)
    bn = model[1]
    return (
        bn.running_mean.tolist(),
        bn.running_var.tolist(),
        int(bn.num_batches_tracked),  # tensors do not
        all(torch.equal(a, b) for a, b in zip(params, model.parameters())),
    )  # outlive the rank's process


def test_broadcast_object_gives_the_source_rank_value_on_every_rank():
    outs = [o.unwrap() for o in run_on_ranks(_broadcast, 2)]
    assert outs == [({"from": 0}, "rank 1"), ({"from": 0}, "rank 1")]


def test_all_gather_objects_returns_every_rank_value_in_rank_order():
    outs = [o.unwrap() for o in run_on_ranks(_gather, 2)]
    assert outs == [[("keys", [0]), ("keys", [0, 1])]] * 2


def test_sync_buffers_copies_rank_0_buffers_and_leaves_parameters_alone():
    (mean0, var0, n0, kept0), (mean1, var1, n1, kept1) = [o.unwrap() for o in run_on_ranks(_sync, 2)]
    assert mean1 == mean0 and var1 == var0 and n0 == n1 == 1
    assert kept0 and kept1


def test_without_a_process_group_each_collective_is_the_identity():
    model = nn.BatchNorm1d(2)
    before = model.running_mean.clone()
    sync_buffers(model)
    assert broadcast_object([1, 2]) == [1, 2]
    assert all_gather_objects("x") == ["x"]
    assert torch.equal(model.running_mean, before)
