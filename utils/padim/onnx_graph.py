"""A trained model as one portable ONNX graph, its description file, and scoring it with ONNX Runtime.

The graph takes uint8 RGB images (N, H, W, 3) already resized and cropped to the model input
size H x W, and returns `anomaly_map` (N, H, W) and `score` (N,): normalisation, the backbone up
to its last hooked stage, the channel choice (or projection), the centre-aligned resampling,
the neighbourhood mean, Mahalanobis with the stored factor, the up-sampling and blur, and the
model's image score, exactly as utils.padim.model computes them. The description
(`<graph stem>.json`) holds what a line application needs to prepare images and decide:
geometry, threshold (on `score`), map threshold (on `anomaly_map`: regions), the image score, class, and
the source model's checksum.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datasets.images import IMAGENET_MEAN, IMAGENET_STD
from utils.cli import first_line
from utils.padim.anomaly_map import MapOperator, image_scores, same_quantity
from utils.padim.embedding import chosen_channels, neighbourhood_mean, patch_embedding, projected_channels
from utils.padim.gaussian import mahalanobis
from utils.padim.model import Padim
from utils.padim.model_file import model_variant
from utils.padim.triangular import TriangularBlocks
from utils.runtime.output_files import atomic_write, file_sha256

ONNX_FORMAT = "padim-suite-onnx"
ONNX_FORMAT_VERSION = 3
READABLE_DESCRIPTION_VERSIONS = (1, 2, 3)  # version 1: square inputs only, `input_size` one number
MAP_THRESHOLD_SINCE = 3  # earlier map_max descriptions take their threshold as the map threshold
# protobuf cannot serialise a message over 2 GiB: larger graphs keep their weights in `<graph>.data`
EXTERNAL_DATA_BYTES = 2**31 - 2**26
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")


class OnnxModelError(Exception):
    """An exported model that cannot be used as it is: one line for the user."""


class PadimGraph(nn.Module):
    """utils.padim.model's scoring of uint8 (N, H, W, 3) images, as one module that exports to ONNX."""

    def __init__(self, padim: Padim):
        super().__init__()
        self.extractor = padim.extractor
        self.local_index = [local.cpu() for local in padim.local_index]
        self.projected = padim.level_rows is not None
        for k, rows in enumerate(padim.level_rows or []):
            self.register_buffer(f"projection_{k}", rows.cpu())
        self.neighbourhood = padim.neighbourhood
        self.image_score = padim.image_score
        self.factor_blocks = len(padim.stats.factor.blocks)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("mean", padim.stats.mean.cpu())
        for k, block in enumerate(padim.stats.factor.blocks):
            self.register_buffer(f"factor_{k}", block.cpu())
        self.register_buffer("map_rows", padim.map_operator.rows.cpu())
        self.register_buffer("map_cols", padim.map_operator.cols.cpu())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = images.permute(0, 3, 1, 2).to(torch.float32) / 255  # as the training transform's ToDtype(scale)
        normalised = (pixels - self.pixel_mean) / self.pixel_std
        feature_maps = self.extractor.maps(normalised)
        if self.projected:
            rows = [getattr(self, f"projection_{k}") for k in range(len(feature_maps))]
            chosen = projected_channels(feature_maps, rows)
        else:
            chosen = chosen_channels(feature_maps, self.local_index)
        embedding = neighbourhood_mean(patch_embedding(chosen, projected=self.projected), self.neighbourhood)
        factor = TriangularBlocks([getattr(self, f"factor_{k}") for k in range(self.factor_blocks)], lower=True)
        distances = mahalanobis(embedding, self.mean, factor, max_elements=None)
        anomaly_maps = MapOperator(self.map_rows, self.map_cols)(distances)
        return anomaly_maps, image_scores(anomaly_maps, distances, self.image_score)


def description_path(graph_path: Path) -> Path:
    """model.onnx -> model.json beside it."""
    return graph_path.with_suffix(".json")


EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """The ONNX exporter's INFO lines (its passes, one per rewrite) kept off the user's log meanwhile;
    its warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_graph(padim: Padim, graph_path: Path, opset: int) -> Path | None:
    """Write the graph (batch size dynamic); its weights go to `<graph>.data` when they exceed
    EXTERNAL_DATA_BYTES. Returns the external-data path, or None."""
    graph = PadimGraph(padim).eval()
    example = torch.zeros(2, *padim.input_size, 3, dtype=torch.uint8)
    weight_bytes = sum(t.numel() * t.element_size() for t in (*graph.parameters(), *graph.buffers()))
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with quiet_exporter():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    program.save(str(graph_path), external_data=external)
    data_path = graph_path.with_name(graph_path.name + ".data")
    return data_path if external else None


def export_openvino_graph(padim: Padim, xml_path: Path, opset: int) -> Path:
    """The same graph in OpenVINO's format: `<name>.xml` and its weights `<name>.bin`, converted from the
    ONNX export in full float32 (OpenVINO would otherwise store the weights in float16). Returns the .bin."""
    import openvino  # only this export needs it

    with tempfile.TemporaryDirectory(dir=xml_path.parent) as folder:
        onnx_path = Path(folder) / "graph.onnx"
        export_graph(padim, onnx_path, opset)
        converted = openvino.convert_model(str(onnx_path))
        staged = Path(folder) / xml_path.name
        openvino.save_model(converted, str(staged), compress_to_fp16=False)
        bin_path = xml_path.with_suffix(".bin")
        os.replace(staged.with_suffix(".bin"), bin_path)
        os.replace(staged, xml_path)
    return bin_path


def write_description(
    graph_path: Path, data_path: Path | None, content: dict, source: Path, input_size: tuple[int, int], opset: int
) -> Path:
    """model.json beside the graph: the geometry to prepare images with, the threshold to decide with, and
    where the model came from (`content`: the source model file's); read back by read_description."""
    import onnx  # only exporting needs it

    description = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "graph": graph_path.name,
        "graph_sha256": file_sha256(graph_path),
        "external_data": data_path.name if data_path else None,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["N", *input_size, 3],
            "layout": "NHWC, RGB",
        },
        "outputs": {OUTPUT_NAMES[0]: ["N", *input_size], OUTPUT_NAMES[1]: ["N"]},
        "preprocessing": "decode to 8-bit RGB; resize the short side to `resize` (bilinear, antialiased), then "
        "centre-crop `cropsize`; cropsize 0: resize to resize x resize, or to resize x resize_width (height x "
        "width) when resize_width is set",
        "decision": "anomalous when score > threshold; regions: anomaly_map pixels > map_threshold",
        **model_variant(content),
        "backbone": content["backbone"],
        "layers": content["layers"],
        "weights_id": content["weights_id"],
        "resize": content["resize"],
        "cropsize": content["cropsize"],
        "resize_width": content["resize_width"],
        "input_size": list(input_size),
        "threshold": content["threshold"],
        "map_threshold": content["map_threshold"],
        "threshold_provenance": content["threshold_provenance"],
        "class_name": content["class_name"],
        "source_model": source.name,
        "source_model_checksum": content["checksum"],
        "opset": opset,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    path = description_path(graph_path)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8"))
    return path


def read_description(graph_path: Path) -> dict:
    """The description beside an exported graph, checked against the graph file; OnnxModelError otherwise."""
    if not graph_path.is_file():
        raise OnnxModelError(f"{graph_path}: no such file")
    json_path = description_path(graph_path)
    if not json_path.is_file():
        raise OnnxModelError(f"{graph_path}: its description {json_path.name} is missing (export.py writes both)")
    try:
        description = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnnxModelError(f"{json_path}: not a readable description ({err})") from err
    if not isinstance(description, dict) or description.get("format") != ONNX_FORMAT:
        raise OnnxModelError(f"{json_path}: not a {ONNX_FORMAT} description")
    version = description.get("format_version")
    if version not in READABLE_DESCRIPTION_VERSIONS:
        raise OnnxModelError(
            f"{json_path}: description version {version}, this tool reads "
            f"{', '.join(map(str, READABLE_DESCRIPTION_VERSIONS))}; export the model again"
        )
    if version == 1:  # a square input, its side one number
        description = {**description, "resize_width": None, "input_size": [description.get("input_size")] * 2}
    if version < MAP_THRESHOLD_SINCE:
        image_score = description.setdefault("image_score", "map_max")
        if not same_quantity(image_score):
            raise OnnxModelError(
                f"{json_path}: description version {version} of a {image_score} model holds no map threshold, which "
                "regions need (its threshold is in grid units, not the map's); refit the model with "
                "run_experiment.py --save_distribution and export it again"
            )
        description["map_threshold"] = description.get("threshold")
    for key in ("threshold", "map_threshold"):
        value = description.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise OnnxModelError(f"{json_path}: {key} {value!r} is not a positive finite number")
    if description.get("graph") != graph_path.name or description.get("graph_sha256") != file_sha256(graph_path):
        raise OnnxModelError(f"{json_path}: does not describe {graph_path.name} (graph name or checksum differ)")
    data = description.get("external_data")
    if data is not None and not (graph_path.parent / data).is_file():
        raise OnnxModelError(f"{graph_path}: its weights file {data} is missing (it must lie beside the graph)")
    return description


