"""train/evaluation.Evaluator in one CPU process (no Ray): the teacher's database codes kept under
train.teacher_cache (train/teacher_cache.TeacherCodes) come back with the encode rate measured when they were
made (a cache hit used to leave teacher_images_per_s unset, and the result table printed 0 img/s)."""

from __future__ import annotations

from dataclasses import replace

import torch
from conftest import tiny_config

from brcd_dist.data import load_manifest
from brcd_dist.models import build_student, build_teacher
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.evaluation import Evaluator
from brcd_dist.train.teacher_cache import TeacherCodes


def test_a_cache_hit_reports_the_teacher_rate_measured_with_the_cached_codes(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path / "storage", "eval-cache")
    cfg.data = replace(cfg.data, loader_workers=0)
    cfg.eval = replace(cfg.eval, max_database=64, max_queries=32)
    ctx = WorkerContext(cfg=cfg, manifest=load_manifest(tiny_shards), rank=0, world_size=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    teacher, student = build_teacher(cfg).eval(), build_student(cfg).eval()

    cache = str(tmp_path / "cache")
    first = Evaluator(ctx, TeacherCodes(ctx, teacher, cache))
    maps_first = first.evaluate(student, "test_query")
    assert first.throughput["teacher_images_per_s"] > 0
    assert list((tmp_path / "cache").glob("packed-database-*.pt"))

    again = Evaluator(
        ctx, TeacherCodes(ctx, teacher, cache)
    )  # a later run with the same teacher: its codes come from the cache
    assert again.evaluate(student, "test_query") == maps_first
    assert again.throughput["teacher_images_per_s"] == first.throughput["teacher_images_per_s"]
