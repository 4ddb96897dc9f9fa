"""--covariance and --epsilon: the shrunk covariances equal scikit-learn's LedoitWolf / OAS on the same samples,
from streamed, merged and resumed sums; a run compares the estimators side by side and records them; predict.py
and update.py follow a shrinkage model; a version-6 model file is an empirical one."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.covariance import OAS, LedoitWolf

import predict
import run_experiment
import trainer
import update
from datasets.files import list_images
from tests.helpers import (
    PREDICT_FLAGS,
    TRAIN_FLAGS,
    class_with,
    no_class_figures,
    row_bands,
    symmetric_matrices,
    synthetic_features,
)
from utils.config import FitConfig, ModelConfig
from utils.padim.gaussian import GaussianAccumulator
from utils.padim.loading import build, read_model
from utils.padim.model import Padim
from utils.padim.model_file import FOURTH_MOMENT_ENTRY_TYPES, content_checksum, load_model

CPU = torch.device("cpu")
ESTIMATORS = {"ledoit_wolf": LedoitWolf, "oas": OAS}
COVARIANCE_FLAGS = ["--covariance", "empirical", "oas", "ledoit_wolf"]


def streamed(x: np.ndarray, groups: list[int], rows: int = 2) -> GaussianAccumulator:
    """An accumulator fed (N, H, W, D) `x` in groups of the given sizes, each as bands of `rows` grid rows."""
    accumulator = GaussianAccumulator(dims=x.shape[3], positions=x.shape[1] * x.shape[2], device=CPU)
    for start, stop in itertools.pairwise(itertools.accumulate(groups, initial=0)):
        accumulator.update(row_bands(x[start:stop], rows))
    return accumulator


def covariances(accumulator: GaussianAccumulator, covariance: str, epsilon: float) -> np.ndarray:
    return symmetric_matrices(accumulator.finalize(covariance, epsilon)[1], torch.float64).numpy()


def sklearn_covariances(x: np.ndarray, covariance: str) -> np.ndarray:
    """scikit-learn's estimate at every position, in float64 (assume_centered=False: the MLE covariance)."""
    flat = x.astype(np.float64).reshape(x.shape[0], -1, x.shape[3])
    return np.stack([ESTIMATORS[covariance]().fit(flat[:, p]).covariance_ for p in range(flat.shape[1])])


def assert_close_to(got: np.ndarray, expected: np.ndarray) -> None:
    """Per position, within 1e-5 of the matrix's largest entry (the second moments are summed in float32)."""
    scale = np.abs(expected).max(axis=(1, 2), keepdims=True)
    assert np.all(np.abs(got - expected) <= 1e-5 * scale)


