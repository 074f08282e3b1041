"""The whole run as the driver sees it: which of the four stages (DESIGN §1) is running, how long each took, and
about how long the rest will take.

The workers' bars reach the driver as tqdm_ray states (brcd_dist/train/progress.py draws them on rank 0); this
module watches those states on the driver, on their way to the bars. A bar's name says its stage: `teacher`
(A), `k-means ...` and the teacher's encode of the train split (B), `student` (C, with its validation encodes),
and the encodes after the student's bar closed (D). Each bar is prefixed with `[i/4]` and, once rates are known,
the time left for the whole run; a line is printed as each stage starts. The estimate is the work left in the
plan (steps and encode batches from the config and the manifest) at the rates measured so far. The final ranking
draws no bar on the workers; the driver draws one (its elapsed time) once the evaluation's encodes are done.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

STAGES = ("teacher", "clustering", "student", "evaluation")


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class Plan:
    """The work of a run in units the bars count: training steps and encode batches, per stage."""

    teacher_steps: int = 0
    clustering_batches: int = 0
    student_steps: int = 0
    validation_batches: int = 0
    evaluation_batches: int = 0

    @classmethod
    def of(cls, cfg, manifest, trains_teacher: bool | None = None) -> Plan:
        """The work of a run of `cfg` over `manifest`; `trains_teacher` (default: no teacher.uri) from the driver's
        teacher_reuse.TeacherPlan."""
        t, e = cfg.train, cfg.eval
        if trains_teacher is None:
            trains_teacher = not cfg.teacher.uri
        per_step = max(1, t.workers * t.batch_size)
        per_batch = max(1, t.workers * e.batch_size)

        def steps(count: int, epochs: int) -> int:
            n = math.ceil(count / per_step)
            return epochs * (min(n, t.max_steps_per_epoch) if t.max_steps_per_epoch else n)

        def count(split: str, cap: int = 0) -> int:
            n = manifest.splits[split].count if split in manifest.splits else 0
            return min(n, cap) if cap else n

        teacher_split = "database" if t.teacher_split == "database" else "train"
        db, val, test = count("database"), count("val_query"), count("test_query")
        validations = t.epochs // t.eval_every if t.eval_every else 0
        return cls(
            teacher_steps=steps(count(teacher_split), t.teacher_epochs) if trains_teacher else 0,
            clustering_batches=math.ceil(count("train") / per_batch),
            student_steps=steps(count("train"), t.epochs),
            validation_batches=validations * math.ceil((db + val) / per_batch),
            evaluation_batches=math.ceil(2 * (db + test) / per_batch),
        )


@dataclass
class RunProgress:
    """Fed every bar state the driver receives (`observe`); keeps stage times and the estimate of the time left."""

    plan: Plan
    print_line: object = print
    t0: float | None = None  # the run's start: when the progress was made, unless given
    stage: int = -1
    started: dict = field(default_factory=dict)  # stage index -> perf_counter at its first bar
    ended: dict = field(default_factory=dict)  # stage index -> perf_counter at its last bar update
    bars: dict = field(default_factory=dict)  # uuid -> (stage, unit, first seen, x)
    step_rate: float | None = None  # training steps a second, latest measured
    batch_rate: float | None = None  # encode batches a second, latest measured
    student_closed: bool = False
    open: set = field(default_factory=set)  # uuids of the bars not closed yet
    idle_since: float | None = None  # when the last open bar closed

    def __post_init__(self):
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def stage_of(self, desc: str) -> int:
        if desc.startswith("teacher"):
            return 0
        if desc.startswith("student"):
            return 2
        if desc.startswith("k-means") or (desc.startswith("encode train") and self.stage < 2):
            return 1
        if desc.startswith("encode"):
            return 3 if self.student_closed or self.stage < 1 else max(self.stage, 1)
        return max(self.stage, 0)

    def observe(self, state: dict) -> dict:
        """Account for one bar state and return it with the stage and the run's time left in its name."""
        now = time.perf_counter()
        uuid, desc, x = state.get("uuid"), str(state.get("desc", "")), int(state.get("x") or 0)
        if uuid not in self.bars:
            self.bars[uuid] = (self.stage_of(desc), state.get("unit"), now, 0)
        stage, unit, first, _ = self.bars[uuid]
        self.bars[uuid] = (stage, unit, first, x)
        if stage > self.stage:
            for skipped in range(self.stage + 1, stage):  # e.g. stage A when the teacher is loaded
                self.started.setdefault(skipped, now)
                self.ended.setdefault(skipped, now)
            self.stage = stage
            self.started.setdefault(stage, now)
            self.print_line(f"stage {stage + 1}/4 {STAGES[stage]}  (run {duration(now - self.t0)}{self._left(now)})")
        self.ended[stage] = now
        if x and now > first:
            rate = x / (now - first)
            if unit == "step":
                self.step_rate = rate
            elif unit == "batch":
                self.batch_rate = rate
        if state.get("closed"):
            self.open.discard(uuid)
            self.student_closed |= desc.startswith("student")
            if not self.open:
                self.idle_since = now
        else:
            self.open.add(uuid)
            self.idle_since = None
        tagged = dict(state)
        tagged["desc"] = f"[{stage + 1}/4] {desc}{self._left(now, sep='  run ')}"
        return tagged

    def left(self) -> float | None:
        """Seconds of work left in the plan at the measured rates (None until a rate is known)."""
        step = self.step_rate
        batch = self.batch_rate or (2 * step if step else None)  # an encode batch before any was measured
        if not step or not batch:
            return None
        p, s = self.plan, self.stage
        done_steps = {0: 0, 2: 0}
        done_batches = {1: 0, 3: 0}
        for stage, unit, _, x in self.bars.values():
            if unit == "step" and stage in done_steps:
                done_steps[stage] += x
            elif unit == "batch" and stage in done_batches:
                done_batches[stage] += x
        seconds = 0.0
        if s <= 0:
            seconds += max(0, p.teacher_steps - done_steps[0]) / step
        if s <= 1:
            seconds += max(0, p.clustering_batches - done_batches[1]) / batch
        if s <= 2:
            seconds += max(0, p.student_steps - done_steps[2]) / step
            seconds += p.validation_batches / batch if s < 2 else 0.0
        seconds += max(0, p.evaluation_batches - done_batches[3]) / batch
        return seconds

    def _left(self, now: float, sep: str = ", ") -> str:
        left = self.left()
        return f"{sep}about {duration(left)} left" if left is not None else ""

    def ranking(self, now: float | None = None, after_s: float = 1.0) -> bool:
        """True while the evaluation ranks: its encodes are done (no bar open for `after_s`), the run goes on."""
        now = time.perf_counter() if now is None else now
        return self.stage == 3 and self.idle_since is not None and now - self.idle_since >= after_s

    def stage_seconds(self) -> dict[str, float]:
        return {STAGES[i]: self.ended[i] - self.started[i] for i in sorted(self.started) if i in self.ended}


