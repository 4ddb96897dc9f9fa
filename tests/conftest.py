"""Shared fixtures: small synthetic MVTec-layout folders made by the demo generator."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import run_experiment  # noqa: E402
from data.demo_data import make_demo_dataset  # noqa: E402

SMALL_MODEL_FLAGS = [  # a small random-init backbone on small inputs: every CLI test runs in seconds
    "--model_architecture",
    "resnet18",
    "--weights",
    "none",
    "--resize",
    "64",
    "--cropsize",
    "56",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--max_visualizations",
    "0",
]
TRAIN_FLAGS = [
    "--dataset",
    "mvtec",
    *SMALL_MODEL_FLAGS,
    "--device",
    "cpu",
    "--save_distribution",
    "--results_subdir",
    "r",
]


@dataclass(frozen=True)
class Trained:
    model_dir: Path
    scores: dict[Path, float]
    threshold: float


@pytest.fixture(scope="session")
def texture_root(tmp_path_factory) -> Path:
    """Two texture classes, small enough for a random-init backbone run in seconds."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("textures"),
        textures=("brick", "gravel"),
        n_train=24,
        n_test_good=6,
        n_test_defect=4,
        size=64,
        seed=3,
    )


@pytest.fixture(scope="session")
def trained(texture_root: Path, tmp_path_factory) -> Trained:
    """brick trained once (random-init resnet18); run_experiment's scores.csv holds the test scores it computed."""
    results = tmp_path_factory.mktemp("predict_results")
    code = run_experiment.main(
        TRAIN_FLAGS + ["--data_path", str(texture_root / "brick"), "--base_results_dir", str(results)]
    )
    assert code == 0
    scores = pd.read_csv(results / "r" / "brick" / "scores.csv")
    captured = {Path(path): float(score) for path, score in zip(scores.path, scores.score)}
    model_dir = results / "r" / "brick"
    content = torch.load(model_dir / "padim_model.pt", weights_only=True)
    return Trained(model_dir, captured, content["threshold"])
