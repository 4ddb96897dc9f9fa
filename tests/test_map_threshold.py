"""The map threshold: regions, areas and masks are drawn against the same quantile of the held-out good images'
map maxima, so a model whose image score is not the map's maximum (grid_max) draws regions where it calls an
image anomalous; map_max models have one threshold; files that predate it load or are refused as documented."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.measure import label

import export
import predict
from datasets.images import ImageDataset, Sample
from tests.helpers import PREDICT_FLAGS, Trained
from utils.padim.anomaly_map import to_original_resolution
from utils.padim.loading import LoadedModel, build, read_model
from utils.padim.model_file import content_checksum, load_model
from utils.padim.onnx_graph import OnnxModelError, read_description

CPU = torch.device("cpu")


def _loaded(model_dir: Path) -> tuple[dict, LoadedModel]:
    content, path, weights = read_model(model_dir, None)
    return content, build(content, path, weights, CPU, batch_size=8)


def _maps(model: LoadedModel, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(maps at the model input, image scores) of `paths`, one batch through the rebuilt model."""
    dataset = ImageDataset([Sample(path, 0, "") for path in paths], model.geometry)
    maps, scores = model.scorer.anomaly_maps(torch.stack([dataset[i][0] for i in range(len(paths))]))
    return maps.numpy(), scores.numpy()


def test_the_map_threshold_is_the_quantile_of_the_held_out_images_map_maxima(grid_max_model: Path):
    """Recomputed from the recorded threshold images' maps with numpy: the image threshold is the quantile of
    their grid_max scores, the map threshold the same quantile of their maps' maxima, and they differ (the raw
    grid peaks higher than the blurred map), so the image threshold cannot stand in for the map's."""
    content, model = _loaded(grid_max_model)
    paths = [Path(path) for path, _ in content["threshold_images"]]
    assert len(paths) == content["threshold_provenance"]["n_images"] >= 2
    maps, scores = _maps(model, paths)
    quantile = content["threshold_provenance"]["quantile"]
    assert content["threshold"] == pytest.approx(np.quantile(scores, quantile), rel=1e-5)
    assert content["map_threshold"] == pytest.approx(np.quantile(maps.max(axis=(1, 2)), quantile), rel=1e-5)
    assert content["threshold"] > 1.05 * content["map_threshold"]
    row = pd.read_csv(grid_max_model.parent / "master_results.csv").iloc[0]
    assert (row.optimal_threshold, row.map_threshold) == pytest.approx(
        (content["threshold"], content["map_threshold"]), rel=1e-5
    )


def test_a_map_max_model_has_one_threshold(trained: Trained):
    content = load_model(trained.model_dir / "padim_model.pt")
    assert content["training_config"].get("image_score", "map_max") == "map_max"
    assert content["map_threshold"] == content["threshold"] == trained.threshold


def test_predict_draws_a_grid_max_models_regions_against_its_map_threshold(
    grid_max_model: Path, texture_root: Path, tmp_path: Path
):
    """predictions.csv's area and region count, and the mask, are those of the map at the original resolution
    above the map threshold (labelled by skimage, 8-connected); the call stays score > threshold. Against the
    grid threshold (the rule before the map threshold) the areas differ: anomalous images lose their regions."""
    content, model = _loaded(grid_max_model)
    paths = sorted((texture_root / "brick" / "test").glob("*/*.png"))
    out = tmp_path / "out"
    flags = ["--model", str(grid_max_model), "--output", str(out), "--save_masks", *PREDICT_FLAGS]
    assert predict.main([*flags, *[arg for path in paths for arg in ("--input", str(path))]]) == 0
    with (out / "predictions.csv").open(newline="") as handle:
        rows = {Path(row["path"]): row for row in csv.DictReader(handle)}
    maps, _ = _maps(model, paths)
    map_threshold, lost = content["map_threshold"], 0
    for path, amap in zip(paths, maps):
        row = rows[path]
        assert float(row["threshold"]) == pytest.approx(content["threshold"])
        assert float(row["map_threshold"]) == pytest.approx(map_threshold)
        assert row["is_anomalous"] == str(float(row["score"]) > content["threshold"])
        width, height = Image.open(path).size
        full = to_original_resolution(torch.from_numpy(amap), height, width, model.geometry).numpy()
        clear = np.abs(full - map_threshold) > 1e-4 * map_threshold  # pixels no float rounding can flip
        above = full > map_threshold
        mask = np.asarray(Image.open(out / "masks" / row["output_name"])) == 255
        assert np.array_equal(mask[clear], above[clear])
        assert int(row["anomalous_area_px"]) == mask.sum()
        labels = label(mask, connectivity=2)
        areas = np.bincount(labels.ravel())[1:]
        assert int(row["n_regions"]) == int((areas >= 25).sum())  # PredictConfig.min_region_area
        missed = (full > content["threshold"]).sum() == 0  # the grid threshold on the map: no region at all
        lost += row["is_anomalous"] == "True" and missed and int(row["n_regions"]) > 0
    assert lost > 0

    moved = tmp_path / "moved"
    one = paths[-1]
    assert (
        predict.main(
            [
                "--model",
                str(grid_max_model),
                "--output",
                str(moved),
                "--input",
                str(one),
                "--save_masks",
                "--threshold",
                "1.0",
                *PREDICT_FLAGS,
            ]
        )
        == 0
    )
    [row] = pd.read_csv(moved / "predictions.csv").to_dict("records")
    assert row["threshold"] == 1.0 and row["is_anomalous"]
    assert row["map_threshold"] == pytest.approx(map_threshold)  # a grid score's threshold leaves the map's
    assert row["anomalous_area_px"] == int(rows[one]["anomalous_area_px"])