GRAPH_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}  # an exported graph and the engine it runs in by default


def graph_engine(graph_path: Path, wanted: str) -> str:
    """The runtime that scores an exported graph: its format's (`auto`), or the one asked for; an OpenVINO
    graph (.xml) runs only in OpenVINO, and no graph runs in torch (score the model file for that)."""
    engine = GRAPH_SUFFIXES[graph_path.suffix] if wanted == "auto" else wanted
    if engine == "torch" or (graph_path.suffix == ".xml" and engine != "openvino"):
        raise OnnxModelError(
            f"--engine {wanted}: {graph_path.name} runs in {GRAPH_SUFFIXES[graph_path.suffix]}"
            + (" or openvino" if graph_path.suffix == ".onnx" else "")
            + " (to score in torch, pass the model file it was exported from)"
        )
    return engine


class GraphScorer:
    """An exported graph (.onnx, or OpenVINO's .xml) in ONNX Runtime or OpenVINO, scoring batches the way
    Padim.stream_anomaly_maps does; OpenVINO computes in float32 (INFERENCE_PRECISION_HINT f32)."""

    def __init__(self, graph_path: Path, description: dict, device: torch.device, engine: str, threads: int):
        self.engine = engine
        self.device = torch.device("cpu")
        try:
            run, inputs, outputs, self.providers = (
                _openvino_graph(graph_path, threads) if engine == "openvino" else _onnxruntime_graph(graph_path, device)
            )
        except ImportError as err:
            raise OnnxModelError(f"{engine} is not installed (pip install -r requirements.txt)") from err
        except Exception as err:  # each runtime raises its own exception types for a damaged graph
            kind = "OpenVINO" if graph_path.suffix == ".xml" else "ONNX"
            raise OnnxModelError(f"{graph_path}: not a usable {kind} graph ({engine}: {first_line(err)})") from err
        size = description["input_size"]
        if (
            [name for name, _, _ in inputs] != [INPUT_NAME]
            or inputs[0][1] != "uint8"
            or list(inputs[0][2][1:]) != [*size, 3]
            or tuple(outputs) != OUTPUT_NAMES
        ):
            raise OnnxModelError(f"{graph_path}: the graph's inputs or outputs do not match its description")
        self.run = run

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> (anomaly maps (N, H, W), scores (N,)), float32."""
        return self.run(images)

    def stream_anomaly_maps(self, batches):
        """(key, maps, scores) for every (key, uint8 images (N, H, W, 3)) batch, as torch tensors."""
        for key, images in batches:
            maps, scores = self(np.ascontiguousarray(images.numpy()))
            yield key, torch.from_numpy(maps), torch.from_numpy(scores)


def _onnxruntime_graph(graph_path: Path, device: torch.device):
    """(run, [(input name, dtype, shape)], output names, providers) of the graph in ONNX Runtime."""
    import onnxruntime  # only the exported-graph path needs it

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = onnxruntime.InferenceSession(str(graph_path), providers=providers)
    inputs = [(i.name, i.type.removeprefix("tensor(").removesuffix(")"), i.shape) for i in session.get_inputs()]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return maps, scores

    return run, inputs, [o.name for o in session.get_outputs()], session.get_providers()


def _openvino_graph(graph_path: Path, threads: int):
    """(run, [(input name, dtype, shape)], output names, providers) of the graph compiled by OpenVINO for the CPU."""
    import openvino  # only the OpenVINO path needs it

    core = openvino.Core()
    model = core.read_model(str(graph_path))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    inputs = [
        (
            i.get_any_name(),
            str(i.get_element_type().to_dtype()),
            [d.get_length() if d.is_static else None for d in i.get_partial_shape()],
        )
        for i in compiled.inputs
    ]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = request.infer({INPUT_NAME: images})
        return tuple(np.array(results[compiled.output(name)], copy=True) for name in OUTPUT_NAMES)

    return run, inputs, [o.get_any_name() for o in compiled.outputs], ["OpenVINO CPU"]
