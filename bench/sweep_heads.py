"""Equal-budget Ray Tune sweep of the KD methods on frozen-backbone hash heads, then seeds on test.

The frozen-Lite0 regime of bench/frozen_heads.py (its feature cache, teacher and student trainers), searched and
decided the way the issue asks:
1. sweep (at --sweep-bits): one teacher; per method, a random search of --samples trials over that method's own
   knobs (SPACES: kd_weight for every KD method; τ, δ ∈ [0.1, 0.6], α ∈ [0, 1], K ∈ {10, 20, 40} for BRCD and the
   variants whose loss reads them), drawn up front (sample_trials) and run by one Ray Tune Tuner as a grid over
   the drawn configs, each trial a function trainable (1 CPU, --concurrent at once, actors reused) that builds
   the teacher's k-means pseudo-labels and masks for its K and δ and trains a student head, scored by its best
   validation SSHP mAP@1000. Every method gets the same number of trials and the same student schedule.
2. final: per code length in --bits, a teacher (seed 0); per method, its best sweep config (DESIGN's defaults for
   `student_alone`, which has no knob), students at each of --seeds, scored on the test queries (SSHP, and ASHP
   against the teacher's database codes). `--phase table` prints the mean ± std table of the final rows.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/sweep_heads.py --cache CACHE.pt \\
        --train 1000 --views 8 --database 2000 --queries 1000 --samples 12

τ is the pipeline's one temperature: it sets the BRCD term's and the student's own CIBHash term's (student_stage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import frozen_heads  # noqa: E402

from brcd_dist.config import BRCDConfig  # noqa: E402
from brcd_dist.models import MLP_HIDDEN  # noqa: E402

_BRCD_KNOBS = {
    "kd_weight": ("loguniform", 0.1, 10.0),
    "tau": ("uniform", 0.1, 0.6),
    "delta": ("uniform", 0.1, 0.6),
    "alpha": ("uniform", 0.0, 1.0),
    "clusters": ("choice", [10, 20, 40]),
}
_NO_DELTA = {k: v for k, v in _BRCD_KNOBS.items() if k != "delta"}
# Method -> its searched knobs: (kind, lo, hi) or ("choice", values). δ only where a mask is built from it.
SPACES: dict[str, dict] = {
    "student_alone": {},
    "brcd": _BRCD_KNOBS,
    "brcd_no_mask": _NO_DELTA,
    "brcd_authors_code_masked": _BRCD_KNOBS,
    "brcd_authors_release": _NO_DELTA,
    "kl_bits": {"kd_weight": _BRCD_KNOBS["kd_weight"]},
    "kl_codes": {"kd_weight": _BRCD_KNOBS["kd_weight"]},
    "distill_kl": {"kd_weight": _BRCD_KNOBS["kd_weight"]},
}
TEACHER_KNOBS = ("clusters", "delta")  # read by the teacher's k-means and masks, not by BRCDConfig's loss alone
DEFAULTS = {"clusters": 10, "delta": 0.5}


def config_for(method: str, params: dict, bits: int) -> BRCDConfig:
    """The BRCDConfig of one trial: the method's row of frozen_heads.METHODS with the trial's knobs over it."""
    if method not in SPACES:
        raise ValueError(f"method={method!r}: allowed: {', '.join(SPACES)}")
    unknown = sorted(set(params) - set(SPACES[method]))
    if unknown:
        raise ValueError(f"{method}: knobs {unknown} are not searched for it; allowed: {sorted(SPACES[method])}")
    cfg = BRCDConfig(**frozen_heads.METHODS[method], **params, bits=bits)
    cfg.validate()
    return cfg


def sample_trials(methods: list[str], samples: int, seed: int) -> list[dict]:
    """Random search, drawn up front: `samples` configs per method from its SPACES entry (uniform, log-uniform,
    choice), each method from its own seeded stream, so a method's trials do not depend on which others run."""
    trials = []
    for method in methods:
        if not SPACES[method]:
            continue
        rng = random.Random(f"{seed}:{method}")
        for _ in range(samples):
            params = {}
            for knob, spec in SPACES[method].items():
                if spec[0] == "choice":
                    params[knob] = rng.choice(spec[1])
                elif spec[0] == "loguniform":
                    params[knob] = math.exp(rng.uniform(math.log(spec[1]), math.log(spec[2])))
                else:
                    params[knob] = rng.uniform(spec[1], spec[2])
            trials.append({"method": method, "params": params})
    return trials


