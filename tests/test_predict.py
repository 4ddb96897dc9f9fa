"""predict.py: the scores run_experiment computed, outputs at the original resolution, clear refusals."""

from __future__ import annotations

import csv
import hashlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torchvision.transforms import v2

import predict
import prediction
from datasets.images import Geometry
from tests.helpers import PREDICT_FLAGS, ROOT, Trained
from utils.padim.anomaly_map import to_original_resolution
from utils.padim.backbones import load_backbone
from utils.padim.model_file import content_checksum, save_model
from utils.reporting.images import OUTLINE_COLOUR, blend_overlay, heat_colour_table


class MarkerPayload:
    """Unpickled by plain pickle, this creates `path`: the file a safe loader must never let appear."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def read_rows(out_dir: Path) -> list[dict]:
    with (out_dir / "predictions.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """predict.py as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_overlay_is_the_rounded_half_mix():
    image = np.array([[[10, 0, 255]]], dtype=np.uint8)
    heat = np.array([[[13, 255, 0]]], dtype=np.uint8)
    assert blend_overlay(image, heat).tolist() == [[[12, 128, 128]]]


def test_projection_tiny_case_by_hand():
    """4x8 image, resize 2, crop 2: resized 2x4, crop left 1, so only original columns 2..5 are covered."""
    geometry = Geometry(2, 2)
    assert geometry.resized_size(8, 4) == (4, 2) and geometry.crop_origin(8, 4) == (0, 1)
    projected = to_original_resolution(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 4, 8, geometry)
    inside = torch.tensor(
        [[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]]
    )
    expected = torch.zeros(4, 8)
    expected[:, 2:6] = inside
    torch.testing.assert_close(projected, expected)
    stretched = to_original_resolution(torch.full((2, 2), 7.0), 3, 5, Geometry(2, 0))
    torch.testing.assert_close(stretched, torch.full((3, 5), 7.0))


