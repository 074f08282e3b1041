"""Quality table: the student alone, every KD baseline, BRCD and BRCD with each mechanism off, at 16/32/64 bits,
on Fashion-MNIST (DESIGN section 3 protocol), each student a real run of the distributed pipeline that
jobs/distill.py runs (Ray Train + DeepSpeed + WebDataset), all of them MLflow child runs of one sweep run.

    python bench/quality.py                                          # teachers trained here (stage A, config recipe)
    python bench/quality.py --teacher 64=t64.pt 32=t32.pt 16=t16.pt  # teachers from hash-model checkpoints
    python bench/quality.py --student-epochs 4 --bits 64 32 16 --seeds 0 1 2 --seed-bits 64

Order: seed 0 at every bit length (largest first), then the extra seeds at --seed-bits, so that a run cut short
still has one full column per bit length. Per bit length: one teacher (trained once, or given), ITQ on pixels
(bench/itq.py, same queries, database and mAP code), then one student per method with the same architecture,
data, seed and steps (no validation: the last epoch's student is tested; no PR curves); k-means results and
the teacher's database codes are computed once per teacher and reused (train.teacher_cache). Every finished run is
appended to --results (JSON lines); rerunning with the same file
skips what is there (resume) and logs to the same MLflow sweep run. Each run's Ray checkpoints are deleted once its
outputs are logged (they hold a copy of the teacher); the MLflow run keeps the student.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "jobs"), str(ROOT / "bench")]

from _cli import connect, preflight, setup_logging  # noqa: E402

from brcd_dist import tracking  # noqa: E402
from brcd_dist.config import load_config  # noqa: E402
from brcd_dist.driver import absolute_paths, launch_teacher_job  # noqa: E402
from brcd_dist.models import load_hash_model  # noqa: E402
from brcd_dist.reporting import launch_and_publish  # noqa: E402
from brcd_dist.sweep import input_example  # noqa: E402

# Row name -> overrides. Baselines are the KD terms of brcd_dist.losses, each added to the student's own CIBHash
# loss with the same weight (brcd.kd_weight); the ablations switch one BRCD mechanism off.
METHODS = {
    "student alone (CIBHash)": ["brcd.kd=none"],
    "individual cosine": ["brcd.kd=individual_cos"],
    "individual L2": ["brcd.kd=individual_l2"],
    "RKD": ["brcd.kd=rkd"],
    "PKT": ["brcd.kd=pkt"],
    "SP": ["brcd.kd=sp"],
    "CRD": ["brcd.kd=crd"],
    "KL on bits": ["brcd.kd=kl_bits"],
    "KL on codes (smoothed)": ["brcd.kd=kl_codes"],
    "paper's KD (DistillKL, T=4)": ["brcd.kd=distill_kl"],
    "BRCD": ["brcd.kd=brcd"],
    "BRCD, no structural term": ["brcd.kd=brcd", "brcd.structural=false"],
    "BRCD, no cluster-based removal": ["brcd.kd=brcd", "brcd.cluster_removal=false"],
    "BRCD, no bit mask": ["brcd.kd=brcd", "brcd.bit_mask=false"],
    "BRCD, masks over L": ["brcd.kd=brcd", "brcd.mask_normalization=length"],
    "BRCD, authors' code": ["brcd.kd=brcd", "brcd.mask_sides=both", "brcd.cosine=normalised", "brcd.negatives=authors"],
    "BRCD, authors' release (zero masks)": [
        "brcd.kd=brcd",
        "brcd.mask_sides=both",
        "brcd.cosine=normalised",
        "brcd.negatives=authors",
        "brcd.authors_release=true",
    ],
}
ITQ_ROW, TEACHER_ROW = "ITQ on pixels", "teacher (its own codes)"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def parse_teachers(items: list[str]) -> dict[int, str]:
    out = {}
    for item in items:
        bits, _, path = item.partition("=")
        if not bits.isdigit() or not path:
            raise SystemExit(f"error: --teacher {item!r}: expected BITS=PATH, e.g. 64=teacher64.pt")
        if not Path(path).is_file():
            raise SystemExit(f"error: --teacher {item!r}: file {path!r} not found")
        spec = load_hash_model(path).spec
        if spec["bits"] != int(bits):
            raise SystemExit(f"error: --teacher {item!r}: the checkpoint has {spec['bits']} bits, not {bits}")
        out[int(bits)] = str(Path(path).resolve())
    return out


def shown(path: str) -> str:
    """A path as a results row keeps it: relative to the repository when inside it (rows hold no machine paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def plan(bits: list[int], seeds: list[int], seed_bits: list[int]) -> list[tuple[int, int]]:
    first = [(b, seeds[0]) for b in sorted(bits, reverse=True)]
    return first + [(b, s) for s in seeds[1:] for b in sorted(seed_bits, reverse=True) if b in bits]


class Results:
    """JSON lines: a header {"sweep", "parent_run_id"} then one row per finished run."""

    def __init__(self, path: Path):
        self.path = path
        self.header: dict = {}
        self.rows: list[dict] = []
        if path.is_file():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.header, self.rows = (lines[0], lines[1:]) if lines else ({}, [])

    def start(self, header: dict) -> None:
        self.header = header
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(header) + "\n")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def has(self, bits: int, seed: int, method: str) -> bool:
        return any((r["bits"], r["seed"], r["method"]) == (bits, seed, method) and "error" not in r for r in self.rows)


