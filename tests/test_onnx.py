"""export.py and predict.py --model model.onnx: the ONNX graph scores as the torch model does, and a
damaged export is one clear line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import export
import predict
import run_experiment
from datasets.images import ImageDataset, Sample
from tests.helpers import ROOT, TRAIN_FLAGS
from utils.padim import loading
from utils.padim import onnx_graph as onnx_model
from utils.padim.onnx_graph import description_path, read_description
from utils.runtime.output_files import file_sha256

pytestmark = pytest.mark.slow
ONNX_PREDICT_FLAGS = ["--device", "cpu", "--batch_size", "4"]
VARIANT_FLAGS = ["--projection", "semi_orthogonal", "--neighbourhood", "3", "--image_score", "grid_top_k_mean"]
CONFIGURATIONS = {  # backbone, weights, resize, crop, other flags
    "lite0_crop224": ("efficientnet_lite0", "imagenet", 256, 224, []),
    "lite0_crop0": ("efficientnet_lite0", "imagenet", 224, 0, []),
    "resnet18_crop224": ("resnet18", "none", 256, 224, []),
    "resnet18_crop0": ("resnet18", "none", 224, 0, []),
    "resnet18_variant": ("resnet18", "none", 224, 0, VARIANT_FLAGS),
}


def _train(
    texture_root: Path, results: Path, backbone: str, weights: str, resize: int, crop: int, other: list[str]
) -> Path:
    flags = list(TRAIN_FLAGS) + other
    flags += ["--model_architecture", backbone, "--weights", weights, "--resize", str(resize), "--cropsize", str(crop)]
    flags += ["--data_path", str(texture_root / "brick"), "--base_results_dir", str(results)]
    assert run_experiment.main(flags) == 0
    return results / "r" / "brick"


class Exports(dict):
    """Each configuration trained and exported once, when a test first asks: (class results folder, graph)."""

    def __init__(self, texture_root: Path, tmp_path_factory):
        super().__init__()
        self.texture_root, self.tmp_path_factory = texture_root, tmp_path_factory

    def __missing__(self, name: str) -> tuple[Path, Path]:
        if name.endswith(":openvino"):  # the ONNX export's model, exported again as OpenVINO's IR
            model_dir, _ = self[name.removesuffix(":openvino")]
            graph = self.tmp_path_factory.mktemp("openvino") / "model.xml"
            assert export.main(["--model", str(model_dir), "--output", str(graph), "--format", "openvino"]) == 0
            self[name] = (model_dir, graph)
            return self[name]
        folder = self.tmp_path_factory.mktemp(name)
        model_dir = _train(self.texture_root, folder / "results", *CONFIGURATIONS[name])
        graph = folder / "export" / "model.onnx"
        assert export.main(["--model", str(model_dir), "--output", str(graph)]) == 0
        self[name] = (model_dir, graph)
        return self[name]


@pytest.fixture(scope="module")
def exported(texture_root: Path, tmp_path_factory) -> Exports:
    return Exports(texture_root, tmp_path_factory)


def _batch(paths: list[Path], dataset_pixels: bool, loaded: loading.LoadedModel) -> torch.Tensor:
    dataset = ImageDataset([Sample(p, 0, "") for p in paths], loaded.geometry, pixels=dataset_pixels)
    return torch.stack([dataset[i][0] for i in range(len(paths))])


@pytest.mark.parametrize(
    "name", [*CONFIGURATIONS, "lite0_crop224:openvino", "resnet18_crop0:openvino", "resnet18_variant:openvino"]
)  # an .onnx graph in ONNX Runtime, an .xml one in OpenVINO
def test_exported_graph_scores_equal_torch(name: str, exported, texture_root: Path):
    """Same images: the graph's scores within 1e-4 relative of the torch model's, maps within 1e-3 of their range."""
    model_dir, graph = exported[name]
    content, path, weights = loading.read_model(model_dir, None)
    torch_model = loading.build(content, path, weights, torch.device("cpu"), batch_size=8)
    onnx_model_ = loading.build_graph(graph, read_description(graph), torch.device("cpu"), "auto")
    assert onnx_model_.scorer.engine == ("openvino" if graph.suffix == ".xml" else "onnxruntime")
    paths = sorted((texture_root / "brick" / "test").glob("*/*.png"))
    torch_maps, torch_scores = torch_model.scorer.anomaly_maps(_batch(paths, False, torch_model))
    onnx_maps, onnx_scores = onnx_model_.scorer(_batch(paths, True, onnx_model_).numpy())
    np.testing.assert_allclose(onnx_scores, torch_scores.numpy(), rtol=1e-4, atol=0)
    spread = float(torch_maps.max() - torch_maps.min())
    np.testing.assert_allclose(onnx_maps, torch_maps.numpy(), rtol=0, atol=1e-3 * spread)
    one, _ = onnx_model_.scorer(_batch(paths[:1], True, onnx_model_).numpy())  # any batch size
    np.testing.assert_allclose(one[0], onnx_maps[0], rtol=0, atol=1e-3 * spread)
    description = json.loads(description_path(graph).read_text())
    assert (
        description["threshold"] == content["threshold"]
        and description["map_threshold"] == content["map_threshold"]
        and description["input_size"] == [content["cropsize"] or content["resize"]] * 2
    )
    assert description["source_model_checksum"] == content["checksum"]
    variant = name.startswith("resnet18_variant")
    assert description["image_score"] == ("grid_top_k_mean" if variant else "map_max")
    assert description["projection"] == ("semi_orthogonal" if variant else "random")
    assert description["external_data"] == ("model.bin" if graph.suffix == ".xml" else None)


@pytest.mark.parametrize("name", ["lite0_crop224", "resnet18_crop0", "resnet18_crop0:openvino", "resnet18_variant"])
def test_predict_with_the_graph_writes_what_the_model_file_writes(name: str, exported, texture_root: Path, tmp_path):
    model_dir, graph = exported[name]
    inputs = ["--input", str(texture_root / "brick" / "test" / "*" / "*.png")]
    assert (
        predict.main(["--model", str(model_dir), *inputs, "--output", str(tmp_path / "pt"), *ONNX_PREDICT_FLAGS]) == 0
    )
    assert predict.main(["--model", str(graph), *inputs, "--output", str(tmp_path / "onnx"), *ONNX_PREDICT_FLAGS]) == 0
    pt, onnx = (pd.read_csv(tmp_path / kind / "predictions.csv") for kind in ("pt", "onnx"))
    assert list(pt.columns) == list(onnx.columns) and list(pt.path) == list(onnx.path)
    np.testing.assert_allclose(onnx.score, pt.score, rtol=1e-4)
    assert list(onnx.is_anomalous) == list(pt.is_anomalous) and (onnx.threshold == pt.threshold).all()
    assert (onnx.map_threshold == pt.map_threshold).all()  # regions drawn against the same map threshold
    for folder in ("heatmaps", "overlays"):
        assert sorted(p.name for p in (tmp_path / "pt" / folder).iterdir()) == sorted(
            p.name for p in (tmp_path / "onnx" / folder).iterdir()
        )


def test_large_graphs_keep_their_weights_beside_them(exported, texture_root: Path, tmp_path, monkeypatch, capsys):
    """Over the size limit (forced small here) the weights go to model.onnx.data, and that scores the same."""
    model_dir, small_graph = exported["resnet18_crop224"]
    monkeypatch.setattr(onnx_model, "EXTERNAL_DATA_BYTES", 1024)
    graph = tmp_path / "big" / "model.onnx"
    assert export.main(["--model", str(model_dir), "--output", str(graph)]) == 0
    data = graph.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > graph.stat().st_size
    assert json.loads(description_path(graph).read_text())["external_data"] == "model.onnx.data"
    inputs = ["--input", str(texture_root / "brick" / "test" / "*" / "*.png")]
    for which, path in (("small", small_graph), ("big", graph)):
        assert (
            predict.main(["--model", str(path), *inputs, "--output", str(tmp_path / which), *ONNX_PREDICT_FLAGS]) == 0
        )
    small, big = (pd.read_csv(tmp_path / which / "predictions.csv") for which in ("small", "big"))
    np.testing.assert_allclose(big.score, small.score, rtol=1e-6)
    data.rename(data.with_name("elsewhere.data"))
    capsys.readouterr()
    assert predict.main(["--model", str(graph), *inputs, "--output", str(tmp_path / "x"), *ONNX_PREDICT_FLAGS]) == 1
    assert "its weights file model.onnx.data is missing" in capsys.readouterr().err


def _copy_export(graph: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(graph, folder / graph.name)
    shutil.copy(description_path(graph), folder / description_path(graph).name)
    return folder / graph.name


def _broken_export(kind: str, graph: Path, folder: Path) -> Path:
    copy = _copy_export(graph, folder)
    description = json.loads(description_path(copy).read_text())
    if kind == "no_description":
        description_path(copy).unlink()
    elif kind == "not_json":
        description_path(copy).write_text("{ not json")
    elif kind == "other_graph":  # a description of another export
        description["graph_sha256"] = "0" * 64
        description_path(copy).write_text(json.dumps(description))
    elif kind == "wrong_size":  # sealed to this graph, but its geometry is not the graph's
        description["input_size"][1] += 8
        description_path(copy).write_text(json.dumps(description))
    elif kind == "corrupted_graph":  # damaged, then described as it is now: ONNX Runtime refuses it
        data = bytearray(copy.read_bytes())
        copy.write_bytes(bytes(data[: len(data) // 3]))
        description["graph_sha256"] = file_sha256(copy)
        description_path(copy).write_text(json.dumps(description))
    elif kind == "missing_graph":
        copy.unlink()
    return copy


BROKEN_EXPORTS = {
    "no_description": "its description model.json is missing",
    "not_json": "not a readable description",
    "other_graph": "does not describe model.onnx",
    "wrong_size": "inputs or outputs do not match its description",
    "corrupted_graph": "not a usable ONNX graph",
    "missing_graph": "no such file",
}


@pytest.mark.parametrize("kind", list(BROKEN_EXPORTS))
def test_broken_export_is_one_clear_line(kind: str, exported, texture_root: Path, tmp_path, capsys):
    graph = _broken_export(kind, exported["resnet18_crop0"][1], tmp_path / "export")
    inputs = ["--input", str(texture_root / "brick" / "test" / "good")]
    capsys.readouterr()
    assert predict.main(["--model", str(graph), *inputs, "--output", str(tmp_path / "out"), *ONNX_PREDICT_FLAGS]) == 1
    err = capsys.readouterr().err
    assert BROKEN_EXPORTS[kind] in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_readme_snippet_scores_one_image_without_torch(exported, texture_root: Path, tmp_path):
    """The deployment snippet the README links (onnxruntime + numpy + Pillow) runs as printed and gives
    the graph's score for an image already at the model input size."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "[docs/deploying.md](docs/deploying.md)" in readme[readme.index("## Deploying a model") :]
    page = (ROOT / "docs" / "deploying.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 15
    _, graph = exported["lite0_crop224"]
    image = sorted((texture_root / "brick" / "test").glob("*/*.png"))[-1]
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    guard = "import sys; sys.modules['torch'] = None; "  # importing torch would fail: the snippet must not need it
    run = subprocess.run(
        [sys.executable, "-c", guard + f"exec(open({str(script)!r}).read())", str(graph), str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    score = float(re.search(r"score ([0-9.]+)", run.stdout).group(1))
    loaded = loading.build_graph(graph, read_description(graph), torch.device("cpu"), "auto")
    maps, scores = loaded.scorer(_batch([image], True, loaded).numpy())
    reference = float(scores[0])
    assert abs(score - reference) <= 0.02 * reference  # Pillow's resize rounds a little differently from torchvision's
    pixels = int(re.search(r"(\d+) pixels above the map threshold", run.stdout).group(1))
    expected = int((np.asarray(maps[0]) > read_description(graph)["map_threshold"]).sum())
    assert expected > 0 and abs(pixels - expected) <= 0.02 * maps[0].size


def test_export_prints_a_few_lines_not_the_exporters_passes(exported, tmp_path, capfd):
    """The ONNX exporter logs one INFO line per pass; export.py shows what it wrote, and little else."""
    model_dir, _ = exported["resnet18_crop0"]
    capfd.readouterr()
    assert export.main(["--model", str(model_dir), "--output", str(tmp_path / "model.onnx")]) == 0
    printed = capfd.readouterr()
    lines = (printed.out + printed.err).splitlines()
    assert len(lines) <= 5 and any(line.startswith("graph: ") for line in lines), lines