@pytest.mark.parametrize(
    "height, width, resize, cropsize, frame, outside",
    [
        (30, 50, 20, 16, None, 0.0),
        (91, 37, 25, 17, None, -2.5),
        (120, 200, 32, 0, (40, 66), 0.0),
        (64, 48, 24, 20, (21, 16), 7.0),
    ],
)
def test_projection_is_bilinear_sampling_at_pixel_centres(height, width, resize, cropsize, frame, outside):
    """Against scipy's map_coordinates (order 1, edges repeated): each frame pixel's centre, carried through
    the resize and the crop, samples the map there; a pixel the crop cut away holds `outside`."""
    geometry = Geometry(resize, cropsize)
    amap = torch.rand(*geometry.input_size, generator=torch.Generator().manual_seed(height))
    projected = to_original_resolution(amap, height, width, geometry, outside, frame)
    frame_height, frame_width = frame or (height, width)
    new_width, new_height = geometry.resized_size(width, height)
    top, left = geometry.crop_origin(width, height)
    rows = (np.arange(frame_height) + 0.5) * new_height / frame_height - top
    columns = (np.arange(frame_width) + 0.5) * new_width / frame_width - left
    grid_rows, grid_columns = np.meshgrid(rows, columns, indexing="ij")
    centres = [grid_rows - 0.5, grid_columns - 0.5]
    sampled = ndimage.map_coordinates(amap.double().numpy(), centres, order=1, mode="nearest")
    seen = np.outer((rows >= 0) & (rows < amap.shape[0]), (columns >= 0) & (columns < amap.shape[1]))
    expected = np.where(seen, sampled, outside)
    assert projected.shape == (frame_height, frame_width)
    np.testing.assert_allclose(projected.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert cropsize == 0 or not seen.all()


@pytest.mark.parametrize("height, width", [(30, 50), (50, 30), (37, 91), (91, 37), (40, 40), (3, 1000)])
def test_geometry_sizes_are_torchvisions(height, width):
    """resized_size and crop_origin (which the projection uses) say where torchvision's Resize and
    CenterCrop put an image: a pixel marked at the crop's origin in the resized image is the crop's first."""
    geometry = Geometry(20, 16)
    resized = v2.Resize(20, antialias=True)(torch.zeros(1, height, width))
    assert geometry.resized_size(width, height) == (resized.shape[2], resized.shape[1])
    top, left = geometry.crop_origin(width, height)
    marked = torch.zeros_like(resized)
    marked[0, top, left] = 1.0
    assert v2.CenterCrop(16)(marked)[0, 0, 0] == 1.0
    assert Geometry(20, 0).resized_size(width, height) == (20, 20) and Geometry(20, 0).crop_origin(width, height) == (
        0,
        0,
    )


@pytest.mark.parametrize(
    "height, width, resize, cropsize", [(30, 50, 20, 16), (50, 30, 20, 16), (37, 91, 25, 17), (33, 71, 16, 0)]
)
def test_projection_inverts_torchvision_geometry(height, width, resize, cropsize):
    """A coordinate ramp sent through the real Resize + CenterCrop comes back to the same coordinates."""
    ramp = torch.arange(width, dtype=torch.float32).add(0.5).expand(height, width)[None]
    geometry = Geometry(resize, cropsize)
    forward = geometry.spatial(v2.InterpolationMode.BILINEAR)(ramp)[0]
    back = to_original_resolution(forward, height, width, geometry)
    assert back.shape == (height, width)
    inside = back != 0
    assert float((back - ramp[0])[inside].abs().median()) < 0.05
    new_width, new_height = geometry.resized_size(width, height)
    top, left = geometry.crop_origin(width, height)
    assert forward.shape == geometry.input_size
    crop = cropsize or resize
    centres = np.arange(width) + 0.5
    expected_columns = (centres * new_width / width >= left) & (centres * new_width / width < left + crop)
    assert np.array_equal(inside.any(dim=0).numpy(), expected_columns)


def test_scores_equal_run_experiment(trained: Trained, texture_root: Path, tmp_path: Path):
    test_dir = texture_root / "brick" / "test"
    out = tmp_path / "out"
    result = run_cli(
        "--model",
        str(trained.model_dir),
        "--input",
        str(test_dir / "*" / "*.png"),
        "--input",
        str(test_dir / "good"),
        "--output",
        str(out),
        *PREDICT_FLAGS,
    )
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert [Path(row["path"]) for row in rows] == sorted(trained.scores)
    for row in rows:
        score = float(row["score"])
        assert abs(score - trained.scores[Path(row["path"])]) < 1e-4
        assert float(row["threshold"]) == pytest.approx(trained.threshold)
        assert row["is_anomalous"] == str(score > trained.threshold) and row["error"] == ""
    names = [row["output_name"] for row in rows]
    assert len(set(names)) == len(rows) and {"good_000.png", "scratch_000.png"} <= set(names)
    for row in rows:  # a stem shared by several images gets its folder's name; the others keep theirs
        path = Path(row["path"])
        shared = sum(Path(other["path"]).stem == path.stem for other in rows) > 1
        assert row["output_name"] == (f"{path.parent.name}_{path.stem}.png" if shared else f"{path.stem}.png")
    for name in names:
        assert Image.open(out / "heatmaps" / name).size == (64, 64)
        assert Image.open(out / "overlays" / name).size == (64, 64)
    assert not (out / "masks").exists()


def test_non_square_image_outputs_at_original_size(trained: Trained, texture_root: Path, tmp_path: Path, capsys):
    """90x50 image, resize 64 crop 56: the model saw rows 3..46 and columns 23..66 only (worked out by hand)."""
    source = Image.open(texture_root / "brick" / "test" / "scratch" / "001.png")
    image_dir = tmp_path / "wide"
    image_dir.mkdir()
    source.resize((90, 50), Image.BILINEAR).save(image_dir / "wide.png")
    out = tmp_path / "out"
    code = predict.main(
        [
            "--model",
            str(trained.model_dir / "padim_model.pt"),
            "--input",
            str(image_dir),
            "--output",
            str(out),
            "--threshold",
            "1.0",
            "--save_masks",
            *PREDICT_FLAGS,
        ]
    )
    assert code == 0, capsys.readouterr().err
    [row] = read_rows(out)
    assert row["threshold"] == "1" and row["is_anomalous"] == "True"
    mask = np.asarray(Image.open(out / "masks" / "wide.png"))
    heat = np.asarray(Image.open(out / "heatmaps" / "wide.png"))
    assert mask.shape == (50, 90) and heat.shape == (50, 90, 3)
    assert Image.open(out / "overlays" / "wide.png").size == (90, 50)
    box = np.zeros((50, 90), dtype=bool)
    box[3:47, 23:67] = True
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, box) and int(row["anomalous_area_px"]) == box.sum()
    assert (heat[~box] == heat_colour_table()[0]).all()
    with (out / "regions.csv").open(newline="") as handle:
        [region] = list(csv.DictReader(handle))
    assert row["n_regions"] == "1" and Path(region["path"]) == image_dir / "wide.png"
    box_fields = ("region_id", "x", "y", "width", "height", "area_px")
    assert [int(region[field]) for field in box_fields] == [1, 23, 3, 44, 44, 44 * 44]
    overlay = np.asarray(Image.open(out / "overlays" / "wide.png"))
    assert (overlay[3, 23:67] == OUTLINE_COLOUR).all() and (overlay[3:47, 66] == OUTLINE_COLOUR).all()

    specks = tmp_path / "specks"
    assert (
        predict.main(
            [
                "--model",
                str(trained.model_dir),
                "--input",
                str(image_dir),
                "--output",
                str(specks),
                "--threshold",
                "1.0",
                "--min_region_area",
                str(44 * 44 + 1),
                *PREDICT_FLAGS,
            ]
        )
        == 0
    )
    assert read_rows(specks)[0]["n_regions"] == "0" and (specks / "regions.csv").read_text().count("\n") == 1


