"""A searchable database of binary codes: packed codes, keys and labels plus a FAISS binary index, and the hash
model that made them, in one directory (DESIGN §5: the student is used, not only scored).

    index = Index.build(packed_codes, keys, labels, model, kind="auto")
    index.save("out/index")                                      # or s3://bucket/indexes/x
    Index.load("out/index").search(["a.png", "b.png"], k=10)   # -> one list of Hit(key, distance, label) a query

Index kinds: exact `IndexBinaryFlat`; `IndexBinaryIVF` (k-means cells over the codes, `nprobe` cells searched)
and `IndexBinaryHNSW` (graph) for large databases. `kind="auto"` is exact up to AUTO_EXACT_MAX codes, IVF above.

The evaluation's exact, stable-tie ranking (retrieval.py) stays for mAP; this module serves queries. No Ray and
no MLflow here; the files are read and written through the storage layer (brcd_dist/storage.py), so an index
lives in a local directory or under an s3:// / gs:// prefix. Nothing read back is unpickled: arrays are .npy with
allow_pickle=False, the FAISS index is FAISS's own serialisation, the model a weights-only torch checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import faiss
except ImportError as err:  # the base install names no FAISS build (pyproject.toml): say which to add
    raise ImportError("brcd_dist.index needs FAISS: pip install 'brcd-dist[cpu]' (or [gpu] on a GPU machine)") from err
import numpy as np
import torch
from PIL import Image

from brcd_dist import storage
from brcd_dist.codes import pack_codes
from brcd_dist.data.augment import eval_batch
from brcd_dist.models import HashModel, load_hash_model, save_hash_model

KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_EXACT_MAX = 1_000_000  # exact search over 1M 64-bit codes is ~10-20 ms a query on one core (BENCHMARKS.md)
IVF_TRAIN_PER_LIST = 64  # training codes a cell for the IVF's k-means
FORMAT = 1
FILES = {
    "meta": "meta.json",
    "codes": "codes.npy",
    "keys": "keys.npy",
    "labels": "labels.npy",
    "index": "index.faiss",
    "model": "model.pt",
}


# ----------------------------------------------------------------------------- files, through the storage layer


def _write_bytes(location: str, name: str, data: bytes) -> None:
    """Write `data` to location/name (a local path or s3:// / gs:// URI), whole or not at all."""
    storage.write_bytes(storage.join(location, name), data)


def _read_bytes(location: str, name: str) -> bytes:
    path = storage.join(location, name)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path}: not found (an index directory holds {', '.join(FILES.values())})")
    return storage.read_bytes(path)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------- building FAISS indexes


def choose_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r}: allowed: {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if n <= AUTO_EXACT_MAX else "ivf"
    return kind


def ivf_lists(n: int) -> int:
    """IVF cells: about 4·√N (FAISS's rule of thumb), at least 1, and at least 39 training codes a cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_faiss(
    packed: np.ndarray,
    kind: str,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    seed: int = 0,
) -> faiss.IndexBinary:
    """A FAISS binary index over uint8 packed codes (N, L/8) (codes.pack_codes), of kind flat, ivf or hnsw."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[0] == 0:
        raise ValueError(f"packed codes: expected a non-empty (N, L/8) uint8 array, got shape {packed.shape}")
    n, bits = packed.shape[0], packed.shape[1] * 8
    if kind == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif kind == "ivf":
        nlist = nlist or ivf_lists(n)
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, nlist)
        index.cp.seed = seed  # the binary k-means of the cells is seeded: the same codes give the same index
        # k-means needs ~40 codes a cell, not all N: train on a seeded sample (1M codes: 2-3x faster to build)
        sample = IVF_TRAIN_PER_LIST * nlist
        train = packed if n <= sample else packed[np.sort(np.random.default_rng(seed).choice(n, sample, False))]
        index.train(train)
        index.nprobe = nprobe or max(1, min(nlist, math.ceil(nlist / 16)))
    elif kind == "hnsw":
        index = faiss.IndexBinaryHNSW(bits, hnsw_m)
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"index kind {kind!r}: allowed: flat, ivf, hnsw")
    index.add(packed)
    return index


