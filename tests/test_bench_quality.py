"""bench/quality.py's bookkeeping: run order, resume file, table (the runs themselves are the pipeline's, tested
end to end elsewhere)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


def test_plan_gives_every_bit_length_its_first_seed_before_the_extra_seeds():
    assert quality.plan([16, 32, 64], [0, 1, 2], [64]) == [(64, 0), (32, 0), (16, 0), (64, 1), (64, 2)]
    assert quality.plan([16, 64], [3, 4], [16, 64]) == [(64, 3), (16, 3), (64, 4), (16, 4)]


def test_results_file_resumes_and_ignores_failed_runs(tmp_path):
    path = tmp_path / "q.jsonl"
    r = quality.Results(path)
    r.start({"sweep": "s", "parent_run_id": "p"})
    r.add({"bits": 64, "seed": 0, "method": "BRCD", "sshp": 0.5, "ashp": 0.6, "teacher": 0.7})
    r.add({"bits": 64, "seed": 1, "method": "BRCD", "error": "RuntimeError: boom"})
    again = quality.Results(path)
    assert again.header == {"sweep": "s", "parent_run_id": "p"}
    assert again.has(64, 0, "BRCD") and not again.has(64, 1, "BRCD") and not again.has(32, 0, "BRCD")


def test_table_means_and_sample_std_over_seeds():
    rows = [
        {"bits": 64, "seed": s, "method": "BRCD", "sshp": v, "ashp": v + 0.1, "teacher": 0.7}
        for s, v in enumerate([0.5, 0.6, 0.7])
    ]
    rows += [
        {"bits": 64, "seed": 0, "method": quality.ITQ_ROW, "sshp": 0.68, "ashp": 0.68},
        {"bits": 16, "seed": 0, "method": "RKD", "error": "x"},
    ]
    lines = quality.table(rows, [16, 64]).splitlines()
    assert lines[0] == "| method | 16 bits SSHP | 16 bits ASHP | 64 bits SSHP | 64 bits ASHP |"
    by_name = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert by_name["BRCD"] == "| BRCD | – | – | 0.600 ± 0.100 | 0.700 ± 0.100 |"
    assert by_name[quality.TEACHER_ROW] == f"| {quality.TEACHER_ROW} | – | – | 0.700 | – |"
    assert by_name[quality.ITQ_ROW] == f"| {quality.ITQ_ROW} | – | – | 0.680 | – |"
    assert by_name["RKD"] == "| RKD | – | – | – | – |"  # a failed run is not a result


def test_teacher_argument_names_the_bad_value(tmp_path):
    with pytest.raises(SystemExit, match=r"--teacher '64': expected BITS=PATH"):
        quality.parse_teachers(["64"])
    with pytest.raises(SystemExit, match=r"file .*nope.pt' not found"):
        quality.parse_teachers([f"64={tmp_path / 'nope.pt'}"])
