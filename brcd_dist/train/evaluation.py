"""Stage D: query and database encoded in parallel across ranks; mAP@K by Hamming ranking in both paradigms
(SSHP: student encodes both sides; ASHP: teacher encodes the database, student the queries) on rank 0, the
result broadcast so that every rank takes the same decisions (model selection, early stopping)."""

from __future__ import annotations

from brcd_dist.retrieval import PARADIGMS, evaluate_paradigms, pr_curve
from brcd_dist.train.collectives import broadcast_object
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.encoding import encode_split
from brcd_dist.train.teacher_cache import cache_file, load_cached, save_cached, teacher_digest


class Evaluator:
    """Holds the frozen teacher's database and query codes across evaluations (computed once per split).

    With `brcd.clustering_cache` set, they are also kept on disk by (teacher weights, shards, split), as the
    k-means results are: runs that share a teacher (a sweep, the quality benchmark) encode its database once. The
    teacher's encode rate is kept with its database codes, so the result table of a cache hit still shows it.
    """

    def __init__(self, ctx: WorkerContext, teacher):
        self.ctx, self.teacher = ctx, teacher
        self._digest = teacher_digest(teacher) if ctx.cfg.brcd.clustering_cache else ""
        self._teacher_codes: dict = {}
        self.throughput: dict = {}

    def _teacher_split(self, split: str, max_items: int):
        if split not in self._teacher_codes:
            path = cache_file(self.ctx, self._digest, f"codes-{split}-n{max_items}")
            saved = load_cached(self.ctx, path)
            if saved is None or "images_per_s" not in saved:  # absent: a file from before rates were kept
                codes, _, labels, rates = encode_split(self.ctx, {"teacher": self.teacher}, split, max_items)
                saved = {"codes": codes["teacher"], "labels": labels, "images_per_s": rates["teacher"]}
                save_cached(self.ctx, saved, path)
            self._teacher_codes[split] = (saved["codes"], saved["labels"])
            if split == "database":  # a cache hit reports the rate measured when the codes were made
                self.throughput["teacher_images_per_s"] = saved["images_per_s"]
        return self._teacher_codes[split]

    def evaluate(self, student, query_split: str, with_curves: bool = False) -> dict:
        e = self.ctx.cfg.eval
        t_db, db_labels = self._teacher_split("database", e.max_database)
        t_q, _ = self._teacher_split(query_split, e.max_queries)
        s_db, _, _, rates = encode_split(self.ctx, {"student": student}, "database", e.max_database)
        s_q, _, q_labels, _ = encode_split(self.ctx, {"student": student}, query_split, e.max_queries)
        self.throughput["student_images_per_s"] = rates["student"]
        result = None
        if self.ctx.is_chief:
            codes = {
                "student": {"query": s_q["student"], "database": s_db["student"]},
                "teacher": {"query": t_q, "database": t_db},
            }
            maps = evaluate_paradigms(codes, q_labels, db_labels, e.topk)
            result = {f"{query_split}/{name}_map": float(v) for name, v in maps.items()}
            if with_curves:
                routes = {**PARADIGMS, "teacher": ("teacher", "teacher")}
                result["curves"] = {
                    name: pr_curve(codes[q]["query"], codes[d]["database"], q_labels, db_labels)
                    for name, (q, d) in routes.items()
                }
        return broadcast_object(result)
