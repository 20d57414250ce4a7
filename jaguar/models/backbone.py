"""The timm backbone of a ReID model: built by name (offline-safe pretrained loading), with its
output turned into a channels-first feature grid plus the class token for token models (ViT, EVA)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from jaguar.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

_HUB_TIMEOUT_S = 2.0


class BackboneFeatures(NamedTuple):
    # a named tuple, not a dataclass: DeepSpeed ZeRO-3 hooks a module's backward through the tensors of
    # its output, which it finds in tuples, lists and dicts only
    grid: torch.Tensor  # B x C x h x w (patch tokens reshaped to their grid for token models)
    cls_token: Optional[torch.Tensor]  # B x C, the first prefix token of token models, else None


def hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> bool:
    """True when HF_HUB_OFFLINE is unset and the hub host accepts a TCP connection within `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # DNS resolution ignores the socket timeout, so the whole probe runs in a thread we stop waiting for.
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline_mode(offline: bool) -> Iterator[None]:
    """Make huggingface_hub fail at once instead of retrying a network it does not have."""
    if not offline:
        yield
        return
    from huggingface_hub import constants as hub_constants

    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_const = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    # huggingface_hub reads the variable once at import, so the module constant is patched too.
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_const
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _create_timm_model(name: str, model_cfg: ModelConfig, **kwargs) -> tuple[nn.Module, bool]:
    """timm.create_model, passing img_size/dynamic_img_size only to models that accept them; returns
    (model, whether it takes any input size: a CNN, or a token model with dynamic_img_size)."""
    size_kwargs = [dict(img_size=tuple(model_cfg.img_size), dynamic_img_size=True),
                   dict(img_size=tuple(model_cfg.img_size)), {}]
    for extra in size_kwargs:
        try:
            net = timm.create_model(name, num_classes=0, **extra, **kwargs)
            return net, extra.get("dynamic_img_size", not extra)
        except TypeError as err:
            # CNNs reject these keywords in __init__, before any weights are allocated or downloaded.
            if "unexpected keyword" not in str(err) or not any(k in str(err) for k in extra):
                raise
    raise AssertionError("unreachable: the last attempt passes no size keywords")


def _set_last_stride_one(net: nn.Module, name: str) -> None:
    """BoT: layer4 keeps the layer3 resolution (first block's strided conv and shortcut to stride 1)."""
    layer4 = getattr(net, "layer4", None)
    if layer4 is None:
        raise ConfigError(f"model.last_stride=1 needs a ResNet-style backbone with a layer4; "
                          f"model.backbone={name} has none (set model.last_stride=2)")
    first_block = layer4[0]
    for module_name, module in first_block.named_modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module_name.startswith("downsample"):
            # ResNet-D shortcuts downsample with a pool before the 1x1 conv.
            parent = first_block.downsample
            for index, child in enumerate(parent):
                if child is module:
                    parent[index] = nn.Identity()


class Backbone(nn.Module):
    """A timm model without classifier; forward returns BackboneFeatures.

    `any_size`: whether the network takes inputs of other sizes than model.img_size (CNNs; ViTs built
    with timm's dynamic_img_size, whose position embeddings are interpolated); relative-position ViTs
    (BEiT, vit_relpos) do not. `size_multiple`: the patch size of token models (1 for CNNs), which
    an input side must be a multiple of. `dropped`: the timm layers forward_features never reaches
    (e.g. MobileNetV3's conv_head, used only by its classifier path), removed so that every parameter
    left is trained (DDP expects a gradient for each; timm#1406)."""

    def __init__(self, net: nn.Module, name: str, any_size: bool = True,
                 probe_size: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.any_size = any_size
        patch_size = getattr(getattr(net, "patch_embed", None), "patch_size", None)
        self.size_multiple = int(max(patch_size)) if patch_size else 1
        self.num_features = int(net.num_features)
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0))
        self.output_fmt = str(getattr(net, "output_fmt", "NCHW"))
        # timm applies these final norms after its own pooling (forward_head); we pool ourselves,
        # so they are applied per position to keep the pretrained norm in use (and its params trained).
        fc_norm = getattr(net, "fc_norm", None)
        self.token_norm = fc_norm if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity) else None
        head_norm = getattr(getattr(net, "head", None), "norm", None)
        self.grid_norm = head_norm if isinstance(head_norm, timm.layers.LayerNorm2d) else None
        # (the module whose forward runs, the parameter it reads of a module whose forward does not):
        # e.g. the ViT's own pos_embed (forward_features is no forward) or EVA's qkv.weight
        self.external_params: list[tuple[str, str]] = []
        self.dropped: list[str] = self._drop_unreached(probe_size) if probe_size else []

    def _drop_unreached(self, size: tuple[int, int]) -> list[str]:
        """Replace by nn.Identity each timm layer none of whose parameters gets a gradient from one
        forward of a 1-image batch of `size` (eval mode); returns their names in `net`. Found by
        autograd, not by call hooks: some timm blocks read a child's weight without calling it
        (those reads are noted in `external_params`, for DeepSpeed ZeRO-3)."""
        was_training = self.training
        saved = {name: param.grad for name, param in self.net.named_parameters()}
        called: set[int] = set()
        hooks = [module.register_forward_pre_hook(lambda module, args: called.add(id(module)))
                 for module in self.modules()]
        try:
            self.eval()
            with torch.enable_grad():
                for param in self.net.parameters():
                    param.grad = None
                out = self.forward(torch.zeros(1, 3, *size))
                total = out.grid.float().sum() + (out.cls_token.float().sum() if out.cls_token is not None else 0)
                total.backward()
            used = {name for name, param in self.net.named_parameters() if param.grad is not None}
        finally:
            for hook in hooks:
                hook.remove()
            for name, param in self.net.named_parameters():
                param.grad = saved[name]
            self.train(was_training)
        modules = dict(self.named_modules())
        for name in sorted(used):
            owner = "net." + name.rsplit(".", 1)[0] if "." in name else "net"
            if id(modules[owner]) in called:
                continue
            runner = owner
            while runner and id(modules[runner]) not in called:
                runner = runner.rsplit(".", 1)[0] if "." in runner else ""
            self.external_params.append((runner, "net." + name))
        dropped: list[str] = []
        for name, module in self.net.named_modules():
            if not name or any(name.startswith(d + ".") for d in dropped):
                continue
            params = [f"{name}.{sub}" for sub, param in module.named_parameters() if param.requires_grad]
            if params and not any(p in used for p in params):
                dropped.append(name)
        for name in dropped:
            self.net.set_submodule(name, nn.Identity())
        if dropped:
            logger.info("backbone %s: dropped %s (not reached by forward_features; no use without "
                        "timm's classifier)", self.name, ", ".join(dropped))
        return dropped

    def data_config(self) -> dict:
        return timm.data.resolve_model_data_config(self.net)

    def _token_grid(self, image_size: tuple[int, int], num_patches: int) -> tuple[int, int]:
        patch_embed = getattr(self.net, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            grid = tuple(patch_embed.dynamic_feat_size(image_size))
        else:
            side = int(round(num_patches ** 0.5))
            grid = (side, side)
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"backbone {self.name}: {num_patches} patch tokens do not form the "
                             f"{grid[0]}x{grid[1]} grid expected for input {image_size}")
        return grid

    def forward(self, images: torch.Tensor) -> BackboneFeatures:
        out = self.net.forward_features(images)
        if out.ndim == 3:
            if self.token_norm is not None:
                out = self.token_norm(out)
            cls_token = out[:, 0] if self.num_prefix_tokens > 0 else None
            patches = out[:, self.num_prefix_tokens:]
            height, width = self._token_grid(tuple(images.shape[-2:]), patches.shape[1])
            grid = patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], height, width)
            return BackboneFeatures(grid=grid, cls_token=cls_token)
        if out.ndim != 4:
            raise ValueError(f"backbone {self.name}: forward_features gave shape {tuple(out.shape)}; "
                             f"expected B x C x H x W or B x N x C")
        if self.output_fmt == "NHWC":
            out = out.permute(0, 3, 1, 2)
        if self.grid_norm is not None:
            out = self.grid_norm(out)
        return BackboneFeatures(grid=out, cls_token=None)


def build_backbone(model_cfg: ModelConfig, load_pretrained: bool = True) -> Backbone:
    """Create `model.backbone` from timm, loading pretrained weights from the hub or a local file
    (not with load_pretrained=False: the weights will come from a checkpoint, so the original
    pretrained file need not exist any more)."""
    name = model_cfg.backbone
    if not timm.models.is_model(name):
        raise ConfigError(f"model.backbone={name} is not a timm model; see `timm.list_models('*pattern*')`")
    kwargs: dict = {}
    offline = False
    if not load_pretrained:
        pass
    elif model_cfg.pretrained_file:
        path = Path(model_cfg.pretrained_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained_file={path} does not exist; give the path of a weights "
                              f"file (.safetensors/.pth) for {name}, or set model.pretrained_file=''")
        if not model_cfg.pretrained:
            logger.info("model.pretrained_file is set: loading %s although model.pretrained=false", path)
        kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    elif model_cfg.pretrained:
        started = time.monotonic()
        offline = not hub_reachable()
        logger.info("weights hub %s (checked in %.1fs)", "unreachable" if offline else "reachable",
                    time.monotonic() - started)
        kwargs = dict(pretrained=True)
    try:
        with _hub_offline_mode(offline):
            net, any_size = _create_timm_model(name, model_cfg, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # timm/hub/torch raise many types; the user needs one actionable line
        if not kwargs:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if model_cfg.pretrained_file:
            raise ConfigError(f"could not load model.pretrained_file={model_cfg.pretrained_file} into "
                              f"{name}: {reason}") from err
        where = "the hub is unreachable (offline)" if offline else "the download failed"
        raise ConfigError(f"pretrained weights for model.backbone={name} are not available: {where} "
                          f"({type(err).__name__}: {reason[:200]}). Download them on a connected machine "
                          f"and pass model.pretrained_file=/path/to/weights.safetensors, "
                          f"or set model.pretrained=false") from err
    if model_cfg.last_stride == 1:
        _set_last_stride_one(net, name)
    if model_cfg.grad_checkpointing:
        net.set_grad_checkpointing(True)
    return Backbone(net, name, any_size, probe_size=tuple(model_cfg.img_size))
