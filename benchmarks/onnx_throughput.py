"""Export time and size of each backbone's ONNX graph, and the graph in ONNX Runtime and OpenVINO against torch,
in images per second.

For every backbone: a model fitted on the first `--fit_images` training images of the class
(the graph's size does not depend on how many), exported with utils.padim.onnx_graph.export_graph
(timed), then the test images scored by torch (Padim, as predict.py runs it) and by the exported
graph in ONNX Runtime and in OpenVINO (float32), at each batch size, from the same decoded pixels. Decoding is
left out of both timings. Only efficientnet_lite0 loads ImageNet weights; the others run with
random weights, which cost the same.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datasets.files import list_images
from datasets.images import Geometry, ImageDataset, Sample
from utils.cli import at_least
from utils.config import DEFAULT_OPSET
from utils.padim.backbones import build_extractor
from utils.padim.embedding import channel_index
from utils.padim.engines import engine_threads
from utils.padim.model import Padim
from utils.padim.onnx_graph import GraphScorer, export_graph

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"
OFFLINE_PRETRAINED = {"efficientnet_lite0"}
GRAPH_ENGINES = ("onnxruntime", "openvino")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", type=Path, default=DEFAULT_DATA, help="one MVTec-layout class folder")
    parser.add_argument(
        "--backbones", nargs="+", default=["efficientnet_lite0", "resnet18", "wide_resnet50_2"], help="backbones"
    )
    parser.add_argument("--resize", type=at_least(1), default=256)
    parser.add_argument("--cropsize", type=int, default=224)
    parser.add_argument("--fit_images", type=at_least(2), default=64, help="training images the model is fitted on")
    parser.add_argument("--test_images", type=at_least(1), default=128, help="test images scored at each batch size")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--output", type=Path, help="also write the table to this CSV file")
    return parser


def pixels_and_inputs(paths: list[Path], geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, S, S, 3) pixels for the graph, normalised (N, 3, S, S) inputs for torch), same images."""
    pixels = ImageDataset([Sample(p, 0, "") for p in paths], geometry, pixels=True)
    inputs = ImageDataset([Sample(p, 0, "") for p in paths], geometry)
    return torch.stack([pixels[i][0] for i in range(len(paths))]), torch.stack(
        [inputs[i][0] for i in range(len(paths))]
    )


def images_per_second(score, batches: list) -> float:
    score(batches[0])  # warm-up: kernels for this shape
    start = time.perf_counter()
    for batch in batches:
        score(batch)
    return sum(len(batch) for batch in batches) / (time.perf_counter() - start)


def measure(backbone: str, args: argparse.Namespace, folder: Path) -> dict:
    geometry = Geometry(args.resize, args.cropsize)
    weights = "imagenet" if backbone in OFFLINE_PRETRAINED else "none"
    extractor, _ = build_extractor(backbone, weights, torch.device("cpu"))
    index = channel_index(extractor.dims, extractor.reduced_dim(None), 1024)
    padim = Padim(extractor, index, geometry.input_size, *[torch.device("cpu")] * 3)
    train = list_images(args.data_path / "train" / "good")[: args.fit_images]
    test = sorted(args.data_path.glob("test/*/*"))[: args.test_images]
    _, fit_inputs = pixels_and_inputs(train, geometry)
    padim.fit(fit_inputs.split(32))
    graph = folder / f"{backbone}.onnx"
    start = time.perf_counter()
    data = export_graph(padim, graph, DEFAULT_OPSET)
    export_s = time.perf_counter() - start
    size = graph.stat().st_size + (data.stat().st_size if data else 0)
    description, cpu = {"input_size": geometry.input_size}, torch.device("cpu")
    scorers = {engine: GraphScorer(graph, description, cpu, engine, engine_threads()) for engine in GRAPH_ENGINES}
    pixels, inputs = pixels_and_inputs(test, geometry)
    row = {"backbone": backbone, "export_s": round(export_s, 1), "size_mib": round(size / 2**20, 1)}
    for batch in args.batch_sizes:
        padim.images_together = batch
        row[f"torch_img_s_b{batch}"] = round(images_per_second(padim.anomaly_maps, list(inputs.split(batch))), 2)
        graph_batches = [np.ascontiguousarray(b.numpy()) for b in pixels.split(batch)]
        for engine, scorer in scorers.items():
            row[f"{engine}_img_s_b{batch}"] = round(images_per_second(scorer, graph_batches), 2)
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="padim-onnx-bench-") as folder:
        rows = [measure(backbone, args, Path(folder)) for backbone in args.backbones]
    table = pd.DataFrame(rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.test_images} test images")
    print(table.to_string(index=False))
    if args.output:
        table.to_csv(args.output, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
