"""losses/registry.py: one registry of KD terms that kd_loss dispatches on and config validation reads."""

import pytest
import torch

from brcd_dist import config
from brcd_dist.config import BRCDConfig, Config, ConfigError, validate_config
from brcd_dist.losses import KDInputs, kd_loss, kd_names, register_kd, registry


def tiny_inputs():
    s = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    p = torch.full((2, 2), 0.5)
    return KDInputs(s1=s, s2=s, p1=p, p2=p, t1=s, t2=s)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry that the test may add to, restored afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_names_list_brcd_and_none_first_then_baselines_alphabetically():
    names = kd_names()
    assert names[:2] == ("brcd", "none")
    assert list(names[2:]) == sorted(names[2:])
    assert {"kl_bits", "kl_codes", "distill_kl", "crd", "rkd", "pkt", "sp", "individual_cos", "individual_l2"} <= set(
        names
    )


def test_a_registered_term_is_dispatched_and_accepted_by_validation(scratch_registry):
    @register_kd("twice_individual")
    def _twice(x, cfg):
        return 2 * (x.s1 - x.t1).abs().sum()

    assert kd_loss("twice_individual", tiny_inputs(), BRCDConfig()).item() == 0.0
    cfg = Config()
    cfg.brcd.kd = "twice_individual"
    assert validate_config(cfg, check_paths=False) is cfg


def test_validation_rejects_a_name_not_in_the_registry():
    cfg = Config()
    cfg.brcd.kd = "twice_individual"
    with pytest.raises(ConfigError, match="brcd.kd='twice_individual': allowed: brcd, none, "):
        validate_config(cfg, check_paths=False)


def test_registering_a_name_twice_raises(scratch_registry):
    with pytest.raises(ValueError, match="'kl_bits' is already registered"):
        register_kd("kl_bits")(lambda x, cfg: x.s1.sum())


def test_needs_may_depend_on_the_config(scratch_registry):
    register_kd("needs_q_when_masked", needs=lambda cfg: ("q1",) if cfg.bit_mask else ())(
        lambda x, cfg: x.s1.new_zeros(())
    )
    with pytest.raises(ValueError, match=r"needs KDInputs.q1"):
        kd_loss("needs_q_when_masked", tiny_inputs(), BRCDConfig())
    assert kd_loss("needs_q_when_masked", tiny_inputs(), BRCDConfig(bit_mask=False)).item() == 0.0


def test_brcd_in_authors_release_mode_needs_no_masks():
    x = tiny_inputs()
    x.labels = x.view_clusters1 = x.view_clusters2 = torch.tensor([0, 1])
    assert torch.isfinite(kd_loss("brcd", x, BRCDConfig(authors_release=True)))
    with pytest.raises(ValueError, match="masks"):
        kd_loss("brcd", x, BRCDConfig())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("mask_sides", "left", "brcd.mask_sides='left': allowed: anchor, both"),
        ("mask_normalization", "bits", "brcd.mask_normalization='bits': allowed: kept, length"),
        ("cosine", "l2", "brcd.cosine='l2': allowed: dot, normalised"),
        ("negatives", "some", "brcd.negatives='some': allowed: all, authors"),
    ],
)
def test_bad_brcd_variant_in_config_gives_one_line_error(key, value, message):
    cfg = Config()
    setattr(cfg.brcd, key, value)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, check_paths=False)


def test_contradictory_brcd_variants_in_config_are_rejected():
    cfg = Config()
    cfg.brcd.cosine, cfg.brcd.mask_normalization = "normalised", "length"
    with pytest.raises(ConfigError, match="brcd.mask_normalization='length': cosine='normalised'"):
        validate_config(cfg, check_paths=False)
    cfg = Config()
    cfg.brcd.authors_release, cfg.brcd.bit_mask = True, False
    with pytest.raises(ConfigError, match="brcd.authors_release=True: .* needs bit_mask=True"):
        validate_config(cfg, check_paths=False)


def test_brcd_variant_keys_load_from_overrides():
    cfg = config.load_config(
        None,
        [
            "brcd.mask_sides=both",
            "brcd.cosine=normalised",
            "brcd.negatives=authors",
            "brcd.authors_release=true",
            "brcd.mask_normalization=kept",
        ],
        validate=False,
    )
    validate_config(cfg, check_paths=False)
    b = cfg.brcd
    assert (b.mask_sides, b.cosine, b.negatives, b.authors_release) == ("both", "normalised", "authors", True)
