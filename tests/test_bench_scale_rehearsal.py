"""bench/synthetic_imagefolder.py and bench/scale_rehearsal.py: ImageNet's counts spread over the classes, the same
bytes whether classes are written in one process or several, and the stage times read from a job's output."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import scale_rehearsal  # noqa: E402
import synthetic_imagefolder  # noqa: E402


def test_imagenet_counts_are_spread_with_the_first_classes_taking_one_more():
    counts = synthetic_imagefolder.class_counts(1000, 1_281_167)
    assert counts.sum() == 1_281_167
    assert (counts[:167] == 1282).all() and (counts[167:] == 1281).all()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_classes_written_in_parallel_give_the_same_files_as_one_process(tmp_path):
    kw = dict(classes=3, total=8, val_per_class=2, size=(16, 12), seed=3)
    one = synthetic_imagefolder.make_image_folder(tmp_path / "one", procs=1, **kw)
    two = synthetic_imagefolder.make_image_folder(tmp_path / "two", procs=2, **kw)
    files = _files(one)
    assert files == _files(two)
    train = [f for f in files if f.startswith("train/")]
    assert len(train) == 8 and len(files) == 8 + 3 * 2
    assert sorted({f.split("/")[1] for f in train}) == ["n00000000", "n00000001", "n00000002"]
    # a resumed write keeps what is there and writes the rest as before
    gone = one / train[-1]
    gone.unlink()
    synthetic_imagefolder.make_image_folder(one, procs=1, **kw)
    assert _files(one) == files


def test_either_images_a_class_or_a_total_is_given(tmp_path):
    with pytest.raises(ValueError, match="one of per_class and total"):
        synthetic_imagefolder.make_image_folder(tmp_path, classes=2, per_class=3, total=6)


def test_stage_times_come_from_done_lines_bars_and_the_run_summary():
    out = "\n".join(
        [
            "[teacher] done: 3 steps in 2.5 s (1.2/s)",
            "(pid=7) [2/4] encode database (teacher)  run about 9s left: 100%|##| 20.0/20.0 [19:52<00:00, 1.1s/batch]",
            "time        46m29s: shards 0s, teacher 1s, student 38m30s, evaluation 4m16s, start-up 1h2m3s",
        ]
    )
    got = scale_rehearsal.substages(out)
    assert got["teacher"] == 2.5
    assert got["encode database (teacher)"] == 19 * 60 + 52
    assert got["summary student"] == 38 * 60 + 30 and got["summary evaluation"] == 256
    assert got["summary start-up"] == 3723


def test_growth_is_the_log_ratio_over_the_size_ratio():
    rows = [{"n": 1000, "stage": "s", "cpu_s": 2.0}, {"n": 4000, "stage": "s", "cpu_s": 8.0}]
    rows.append({"n": 16000, "stage": "s", "cpu_s": 128.0})
    assert scale_rehearsal.growth(rows, "s", "cpu_s") == "1.00 2.00"
    assert np.isclose(float(scale_rehearsal.growth(rows[:2], "s", "cpu_s")), 1.0)