@pytest.mark.parametrize("covariance", ["ledoit_wolf", "oas"])
@pytest.mark.parametrize("dims, n", [(5, 10), (20, 12), (8, 60), (20, 60)])
def test_shrunk_covariance_equals_sklearn_at_every_position(covariance, dims, n):
    """12 positions, streamed in uneven groups and bands; epsilon 0 equals scikit-learn's estimate, and an
    epsilon adds exactly epsilon I to it."""
    x = synthetic_features(n=n, d=dims, seed=dims + n)
    groups = [n // 3, 1, n - n // 3 - 1]
    expected = sklearn_covariances(x, covariance)
    unregularised = covariances(streamed(x, groups), covariance, 0.0)
    assert_close_to(unregularised, expected)
    shifted = covariances(streamed(x, groups), covariance, 0.25) - unregularised
    scale = np.abs(expected).max()
    np.testing.assert_allclose(shifted, np.broadcast_to(0.25 * np.eye(dims), expected.shape), atol=1e-6 * scale)


def test_shrinkage_is_not_the_empirical_covariance_and_the_estimators_differ():
    """The test above could not pass with the empirical covariance in place of either estimator."""
    x = synthetic_features(n=12, d=20, seed=4)
    empirical = covariances(streamed(x, [12]), "empirical", 0.0)
    shrunk = {name: covariances(streamed(x, [12]), name, 0.0) for name in ESTIMATORS}
    for name, matrices in shrunk.items():
        assert np.abs(matrices - empirical).max() > 0.05 * np.abs(empirical).max(), name
    assert np.abs(shrunk["oas"] - shrunk["ledoit_wolf"]).max() > 1e-3 * np.abs(empirical).max()


def test_streamed_fourth_moments_equal_their_definition_and_one_pass():
    """sum |y|^2 y and sum |y|^4 around the shift (the first group's mean) equal numpy's on all the samples,
    in one group or in five (moved to the same shift: recentre, the second moments being float32)."""
    x = synthetic_features(n=40, d=7, seed=9)
    one, several = streamed(x, [40]), streamed(x, [3, 9, 1, 20, 7])
    y = x.astype(np.float64).reshape(40, 12, 7) - several.shift[:, 0].double().numpy()
    squares = (y**2).sum(axis=2)
    np.testing.assert_allclose(several.fourth.numpy(), (squares**2).sum(axis=0), rtol=1e-6)
    third = (squares[..., None] * y).sum(axis=0)
    np.testing.assert_allclose(several.third.numpy(), third, rtol=0, atol=1e-6 * np.abs(third).max())
    one.recentre(several.shift.clone())
    torch.testing.assert_close(one.fourth, several.fourth, rtol=1e-6, atol=0)
    torch.testing.assert_close(one.third, several.third, rtol=0, atol=1e-5 * float(several.third.abs().max()))


def test_sums_of_two_processes_recentred_and_added_give_ledoit_wolf_of_all():
    """As GaussianAccumulator.merged does under torchrun: each rank's sums around its own shift, moved to the
    first rank's and added, give scikit-learn's Ledoit-Wolf estimate on all the images."""
    x = synthetic_features(n=30, d=9, seed=5) + np.linspace(0, 3, 30, dtype=np.float32)[:, None, None, None]
    first, second = streamed(x[:11], [4, 7]), streamed(x[11:], [19])
    assert not torch.allclose(first.shift, second.shift)
    second.recentre(first.shift.clone())
    for mine, theirs in zip(first.moments(), second.moments()):
        mine += theirs
    first.count += second.count
    assert_close_to(covariances(first, "ledoit_wolf", 0.0), sklearn_covariances(x, "ledoit_wolf"))


def test_an_accumulator_resumed_from_saved_sums_gives_ledoit_wolf_of_old_and_new_images():
    x = synthetic_features(n=35, d=10, seed=6)
    saved = streamed(x[:15], [15]).sums()
    resumed = GaussianAccumulator.resumed(saved, CPU)
    resumed.update(row_bands(x[15:], 3))
    assert_close_to(covariances(resumed, "ledoit_wolf", 0.0), sklearn_covariances(x, "ledoit_wolf"))


def test_sums_saved_without_fourth_moments_serve_empirical_and_oas_and_refuse_ledoit_wolf():
    """What a version-6 model file holds: an update still forms the empirical covariance; Ledoit-Wolf says why not."""
    x = synthetic_features(n=20, d=6, seed=8)
    saved = streamed(x[:10], [10]).sums()
    saved.third = saved.fourth = None
    resumed = GaussianAccumulator.resumed(saved, CPU)
    resumed.update(row_bands(x[10:], 3))
    assert resumed.sums().fourth is None
    flat = x.astype(np.float64).reshape(20, 12, 6)
    empirical = np.stack([np.cov(flat[:, p], rowvar=False) for p in range(12)])
    assert_close_to(covariances(resumed, "empirical", 0.0), empirical)
    resumed = GaussianAccumulator.resumed(saved, CPU)
    with pytest.raises(ValueError, match="no fourth moments.*refit"):
        resumed.finalize("ledoit_wolf", 0.01)


def test_flags_make_one_configuration_per_estimator_and_epsilon(tmp_path: Path, capsys):
    base = ["--dataset", "mvtec", "--data_path", str(tmp_path), "--model_architecture", "efficientnet_lite0"]
    config = run_experiment.parse_args([*base, *COVARIANCE_FLAGS, "--epsilon", "0.01", "0.001"])
    assert [(m.covariance, m.epsilon) for m in config.models] == [
        (c, e) for c in ("empirical", "oas", "ledoit_wolf") for e in (0.01, 0.001)
    ]
    names = [config.results_folder(m).name for m in config.models]
    assert len(set(names)) == 6
    assert names[:3] == [
        "mvtec_efficientnet_lite0_resize-256_crop-256",
        "mvtec_efficientnet_lite0_resize-256_crop-256_eps-0.001",
        "mvtec_efficientnet_lite0_resize-256_crop-256_cov-oas",
    ]
    default = run_experiment.parse_args(base).models[0]
    assert default == ModelConfig("efficientnet_lite0", default.layers, seed=default.seed)
    assert "covariance" not in default.settings() and "epsilon" not in default.settings()
    assert config.models[-1].settings() | {} == {**default.settings(), "covariance": "ledoit_wolf", "epsilon": 0.001}
    for flags, message in [
        (["--epsilon", "-0.1"], "must be a finite number >= 0"),
        (["--covariance", "shrunk"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit):
            run_experiment.parse_args([*base, *flags])
        assert message in capsys.readouterr().err


def _train(class_dir: Path, results: Path, *flags: str) -> Path:
    """run_experiment with the model file saved, on `class_dir`; the results folder."""
    with no_class_figures():  # set up before conftest's function-scoped switch
        code = run_experiment.main(
            [*TRAIN_FLAGS, "--data_path", str(class_dir), "--base_results_dir", str(results), *flags]
        )
    assert code == 0
    return results / "r"


@pytest.fixture(scope="module")
def shrunk(texture_root: Path, tmp_path_factory) -> tuple[Path, list[Path]]:
    """brick's Ledoit-Wolf model on the first 16 of its good images; the other 8 images."""
    tmp = tmp_path_factory.mktemp("variants")
    images = list_images(texture_root / "brick" / "train" / "good")
    (tmp / "new").mkdir()
    added = [Path(shutil.copy(path, tmp / "new" / path.name)) for path in images[16:]]
    class_dir = class_with(images[:16], texture_root / "brick", tmp / "brick")
    return _train(class_dir, tmp / "results", "--covariance", "ledoit_wolf") / "brick", added


@pytest.mark.slow
def test_a_run_compares_the_estimators_and_records_them(texture_root, tmp_path):
    """Three configurations, each with its settings in comparison.csv, experiment.json and its model file; the
    shrunk ones score differently from the empirical one."""
    parent = _train(texture_root / "brick", tmp_path, *COVARIANCE_FLAGS)
    comparison = pd.read_csv(parent / "comparison.csv")
    assert list(comparison.covariance) == ["empirical", "oas", "ledoit_wolf"]
    assert list(comparison.epsilon) == [0.01] * 3
    for row in comparison.itertuples():
        folder = parent / row.configuration
        recorded = json.loads((folder / "experiment.json").read_text())
        config = load_model(folder / "brick")["training_config"]
        if row.covariance == "empirical":
            assert "covariance" not in recorded and "covariance" not in config
            assert row.configuration == "mvtec_resnet18_resize-64_crop-56"
        else:
            assert recorded["covariance"] == config["covariance"] == row.covariance
            assert row.configuration == f"mvtec_resnet18_resize-64_crop-56_cov-{row.covariance}"
    scores = [pd.read_csv(parent / name / "brick" / "scores.csv").score for name in comparison.configuration]
    assert np.abs(scores[0] - scores[1]).max() > 1e-2 * scores[0].max()


def test_predict_reproduces_a_shrinkage_model_s_scores(shrunk, tmp_path):
    model, _ = shrunk
    expected = pd.read_csv(model / "scores.csv")
    inputs = [flag for path in expected.path for flag in ("--input", path)]
    assert predict.main(["--model", str(model), *inputs, "--output", str(tmp_path), *PREDICT_FLAGS]) == 0
    got = pd.read_csv(tmp_path / "predictions.csv").set_index("path").loc[expected.path]
    assert np.abs(got.score.to_numpy() - expected.score.to_numpy()).max() < 1e-4


def test_update_of_a_ledoit_wolf_model_equals_a_ledoit_wolf_fit_on_all_its_images(shrunk, tmp_path):
    """update.py adds 8 images to the Ledoit-Wolf model: its statistics equal a Ledoit-Wolf fit on every image
    it now holds, within 1e-5 relative (and differ from an empirical fit on them)."""
    model, added = shrunk
    flags = ["--model", str(model), "--add", str(added[0].parent), "--output", str(tmp_path / "u")]
    assert update.main([*flags, "--device", "cpu", "--batch_size", "8"]) == 0
    content, path, weights = read_model(tmp_path / "u", None)
    assert content["training_config"]["covariance"] == "ledoit_wolf"
    threshold_images = {Path(p) for p, _ in content["threshold_images"]}
    fitted = sorted(p.resolve() for p in [*list_images(model.parents[2] / "brick" / "train" / "good"), *added])
    fitted = [p for p in fitted if p not in threshold_images]
    assert content["n_train"] == len(fitted)
    loaded = build(content, path, weights, CPU, 8)
    loader_config = FitConfig(batch_size=8, num_workers=0)
    factors = {}
    for covariance in ("ledoit_wolf", "empirical"):
        reference = Padim(
            loaded.scorer.extractor,
            loaded.scorer.index,
            loaded.geometry.input_size,
            CPU,
            CPU,
            CPU,
            covariance=covariance,
        )
        loader = trainer.class_loader(trainer.good_samples(fitted), loaded.geometry, loader_config, 0, CPU)
        factors[covariance] = reference.fit(batch.images for batch in loader).factor.dense().double()
    updated = loaded.scorer.stats.factor.dense().double()
    scale = factors["ledoit_wolf"].abs().max()
    assert (updated - factors["ledoit_wolf"]).abs().max() / scale < 1e-5
    assert (updated - factors["empirical"]).abs().max() / scale > 1e-2


def test_a_version_6_model_file_is_an_empirical_model_and_can_still_be_updated(shrunk, tmp_path):
    """Without training_config's settings and the fourth moments, as version 6 wrote it: it loads as empirical
    with epsilon 0.01, and update.py updates it (the new file still has no fourth moments)."""
    model, added = shrunk
    content = torch.load(model / "padim_model.pt", weights_only=True)
    old = {key: value for key, value in content.items() if key not in FOURTH_MOMENT_ENTRY_TYPES}
    old["training_config"] = {k: v for k, v in content["training_config"].items() if k != "covariance"}
    old["format_version"] = 6
    old["checksum"] = content_checksum(old)
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "padim_model.pt")
    content, path, weights = read_model(tmp_path / "old", None)
    scorer = build(content, path, weights, CPU, 8).scorer
    assert (scorer.covariance, scorer.epsilon) == ("empirical", 0.01)
    flags = ["--model", str(tmp_path / "old"), "--add", str(added[0]), "--output", str(tmp_path / "u")]
    assert update.main([*flags, "--device", "cpu", "--batch_size", "8"]) == 0
    updated = load_model(tmp_path / "u")
    assert updated["format_version"] == 8 and "sums_fourth" not in updated
    assert updated["n_train"] == content["n_train"] + 1
