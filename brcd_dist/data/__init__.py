"""WebDataset shards: writing (IDX, ImageFolder), the manifest, and reading for N ranks x M loader workers."""

from brcd_dist.data.manifest import Manifest, ShardsMismatchError, SplitInfo, load_manifest
from brcd_dist.data.reading import ReadStats, eval_batches, train_batches
from brcd_dist.data.shards import ensure_shards, verify_shards, write_shards

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
