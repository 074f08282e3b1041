"""Write the generated reference pages: docs/reference/cli.md from the jobs' parsers (each job's make_parser) and
docs/reference/config.md from brcd_dist/config.py (every field with its type, default and the comment on its line).

    .venv/bin/python scripts/gen_reference.py           # rewrite both pages
    .venv/bin/python scripts/gen_reference.py --check   # exit 1 when a page is stale (tests/test_docs.py runs it)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import io
import os
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOBS = ["distill", "make_shards", "train_teacher", "evaluate", "tune", "index", "search"]
CLI_PAGE = REPO / "docs" / "reference" / "cli.md"
CONFIG_PAGE = REPO / "docs" / "reference" / "config.md"


def job_parser(name: str) -> argparse.ArgumentParser:
    """jobs/NAME.py's parser, without running the job (its top-level imports are light)."""
    os.environ["COLUMNS"] = "100"  # argparse wraps usage to the terminal: the page must not depend on it
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_parser()


def _flag_row(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or (
                "{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper()
            )
            names += f" `{metavar}`" + (" ..." if action.nargs in ("+", "*") else "")
    else:
        names = f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("+", "*") else "")
    required = " (required)" if getattr(action, "required", False) and action.option_strings else ""
    return f"| {names} | {(action.help or '').replace('|', '/')}{required} |"


def cli_page() -> str:
    out = [
        "# Command line",
        "",
        "Generated from the jobs' parsers by `scripts/gen_reference.py`; `python jobs/JOB.py --help` prints the same.",
        "Every job exits with 0 when done, 1 when the run failed after it started, and 2 on bad input, with one line",
        "`error: ...` on stderr ([exit codes and environment variables](env.md)). Jobs with a config take",
        "`--config FILE` and `key=value` overrides of any [configuration key](config.md).",
        "",
    ]
    for name in JOBS:
        p = job_parser(name)
        out += [f"## {name}", "", "```", p.format_usage().strip(), "```", "", p.description, ""]
        examples = [
            ln.strip()
            for ln in (p.epilog or "").splitlines()
            if ln.strip().startswith("python jobs/") and "[" not in ln  # runnable lines, not the usage sketch
        ]
        if examples:
            out += ["```bash", *examples, "```", ""]
        out += ["| argument | meaning |", "|---|---|"]
        out += [_flag_row(a) for a in p._actions if not isinstance(a, argparse._HelpAction)]
        out.append("")
    return "\n".join(out)


def field_comments(path: Path = REPO / "brcd_dist" / "config.py") -> dict[str, dict[str, str]]:
    """{dataclass name: {field: the comment on its line}} for the dataclasses of config.py."""
    source = path.read_text()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {
                stmt.target.id: comments.get(stmt.lineno, "")
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    return out


def config_keys() -> list[tuple[str, object, str, str]]:
    """(key, default, type name, doc) for every config key, in the order of the dataclasses."""
    from brcd_dist.config import Config

    docs = field_comments()
    cfg = Config()
    rows = []
    for section in dataclasses.fields(Config):
        value = getattr(cfg, section.name)
        for f in dataclasses.fields(value):
            doc = docs.get(type(value).__name__, {}).get(f.name, "")
            rows.append(
                (f"{section.name}.{f.name}", getattr(value, f.name), type(getattr(value, f.name)).__name__, doc)
            )
    return rows


def _default(value) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def config_page() -> str:
    out = [
        "# Configuration",
        "",
        "Generated from `brcd_dist/config.py` by `scripts/gen_reference.py`. A job's config is these defaults, then",
        "the YAML file given with `--config` (its sections and keys as below), then `key=value` overrides on the",
        "command line, e.g. `python jobs/distill.py --config configs/fashion_mnist.yaml brcd.alpha=0.7`. Keys that a",
        "file does not set keep the defaults below. A bad value stops the job with one line naming the key, the value",
        "and what is allowed, e.g. `error: brcd.alpha=1.5: must be in [0, 1]`.",
        "",
        "Configs in the repository: `configs/fashion_mnist.yaml` (the embedded default, what `jobs/distill.py`",
        "uses without `--config`), `configs/smoke.yaml` (the two-minute smoke run),",
        "`configs/fashion_mnist_frozen_lite0.yaml` (the paper's frozen-backbone student regime) and",
        "`configs/imagenet100_vitb16_effb0.yaml` (the paper's setting for a GPU cluster: ViT-B/16 teacher,",
        "EfficientNet-B0 student, ImageNet-100 as an image folder).",
    ]
    section = None
    for key, default, type_name, doc in config_keys():
        name = key.split(".", 1)[0]
        if name != section:
            section = name
            out += ["", f"## {name}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out.append(f"| `{key}` | {type_name} | {_default(default)} | {doc.replace('|', '/')} |")
    return "\n".join(out) + "\n"


PAGES = {CLI_PAGE: cli_page, CONFIG_PAGE: config_page}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a page differs from what would be written")
    args = p.parse_args()
    stale = []
    for page, make in PAGES.items():
        text = make()
        if args.check:
            if not page.is_file() or page.read_text() != text:
                stale.append(str(page.relative_to(REPO)))
        else:
            page.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)} (run: .venv/bin/python scripts/gen_reference.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
