"""Config: defaults <- YAML <- key=value overrides, and one-line errors for every bad value."""

import dataclasses
from pathlib import Path

import pytest

import brcd_dist.config as config_module
from brcd_dist.config import (
    Config,
    ConfigError,
    flatten,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    to_yaml,
    validate_config,
)

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


@pytest.mark.parametrize(
    "override, message",
    [
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
        ("data.source=lmdb", "data.source='lmdb': allowed: fashion_mnist, imagefolder, object_store_folder, shards"),
    ],
)
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


# ----------------------------------------------------------------------------- bad input at the door


@pytest.mark.parametrize(
    "override, message",
    [
        ("brcd.tau=.inf", "brcd.tau=inf: expected a finite number"),
        ("brcd.tau=.nan", "brcd.tau=nan: expected a finite number"),
        ("train.lr=.inf", "train.lr=inf: expected a finite number"),
        ("train.cpus_per_worker=.inf", "train.cpus_per_worker=inf: expected a finite number"),
        ("data.image_size=100000", "data.image_size=100000: must be in 8..4096"),
        ("eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
        ("eval.batch_size=-5", "eval.batch_size=-5: must be >= 1"),
        ("eval.max_queries=-1", "eval.max_queries=-1: must be >= 0"),
        ("student.name=[resnet18]", "student.name=['resnet18']: expected a string, not a list"),
        ("tracking.uri={a: 1}", "tracking.uri={'a': 1}: expected a string, not a dict"),
        ("brcd.clusters=1000000", "brcd.clusters=1000000: must be <= 5000, the images of the train split"),
        ("data.train_per_class=7000", "data.train_per_class=7000: must be <= 6000"),
        ("brcd.alpha=[0.5", "override 'brcd.alpha=[0.5': not valid YAML"),
    ],
)
def test_bad_input_at_the_door_is_one_line(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(FMNIST, [f"data.shards_dir={tmp_path / 'shards'}", override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_unparseable_yaml_file_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("brcd:\n  alpha: 0.5\n  tau: [0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(f"--config '{bad}': not valid YAML (line ")
    assert "\n" not in str(err.value)


def test_python_tag_in_yaml_is_refused_without_running(tmp_path):
    bad = tmp_path / "tag.yaml"
    marker = tmp_path / "PWNED"
    bad.write_text(f"brcd: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["data.shards_dir", "train.teacher_cache", "train.storage_path"])
def test_directory_key_naming_a_file_is_refused(key, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=f"{key}='{a_file}': is a file; expected a directory"):
        load_config(FMNIST, [f"data.shards_dir={tmp_path / 'shards'}", f"{key}={a_file}"])


def test_clusters_are_checked_against_an_existing_manifest(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"splits": {"train": {"count": 80}}}')
    load_config(FMNIST, ["data.source=shards", f"data.shards_dir={shards}", "brcd.clusters=80"])
    with pytest.raises(ConfigError, match=r"brcd.clusters=81: must be <= 80, the images of the train split"):
        load_config(FMNIST, ["data.source=shards", f"data.shards_dir={shards}", "brcd.clusters=81"])


def _image_folder(root, per_class: dict):
    from PIL import Image

    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), color=i * 10).save(root / cls / f"{i}.png")
    return root


def _folder_overrides(root, tmp_path, *extra):
    return [
        "data.source=imagefolder",
        f"data.source_path={root}",
        f"data.shards_dir={tmp_path / 'shards'}",
        "data.in_chans=1",
        *extra,
    ]


def test_image_folder_with_one_class_is_refused(tmp_path):
    root = _image_folder(tmp_path / "folder", {"only": 6})
    with pytest.raises(ConfigError, match=r"data.source_path=.*holds 1 class folder\(s\); retrieval needs >= 2"):
        load_config(FMNIST, _folder_overrides(root, tmp_path, "data.train_per_class=2", "brcd.clusters=2"))


def test_train_per_class_above_what_a_class_holds_is_refused(tmp_path):
    # 10 images of 'a' and 5 of 'b'; 10% of each class (at least 1) is held out as queries: 'b' keeps 4
    root = _image_folder(tmp_path / "folder", {"a": 10, "b": 5})
    load_config(FMNIST, _folder_overrides(root, tmp_path, "data.train_per_class=4", "brcd.clusters=2"))
    with pytest.raises(ConfigError, match=r"data.train_per_class=5: must be <= 4, the training images of class 'b'"):
        load_config(FMNIST, _folder_overrides(root, tmp_path, "data.train_per_class=5", "brcd.clusters=2"))


def test_every_field_has_a_one_line_doc():
    import inspect

    for section in (f.type for f in dataclasses.fields(Config)):
        cls = getattr(config_module, section) if isinstance(section, str) else section
        src = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            line = next(x for x in src.splitlines() if x.strip().startswith(f"{f.name}:"))
            assert "#" in line, f"{cls.__name__}.{f.name} has no doc comment"


@pytest.mark.parametrize(
    "endpoint, shown",
    [("minio:9000", "minio:9000"), ("ftp://minio:9000", "ftp://minio:9000"), ("http://key:hunter2@minio:9000", "***")],
)
def test_s3_endpoint_must_be_an_http_url_without_credentials(endpoint, shown):
    with pytest.raises(ConfigError, match=r"train\.s3_endpoint=.*must be http\(s\)://HOST") as err:
        load_config(None, [f"train.s3_endpoint={endpoint}"])
    assert shown in str(err.value) and "hunter2" not in str(err.value) and "\n" not in str(err.value)


def test_s3_endpoint_accepts_an_http_url():
    assert load_config(None, ["train.s3_endpoint=https://minio.internal:9000"]).train.s3_endpoint.endswith(":9000")


@pytest.mark.parametrize("given", ["override", "file"])
def test_the_old_name_of_the_teacher_cache_still_works_with_a_one_line_notice(given, tmp_path, capsys):
    if given == "override":
        cfg = load_config(FMNIST, ["brcd.clustering_cache=/elsewhere"])
    else:
        path = tmp_path / "old.yaml"
        path.write_text("brcd:\n  alpha: 0.5\n  clustering_cache: /elsewhere\n")
        cfg = load_config(path)
        assert cfg.brcd.alpha == 0.5
    assert cfg.train.teacher_cache == "/elsewhere"
    err = capsys.readouterr().err
    assert err == "warning: brcd.clustering_cache is now train.teacher_cache (the old name still works; rename it)\n"


def test_the_new_name_wins_over_the_old_one():
    cfg = load_config(FMNIST, ["brcd.clustering_cache=/old", "train.teacher_cache=/new"])
    assert cfg.train.teacher_cache == "/new"
