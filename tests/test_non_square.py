"""A height x width model input (--resize HxW, issue 34): a run on 1:2 parts end to end, predict.py and the
exported graph reproduce its scores, and the maps land where the defect lies in the original image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torchvision.transforms import v2

import export
import predict
import run_experiment
from datasets.images import Geometry
from tests.helpers import PREDICT_FLAGS, TRAIN_FLAGS
from utils.config import ModelConfig, RunConfig
from utils.padim.anomaly_map import to_original_resolution

HEIGHT, WIDTH = 40, 80  # the parts: 1:2, wider than high
DEFECT = (slice(14, 26), slice(46, 58))  # rows, columns of the planted square, off the image centre
NON_SQUARE_FLAGS = ["--resize", "32x64", "--cropsize", "0"]


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth random grey texture, HEIGHT x WIDTH x 3 uint8."""
    noise = ndimage.gaussian_filter(rng.normal(size=(HEIGHT, WIDTH)), 2.0)
    grey = 128 + 40 * noise / noise.std()
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """An MVTec class of 1:2 images: textures to train on, good ones and ones with a bright square at DEFECT."""
    root = tmp_path_factory.mktemp("tiles") / "tile"
    rng = np.random.default_rng(7)
    for folder, count in (("train/good", 24), ("test/good", 4), ("test/spot", 4)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            pixels = _texture(rng)
            if folder == "test/spot":
                pixels[DEFECT] = 250
                mask = np.zeros((HEIGHT, WIDTH), np.uint8)
                mask[DEFECT] = 255
                (root / "ground_truth/spot").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / f"ground_truth/spot/{i:03d}_mask.png")
            Image.fromarray(pixels).save(root / folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def non_square_run(tiles: Path, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("non_square_results")
    flags = [*TRAIN_FLAGS, *NON_SQUARE_FLAGS, "--data_path", str(tiles), "--base_results_dir", str(results)]
    assert run_experiment.main(flags) == 0
    return results / "r" / "tile"


def test_resize_height_by_width_needs_no_crop(capsys):
    with pytest.raises(SystemExit) as stop:
        run_experiment.parse_args(["--data_path", "x", "--resize", "256x512"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--resize 256x512 needs --cropsize 0" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        run_experiment.parse_args(["--data_path", "x", "--resize", "256x0", "--cropsize", "0"])
    config = run_experiment.parse_args(
        ["--data_path", "x", "--dataset", "mvtec", "--resize", "256", "256x512", "--cropsize", "0"]
    )
    square, wide = config.models
    assert (square.resize, square.resize_width, wide.resize, wide.resize_width) == (256, None, 256, 512)
    assert "resize_width" not in square.settings() and wide.settings()["resize_width"] == 512
    assert [config.results_folder(model).name for model in config.models] == [
        "mvtec_wide_resnet50_2_resize-256_crop-0",
        "mvtec_wide_resnet50_2_resize-256x512_crop-0",
    ]
    one = RunConfig(Path("x"), (ModelConfig(resize=32, cropsize=0, resize_width=64),))
    assert one.identity(one.models[0])["resize_width"] == 64


@pytest.mark.parametrize("height, width", [(40, 80), (37, 91), (91, 37)])
def test_projection_of_a_height_by_width_input_inverts_torchvision(height, width):
    """A coordinate ramp resized to 32 x 64 by torchvision comes back to the same coordinates at the original size."""
    geometry = Geometry(32, 0, 64)
    assert geometry.input_size == (32, 64) and geometry.resized_size(width, height) == (64, 32)
    for ramp in (
        torch.arange(width, dtype=torch.float32).add(0.5).expand(height, width)[None],
        torch.arange(height, dtype=torch.float32).add(0.5)[:, None].expand(height, width)[None],
    ):
        forward = geometry.spatial(v2.InterpolationMode.BILINEAR)(ramp)[0]
        assert forward.shape == (32, 64)
        back = to_original_resolution(forward, height, width, geometry)
        assert back.shape == (height, width)
        assert float((back - ramp[0]).abs().median()) < 0.05


def test_a_non_square_run_end_to_end(non_square_run: Path, tiles: Path, tmp_path: Path):
    """The model file records the geometry; predict.py reproduces the run's scores within 1e-4, and its maps at
    the original size peak on the planted square of each defect image."""
    content = torch.load(non_square_run / "padim_model.pt", weights_only=True)
    assert content["format_version"] == 8 and (content["resize"], content["resize_width"]) == (32, 64)
    assert content["grid"][1] == 2 * content["grid"][0]
    settings = json.loads((non_square_run.parent / "experiment.json").read_text())
    assert "resize_width" in json.dumps(settings) and "64" in json.dumps(settings)
    scores = pd.read_csv(non_square_run / "scores.csv")
    out = tmp_path / "out"
    flags = ["--model", str(non_square_run), "--input", str(tiles / "test" / "*" / "*.png"), "--output", str(out)]
    assert predict.main([*flags, "--threshold", "1e9", *PREDICT_FLAGS]) == 0
    predicted = pd.read_csv(out / "predictions.csv").set_index("path")
    for path, score in zip(scores.path, scores.score):
        assert abs(predicted.score[path] - score) <= 1e-4 * abs(score)
    for path in scores.path[scores.label == 1]:  # the region around each defect image's peak lies on the square
        spot = tmp_path / Path(path).stem
        one = ["--model", str(non_square_run), "--input", path, "--output", str(spot), "--min_region_area", "1"]
        assert predict.main([*one, "--threshold", str(0.99 * predicted.score[path]), *PREDICT_FLAGS]) == 0
        assert Image.open(spot / "heatmaps" / f"{Path(path).stem}.png").size == (WIDTH, HEIGHT)
        regions = pd.read_csv(spot / "regions.csv")
        peak = regions.loc[regions.peak_score.idxmax()]
        centre = (peak.y + peak.height / 2, peak.x + peak.width / 2)
        assert DEFECT[0].start <= centre[0] < DEFECT[0].stop and DEFECT[1].start <= centre[1] < DEFECT[1].stop


@pytest.mark.slow
def test_the_exported_graph_of_a_non_square_model_reproduces_its_scores(non_square_run: Path, tiles: Path, tmp_path):
    graph = tmp_path / "deploy" / "model.onnx"
    assert export.main(["--model", str(non_square_run), "--output", str(graph)]) == 0
    description = json.loads(graph.with_suffix(".json").read_text())
    assert description["input"]["shape"] == ["N", 32, 64, 3] and description["input_size"] == [32, 64]
    out = tmp_path / "out"
    flags = ["--model", str(graph), "--input", str(tiles / "test" / "*" / "*.png"), "--output", str(out)]
    assert predict.main([*flags, *PREDICT_FLAGS]) == 0
    predicted = pd.read_csv(out / "predictions.csv").set_index("path")
    scores = pd.read_csv(non_square_run / "scores.csv")
    for path, score in zip(scores.path, scores.score):
        assert abs(predicted.score[path] - score) <= 1e-4 * abs(score)
