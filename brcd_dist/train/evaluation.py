"""Stage D: query and database encoded in parallel across ranks; mAP@K by Hamming ranking in both paradigms
(SSHP: student encodes both sides; ASHP: teacher encodes the database, student the queries) on rank 0, the
result broadcast so that every rank takes the same decisions (model selection, early stopping)."""

from __future__ import annotations

from brcd_dist.retrieval import PARADIGMS, evaluate_paradigms, pr_curve
from brcd_dist.train.collectives import broadcast_object
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.encoding import encode_split
from brcd_dist.train.teacher_cache import TeacherCodes


class Evaluator:
    """mAP of a student against the frozen teacher, whose codes `TeacherCodes` holds (computed once per split and
    run, or read from train.teacher_cache); `throughput` has both models' encode rates per worker."""

    def __init__(self, ctx: WorkerContext, teacher: TeacherCodes):
        self.ctx, self.teacher = ctx, teacher
        self.throughput: dict = teacher.throughput

    def evaluate(self, student, query_split: str, with_curves: bool = False) -> dict:
        e = self.ctx.cfg.eval
        t_db, db_labels = self.teacher.gathered("database", e.max_database)
        t_q, _ = self.teacher.gathered(query_split, e.max_queries)
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