def summarise(rows: list[dict]) -> dict:
    """(method, bits) -> {metric: (mean, sample std, n)} over the final rows' seeds (std 0.0 for one seed)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    out = {}
    for key, group in groups.items():
        out[key] = {}
        for metric in ("test_sshp", "test_ashp"):
            values = [g[metric] for g in group]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[key][metric] = (statistics.fmean(values), std, len(values))
    return out


def format_table(summary: dict, methods: list[str], bits: list[int]) -> str:
    """A markdown table: mean ± sample std over seeds per cell, the bare value where one seed ran, – where none."""
    head = "| method | " + " | ".join(f"{b} bits SSHP | {b} bits ASHP" for b in bits) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(bits))]
    for m in methods:
        cells = []
        for b in bits:
            for metric in ("test_sshp", "test_ashp"):
                if (m, b) in summary:
                    mean, std, n = summary[(m, b)][metric]
                    cells.append(f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")
                else:
                    cells.append("–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_params(rows: list[dict]) -> dict:
    """Method -> the knobs of its sweep trial with the highest validation SSHP (ties: the earlier trial)."""
    best: dict = {}
    for r in rows:
        if r["method"] not in best or r["val_sshp_best"] > best[r["method"]]["val_sshp_best"]:
            best[r["method"]] = r
    return {m: r["params"] for m, r in best.items()}


# ----------------------------------------------------------------------------- the edges: teacher, trials, seeds


def head_args(args, bits: int, seed: int = 0, params: dict | None = None) -> argparse.Namespace:
    """The namespace frozen_heads' trainers read, for one teacher or student."""
    teacher = {k: (params or {}).get(k, DEFAULTS[k]) for k in TEACHER_KNOBS}
    fields = dict(vars(args), bits=bits, seed=seed, head="mlp", **teacher)
    return argparse.Namespace(**fields)


def student_row(cache, teacher, method: str, params: dict, hargs) -> dict:
    teacher_out, report = frozen_heads.teacher_outputs(cache, teacher, hargs)
    cfg = config_for(method, params, hargs.bits)
    started = time.time()
    row = frozen_heads.train_student(cache, teacher_out, cfg, hargs)
    row["seconds"] = round(time.time() - started, 1)
    row["teacher"] = {k: report[k] for k in ("teacher_val_map", "teacher_test_map", "cluster_nmi", "view_offset_rate")}
    row["teacher"]["mask_bits_kept_mean"] = round(statistics.fmean(report["mask_bits_kept"]), 1)
    return row


def trial(config: dict, cache: dict, teacher_states: dict, args_dict: dict) -> None:
    """A Tune function trainable: one student head for config["trial"] = {method, params, bits, seed}."""
    from ray import tune

    torch.set_num_threads(1)
    args = argparse.Namespace(**args_dict)
    frozen_heads.TOPK = min(frozen_heads.TOPK, args.database)
    t = config["trial"]
    hargs = head_args(args, t["bits"], seed=t["seed"], params=t["params"])
    teacher = frozen_heads.hash_head(
        cache["teacher"]["views"].shape[-1], t["bits"], "mlp", hidden=args.teacher_hidden or MLP_HIDDEN
    )
    teacher.load_state_dict(teacher_states[str(t["bits"])])
    row = student_row(cache, teacher.eval(), t["method"], t["params"], hargs)
    tune.report({"val_sshp_best": row["val_sshp_best"], "row": json.dumps(row)})


def run_trials(cache: dict, args, trials: list[dict], phase: str) -> list[dict]:
    """The trials in one Tuner (--concurrent at once, 1 CPU each, trial actors reused; a Tuner per method cost
    about 2 minutes of start-up each on this machine), one teacher per code length trained here first. Each
    finished trial is appended to --out as it is read back."""
    import ray
    from ray import tune

    teachers = {}
    for bits in sorted({t["bits"] for t in trials}):
        started = time.time()
        teachers[str(bits)] = frozen_heads.train_teacher(cache, head_args(args, bits)).state_dict()
        print(f"teacher ({bits} bits) in {time.time() - started:.0f} s", flush=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    tmp = tempfile.mkdtemp(prefix="brcd-sweep-ray-")
    ray.init(num_cpus=args.concurrent, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        trainable = tune.with_parameters(trial, cache=cache, teacher_states=teachers, args_dict=vars(args))
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"CPU": 1}),
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name=f"{phase}-heads", storage_path=str(Path(tmp) / "tune"), verbose=1),
        )
        for result in tuner.fit():
            if result.error or "row" not in (result.metrics or {}):
                print(f"{result.config['trial']}: failed: {result.error}", flush=True)
                continue
            rows.append({**result.config["trial"], **json.loads(result.metrics["row"]), "phase": phase})
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def sweep(cache: dict, args) -> list[dict]:
    trials = [
        {**t, "bits": args.sweep_bits, "seed": 0} for t in sample_trials(args.methods, args.samples, args.search_seed)
    ]
    rows = run_trials(cache, args, trials, "sweep")
    for method, params in best_params(rows).items():
        best = max(r["val_sshp_best"] for r in rows if r["method"] == method)
        print(f"{method}: best val SSHP {best} at {params}", flush=True)
    return rows


