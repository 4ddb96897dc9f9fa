"""The typed configuration: the flags become it once, its defaults are the flags', and one set of
settings decides both "same experiment" (experiment.json) and "same model" (the model file)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_experiment
import trainer
from tests.helpers import ROOT
from utils.config import FitConfig, Flips, ModelConfig, RunConfig, model_configs


def test_flag_defaults_are_the_dataclasses_defaults(tmp_path: Path):
    config = run_experiment.parse_args(["--data_path", str(tmp_path)])
    [model] = config.models
    defaults = ModelConfig()
    assert dataclasses.replace(model, layers=()) == defaults
    assert model.layers == ("layer1", "layer2", "layer3")
    assert config.fit == FitConfig() and config.devices == type(config.devices)()
    plain = RunConfig(tmp_path, (model,))
    assert dataclasses.replace(config, data_path=tmp_path) == plain


def test_flags_reach_their_fields(tmp_path: Path):
    config = run_experiment.parse_args(
        [
            "--data_path",
            str(tmp_path),
            "--dataset",
            "mvtec",
            "--holdout_ratio",
            "0.3",
            "--threshold_quantile",
            "0.9",
            "--augmentations_enabled",
            "--vertical_flip",
            "--augmentation_prob",
            "0.25",
            "--batch_size",
            "7",
            "--num_workers",
            "0",
            "--save_distribution",
            "--max_visualizations",
            "-1",
            "--no_report",
            "--stats_on_gpu",
            "--seed",
            "5",
        ]
    )
    assert config.fit == FitConfig("mvtec", 0.2, 0.3, 0.9, Flips(False, True, 0.25), 7, 0, True, -1)
    assert config.devices.stats_on_gpu and not config.devices.mahalanobis_on_gpu
    assert not config.write_report and config.models[0].seed == 5


def test_one_set_of_settings_decides_experiment_and_model(tmp_path: Path):
    """experiment.json and the model file's identity hold the same fit settings, and each differs when
    one of them does."""
    model = ModelConfig("resnet18", ("layer1", "layer2", "layer3"), "none", 64, 56, 10, 3)
    fits = [FitConfig(), FitConfig(threshold_quantile=0.95), FitConfig(flips=Flips(True, False))]
    index = torch.arange(10)
    for fit in fits:
        experiment = RunConfig(tmp_path, (model,), fit).identity(model)
        identity = trainer.model_identity(model, fit, "none", list(model.layers), index, "print")
        for key, value in {**fit.settings(), "seed": model.seed}.items():
            assert experiment[key] == identity["training_config"][key] == value
    experiments = [RunConfig(tmp_path, (model,), fit).identity(model) for fit in fits]
    models = [trainer.model_identity(model, fit, "none", list(model.layers), index, "print") for fit in fits]
    assert all(a != b for i, a in enumerate(experiments) for b in experiments[i + 1 :])
    assert all(a != b for i, a in enumerate(models) for b in models[i + 1 :])


def test_model_configs_check_every_combination():
    chosen = model_configs(["efficientnet_lite0"], [["4", "2", "3"], None], [256], [0, 224], [None])
    assert [(c.layers, c.cropsize) for c in chosen] == [(("2", "3", "4"), 0), (("2", "3", "4"), 224)]
    with pytest.raises(ValueError, match="--cropsize 300 is larger than --resize 256"):
        model_configs(["resnet18"], [None], [256], [300], [None])
    with pytest.raises(ValueError, match="--layers: unknown stage"):
        model_configs(["resnet18"], [["layer9"]], [256], [224], [None])


def test_the_configuration_loads_without_torch():
    """Flags are checked before torch loads: the configuration and the parser import no torch."""
    code = "import sys, run_experiment, utils.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
