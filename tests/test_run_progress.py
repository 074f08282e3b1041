"""The whole run's progress as the driver tracks it (brcd_dist/run_progress.py), fed the bar states that the
workers send: the stage each bar belongs to, one line as each stage starts, the [i/4] prefix, the time left as
the plan's remaining work at the measured rates, and the seconds of each stage. Plain Python, no Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from brcd_dist.run_progress import Plan, RunProgress, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr("brcd_dist.run_progress.time.perf_counter", c)
    return c


def state(uuid, desc, x, total, unit, closed=False):
    return {"uuid": uuid, "desc": desc, "x": x, "total": total, "unit": unit, "closed": closed}


def test_the_plan_counts_steps_and_encode_batches_from_the_config_and_the_manifest():
    cfg = SimpleNamespace(
        train=SimpleNamespace(workers=2, batch_size=64, max_steps_per_epoch=0, teacher_split="database",
                              teacher_epochs=1, epochs=3, eval_every=3),
        eval=SimpleNamespace(batch_size=256),
        teacher=SimpleNamespace(uri=""),
    )  # fmt: skip
    counts = {"train": 2000, "database": 6000, "val_query": 3000, "test_query": 3000}
    manifest = SimpleNamespace(splits={k: SimpleNamespace(count=v) for k, v in counts.items()})
    plan = Plan.of(cfg, manifest)
    assert plan.teacher_steps == 47  # ceil(6000 / 128)
    assert plan.student_steps == 3 * 16  # 3 epochs of ceil(2000 / 128)
    assert plan.clustering_batches == 4  # ceil(2000 / 512)
    assert plan.validation_batches == 18  # one validation: ceil(9000 / 512)
    assert plan.evaluation_batches == 36  # teacher and student: ceil(2 * 9000 / 512)
    cfg.teacher.uri = "models:/t@candidate"
    assert Plan.of(cfg, manifest).teacher_steps == 0  # a loaded teacher is not trained


def test_stages_are_announced_once_in_order_and_each_bar_carries_its_stage_and_the_time_left(clock):
    lines = []
    progress = RunProgress(Plan(teacher_steps=10, clustering_batches=2, student_steps=20, evaluation_batches=4),
                           print_line=lines.append)  # fmt: skip
    clock.now = 5.0
    shown = progress.observe(state("t", "teacher  epoch 1/1", 0, 10, "step"))
    assert lines == ["stage 1/4 teacher  (run 5s)"] and shown["desc"] == "[1/4] teacher  epoch 1/1"
    clock.now = 15.0  # 5 steps in 10 s: 2 s a step; an encode batch guessed at half a step until one is measured
    shown = progress.observe(state("t", "teacher  epoch 1/1", 5, 10, "step"))
    # left: 5 teacher steps (10 s) + 2 clustering batches (2 s) + 20 student steps (40 s) + 4 eval batches (4 s)
    assert shown["desc"] == "[1/4] teacher  epoch 1/1  run about 56s left"
    clock.now = 25.0
    progress.observe(state("t", "teacher  epoch 1/1", 10, 10, "step", closed=True))
    progress.observe(state("e", "encode train (teacher)", 0, 2, "batch"))
    progress.observe(state("k", "k-means K=10", 0, 10, "iter"))
    clock.now = 30.0
    progress.observe(state("s", "student  epoch 1/2", 0, 20, "step"))
    progress.observe(state("v", "encode database (student)", 3, 3, "batch", closed=True))  # a validation encode
    clock.now = 40.0
    progress.observe(state("s", "student  epoch 2/2", 20, 20, "step", closed=True))
    clock.now = 42.0
    shown = progress.observe(state("d", "encode database (student)", 1, 4, "batch"))
    assert shown["desc"].startswith("[4/4] encode database (student)")
    starts = [line.split("  (")[0] for line in lines]
    assert starts == ["stage 1/4 teacher", "stage 2/4 clustering", "stage 3/4 student", "stage 4/4 evaluation"]
    assert progress.stage_seconds() == {"teacher": 20.0, "clustering": 0.0, "student": 10.0, "evaluation": 0.0}


def test_a_loaded_teacher_starts_the_run_at_stage_two(clock):
    lines = []
    progress = RunProgress(Plan(clustering_batches=2, student_steps=4, evaluation_batches=2), print_line=lines.append)
    progress.observe(state("e", "encode train (teacher)", 0, 2, "batch"))
    assert [line.split("  (")[0] for line in lines] == ["stage 2/4 clustering"]
    assert "teacher" in progress.stage_seconds()  # counted, as zero seconds


@pytest.mark.parametrize("seconds,text", [(4.4, "4s"), (65, "1m05s"), (3725, "1h02m")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert duration(seconds) == text


def test_the_ranking_is_shown_once_the_evaluation_encodes_are_done_and_no_bar_is_open(clock):
    progress = RunProgress(Plan(student_steps=2, evaluation_batches=2), print_line=lambda line: None)
    progress.observe(state("s", "student  epoch 1/1", 2, 2, "step", closed=True))
    assert not progress.ranking(now=100.0)  # the student stage ends: not the ranking yet
    clock.now = 1.0
    progress.observe(state("d", "encode database (student)", 0, 2, "batch"))
    clock.now = 2.0
    progress.observe(state("d", "encode database (student)", 2, 2, "batch", closed=True))
    assert not progress.ranking(now=2.5)  # maybe only the gap between two encodes
    assert progress.ranking(now=3.5)
    clock.now = 4.0
    progress.observe(state("q", "encode test_query (teacher)", 0, 1, "batch"))
    assert not progress.ranking(now=10.0)  # another encode: not ranking