def final_trials(methods: list[str], chosen: dict, bits: list[int], seeds: list[int]) -> list[dict]:
    """Each method's chosen knobs ({} for a method with none: DESIGN's defaults) at every length and seed."""
    missing = [m for m in methods if SPACES[m] and m not in chosen]
    if missing:
        raise ValueError(f"no sweep result for {missing}: run --phase sweep for them first")
    return [
        {"method": m, "params": chosen.get(m, {}), "bits": b, "seed": s} for b in bits for m in methods for s in seeds
    ]


def teacher_probe(cache: dict, args) -> dict:
    """One teacher recipe (the --teacher-* knobs) at --sweep-bits: its mAPs, cluster NMI and offset rate, beside
    ITQ on the same frozen features (a linear reference: what the features give without a trained head)."""
    from brcd_dist.itq import fit_itq, itq_encode
    from brcd_dist.retrieval import mean_average_precision

    hargs = head_args(args, args.sweep_bits)
    started = time.time()
    teacher = frozen_heads.train_teacher(cache, hargs)
    seconds = round(time.time() - started, 1)
    _, report = frozen_heads.teacher_outputs(cache, teacher, hargs)
    feats = cache["teacher"]
    itq = fit_itq(feats["train"].float().numpy(), args.sweep_bits, seed=0)
    db = torch.as_tensor(itq_encode(itq, feats["database"].float().numpy()))
    q = torch.as_tensor(itq_encode(itq, feats["test_query"].float().numpy()))
    itq_map = mean_average_precision(
        q, db, cache["labels"]["test_query"], cache["labels"]["database"], frozen_heads.TOPK
    )
    knobs = ("teacher_epochs", "teacher_tau", "teacher_batch", "teacher_views", "teacher_hidden", "teacher_px")
    row = {"phase": "teacher", "bits": args.sweep_bits, **{k: getattr(args, k) for k in knobs}}
    row.update({k: v for k, v in report.items() if k != "mask_bits_kept"}, train_seconds=seconds)
    row["mask_bits_kept_mean"] = round(statistics.fmean(report["mask_bits_kept"]), 1)
    row["itq_test_map"] = round(itq_map, 4)
    return row


def read_rows(path: str, phase: str) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r.get("phase") == phase]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", default="all", choices=["all", "teacher", "sweep", "final", "table"])
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--cache", required=True, help="a bench/frozen_heads.py feature cache (built there)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--database", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--teacher-tau", type=float, default=0.3)
    ap.add_argument("--teacher-batch", type=int, default=0)
    ap.add_argument("--teacher-views", type=int, default=0)
    ap.add_argument("--teacher-hidden", type=int, default=0)
    ap.add_argument("--teacher-px", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=12, help="Tune trials per method (the equal budget)")
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--concurrent", type=int, default=1, help="Tune trials at once, 1 CPU each")
    ap.add_argument("--sweep-bits", type=int, default=64)
    ap.add_argument("--bits", default="16,32,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(SPACES))
    ap.add_argument("--out", default="bench/results/sweep_heads.jsonl")
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in SPACES]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(SPACES)}")
    args.bits = [int(b) for b in args.bits.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    frozen_heads.TOPK = min(frozen_heads.TOPK, args.database)
    if args.phase != "table":
        cache = torch.load(args.cache, weights_only=True)
        if cache["made_with"] != frozen_heads.cache_key(args):
            sys.exit(f"--cache {args.cache} was made with {cache['made_with']}, not {frozen_heads.cache_key(args)}")
    started = time.time()
    if args.phase == "teacher":
        row = teacher_probe(cache, args)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    if args.phase in ("all", "sweep"):
        sweep(cache, args)
        print(f"sweep: {time.time() - started:.0f} s", flush=True)
    if args.phase in ("all", "final"):
        chosen = best_params(read_rows(args.out, "sweep"))
        print(f"chosen on validation: {json.dumps(chosen)}", flush=True)
        run_trials(cache, args, final_trials(args.methods, chosen, args.bits, args.seeds), "final")
        print(f"sweep + final: {time.time() - started:.0f} s", flush=True)
    rows = read_rows(args.out, "final")
    print(format_table(summarise(rows), args.methods, args.bits))


if __name__ == "__main__":
    main()
