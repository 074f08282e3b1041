"""WebDataset shards: writing (IDX, ImageFolder), the manifest, and reading for N ranks x M loader workers.

The names below are imported on first use (PEP 562), so that config validation can read `data.imagefolder` and
`data.splits` without importing the reader's torch and webdataset stack."""

import importlib

_WHERE = {
    "Manifest": "manifest",
    "SplitInfo": "manifest",
    "ShardsMismatchError": "manifest",
    "load_manifest": "manifest",
    "ReadStats": "reading",
    "eval_batches": "reading",
    "train_batches": "reading",
    "ensure_shards": "shards",
    "verify_shards": "shards",
    "write_shards": "shards",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Manifest",
    "SplitInfo",
    "ShardsMismatchError",
    "load_manifest",
    "write_shards",
    "ensure_shards",
    "verify_shards",
    "train_batches",
    "eval_batches",
    "ReadStats",
]
