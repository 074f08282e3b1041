"""Validation and stage D: mAP@K by Hamming ranking in both paradigms (SSHP: the student encodes both sides;
ASHP: the teacher encodes the database, the student the queries) and the teacher's own, split across ranks.

Every rank holds the database's packed codes (10 MB per code set at 1.28M images and 64 bits) and ranks its own
share of the queries, the share it encoded; the per-query APs are gathered and averaged in key order, which gives
the single-process mAP to the last bit (retrieval.average_precisions). Precision-recall curves are sums that add
up across ranks, over at most PR_MAX_QUERIES queries. The teacher's own mAP and curves are computed once per run:
its codes do not change. A capped evaluation set (eval.max_queries, eval.max_database) is drawn seeded and even
across classes before anything is encoded (encoding.capped_keys)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from brcd_dist.codes import pack_codes
from brcd_dist.retrieval import average_precisions, pr_from_sums, pr_sums
from brcd_dist.train.collectives import all_gather_objects
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.encoding import capped_keys, encode_local, encode_split
from brcd_dist.train.teacher_cache import TeacherCodes

PR_MAX_QUERIES = 5000  # curves from at most this many queries (seeded, even across classes): a curve, not a score


def distributed_map(q_codes, q_keys: list, q_labels, db_codes, db_labels, topk: int) -> float:
    """mAP@topk of all ranks' queries (each rank passes its own) against the database every rank holds: the
    per-query APs in key order, averaged as one process would (call on every rank; every rank gets it)."""
    aps = average_precisions(q_codes, db_codes, q_labels, db_labels, topk) if len(q_keys) else np.zeros(0)
    parts = all_gather_objects((list(q_keys), aps))
    keys = [k for ks, _ in parts for k in ks]
    all_aps = np.concatenate([a for _, a in parts])
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    return float(all_aps[order].mean()) if len(order) else 0.0


def distributed_pr(q_codes, q_keys: list, q_labels, db_codes, db_labels, sample: frozenset | None) -> dict:
    """pr_curve of all ranks' queries (of `sample`, if given) against the database, from summed parts."""
    keep = [i for i, k in enumerate(q_keys) if sample is None or k in sample]
    bits = 8 * db_codes.shape[1]
    mine = pr_sums(q_codes[keep], db_codes, np.asarray(q_labels)[keep], db_labels) if keep else np.zeros((4, bits + 1))
    return pr_from_sums(sum(all_gather_objects(mine)))


class Evaluator:
    """mAP of a student against the frozen teacher, whose codes `TeacherCodes` holds (computed once per split and
    run, or read from train.teacher_cache); `throughput` has both models' encode rates per worker."""

    def __init__(self, ctx: WorkerContext, teacher: TeacherCodes):
        self.ctx, self.teacher = ctx, teacher
        self.throughput: dict = teacher.throughput
        self._capped: dict = {}
        self._student_db: tuple | None = None  # (weights digest or None, database codes) of the last student

    def _capped_keys(self, split: str, cap: int) -> frozenset[str] | None:
        """encoding.capped_keys, drawn once per run: every evaluation uses the same sets."""
        if (split, cap) not in self._capped:
            self._capped[split, cap] = capped_keys(self.ctx, split, cap)
        return self._capped[split, cap]

    def evaluate(self, student, query_split: str, with_curves: bool = False) -> dict:
        ctx, e = self.ctx, self.ctx.cfg.eval
        t_db, db_keys, db_labels = self.teacher.gathered("database", e.max_database)
        s_db = self._student_database(student, db_keys)
        only = self._capped_keys(query_split, e.max_queries)
        local, q_keys, q_labels, _ = encode_local(ctx, {"student": student}, query_split, only)
        s_q = pack_codes(local["student"])
        result = {
            f"{query_split}/sshp_map": distributed_map(s_q, q_keys, q_labels, s_db, db_labels, e.topk),
            f"{query_split}/ashp_map": distributed_map(s_q, q_keys, q_labels, t_db, db_labels, e.topk),
        }
        name = f"{query_split}/teacher_map"
        result[name] = self.teacher.own_map(name, lambda: distributed_map(*self._teacher_share(query_split), e.topk))
        if with_curves:
            sample = self._capped_keys(query_split, min(e.max_queries or PR_MAX_QUERIES, PR_MAX_QUERIES))
            result["curves"] = {
                "sshp": distributed_pr(s_q, q_keys, q_labels, s_db, db_labels, sample),
                "ashp": distributed_pr(s_q, q_keys, q_labels, t_db, db_labels, sample),
                "teacher": self.teacher.own_map(
                    f"{query_split}/curve", lambda: distributed_pr(*self._teacher_share(query_split), sample)
                ),
            }
        return result

    def _student_database(self, student, db_keys: list) -> np.ndarray:
        """The student's packed database codes, encoded again only when its weights changed: the final test of a
        student whose last validation chose it reuses that validation's codes (one database pass fewer)."""
        digest = weights_digest(student)
        same = digest is not None and self._student_db is not None and self._student_db[0] == digest
        if not all(all_gather_objects(same)):  # every rank decides alike (ZeRO-3 ranks hold different shards)
            only_db = self._capped_keys("database", self.ctx.cfg.eval.max_database)
            codes, s_keys, _, rates = encode_split(self.ctx, {"student": student}, "database", only_db)
            assert s_keys == db_keys, "student and teacher encoded different database sets"
            self.throughput["student_images_per_s"] = rates["student"]
            self._student_db = (digest, codes["student"])
        return self._student_db[1]

    def _teacher_share(self, query_split: str) -> tuple:
        """(this rank's share of the teacher's query codes, their keys and labels, the teacher's database codes and
        labels): the teacher alone, ranked in shares across ranks."""
        e, rank, world = self.ctx.cfg.eval, self.ctx.rank, self.ctx.world_size
        t_db, _, db_labels = self.teacher.gathered("database", e.max_database)
        t_q, q_keys, q_labels = self.teacher.gathered(query_split, e.max_queries)
        share = slice(rank, None, world)
        return t_q[share], q_keys[share], q_labels[share], t_db, db_labels


def weights_digest(model: torch.nn.Module) -> str | None:
    """A digest of a model's parameters and buffers, by value: equal for a copy with the same weights. None for a
    module whose parameters ZeRO-3 has partitioned (`ds_id`): its state_dict holds empty placeholders."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