def itq_row(cfg, bits: int, seed: int) -> dict:
    from itq import split_pixels

    from brcd_dist.itq import fit_itq, itq_encode
    from brcd_dist.retrieval import mean_average_precision

    data = split_pixels(cfg)
    (db_x, db_y), (q_x, q_y) = data["database"], data["test_query"]
    model = fit_itq(data["train"], bits, iters=50, seed=seed)
    m = mean_average_precision(itq_encode(model, q_x), itq_encode(model, db_x), q_y, db_y, cfg.eval.topk)
    return {"sshp": m, "ashp": m}


def run_config(args, bits: int, seed: int, extra: list[str], name: str, cache: Path, teacher: str):
    overrides = [
        *args.overrides,
        f"brcd.bits={bits}",
        f"train.seed={seed}",
        f"train.name={name}",
        f"train.teacher_cache={cache}",
        f"tracking.experiment={args.experiment}",
        "tracking.register=false",
        "train.eval_every=0",
        "eval.pr_curves=false",
        *extra,
    ]
    if args.student_epochs:
        overrides.append(f"train.epochs={args.student_epochs}")
    if teacher:
        overrides.append(f"teacher.uri={teacher}")
    return absolute_paths(load_config(args.config, overrides))


def student_run(args, cfg, parent: str | None, name: str, tags: dict) -> dict:
    run_id = tracking.start_run(cfg, run_name=name, parent_run_id=parent, tags=tags) if parent else None
    t0 = time.perf_counter()
    try:
        out = launch_and_publish(cfg, run_id, name, roles=("student",))
    except Exception as err:  # one failed run must not end the sweep: it is recorded (run FAILED) and the rest go on
        return {"error": f"{type(err).__name__}: {err}"[:300], "run_id": run_id}
    finally:
        if not args.keep_checkpoints:
            shutil.rmtree(Path(cfg.train.storage_path) / name, ignore_errors=True)
    t = out.test
    return {
        "sshp": t["test_query/sshp_map"],
        "ashp": t["test_query/ashp_map"],
        "teacher": t["test_query/teacher_map"],
        "wall_s": time.perf_counter() - t0,
        "run_id": run_id,
        "images_per_s": [
            r["student/images_per_s"] for r in out.state.history.get("train", []) if "student/images_per_s" in r
        ],
    }


