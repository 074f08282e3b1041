"""Config: defaults <- YAML <- key=value overrides, and one-line errors for every bad value (issue #2 item 4)."""
from pathlib import Path

import pytest

from brcd_dist.config import (Config, ConfigError, flatten, from_dict, load_config, parse_overrides, to_dict,
                              to_yaml, validate_config)

REPO = Path(__file__).resolve().parents[1]
FMNIST = REPO / "configs" / "fashion_mnist.yaml"
IMAGENET = REPO / "configs" / "imagenet100_vitb16_effb0.yaml"


def test_yaml_and_overrides_merge_in_order(tmp_path):
    cfg = load_config(FMNIST, ["brcd.alpha=0.7", "train.workers=3", "student.name=resnet10t", "brcd.bit_mask=false"])
    assert cfg.brcd.alpha == 0.7
    assert cfg.train.workers == 3
    assert cfg.student.name == "resnet10t"
    assert cfg.brcd.bit_mask is False
    assert cfg.teacher.name == "resnet18"  # from the YAML file
    assert cfg.kmeans.iters == 25  # from the YAML file, equal to the default


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(FMNIST, ["brcd.delta=0.25", "tracking.uri=http://127.0.0.1:5000"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_flatten_uses_dotted_keys():
    flat = flatten(Config())
    assert flat["brcd.alpha"] == 0.8
    assert flat["train.zero_stage"] == 0
    assert all("." in k for k in flat)


def test_override_values_are_typed():
    tree = parse_overrides(["brcd.bits=32", "brcd.tau=0.2", "tracking.uri=", "brcd.kd=rkd"])
    assert tree == {"brcd": {"bits": 32, "tau": 0.2, "kd": "rkd"}, "tracking": {"uri": ""}}


def test_shipped_configs_load():
    assert load_config(FMNIST).data.source == "fashion_mnist"
    # The GPU config points at data this machine does not have: its values are valid, its paths are checked at run time.
    cfg = load_config(IMAGENET, validate=False)
    validate_config(cfg, check_paths=False)
    assert (cfg.teacher.name, cfg.student.name) == ("vit_base_patch16_224", "efficientnet_b0")


@pytest.mark.parametrize("override, message", [
    ("brcd.alpha=1.5", "brcd.alpha=1.5: must be in [0, 1]"),
    ("brcd.alpha=-0.1", "brcd.alpha=-0.1: must be in [0, 1]"),
    ("brcd.delta=2", "brcd.delta=2.0: must be in [0, 1]"),
    ("brcd.clusters=1", "brcd.clusters=1: must be an integer >= 2"),
    ("brcd.bits=12", "brcd.bits=12: must be a multiple of 8 in 8..256"),
    ("brcd.bits=512", "brcd.bits=512: must be a multiple of 8 in 8..256"),
    ("brcd.bits=4", "brcd.bits=4: must be a multiple of 8 in 8..256"),
    ("brcd.kd=hinton", "brcd.kd='hinton': allowed: brcd, none,"),
    ("brcd.alhpa=0.5", "unknown key 'brcd.alhpa'; allowed under brcd:"),
    ("nonsense.x=1", "unknown key 'nonsense'"),
    ("train.zero_stage=4", "train.zero_stage=4: allowed: 0, 1, 2, 3"),
    ("train.workers=two", "train.workers='two': expected an integer"),
    ("brcd.bit_mask=maybe", "brcd.bit_mask='maybe': expected true or false"),
    ("student.name=resnet_does_not_exist", "student.name='resnet_does_not_exist': not a timm model name"),
    ("teacher.weights_path=/no/such/weights.pth", "teacher.weights_path='/no/such/weights.pth': file not found"),
    ("data.source_path=/no/such/dir", "data.source_path='/no/such/dir': not found"),
    ("data.source=lmdb", "data.source='lmdb': allowed: fashion_mnist, imagefolder, shards"),
])
def test_bad_value_gives_one_line_error_naming_key_value_and_allowed(override, message, tmp_path):
    # Point shards at an empty dir so data.source_path is what gets checked.
    with pytest.raises(ConfigError) as err:
        load_config(FMNIST, [f"data.shards_dir={tmp_path}", override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_missing_config_file_is_one_line():
    with pytest.raises(ConfigError, match=r"--config '/no/such.yaml': file not found"):
        load_config("/no/such.yaml")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["brcd.alpha"])
