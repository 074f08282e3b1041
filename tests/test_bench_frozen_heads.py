"""bench/frozen_heads.py's pure parts: the cached-view pairing and its method rows (the heads' training is the
losses' and retrieval's code, tested on their own)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import frozen_heads

from brcd_dist.config import BRCDConfig, Config, validate_config


@pytest.mark.parametrize("views", [2, 4, 20])
def test_view_pairs_are_two_distinct_cached_views(views):
    a, b = frozen_heads.view_pairs(500, views, epoch=3, seed=1)
    assert bool((a != b).all()) and int(a.min()) >= 0 and int(max(a.max(), b.max())) < views


def test_view_pairs_change_with_the_epoch_and_repeat_for_the_same_epoch():
    a0, b0 = frozen_heads.view_pairs(500, 4, epoch=0, seed=0)
    a1, _ = frozen_heads.view_pairs(500, 4, epoch=1, seed=0)
    again, again_b = frozen_heads.view_pairs(500, 4, epoch=0, seed=0)
    assert torch.equal(a0, again) and torch.equal(b0, again_b) and not torch.equal(a0, a1)


@pytest.mark.parametrize("name", list(frozen_heads.METHODS))
def test_every_method_row_is_a_valid_brcd_config(name):
    cfg = Config()
    cfg.brcd = BRCDConfig(**frozen_heads.METHODS[name])
    validate_config(cfg, check_paths=False)
