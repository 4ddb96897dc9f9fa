"""--layers: which backbone stages PaDiM hooks, validated by name, with the embedding's dims measured."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
import torch

import predict
import run_experiment
from tests.helpers import CPU_RUN_FLAGS
from utils.padim.backbone_specs import BACKBONES, hooked_layers
from utils.padim.backbones import build_extractor

DEFAULT_DIMS = {"wide_resnet50_2": 1792, "resnet18": 448, "efficientnet_b5": 472, "efficientnet_lite0": 144}


def test_stage_names_are_checked_per_backbone_and_put_in_depth_order():
    lite0, resnet = BACKBONES["efficientnet_lite0"], BACKBONES["resnet18"]
    assert hooked_layers(lite0, None) == ("2", "3", "4") and hooked_layers(lite0, ["5", "3", "4"]) == ("3", "4", "5")
    assert hooked_layers(resnet, ["layer3", "layer1"]) == ("layer1", "layer3")
    with pytest.raises(
        ValueError, match="unknown stage layer2 for efficientnet_lite0; its stages are 0 1 2 3 4 5 6 7 8"
    ):
        hooked_layers(lite0, ["layer2"])
    with pytest.raises(ValueError, match="unknown stage 3 for resnet18; its stages are layer1 layer2 layer3 layer4"):
        hooked_layers(resnet, ["3"])
    for repeated in (["layer1", "layer1"], []):
        with pytest.raises(ValueError, match="each stage once"):
            hooked_layers(resnet, repeated)


@pytest.mark.parametrize(
    "name, layers",
    [
        ("resnet18", None),
        ("resnet18", ["layer2", "layer3", "layer4"]),
        ("resnet18", ["layer1"]),
        pytest.param("wide_resnet50_2", None, marks=pytest.mark.slow),
        pytest.param("efficientnet_b5", None, marks=pytest.mark.slow),
        pytest.param("efficientnet_b5", ["3", "5"], marks=pytest.mark.slow),
        ("efficientnet_lite0", None),
        ("efficientnet_lite0", ["3", "4", "5"]),
        ("efficientnet_lite0", ["1", "2", "3"]),
    ],
)
def test_dims_are_the_hooked_maps_channels(name, layers):
    extractor, _ = build_extractor(name, "none", torch.device("cpu"), layers=layers)
    maps = extractor(torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last))
    assert extractor.dims == sum(m.shape[1] for m in maps) and len(maps) == len(extractor.layers)
    if layers is None:
        assert extractor.dims == DEFAULT_DIMS[name]  # the totals of the design's table


def test_reduced_dim_above_the_stages_channels_is_one_line(tmp_path: Path, texture_root: Path, capsys):
    code = run_experiment.main(
        [
            *CPU_RUN_FLAGS,
            "--save_distribution",
            "--data_path",
            str(texture_root / "brick"),
            "--base_results_dir",
            str(tmp_path),
            "--layers",
            "layer1",
            "--reduced_dim",
            "65",
        ]
    )
    assert code == 1
    assert capsys.readouterr().err == "error: --reduced_dim 65 exceeds the 64 channels of resnet18 at stages layer1\n"
    assert not tmp_path.joinpath("mvtec_resnet18_resize-64_crop-56_layers-layer1").exists()


@pytest.mark.slow
def test_a_model_with_other_layers_is_reproduced_by_predict_and_not_reused_for_others(
    tmp_path: Path, texture_root: Path, capsys, caplog
):
    results = tmp_path / "res"
    flags = [
        *CPU_RUN_FLAGS,
        "--save_distribution",
        "--data_path",
        str(texture_root / "brick"),
        "--base_results_dir",
        str(results),
    ]
    assert run_experiment.main([*flags, "--layers", "layer2", "layer3"]) == 0
    folder = results / "mvtec_resnet18_resize-64_crop-56_layers-layer2-layer3"
    content = torch.load(folder / "brick" / "padim_model.pt", weights_only=True)
    assert content["layers"] == ["layer2", "layer3"] and content["channel_index"].numel() == 100
    assert content["mean"].shape == (49, 100)  # layer2's grid: 56 / 8 = 7 x 7
    scores = pd.read_csv(folder / "brick" / "scores.csv")
    out = tmp_path / "out"
    assert (
        predict.main(
            [
                "--model",
                str(folder / "brick"),
                "--input",
                str(texture_root / "brick" / "test" / "*" / "*.png"),
                "--output",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with (out / "predictions.csv").open(newline="") as handle:
        predicted = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    assert len(predicted) == len(scores)
    for path, score in zip(scores.path, scores.score):
        assert abs(predicted[path] - score) < 1e-4

    (folder / "experiment.json").unlink()  # so the model file's own identity is what guards the reuse
    caplog.clear()
    assert run_experiment.main([*flags, "--layers", "layer1", "layer2", "--results_subdir", folder.name]) == 0
    assert "differs in layers" in caplog.text
    assert torch.load(folder / "brick" / "padim_model.pt", weights_only=True)["layers"] == ["layer1", "layer2"]
