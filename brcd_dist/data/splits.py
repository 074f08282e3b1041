"""The seeded split of DESIGN §3: train subset, database, validation and test queries.

Each part draws from its own generator, seeded by (seed, part): changing train_per_class does not move the
query split, and the same seed gives the same split on any machine (numpy's PCG64 is stable across versions).
The authors' code drew the train subset before setting a seed; here it is seeded and stored (DESIGN §2).
"""

from __future__ import annotations

import numpy as np

_TRAIN, _DATABASE, _QUERIES, _HOLDOUT, _EVAL_CAP = 1, 2, 3, 4, 5
DEFAULT_HOLDOUT = 0.1  # ImageFolder without train/ and val/: share of each class held out as queries


def _rng(seed: int, part: int) -> np.random.Generator:
    return np.random.default_rng([seed, part])


def _class_members(labels: np.ndarray) -> list[np.ndarray]:
    """Each class's indices, increasing, classes in sorted order: what `np.flatnonzero(labels == c)` gives for each
    c of np.unique(labels), from one stable sort (O(N log N), not O(N x classes): 1.28M images of 1,000 classes)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    return np.split(order, starts[1:]) if len(order) else []


def train_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` images of each class (all of a smaller class), in a seeded shuffled order."""
    rng = _rng(seed, _TRAIN)
    picks = []
    for members in _class_members(labels):
        picks.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    chosen = np.concatenate(picks)
    return chosen[rng.permutation(len(chosen))]


def database_order(n: int, seed: int) -> np.ndarray:
    """All n training images, shuffled so that every shard mixes classes (ImageFolder lists are class-sorted)."""
    return _rng(seed, _DATABASE).permutation(n)


def query_split(n_test: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Test images -> (validation queries, test queries): round(val_fraction * n_test) of them to validation."""
    perm = _rng(seed, _QUERIES).permutation(n_test)
    n_val = int(round(val_fraction * n_test))
    return perm[:n_val], perm[n_val:]


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For an ImageFolder without train/ and val/: (kept, held out) indices, round(fraction * n_c) of each
    class held out (at least 1 where the class has 2 or more images). Both sorted."""
    rng = _rng(seed, _HOLDOUT)
    held = []
    for members in _class_members(labels):
        k = int(round(fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        held.append(rng.choice(members, size=k, replace=False))
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def make_splits(
    train_labels: np.ndarray, n_test: int, *, train_per_class: int, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """{'train', 'database'}: indices into the training images; {'val_query', 'test_query'}: into the test images."""
    val, test = query_split(n_test, val_fraction, seed)
    return {
        "train": train_subset(train_labels, train_per_class, seed),
        "database": database_order(len(train_labels), seed),
        "val_query": val,
        "test_query": test,
    }


def balanced_subset(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `cap` items, as even across the classes as their sizes allow (each class gets
    cap // C or one more; a smaller class gives all it has and the rest goes to the others), each class's drawn
    by a seeded permutation: the capped evaluation set of eval.max_queries / eval.max_database. cap <= 0 or
    cap >= len(labels): every index."""
    labels = np.asarray(labels)
    if cap <= 0 or cap >= len(labels):
        return np.arange(len(labels))
    rng = _rng(seed, _EVAL_CAP)
    members = [rng.permutation(m) for m in _class_members(labels)]
    take = np.zeros(len(members), dtype=np.int64)
    left, open_ = cap, [i for i, m in enumerate(members) if len(m)]
    while left > 0 and open_:  # water-filling: an even share to every class that still has items
        share = max(1, left // len(open_))
        for i in list(open_):
            n = min(share, len(members[i]) - take[i], left)
            take[i] += n
            left -= n
            if take[i] == len(members[i]):
                open_.remove(i)
            if left == 0:
                break
    return np.sort(np.concatenate([m[:t] for m, t in zip(members, take)]))