def test_unreadable_images_are_listed_and_the_rest_scored(trained: Trained, texture_root: Path, tmp_path: Path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("000.png", "001.png"):
        shutil.copy(texture_root / "brick" / "test" / "good" / name, folder / name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image\n")
    (folder / "half.png").write_bytes((folder / "000.png").read_bytes()[:200])
    out = tmp_path / "out"
    assert (
        predict.main(["--model", str(trained.model_dir), "--input", str(folder), "--output", str(out), *PREDICT_FLAGS])
        == 0
    )
    rows = {Path(row["path"]).name: row for row in read_rows(out)}
    assert set(rows) == {"000.png", "001.png", "empty.png", "notes.jpg", "half.png"}
    for name in ("empty.png", "notes.jpg", "half.png"):
        assert rows[name]["error"] and rows[name]["score"] == "" and rows[name]["output_name"] == ""
    for name in ("000.png", "001.png"):
        expected = trained.scores[texture_root / "brick" / "test" / "good" / name]
        assert rows[name]["error"] == "" and abs(float(rows[name]["score"]) - expected) < 1e-4
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["000.png", "001.png"]

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "empty.png").write_bytes(b"")
    capsys.readouterr()
    assert (
        predict.main(
            [
                "--model",
                str(trained.model_dir),
                "--input",
                str(only_bad),
                "--output",
                str(tmp_path / "o2"),
                *PREDICT_FLAGS,
            ]
        )
        == 1
    )
    assert "error: no image could be read" in capsys.readouterr().err
    assert read_rows(tmp_path / "o2")[0]["error"]


def _real_content(trained: Trained) -> dict:
    return torch.load(trained.model_dir / "padim_model.pt", weights_only=True)


def _resealed(content: dict, path: Path) -> None:
    """Write changed content as save_model does, with a checksum that matches it: reaches the checks
    after the checksum."""
    save_model(path, {key: value for key, value in content.items() if key != "checksum"})


def _broken_model(kind: str, trained: Trained, folder: Path, marker: Path) -> Path:
    """A model file (or folder) broken in the way `kind` names."""
    path = folder / "padim_model.pt"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return folder / "nothing_here"
    if kind == "several_classes":
        return trained.model_dir.parent
    if kind == "truncated":
        data = (trained.model_dir / "padim_model.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "old_format":
        torch.save({"format": "padim-suite-model", "format_version": 0}, path)
    elif kind == "before_checksums":
        content = _real_content(trained)
        del content["checksum"]
        torch.save({**content, "format_version": 4}, path)
    elif kind == "changed_number":
        content = _real_content(trained)
        content["mean"][5, 7] += 0.5
        torch.save(content, path)
    elif kind == "changed_threshold":
        torch.save({**_real_content(trained), "threshold": 1e9}, path)
    elif kind == "not_a_dict":
        torch.save([1, 2, 3], path)
    elif kind == "unknown_backbone":
        _resealed({**_real_content(trained), "backbone": "vgg99"}, path)
    elif kind == "factor_blocks_wrong":
        content = _real_content(trained)
        _resealed({**content, "precision_factor": content["precision_factor"][:1]}, path)
    elif kind == "factor_dense":  # version 2's layout
        _resealed({**_real_content(trained), "precision_factor": torch.zeros(196, 100, 100)}, path)
    elif kind == "threshold_nan":
        _resealed({**_real_content(trained), "threshold": float("nan")}, path)
    elif kind == "map_threshold_zero":
        _resealed({**_real_content(trained), "map_threshold": 0.0}, path)
    elif kind == "malicious_torch":
        torch.save({"format": "padim-suite-model", "payload": MarkerPayload(marker)}, path)
    elif kind == "malicious_pickle":
        path.write_bytes(pickle.dumps(MarkerPayload(marker)))
    return folder


BROKEN = {
    "missing": "no model file",
    "several_classes": "but its class folders do (brick)",
    "truncated": "truncated or damaged",
    "zero_bytes": "empty file, not a model",
    "old_format": "format version 0",
    "before_checksums": "model format version 4, this tool reads versions 5 to 8 "
    "(earlier files carry no checksum); retrain it",
    "changed_number": "damaged (checksum mismatch)",
    "changed_threshold": "damaged (checksum mismatch)",
    "threshold_nan": "threshold nan is not a positive finite number",
    "map_threshold_zero": "map_threshold 0.0 is not a positive finite number",
    "not_a_dict": "not a PaDiM suite model file",
    "unknown_backbone": "'vgg99' is unknown",
    "factor_blocks_wrong": "statistics shapes do not match",
    "factor_dense": "malformed model file, unexpected types of precision_factor",
    "malicious_torch": "refused",
    "malicious_pickle": "refused",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_model_is_one_clear_line(kind: str, trained: Trained, texture_root: Path, tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    model = _broken_model(kind, trained, tmp_path / "model", marker)
    capsys.readouterr()
    code = predict.main(
        [
            "--model",
            str(model),
            "--input",
            str(texture_root / "brick" / "test" / "good"),
            "--output",
            str(tmp_path / "out"),
            *PREDICT_FLAGS,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: ") and BROKEN[kind] in err and "\n" not in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_malicious_model_from_the_command_line(trained: Trained, texture_root: Path, tmp_path: Path):
    """The payload is live (plain pickle runs it); predict.py refuses it and it never runs."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(MarkerPayload(probe))).close()
    assert probe.exists()
    marker = tmp_path / "pwned"
    model = _broken_model("malicious_torch", trained, tmp_path / "model", marker)
    result = run_cli(
        "--model",
        str(model),
        "--input",
        str(texture_root / "brick" / "test" / "good"),
        "--output",
        str(tmp_path / "out"),
        *PREDICT_FLAGS,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert not marker.exists()


def test_weights_file_must_be_the_training_one(trained: Trained, texture_root: Path, tmp_path: Path, capsys):
    model, _ = load_backbone("resnet18", "none", seed=7)
    weights = tmp_path / "backbone.pt"
    torch.save(model.state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _resealed({**_real_content(trained), "weights_id": f"file:backbone.pt:{digest}"}, model_dir / "padim_model.pt")
    other = tmp_path / "other.pt"
    other.write_bytes(weights.read_bytes() + b"\0")
    common = [
        "--model",
        str(model_dir),
        "--input",
        str(texture_root / "brick" / "test" / "good" / "000.png"),
        *PREDICT_FLAGS,
    ]

    def run(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = predict.main(common + ["--output", str(tmp_path / f"out{len(extra)}"), *extra])
        return code, capsys.readouterr().err

    assert run() == (
        1,
        f"error: the model was trained with the weights file backbone.pt (sha256 {digest}...): "
        "pass that file with --weights PATH\n",
    )
    code, err = run("--weights", str(other))
    assert code == 1 and "is not the file the model was trained with" in err
    code, err = run("--weights", str(weights))
    assert code == 0, err
    code, err = run("--weights", str(weights), "--threshold", "5")
    assert code == 0, err

    capsys.readouterr()
    assert (
        predict.main(
            [
                "--model",
                str(trained.model_dir),
                "--input",
                str(texture_root / "brick" / "test" / "good"),
                "--output",
                str(tmp_path / "o"),
                "--weights",
                str(weights),
                *PREDICT_FLAGS,
            ]
        )
        == 1
    )
    assert "--weights is only for models trained with a weights file" in capsys.readouterr().err


def test_no_input_image_is_an_error(trained: Trained, tmp_path: Path, capsys):
    code = predict.main(
        ["--model", str(trained.model_dir), "--input", str(tmp_path / "*.png"), "--output", str(tmp_path / "o")]
    )
    assert code == 1 and "error: no image found in --input" in capsys.readouterr().err


def test_output_names_say_which_image_they_are():
    paths = [
        Path("a/good/000.png"),
        Path("a/crack/000.png"),
        Path("b/good/000.PNG"),
        Path("a/good/017.png"),
        Path("c/x/Wide.png"),
        Path("c/y/wide.jpg"),
    ]
    assert prediction.output_names(paths) == ["good_000", "crack_000", "good_000_1", "017", "x_Wide", "y_wide"]


def test_a_second_prediction_into_one_folder_leaves_nothing_of_the_first(
    trained: Trained, texture_root, tmp_path, capsys
):
    """A folder holds one prediction run: the earlier run's maps, overlays and masks are removed, and said."""
    output = tmp_path / "predictions"
    test = texture_root / "brick" / "test"
    first = ["--model", str(trained.model_dir), "--input", str(test / "*" / "*.png"), "--save_masks"]
    assert predict.main([*first, "--output", str(output), *PREDICT_FLAGS]) == 0
    assert len(list((output / "heatmaps").iterdir())) == len(list(test.glob("*/*.png")))
    capsys.readouterr()
    second = ["--model", str(trained.model_dir), "--input", str(test / "good")]
    assert predict.main([*second, "--output", str(output), *PREDICT_FLAGS]) == 0
    goods = sorted(p.stem for p in (test / "good").iterdir())
    for folder in ("heatmaps", "overlays"):
        assert sorted(p.stem for p in (output / folder).iterdir()) == goods
    assert not (output / "masks").exists()
    assert "held an earlier prediction: removed its predictions.csv, regions.csv, heatmaps, overlays, masks" in (
        capsys.readouterr().err
    )


def test_a_graph_description_given_as_the_model_points_to_its_graph(tmp_path, capsys):
    graph = tmp_path / "deploy" / "model.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"graph")
    graph.with_suffix(".json").write_text('{"format": "padim-suite-onnx"}\n')
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    args = ["--model", str(graph.with_suffix(".json")), "--input", str(image), "--output", str(tmp_path / "p")]
    capsys.readouterr()
    assert predict.main([*args, *PREDICT_FLAGS]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pass --model {graph}" in err


def test_predict_reproduces_a_variant_models_scores(grid_max_model: Path, texture_root: Path, tmp_path: Path):
    """A model with the semi-orthogonal projection, the 3 x 3 neighbourhood and the grid_max score: predict.py
    gives the scores (and calls) run_experiment wrote in scores.csv within 1e-4, from the stored projection."""
    model_dir = grid_max_model
    expected = pd.read_csv(model_dir / "scores.csv")
    threshold = torch.load(model_dir / "padim_model.pt", weights_only=True)["threshold"]
    out = tmp_path / "out"
    inputs = ["--input", str(texture_root / "brick" / "test" / "*" / "*.png")]
    assert predict.main(["--model", str(model_dir), *inputs, "--output", str(out), *PREDICT_FLAGS]) == 0
    rows = {Path(row["path"]): row for row in read_rows(out)}
    assert sorted(rows) == sorted(Path(path) for path in expected.path)
    for path, score in zip(expected.path, expected.score):
        row = rows[Path(path)]
        assert abs(float(row["score"]) - score) < 1e-4
        assert float(row["threshold"]) == pytest.approx(threshold)
        assert row["is_anomalous"] == str(float(row["score"]) > threshold)


def test_a_version_6_model_scores_with_the_default_variants(trained: Trained, tmp_path: Path, capsys):
    """A model file of version 6 (no variant settings, no projection matrix) loads with the defaults and
    scores as run_experiment did; a variant setting this version does not know is one clear line."""
    content = {key: value for key, value in _real_content(trained).items() if key != "checksum"}
    old = tmp_path / "v6" / "padim_model.pt"
    old.parent.mkdir()
    content["format_version"] = 6
    content["checksum"] = content_checksum(content)
    torch.save(content, old)
    out = tmp_path / "out"
    image = sorted(trained.scores)[0]
    assert predict.main(["--model", str(old), "--input", str(image), "--output", str(out), *PREDICT_FLAGS]) == 0
    [row] = read_rows(out)
    assert abs(float(row["score"]) - trained.scores[image]) < 1e-4
    unknown = tmp_path / "unknown" / "padim_model.pt"
    unknown.parent.mkdir()
    config = {**content["training_config"], "projection": "learned"}
    _resealed({**_real_content(trained), "training_config": config}, unknown)
    capsys.readouterr()
    flags = ["--model", str(unknown), "--input", str(image), "--output", str(tmp_path / "o2"), *PREDICT_FLAGS]
    assert predict.main(flags) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert error[0].endswith("projection 'learned' is unknown to this version (known: ['random', 'semi_orthogonal'])")
