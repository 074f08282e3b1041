"""Evaluation that scales (train/evaluation.py, train/encoding.capped_keys): the ranking split across ranks gives
the single-process mAP to the last bit, ties included, and a capped evaluation set holds every class."""

from __future__ import annotations

import numpy as np
import pytest
from dist_utils import run_on_ranks

from brcd_dist.codes import pack_codes
from brcd_dist.data.splits import balanced_subset
from brcd_dist.retrieval import mean_average_precision, pr_curve

BITS, N_DB, N_Q, CLASSES = 8, 600, 90, 7  # 8 bits over 600 codes: most distances are ties


def _data():
    g = np.random.default_rng(5)
    db = np.sign(g.standard_normal((N_DB, BITS))).astype(np.float32)
    q = np.sign(g.standard_normal((N_Q, BITS))).astype(np.float32)
    keys = [f"q-{i:03d}" for i in g.permutation(N_Q)]  # key order is not array order
    return q, keys, g.integers(0, CLASSES, N_Q), db, g.integers(0, CLASSES, N_DB)


def _on_rank(rank, world_size, shares):
    from brcd_dist.train.evaluation import distributed_map, distributed_pr

    q, keys, q_labels, db, db_labels = _data()
    mine = shares[rank]
    args = (pack_codes(q[mine]), [keys[i] for i in mine], q_labels[mine], pack_codes(db), db_labels)
    return distributed_map(*args, topk=100), distributed_pr(*args, sample=None)


@pytest.mark.parametrize("split", ["interleaved", "uneven", "one rank has none"])
def test_the_ranking_split_across_ranks_equals_one_process_to_the_last_bit(split):
    idx = np.arange(N_Q)
    shares = {
        "interleaved": [idx[0::2], idx[1::2]],
        "uneven": [idx[:7], idx[7:]],
        "one rank has none": [idx[:0], idx],
    }[split]
    q, keys, q_labels, db, db_labels = _data()
    order = np.argsort(keys, kind="stable")  # one process: the queries gathered and sorted by key
    single = mean_average_precision(q[order], db, q_labels[order], db_labels, 100)
    single_pr = pr_curve(q, db, q_labels, db_labels)
    for got, curve in (o.unwrap() for o in run_on_ranks(_on_rank, 2, args=(shares,))):
        assert got == single  # exact: the per-query APs averaged in the same order
        for part in ("precision", "recall"):
            np.testing.assert_allclose(curve[part], single_pr[part], rtol=1e-12, equal_nan=True)


def test_a_capped_set_holds_every_class_even_when_keys_are_numbered_by_class():
    """ImageFolder keys are numbered in class order: the first 1,000 of 25,000 would be 40 classes of 1,000."""
    labels = np.repeat(np.arange(1000), 25)
    picked = balanced_subset(labels, 1000, seed=0)
    assert len(picked) == 1000 and set(labels[picked]) == set(range(1000))
    assert np.array_equal(picked, balanced_subset(labels, 1000, seed=0))  # seeded
    assert not np.array_equal(picked, balanced_subset(labels, 1000, seed=1))


def test_a_small_class_gives_what_it_has_and_the_rest_goes_to_the_others():
    labels = np.array([0] * 3 + [1] * 100 + [2] * 100)
    counts = np.bincount(labels[balanced_subset(labels, 31, seed=0)])
    assert counts.tolist() == [3, 14, 14] and counts.sum() == 31
    assert len(balanced_subset(labels, 0, seed=0)) == len(labels) == len(balanced_subset(labels, 10_000, seed=0))


def test_the_capped_keys_of_a_split_come_from_its_manifest_and_hold_every_class(tiny_shards):
    import torch
    from conftest import tiny_config

    from brcd_dist.data import load_manifest
    from brcd_dist.train.context import WorkerContext
    from brcd_dist.train.encoding import capped_keys

    cfg = tiny_config(tiny_shards, tiny_shards, "cap")
    manifest = load_manifest(tiny_shards)
    ctx = WorkerContext(cfg=cfg, manifest=manifest, rank=0, world_size=1, device=torch.device("cpu"))
    info = manifest.splits["test_query"]
    keys = capped_keys(ctx, "test_query", 20)
    label_of = dict(zip(info.keys, info.labels))
    assert len(keys) == 20 and {label_of[k] for k in keys} == set(info.labels)
    assert capped_keys(ctx, "test_query", 0) is None and capped_keys(ctx, "test_query", info.count) is None


def test_the_reader_yields_only_the_capped_keys_and_counts_them_per_rank(tiny_shards):
    from brcd_dist.data import eval_batches, load_manifest

    manifest = load_manifest(tiny_shards)
    info = manifest.splits["test_query"]
    only = frozenset(info.keys[i] for i in balanced_subset(np.asarray(info.labels), 20, seed=0))
    kw = dict(batch_size=8, num_workers=0, image_size=16, in_chans=1, only_keys=only)
    seen, counted = [], 0
    for rank in range(2):
        batches = eval_batches(manifest, "test_query", rank=rank, world_size=2, **kw)
        seen += [k for b in batches for k in b["key"]]
        counted += batches.num_samples
    assert sorted(seen) == sorted(only) and counted == 20


def test_the_weights_digest_tells_equal_weights_from_changed_ones():
    """The final test reuses the last validation's student database codes only for the same weights, buffers too."""
    import copy

    import torch

    from brcd_dist.models import HashModel
    from brcd_dist.train.evaluation import weights_digest

    model = HashModel("mobilenetv3_small_050", bits=16, in_chans=1, img_size=32)
    same = copy.deepcopy(model).eval()  # the test's student: a copy, in eval mode
    assert weights_digest(same) == weights_digest(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(model) != weights_digest(same)
    changed = copy.deepcopy(same)
    next(m for m in changed.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean += 1.0  # a buffer
    assert weights_digest(changed) != weights_digest(same)
    next(changed.parameters()).ds_id = 0  # what ZeRO-3 marks a partitioned parameter with: no digest, no reuse
    assert weights_digest(changed) is None


def test_encoded_rows_go_into_one_array_grown_only_when_more_come_than_planned():
    from brcd_dist.train.encoding import _room

    like = np.zeros((3, 4), np.float32)
    a = _room(None, 3, like, planned=10)
    assert a.shape == (10, 4) and a.dtype == np.float32
    a[:3] = 1.0
    assert _room(a, 10, like, planned=10) is a  # within the plan: the same array, no copy
    grown = _room(a, 11, like, planned=10)
    assert grown.shape == (20, 4) and (grown[:3] == 1.0).all()
    assert _room(None, 5, np.zeros(5, np.int64), planned=0).shape == (5,)  # a plan of 0 (unknown): what came
