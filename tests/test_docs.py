"""The documentation tells the truth about the code: every config key and every flag is documented, the generated
references are current, every `python jobs/...` line in the docs parses with that job's parser and names real
config keys, the README keeps its two commands (and CI runs its test command), and the docs hold no absolute
machine paths and no words about how the project was developed. Cheap: no Ray, no training."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shlex
import sys

import pytest
from conftest import REPO

from brcd_dist.config import Config, ConfigError, load_config

DOCS = sorted((REPO / "docs").rglob("*.md"))
USER_TEXTS = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "CHANGELOG.md", *DOCS]
JOBS = ["distill", "make_shards", "train_teacher", "evaluate", "tune", "index", "search"]


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(REPO / "jobs"))
GEN = _module(REPO / "scripts" / "gen_reference.py", "gen_reference")


def job_parser(job: str) -> argparse.ArgumentParser:
    return GEN.job_parser(job)


def config_key_names() -> list[str]:
    return [
        f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(Config(), s.name))
    ]


def test_every_config_key_has_a_field_comment_and_a_row_in_the_config_reference():
    page = (REPO / "docs" / "reference" / "config.md").read_text()
    undocumented = [key for key, _, _, doc in GEN.config_keys() if not doc]
    assert undocumented == []
    assert [key for key in config_key_names() if f"| `{key}` |" not in page] == []


def test_the_generated_references_are_current():
    for page, make in GEN.PAGES.items():
        assert page.read_text() == make(), f"{page.name} is stale: run .venv/bin/python scripts/gen_reference.py"


def test_every_flag_of_every_job_is_in_the_cli_reference():
    page = (REPO / "docs" / "reference" / "cli.md").read_text()
    missing = [
        f"{job} {flag}"
        for job in JOBS
        for action in job_parser(job)._actions
        for flag in action.option_strings
        if flag not in ("-h", "--help") and f"`{flag}`" not in page
    ]
    assert missing == []


def job_lines(text: str) -> list[str]:
    """`python jobs/X.py ...` commands in code blocks and inline code, continuations joined, comments cut."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL) + re.findall(
        r"`([^`\n]*python jobs/[^`\n]*)`", text
    )
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if "python jobs/" in line:
                lines.append(line[line.index("python jobs/") :])
    return lines


DOC_COMMANDS = sorted(
    {(path.relative_to(REPO).as_posix(), line) for path in USER_TEXTS for line in job_lines(path.read_text())}
)


def test_the_docs_show_job_commands():
    assert len(DOC_COMMANDS) >= 15
    assert {line.split()[1] for _, line in DOC_COMMANDS} >= {f"jobs/{job}.py" for job in JOBS}


@pytest.mark.parametrize("where,line", DOC_COMMANDS)
def test_every_job_command_in_the_docs_parses_and_names_real_config_keys(where, line):
    words = shlex.split(line.replace("$PWD", "PWD"))
    job = words[1][len("jobs/") : -len(".py")]
    if job in ("", "JOB") or any(w.startswith("[") or w in ("...", "key=value") for w in words):
        return  # a sketch, such as `python jobs/JOB.py --help` or `[--config X.yaml]`, not a command
    assert job in JOBS, line
    p = job_parser(job)
    p.error = lambda message: pytest.fail(f"{where}: {line}: {message}")  # instead of exiting
    args = p.parse_intermixed_args(words[2:])
    for override in getattr(args, "overrides", []):
        try:
            load_config(None, [override], validate=False)
        except ConfigError as err:
            pytest.fail(f"{where}: {line}: {err}")


FORBIDDEN = {
    "an absolute machine path": r"(?<![\w.])/(?:work|tmp|home|Users|root|scratch)/",
    "a tracker number": r"(?i)\bissue\s+#?\d+|(?<![\w&{])#\d{1,3}\b",
    "who ran what": r"(?i)\b(?:sessions?|engineers?|lent|audit(?:or)?|flock|ray\.lock|that day|time ran short)\b",
}


@pytest.mark.parametrize("what", FORBIDDEN)
def test_user_facing_text_holds_no_development_words(what):
    texts = [*USER_TEXTS, *sorted((REPO / "configs").glob("*.yaml"))]
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}"
        for path in texts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(FORBIDDEN[what], line)
    ]
    assert hits == [], what


def test_benchmark_rows_hold_no_absolute_machine_paths():
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "bench" / "results").rglob("*.json*"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(FORBIDDEN["an absolute machine path"], line)
    ]
    assert hits == []


def test_every_benchmark_table_page_gives_command_commit_date_and_hardware():
    for page in sorted((REPO / "docs" / "benchmarks").glob("*.md")):
        if page.name == "index.md":
            continue
        text = page.read_text()
        assert "Command" in text or "```" in text, page.name
        assert re.findall(r"\*Provenance: commit `[0-9a-f]{7}` · \d{4}-\d\d-\d\d · [^*]+\.\*", text), page.name


def test_readme_is_short_and_keeps_its_two_commands_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 170
    run = "bash scripts/setup.sh && .venv/bin/python jobs/distill.py"
    test = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert f"```bash\n{run}\n```" in readme and f"```bash\n{test}\n```" in readme
    assert test in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_design_section_the_code_cites_is_a_heading_of_the_design_page():
    import subprocess

    cited = set(
        re.findall(
            r"DESIGN §(\d+)",
            subprocess.run(["git", "grep", "-h", "DESIGN §"], cwd=REPO, capture_output=True, text=True).stdout,
        )
    )
    headings = set(re.findall(r"^## (\d+)\. ", (REPO / "docs" / "design.md").read_text(), re.MULTILINE))
    assert cited and cited <= headings, sorted(cited - headings)


def test_every_environment_variable_the_code_reads_is_documented():
    import subprocess

    used = set(
        re.findall(
            r"\bBRCD_[A-Z_]+\b",
            subprocess.run(
                ["git", "grep", "-h", "BRCD_", "--", "brcd_dist", "jobs", "cluster"],
                cwd=REPO,
                capture_output=True,
                text=True,
            ).stdout,
        )
    )
    page = (REPO / "docs" / "reference" / "env.md").read_text()
    assert used and [v for v in sorted(used) if f"`{v}`" not in page] == []
