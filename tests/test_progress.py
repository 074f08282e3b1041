"""The main job's progress display (brcd_dist/train/progress.py) in a plain process, where it draws tqdm bars:
what a stage's bar shows and the one line a stage's end prints."""

from __future__ import annotations

import pytest

from brcd_dist.train.progress import EpochProgress, StageBar


def test_stage_end_prints_one_line_with_count_and_summary(capsys):
    bar = StageBar("k-means K=10", 25, "iteration")
    for _ in range(3):
        bar.update(1, inertia=2.5)
    bar.close("converged")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[k-means K=10] done: 3 iterations in ") and lines[0].endswith("; converged")


def test_epoch_bar_shows_epoch_running_mean_loss_and_the_latest_validation_map(capsys):
    progress = EpochProgress("student", epochs=2)
    progress.start_epoch(0, steps=2)
    progress.step(1.0)
    progress.step(3.0)
    assert progress.bar.shown == {"epoch": "1/2", "loss": 2.0}
    progress.end_epoch({"val_query/sshp_map": 0.61, "student/epoch_loss": 2.0})
    progress.start_epoch(1, steps=2)
    progress.step(0.5)
    assert progress.bar.shown == {"epoch": "2/2", "loss": 0.5, "val mAP": 0.61}
    assert progress.bar.total == 4 and progress.bar.count == 3
    progress.close()
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[student] done: 3 steps in ") and "val mAP 0.6100" in line


def test_a_resumed_stage_counts_only_the_steps_left(capsys):
    progress = EpochProgress("teacher", epochs=3)
    progress.start_epoch(1, steps=4, skip=1)  # restarted in epoch 2 after its first step
    assert progress.bar.total == 7


def test_progress_off_draws_and_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("BRCD_PROGRESS", "0")
    bar = StageBar("encode database (student)", 5, "batch")
    bar.update(5, loss=1.0)
    bar.close()
    assert bar.count == 5 and capsys.readouterr() == ("", "")


@pytest.mark.parametrize("value,expected", [("1", False), ("", True), ("0", True)])
def test_verbose_keeps_the_noisy_loggers_as_they_were(monkeypatch, value, expected):
    import logging

    from brcd_dist.train.progress import quiet_worker_logs

    logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setenv("BRCD_VERBOSE", value)
    quiet_worker_logs()
    assert (logger.level == logging.ERROR) is expected


def test_rays_token_auth_notice_is_dropped_and_its_disabled_warning_kept(monkeypatch):
    """Ray's own logger, with Ray's own messages (ray._private.authentication): what a local ray.init logs."""
    import logging

    from ray._private.authentication import authentication_token_setup as ray_auth

    from brcd_dist.train.progress import quiet_worker_logs

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(ray_auth.__name__)
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setattr(logger, "handlers", [Keep()])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    monkeypatch.setenv("BRCD_VERBOSE", "0")
    quiet_worker_logs()
    ray_auth._warn_token_auth_enabled()
    ray_auth._warn_token_auth_disabled()
    assert len(seen) == 1 and seen[0].startswith("Token authentication is disabled")


@pytest.mark.parametrize("value,shown", [("1", True), ("0", False)])
def test_deepspeeds_set_up_prints_show_only_when_verbose(monkeypatch, capsys, value, shown):
    from brcd_dist.train.progress import quiet_stdout

    monkeypatch.setenv("BRCD_VERBOSE", value)
    with quiet_stdout():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert ("built successfully" in capsys.readouterr().out) is shown
