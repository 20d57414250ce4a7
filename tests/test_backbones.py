"""Backbones by name: ViT/EVA/ResNet shapes, last stride, img_size, pretrained loading from a local file,
and the fast, actionable offline error."""

import time

import pytest
import torch
from safetensors.torch import save_file

from jaguar.config import ConfigError, load_config
from jaguar.models import build_model
from jaguar.models.backbone import build_backbone


def cfg_for(backbone: str, *overrides: str):
    return load_config(None, [f"model.backbone={backbone}", *overrides])


@pytest.fixture(scope="module")
def eva02_large():
    # ~300M parameters: built once, used only for one tiny forward.
    return build_model(cfg_for("eva02_large_patch14_448", "model.img_size=[28,28]"), 3).eval()


@pytest.mark.slow
def test_eva02_large_builds_and_embeds_at_tiny_size(eva02_large):
    with torch.no_grad():
        embedding = eva02_large.embed(torch.randn(2, 3, 28, 28))
    assert embedding.shape == (2, 1024) and eva02_large.embed_dim == 1024
    assert torch.isfinite(embedding).all()
    assert eva02_large.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP statistics
    assert eva02_large.backbone.num_prefix_tokens == 1


@pytest.mark.slow
def test_resnet152_builds_and_embeds():
    model = build_model(cfg_for("resnet152"), 3).eval()
    with torch.no_grad():
        embedding = model.embed(torch.randn(2, 3, 56, 56))
    assert embedding.shape == (2, 2048)
    assert model.mean == pytest.approx((0.485, 0.456, 0.406))


def test_resnet50_last_stride_one_doubles_the_feature_map():
    images = torch.randn(2, 3, 56, 56)
    grids = {}
    for stride in (2, 1):
        backbone = build_backbone(cfg_for("resnet50", f"model.last_stride={stride}").model).eval()
        with torch.no_grad():
            grids[stride] = backbone(images).grid
    assert grids[2].shape == (2, 2048, 2, 2)
    assert grids[1].shape == (2, 2048, 4, 4)


def test_last_stride_on_a_non_resnet_is_a_config_error():
    with pytest.raises(ConfigError, match="model.last_stride"):
        build_backbone(cfg_for("test_vit", "model.last_stride=1").model)


def test_img_size_reaches_vit_and_grad_checkpointing_is_set():
    backbone = build_backbone(cfg_for("test_vit", "model.img_size=[32,64]", "model.grad_checkpointing=true").model)
    assert tuple(backbone.net.patch_embed.img_size) == (32, 64)
    assert backbone.net.grad_checkpointing
    assert backbone(torch.randn(1, 3, 32, 64)).grid.shape[-2:] == (2, 4)


def test_eva02_tiny_dynamic_size_and_cls_pooling():
    model = build_model(cfg_for("eva02_tiny_patch14_224", "model.img_size=[28,42]", "model.pooling=cls"), 2).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(2, 3, 28, 42))
        embedding = model.embed(torch.randn(2, 3, 28, 42))
    assert features.grid.shape == (2, 192, 2, 3)
    assert embedding.shape == (2, 192)


def test_pretrained_file_loads_identical_backbone_weights(tmp_path):
    torch.manual_seed(1)
    source = build_backbone(cfg_for("test_resnet").model)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = build_backbone(cfg_for("test_resnet", "model.pretrained=true", f"model.pretrained_file={path}").model)
    torch.manual_seed(3)
    fresh = build_backbone(cfg_for("test_resnet").model)
    source_state, loaded_state = source.net.state_dict(), loaded.net.state_dict()
    assert source_state.keys() == loaded_state.keys()
    for key in source_state:
        assert torch.equal(source_state[key], loaded_state[key]), key
    first_weight = next(k for k in source_state if k.endswith("weight"))
    assert not torch.equal(fresh.net.state_dict()[first_weight], loaded_state[first_weight])


def test_missing_pretrained_file_names_key_and_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match="model.pretrained_file") as err:
        build_backbone(cfg_for("test_resnet", f"model.pretrained_file={missing}").model)
    assert str(missing) in str(err.value)


def test_offline_pretrained_fails_fast_with_instructions(monkeypatch, tmp_path):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    before = hub_constants.HF_HUB_OFFLINE
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        build_backbone(cfg_for("test_resnet", "model.pretrained=true").model)
    assert time.monotonic() - started < 5.0
    assert "model.pretrained_file=" in str(err.value) and "test_resnet" in str(err.value)
    assert hub_constants.HF_HUB_OFFLINE == before


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="model.backbone=resnet_does_not_exist"):
        build_backbone(cfg_for("resnet_does_not_exist").model)