RANKING = "[4/4] ranking the test queries against the database (Hamming, SSHP, ASHP and the teacher)"


def watch(progress: RunProgress):
    """Route the driver's tqdm_ray bar states through `progress` while the returned context is open, and draw the
    ranking's bar: the workers rank after their last encode with no bar of their own, so the driver shows one
    (its elapsed time) from then until the next bar or the end of the run."""
    import contextlib
    import threading

    @contextlib.contextmanager
    def ctx():
        from ray.experimental import tqdm_ray
        from tqdm.auto import tqdm

        manager = tqdm_ray.instance()
        original = manager.process_state_update
        stop = threading.Event()

        def process(state):
            try:
                state = progress.observe(state)
            except Exception:  # noqa: BLE001 - a progress estimate must never break a run
                pass
            original(state)

        def ranking_bar():
            bar = None
            while not stop.wait(0.5):
                if progress.ranking() and bar is None:
                    bar = tqdm(desc=RANKING, total=None, bar_format="{desc}: {elapsed}", leave=False)
                elif bar is not None and not progress.ranking():
                    bar.close()
                    bar = None
                elif bar is not None:
                    bar.refresh()
            if bar is not None:
                bar.close()

        manager.process_state_update = process
        progress.print_line = lambda line: tqdm_ray.safe_print(line, flush=True)
        ticker = threading.Thread(target=ranking_bar, daemon=True)
        ticker.start()
        try:
            yield progress
        finally:
            manager.process_state_update = original
            stop.set()
            ticker.join(timeout=5)

    return ctx()
