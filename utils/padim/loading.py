"""A saved model made ready to score: the model file (or an exported graph) checked, then the training
pipeline rebuilt from it (backbone, weights, channel index, Gaussian, geometry). predict.py and
export.py both load through here; every refusal comes before any heavy work."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.images import IMAGENET_MEAN, IMAGENET_STD, Geometry
from utils.padim.anomaly_map import Thresholds
from utils.padim.backbone_specs import BACKBONES, hooked_layers
from utils.padim.backbones import WeightsError, build_extractor, weights_digest
from utils.padim.engines import EngineError, engine_extractor, engine_threads
from utils.padim.model import Padim
from utils.padim.model_file import (
    MODEL_FILENAME,
    ModelFileError,
    covariance_settings,
    load_model,
    model_variant,
    projection_from_content,
    stats_from_content,
)
from utils.padim.onnx_graph import GraphScorer, graph_engine

log = logging.getLogger("padim.predict")


class LoadError(Exception):
    """A model this code cannot score with: its file or folder, its backbone weights, or odd contents."""


# what reading and rebuilding a saved model can refuse with one line: every model CLI's user errors
LOAD_ERRORS = (LoadError, ModelFileError, WeightsError, EngineError)


@dataclass(frozen=True)
class LoadedModel:
    """A ready-to-score model and what the outputs need from its file.

    `scorer` is the rebuilt Padim, or an exported graph in ONNX Runtime or OpenVINO (`pixels`: it
    takes uint8 model-input pixels instead of normalised tensors); both stream anomaly maps alike.
    `identity` names what scores (the model file's checksum or the graph's sha256, and the engine
    that runs it): predict.py goes on from an earlier run's rows only for the same identity. `thresholds`:
    the image threshold decides, the map threshold draws regions (Thresholds); `image_score` says whether
    the two are one quantity (map_max).
    """

    scorer: Padim | GraphScorer
    geometry: Geometry
    thresholds: Thresholds
    image_score: str
    identity: dict

    @property
    def pixels(self) -> bool:
        return isinstance(self.scorer, GraphScorer)


def model_file(path: Path) -> Path:
    """The model file for --model; a run's results folder (above the class folders) gets a hint,
    not a bare 'missing'."""
    if path.is_dir() and not (path / MODEL_FILENAME).exists():
        classes = sorted(p.parent.name for p in path.glob(f"*/{MODEL_FILENAME}"))
        if classes:
            raise LoadError(
                f"{path} has no {MODEL_FILENAME} but its class folders do ({', '.join(classes)}): "
                f"pass one of them, e.g. --model {path / classes[0]}"
            )
    return path / MODEL_FILENAME if path.is_dir() else path


def weights_argument(weights_id: str, weights_path: Path | None) -> str:
    """build_extractor's `weights` for the model's weights id; a weights file must be byte-identical to training's."""
    if weights_id.startswith("file:"):
        name, expected = weights_id[len("file:") :].rsplit(":", 1)
        if weights_path is None:
            raise LoadError(
                f"the model was trained with the weights file {name} (sha256 {expected}...): "
                "pass that file with --weights PATH"
            )
        if not weights_path.is_file():
            raise LoadError(f"--weights {weights_path} is not a file")
        if weights_digest(weights_path) != expected:
            raise LoadError(
                f"--weights {weights_path} is not the file the model was trained with ({name}, sha256 {expected}...)"
            )
        return str(weights_path)
    if weights_path is not None:
        raise LoadError(f"--weights is only for models trained with a weights file; this one uses {weights_id!r}")
    if weights_id == "none":
        return "none"
    if weights_id.startswith("imagenet:"):
        return "imagenet"
    raise LoadError(f"unknown weights id {weights_id!r} in the model file")


def check_content(content: dict, path: Path) -> None:
    """Refuse a model this code cannot reproduce exactly, before any heavy work."""
    name = content["backbone"]
    if name not in BACKBONES:
        raise LoadError(f"{path}: backbone {name!r} is unknown to this version (known: {', '.join(sorted(BACKBONES))})")
    spec = BACKBONES[name]
    try:
        layers = hooked_layers(spec, content["layers"])
    except ValueError as err:
        raise LoadError(f"{path}: hooked layers {content['layers']}: {err}") from err
    if list(layers) != list(content["layers"]):
        raise LoadError(f"{path}: hooked layers {content['layers']} are not in {name}'s order")
    if not (
        np.allclose(content["normalization_mean"], IMAGENET_MEAN)
        and np.allclose(content["normalization_std"], IMAGENET_STD)
    ):
        raise LoadError(f"{path}: normalisation other than ImageNet mean/std is not supported")
    resize, cropsize, width = content["resize"], content["cropsize"], content["resize_width"]
    if not (
        isinstance(resize, int)
        and isinstance(cropsize, int)
        and resize >= 1
        and 0 <= cropsize <= resize
        and (width is None or (width >= 1 and cropsize == 0))
    ):
        raise LoadError(f"{path}: invalid resize {resize!r} / cropsize {cropsize!r} / resize_width {width!r}")
    index = torch.as_tensor(content["channel_index"])
    if index.numel() == 0 or int(index.min()) < 0:
        raise LoadError(f"{path}: channel index is empty or negative")
    try:
        stats_from_content(content)
        covariance_settings(content)
    except ModelFileError as err:
        raise LoadError(f"{path}: {err}") from err
    if content["weights_id"] == "none" and not isinstance(content["training_config"].get("seed"), int):
        raise LoadError(f"{path}: random-init model without the seed needed to rebuild its backbone")


