"""bench/teacher_recipes.py: its learning-rate schedule against hand values, and a timed run that writes its row."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import teacher_recipes  # noqa: E402


def test_the_schedule_warms_up_linearly_then_follows_the_cosine_to_zero():
    lr = teacher_recipes.lr_at
    assert [lr(s, 10, 1.0, "cosine", 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4, 10, 1.0, "cosine", 4) == pytest.approx(1.0)
    assert lr(7, 10, 1.0, "cosine", 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr(10, 10, 1.0, "cosine", 4) == pytest.approx(0.0, abs=1e-12)
    assert lr(3, 10, 2e-3, "constant", 0) == 2e-3


def test_a_timed_run_writes_its_rate_and_no_score(tmp_path):
    import torch

    out, threads = tmp_path / "rows.jsonl", torch.get_num_threads()
    try:
        teacher_recipes.main(
            ["--name", "t", "--arch", "mobilenetv3_small_050", "--split", "train", "--batch", "8", "--rate-steps", "2",
             "--threads", "1", "--out", str(out)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the script sets the process's threads; the next tests keep theirs
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["name"] == "t" and row["img_per_s"] > 0 and "val_map" not in row
