"""Hash models (DESIGN §2 "Teacher"): timm backbones at 32x32x1, heads, frozen backbones, weights, checkpoints."""

import logging

import pytest
import timm
import torch
from torch import nn

from brcd_dist.config import Config, ModelConfig
from brcd_dist.models import (
    HashModel,
    build_hash_model,
    build_student,
    build_teacher,
    count_flops,
    load_hash_model,
    save_hash_model,
)


@pytest.mark.parametrize(
    "arch", ["resnet18", "resnet10t", "mobilenetv3_small_050", "efficientnet_b0", "vit_tiny_patch16_224"]
)
def test_timm_backbones_build_and_run_on_32px_grayscale(arch):
    model = HashModel(arch, bits=64, in_chans=1, img_size=32)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 64)
    codes = model.encode(x)
    assert codes.shape == (2, 64) and set(codes.unique().tolist()) <= {-1.0, 1.0}


def test_vit_below_224px_gets_64_tokens():
    model = HashModel("vit_tiny_patch16_224", bits=16, in_chans=1, img_size=32)
    assert model.backbone.patch_embed.patch_size == (4, 4)
    assert model.backbone.patch_embed.num_patches == 64
    assert model.spec["backbone_kwargs"] == {"img_size": 32, "patch_size": 4}


def test_mlp_head_is_feat_1000_1000_bits():
    model = HashModel("resnet10t", bits=32, in_chans=1, img_size=32, head="mlp")
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 1000), (1000, 1000), (1000, 32)]
    assert sum(isinstance(m, nn.ReLU) for m in model.head) == 2


def test_encode_is_sign_of_logits_and_restores_train_mode():
    torch.manual_seed(0)
    model = HashModel("resnet10t", bits=16, in_chans=1, img_size=32)
    x = torch.randn(4, 1, 32, 32)
    model.train()
    codes = model.encode(x)
    assert model.training and model.backbone.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(codes, torch.where(model(x) >= 0, 1.0, -1.0))
    assert not codes.requires_grad


def test_frozen_backbone_keeps_bn_in_eval_and_gets_no_gradient():
    torch.manual_seed(0)
    model = HashModel("resnet10t", bits=16, in_chans=1, img_size=32, frozen_backbone=True, head="mlp")
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    assert model.head.training
    stats = [bn.running_mean.clone() for bn in bns]
    model(torch.randn(8, 1, 32, 32)).pow(2).mean().backward()
    assert all(torch.equal(bn.running_mean, s) for bn, s in zip(bns, stats))
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_unfrozen_backbone_trains_bn():
    model = HashModel("resnet10t", bits=16, in_chans=1, img_size=32).train()
    assert all(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_save_load_round_trip_gives_identical_codes(tmp_path):
    torch.manual_seed(0)
    model = HashModel("vit_tiny_patch16_224", bits=32, in_chans=1, img_size=32, frozen_backbone=True, head="mlp")
    with torch.no_grad():  # move the head away from its init so that a fresh build would differ
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "teacher.pt"
    save_hash_model(model, path)
    loaded = load_hash_model(path)
    assert loaded.spec == model.spec
    x = torch.randn(6, 1, 32, 32)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert all(not p.requires_grad for p in loaded.backbone.parameters())


def test_hash_model_from_checkpoint_uri_must_match_the_config(tmp_path):
    path = tmp_path / "m.pt"
    save_hash_model(HashModel("resnet10t", bits=16, in_chans=1, img_size=32), path)
    assert build_hash_model(ModelConfig(uri=str(path)), 16, 1, 32).arch == "resnet10t"
    with pytest.raises(ValueError, match="bits"):
        build_hash_model(ModelConfig(uri=str(path)), 64, 1, 32)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_weights_path_loads_a_local_state_dict(tmp_path, wrap):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=10, in_chans=1)  # classifier: unexpected in a backbone
    sd = source.state_dict()
    ckpt = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / "backbone.pt"
    torch.save(ckpt, path)
    model = HashModel("resnet10t", bits=16, in_chans=1, img_size=32, weights_path=str(path))
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if k in own)


def test_weights_path_reports_missing_unexpected_and_adapts_rgb_stem(tmp_path, caplog):
    torch.manual_seed(2)
    sd = timm.create_model("resnet10t", num_classes=10, in_chans=3).state_dict()
    del sd["layer4.0.conv1.weight"]
    path = tmp_path / "rgb.pt"
    torch.save(sd, path)
    with caplog.at_level(logging.INFO, logger="brcd_dist.models"):
        model = HashModel("resnet10t", bits=16, in_chans=1, img_size=32, weights_path=str(path))
    stem = "conv1.0.weight"  # resnet10t's deep stem: first conv
    assert torch.allclose(model.backbone.state_dict()[stem], sd[stem].sum(1, keepdim=True))
    line = next(r.getMessage() for r in caplog.records if "backbone weights" in r.getMessage())
    assert "missing 1 ['layer4.0.conv1.weight']" in line
    assert "unexpected 2 ['fc.weight', 'fc.bias']" in line


def test_count_flops_by_hand_and_by_size():
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    assert count_flops(tiny, in_chans=1, img_size=4) == 2 * 16 * 3  # one multiply-add = 2 FLOPs
    small = HashModel("mobilenetv3_small_050", bits=64, in_chans=1, img_size=32)
    big = HashModel("resnet18", bits=64, in_chans=1, img_size=32)
    assert 0 < count_flops(small, 1, 32) < count_flops(big, 1, 32)
    assert big.training  # count_flops restores the mode


def test_teacher_and_student_factories_follow_the_config():
    cfg = Config()
    cfg.teacher = ModelConfig(name="resnet10t", head="mlp", frozen_backbone=True)
    cfg.student = ModelConfig(name="mobilenetv3_small_050")
    cfg.brcd.bits, cfg.data.in_chans, cfg.data.image_size = 32, 1, 32
    teacher, student = build_teacher(cfg), build_student(cfg)
    assert teacher.spec == {
        "arch": "resnet10t",
        "bits": 32,
        "in_chans": 1,
        "img_size": 32,
        "head": "mlp",
        "frozen_backbone": True,
        "backbone_kwargs": {},
    }
    assert (student.arch, student.head_type, student.frozen_backbone) == ("mobilenetv3_small_050", "linear", False)
    assert student(torch.randn(2, 1, 32, 32)).shape == (2, 32)