def get_teacher(args, cfg_base, bits: int, given: dict, sweep: str, parent: str | None, results: Results) -> str:
    """The bit length's teacher checkpoint: given, trained earlier in this sweep, or trained now (stage A)."""
    if bits in given:
        path = given[bits]
    else:
        path = str(Path(cfg_base.train.storage_path) / f"{sweep}-teacher{bits}" / "teacher.pt")
    if not results.has(bits, -1, TEACHER_ROW):
        cfg = absolute_paths(
            load_config(args.config, [*args.overrides, f"brcd.bits={bits}", f"tracking.experiment={args.experiment}"])
        )
        name = f"{sweep}-teacher{bits}"
        run_id = (
            tracking.start_run(
                cfg, run_name=name, parent_run_id=parent, tags={"bench.row": TEACHER_ROW, "bench.bits": bits}
            )
            if parent
            else None
        )
        t0 = time.perf_counter()
        if bits in given:
            model = load_hash_model(path)
            source = f"given: {shown(path)}"
        else:
            path_t, out = launch_teacher_job(cfg, run_id=run_id, name=name)
            path, model, source = str(path_t), out.teacher, "trained here (pipeline stage A)"
        if run_id:
            tracking.set_tags(run_id, {"bench.teacher_source": source})
            tracking.log_hash_model(run_id, model, "teacher", input_example(cfg))
            tracking.end_run(run_id)
        results.add(
            {
                "bits": bits,
                "seed": -1,
                "method": TEACHER_ROW,
                "path": shown(path),
                "source": source,
                "wall_s": time.perf_counter() - t0,
                "run_id": run_id,
            }
        )
    return next(r["path"] for r in results.rows if (r["bits"], r["method"]) == (bits, TEACHER_ROW))


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict], bits: list[int]) -> str:
    """Markdown: one row per method, SSHP / ASHP per bit length; mean ± std (sample) over seeds where > 1. The
    teacher's row is its own codes on both sides (its test mAP, the same in every run of that bit length); ITQ
    has one encoder, so one figure."""
    done = [r for r in rows if "error" not in r and "sshp" in r]
    lines = [
        "| method | " + " | ".join(f"{b} bits SSHP | {b} bits ASHP" for b in sorted(bits)) + " |",
        "|---" * (1 + 2 * len(bits)) + "|",
    ]
    teacher = []
    for b in sorted(bits):
        maps = [r["teacher"] for r in done if r["bits"] == b and "teacher" in r]
        teacher += [f"{maps[0]:.3f}" if maps else "–", "–"]
    lines.append(f"| {TEACHER_ROW} | " + " | ".join(teacher) + " |")
    for method in [ITQ_ROW, *METHODS]:
        parts = []
        for b in sorted(bits):
            sel = [r for r in done if r["method"] == method and r["bits"] == b]
            parts += [fmt([r["sshp"] for r in sel]), "–" if method == ITQ_ROW else fmt([r["ashp"] for r in sel])]
        lines.append(f"| {method} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist.yaml"))
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seed-bits", type=int, nargs="+", default=[64], help="bit lengths that get every seed")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    ap.add_argument("--teacher", nargs="*", default=[], metavar="BITS=PATH", help="teacher checkpoints to use")
    ap.add_argument("--student-epochs", type=int, default=0, help="student epochs (0: the config's)")
    ap.add_argument("--experiment", default="brcd-quality")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.jsonl"))
    ap.add_argument("--name", default="", help="sweep name (default: from the time; a resumed file keeps its own)")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = ap.parse_args(argv)
    setup_logging()
    given = parse_teachers(args.teacher)
    cfg = absolute_paths(load_config(args.config, [*args.overrides, f"tracking.experiment={args.experiment}"]))
    results = Results(Path(args.results))
    uri, manifest = preflight(cfg)
    connect(None, uri)
    if results.header:
        sweep, parent = results.header["sweep"], results.header.get("parent_run_id")
        print(f"resuming sweep {sweep}: {len(results.rows)} runs already in {args.results}")
    else:
        sweep = args.name or time.strftime("quality-%Y%m%d-%H%M%S")
        parent = (
            tracking.start_run(
                cfg, run_name=sweep, manifest_digest=manifest.digest(), tags={"brcd.job": "bench-quality"}
            )
            if uri
            else None
        )
        results.start({"sweep": sweep, "parent_run_id": parent, "argv": sys.argv[1:]})
    cache = Path(cfg.train.storage_path) / sweep / "cache"
    t_start = time.perf_counter()
    with tracking.failing_run(parent):
        for bits, seed in plan(args.bits, args.seeds, args.seed_bits):
            teacher = get_teacher(args, cfg, bits, given, sweep, parent, results)
            if not results.has(bits, seed, ITQ_ROW):
                results.add({"bits": bits, "seed": seed, "method": ITQ_ROW, **itq_row(cfg, bits, seed)})
            for method in args.methods:
                if results.has(bits, seed, method):
                    continue
                name = f"{sweep}-{bits}b-s{seed}-{slug(method)}"
                run_cfg = run_config(args, bits, seed, METHODS[method], name, cache, teacher)
                row = {
                    "bits": bits,
                    "seed": seed,
                    "method": method,
                    **student_run(
                        args, run_cfg, parent, name, {"bench.row": method, "bench.bits": bits, "bench.seed": seed}
                    ),
                }
                results.add(row)
                print(
                    f"[{(time.perf_counter() - t_start) / 60:.1f} min] {bits} bits seed {seed} {method}: "
                    + (
                        row.get("error")
                        or f"SSHP {row['sshp']:.4f} ASHP {row['ashp']:.4f} "
                        f"teacher {row['teacher']:.4f} ({row['wall_s']:.0f} s)"
                    ),
                    flush=True,
                )
        text = table(results.rows, args.bits)
        print(text)
        if parent:
            tracking.log_text(parent, text, "quality_table.md")
            tracking.log_artifact(parent, args.results)
            tracking.end_run(parent)
    return results.rows


if __name__ == "__main__":
    main()