def _older(content: dict, version: int, path: Path) -> Path:
    """`content` as a file of `version` wrote it: no map threshold, sealed with a matching checksum."""
    old = {key: value for key, value in content.items() if key not in ("map_threshold", "checksum")}
    old["format_version"] = version
    old["checksum"] = content_checksum(old)
    path.parent.mkdir(parents=True)
    torch.save(old, path)
    return path


def test_files_before_the_map_threshold_load_when_map_max_and_are_refused_for_a_grid_score(
    trained: Trained, grid_max_model: Path, texture_root: Path, tmp_path: Path, capsys
):
    """Version 7: a map_max file takes its threshold (the same quantity); a grid_max file's threshold is in
    other units, and its map threshold cannot be known without the held-out maps: predict.py and export.py
    refuse it with one line that says to refit."""
    plain = torch.load(trained.model_dir / "padim_model.pt", weights_only=True)
    assert load_model(_older(plain, 7, tmp_path / "map_max" / "padim_model.pt"))["map_threshold"] == plain["threshold"]
    grid = _older(torch.load(grid_max_model / "padim_model.pt", weights_only=True), 7, tmp_path / "grid" / "x.pt")
    image = str(texture_root / "brick" / "test" / "good" / "000.png")
    capsys.readouterr()
    assert predict.main(["--model", str(grid), "--input", image, "--output", str(tmp_path / "o"), *PREDICT_FLAGS]) == 1
    assert export.main(["--model", str(grid), "--output", str(tmp_path / "g" / "model.onnx")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and not (tmp_path / "o").exists() and not (tmp_path / "g" / "model.onnx").exists()
    for line in lines:
        assert line.startswith("error: ") and "version 7 with image score 'grid_max' holds no map threshold" in line
        assert line.endswith("refit it with run_experiment.py --save_distribution")


@pytest.mark.parametrize(
    "version, image_score, map_threshold, refusal",
    [
        (2, "map_max", None, None),
        (1, None, None, None),
        (2, "grid_max", None, "description version 2 of a grid_max model holds no map threshold"),
        (3, "grid_max", 2.5, None),
        (3, "grid_max", None, "map_threshold None is not a positive finite number"),
        (3, "grid_max", -1.0, "map_threshold -1.0 is not a positive finite number"),
    ],
)
def test_graph_descriptions_before_the_map_threshold(version, image_score, map_threshold, refusal, tmp_path: Path):
    """model.json of versions 1 and 2 (no map threshold): map_max ones take their threshold, grid ones are
    refused; version 3 needs a positive map threshold."""
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"a graph")
    description = {"format": "padim-suite-onnx", "format_version": version, "graph": graph.name, "threshold": 4.0}
    description["graph_sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    description |= {"input_size": 56} if version == 1 else {"input_size": [56, 56]}
    description |= {"image_score": image_score} if image_score else {}
    description |= {"map_threshold": map_threshold} if map_threshold is not None else {}
    graph.with_suffix(".json").write_text(json.dumps(description))
    if refusal:
        with pytest.raises(OnnxModelError, match=refusal):
            read_description(graph)
    else:
        read = read_description(graph)
        assert read["map_threshold"] == (map_threshold or 4.0)