def read_model(model_path: Path, weights_path: Path | None) -> tuple[dict, Path, str]:
    """The validated model file, its path and build_extractor's `weights`: every refusal comes before heavy work."""
    path = model_file(model_path)
    content = load_model(path)
    try:
        check_content(content, path)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as err:  # a well-typed entry with odd insides
        raise LoadError(f"{path}: malformed model file ({err})") from err
    return content, path, weights_argument(content["weights_id"], weights_path)


def build(
    content: dict,
    path: Path,
    weights: str,
    device: torch.device,
    batch_size: int,
    engine: str = "torch",
    precision: str = "fp32",
    workers: int = 0,
) -> LoadedModel:
    """Rebuild the training pipeline (backbone, weights, channel index or projection, Gaussian, neighbourhood, image
    score, geometry) from the model file,
    the backbone on `engine` (utils.padim.engines.engine_extractor).

    Distances are computed batch by batch (`batch_size` images together), not over run_experiment's
    groups of GROUP_IMAGES: each image's original stays in memory until its outputs are written, so a
    group would hold GROUP_IMAGES originals of the camera's resolution at once.
    """
    seed = content["training_config"].get("seed", 0)
    extractor, weights_id = build_extractor(content["backbone"], weights, device, seed, content["layers"])
    if weights_id.rsplit(":", 1)[-1] != content["weights_id"].rsplit(":", 1)[-1]:
        raise LoadError(
            f"the backbone weights here ({weights_id}) are not those the model was trained with "
            f"({content['weights_id']})"
        )
    geometry = Geometry(content["resize"], content["cropsize"], content["resize_width"])
    index = torch.as_tensor(content["channel_index"], dtype=torch.long)
    if int(index.max()) >= extractor.dims:
        raise LoadError(
            f"{path}: channel index does not fit the {extractor.dims} channels of {content['backbone']} "
            f"at stages {' '.join(content['layers'])}"
        )
    projection = projection_from_content(content)
    if projection is not None and projection.shape[0] != extractor.dims:
        raise LoadError(
            f"{path}: the projection's {projection.shape[0]} rows do not fit the {extractor.dims} channels of "
            f"{content['backbone']} at stages {' '.join(content['layers'])}"
        )
    variant = model_variant(content)
    trained_precision = content["training_config"].get("precision", "fp32")
    if trained_precision != precision:
        log.warning(
            "the model was fitted with its backbone in %s, it scores in %s here: its scores move",
            trained_precision,
            precision,
        )
    backbone = engine_extractor(extractor, engine, precision, device, geometry.input_size, weights_id, seed, workers)
    covariance, epsilon = covariance_settings(content)
    padim = Padim(
        backbone,
        index,
        geometry.input_size,
        device,
        torch.device("cpu"),
        device,
        images_together=batch_size,
        projection=projection,
        neighbourhood=variant["neighbourhood"],
        image_score=variant["image_score"],
        covariance=covariance,
        epsilon=epsilon,
    )
    padim.use(stats_from_content(content))
    log.info(
        "model %s: class %s, backbone %s (%s) on %s (%s), input %dx%d, crop %d, threshold %.4f (map %.4f) from %s",
        path,
        content["class_name"],
        content["backbone"],
        weights_id,
        backbone.engine,
        backbone.precision,
        *geometry.input_size,
        geometry.cropsize,
        content["threshold"],
        content["map_threshold"],
        content["threshold_provenance"].get("source", "?"),
    )
    identity = {"model_checksum": content["checksum"], "engine": backbone.engine, "precision": backbone.precision}
    thresholds = Thresholds(float(content["threshold"]), float(content["map_threshold"]))
    return LoadedModel(padim, geometry, thresholds, variant["image_score"], identity)


def build_graph(path: Path, description: dict, device: torch.device, engine: str, workers: int = 0) -> LoadedModel:
    """An exported graph in ONNX Runtime or OpenVINO (graph_engine), checked against its description
    (read_description)."""
    scorer = GraphScorer(path, description, device, graph_engine(path, engine), engine_threads(workers))
    log.info(
        "graph %s: class %s, backbone %s, input %dx%d, crop %d, threshold %.4f (map %.4f) (%s: %s)",
        path,
        description["class_name"],
        description["backbone"],
        *description["input_size"],
        description["cropsize"],
        description["threshold"],
        description["map_threshold"],
        scorer.engine,
        ", ".join(scorer.providers),
    )
    geometry = Geometry(description["resize"], description["cropsize"], description["resize_width"])
    identity = {"graph_sha256": description["graph_sha256"], "engine": scorer.engine}
    thresholds = Thresholds(float(description["threshold"]), float(description["map_threshold"]))
    return LoadedModel(scorer, geometry, thresholds, description["image_score"], identity)