def search_faiss(index: faiss.IndexBinary, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances (Q, k) int32 Hamming, ids (Q, k) int64; -1 where fewer than k were found)."""
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    q = np.ascontiguousarray(packed_queries, dtype=np.uint8)
    if q.ndim != 2 or q.shape[1] * 8 != index.d:
        raise ValueError(f"queries: expected (Q, {index.d // 8}) packed codes, got shape {q.shape}")
    return index.search(q, min(k, index.ntotal))


def recall_at_k(approx_dist: np.ndarray, exact_dist: np.ndarray) -> float:
    """Share of the approximate top-k that is as near as the exact top-k's k-th neighbour, over queries.

    Distance-based rather than id-based: Hamming distances tie a lot, and any code at the k-th distance is as
    correct an answer as another. A missing result (-1 id) carries FAISS's large sentinel distance and misses.
    """
    kth = exact_dist[:, -1:]
    return float((approx_dist <= kth).mean())


# ----------------------------------------------------------------------------- queries: images -> packed codes


def load_images(paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            out.append(im.copy())
    return out


def encode_queries(model: HashModel, images: Sequence, batch_size: int = 256) -> np.ndarray:
    """Image files, PIL images or a preprocessed (B, C, H, W) tensor -> uint8 packed codes (B, L/8).

    Images get the evaluation's deterministic transform (centre square, resize, normalise), as the database did.
    """
    if torch.is_tensor(images):
        return pack_codes(model.encode(images))
    pil = [im if isinstance(im, Image.Image) else None for im in images]
    if any(im is None for im in pil):
        pil = (
            load_images([str(im) for im in images])
            if all(isinstance(im, (str, os.PathLike)) for im in images)
            else None
        )
    if pil is None:
        raise TypeError("images: expected file paths, PIL images or a (B, C, H, W) tensor")
    mode = "L" if model.in_chans == 1 else "RGB"
    chunks = []
    for start in range(0, len(pil), batch_size):
        part = [im.convert(mode) for im in pil[start : start + batch_size]]
        chunks.append(pack_codes(model.encode(eval_batch(part, model.img_size, model.in_chans))))
    return np.concatenate(chunks) if chunks else np.zeros((0, model.bits // 8), np.uint8)


# ----------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class Hit:
    key: str
    distance: int
    label: Any


@dataclass
class Index:
    codes: np.ndarray  # uint8 (N, L/8), codes.pack_codes order
    keys: np.ndarray  # str (N,)
    labels: np.ndarray  # (N,) int or (N, C) multi-hot
    faiss_index: faiss.IndexBinary
    model: HashModel
    meta: dict = field(default_factory=dict)  # kind, bits, model uri/version/run, build seconds, ...

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def build(
        cls,
        codes: np.ndarray,
        keys: Sequence[str],
        labels,
        model: HashModel,
        *,
        kind: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        source: dict | None = None,
    ) -> Index:
        """From packed codes (N, L/8) with their keys and labels; `source` (model uri, version, run, images)
        goes into meta.json so that an index says which model version made it."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        keys = np.asarray([str(k) for k in keys])
        labels = np.asarray(labels)
        if not (len(codes) == len(keys) == len(labels)):
            raise ValueError(f"codes, keys, labels: lengths differ ({len(codes)}, {len(keys)}, {len(labels)})")
        if codes.ndim != 2 or codes.shape[1] * 8 != model.bits:
            raise ValueError(f"codes of shape {codes.shape} do not fit the model's {model.bits} bits")
        if len(set(keys.tolist())) != len(keys):
            raise ValueError("keys: not unique (each database item needs its own key)")
        chosen = choose_kind(kind, len(codes))
        t0 = time.perf_counter()
        index = build_faiss(codes, chosen, nlist=nlist, nprobe=nprobe)
        meta = {
            "format": FORMAT,
            "kind": chosen,
            "count": len(codes),
            "bits": int(model.bits),
            "build_seconds": round(time.perf_counter() - t0, 3),
            "model_spec": model.spec,
            **(source or {}),
        }
        if chosen == "ivf":
            meta.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
        return cls(codes, keys, labels, index, model.eval(), meta)

    def save(self, location: str | os.PathLike) -> None:
        """Write every file of the index to a directory or URI prefix (meta.json last: its presence means
        complete)."""
        location = str(location)
        _write_bytes(location, FILES["codes"], _npy_bytes(self.codes))
        _write_bytes(location, FILES["keys"], _npy_bytes(self.keys))
        _write_bytes(location, FILES["labels"], _npy_bytes(self.labels))
        _write_bytes(location, FILES["index"], faiss.serialize_index_binary(self.faiss_index).tobytes())
        save_hash_model(self.model, storage.join(location, FILES["model"]))
        _write_bytes(location, FILES["meta"], json.dumps(self.meta, indent=1).encode())

    @classmethod
    def load(cls, location: str | os.PathLike) -> Index:
        location = str(location)
        meta = json.loads(_read_bytes(location, FILES["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{location}: index format {meta.get('format')!r}, this code reads {FORMAT}")
        raw = np.frombuffer(_read_bytes(location, FILES["index"]), dtype=np.uint8)
        index = faiss.deserialize_index_binary(raw)
        model = load_hash_model(io.BytesIO(_read_bytes(location, FILES["model"])))
        codes = _npy_array(_read_bytes(location, FILES["codes"]))
        keys = _npy_array(_read_bytes(location, FILES["keys"]))
        labels = _npy_array(_read_bytes(location, FILES["labels"]))
        if not (index.ntotal == len(codes) == len(keys) == len(labels) == meta["count"]):
            raise ValueError(
                f"{location}: index, codes, keys and labels disagree on the count "
                f"({index.ntotal}, {len(codes)}, {len(keys)}, {len(labels)}, meta {meta['count']})"
            )
        return cls(codes, keys, labels, index, model.eval(), meta)

    def search_codes(self, packed_queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        dist, ids = search_faiss(self.faiss_index, packed_queries, k)
        return [
            [Hit(str(self.keys[i]), int(d), self.labels[i].tolist()) for d, i in zip(drow, irow) if i >= 0]
            for drow, irow in zip(dist, ids)
        ]

    def search(self, images: Sequence, k: int = 10) -> list[list[Hit]]:
        """The k nearest database keys of each query image (file paths, PIL images or a preprocessed tensor),
        nearest first, with Hamming distances."""
        return self.search_codes(encode_queries(self.model, images), k)
