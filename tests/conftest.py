"""Shared fixtures: small synthetic MVTec-layout folders made by the demo generator, one trained class,
and no class figures drawn unless a test is marked `figures`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import run_experiment
from data.demo_data import make_demo_dataset
from tests.helpers import TRAIN_FLAGS, Trained, no_class_figures


@pytest.fixture(autouse=True)
def _class_figures_only_when_looked_at(request):
    """Tests marked `figures` get trainer's class figures; the others skip drawing them."""
    if request.node.get_closest_marker("figures"):
        yield
    else:
        with no_class_figures():
            yield


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory):
    """Exported backbone trunks (utils.padim.engines) cached for this session only, never in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PADIM_CACHE_DIR", str(tmp_path_factory.mktemp("engine_cache")))
        yield


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
    with no_class_figures():  # set up before the function-scoped switch above
        code = run_experiment.main(
            TRAIN_FLAGS + ["--data_path", str(texture_root / "brick"), "--base_results_dir", str(results)]
        )
    assert code == 0
    scores = pd.read_csv(results / "r" / "brick" / "scores.csv")
    captured = {Path(path): float(score) for path, score in zip(scores.path, scores.score)}
    model_dir = results / "r" / "brick"
    content = torch.load(model_dir / "padim_model.pt", weights_only=True)
    return Trained(model_dir, captured, content["threshold"])


@pytest.fixture(scope="session")
def grid_max_model(texture_root: Path, tmp_path_factory) -> Path:
    """brick trained once with the grid_max image score, the semi-orthogonal projection and the 3 x 3
    neighbourhood (random-init resnet18): its class results folder, with padim_model.pt and scores.csv."""
    results = tmp_path_factory.mktemp("grid_max_results")
    flags = [*TRAIN_FLAGS, "--data_path", str(texture_root / "brick"), "--base_results_dir", str(results)]
    variant = ["--projection", "semi_orthogonal", "--neighbourhood", "3", "--image_score", "grid_max"]
    with no_class_figures():
        assert run_experiment.main([*flags, *variant]) == 0
    return results / "r" / "brick"
