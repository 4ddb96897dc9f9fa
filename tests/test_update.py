"""update.py: adding good images to a saved model equals one fit on all of them (statistics and threshold
inputs), repeatedly; a model taught a normal variation it flagged stops flagging it but still flags defects;
old models, bad inputs and non-finite statistics are refused with one line and nothing written."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import predict
import run_experiment
import trainer
import update
from datasets.files import list_images
from tests.helpers import PREDICT_FLAGS, TRAIN_FLAGS, class_with
from utils.config import FitConfig
from utils.padim.loading import build, read_model
from utils.padim.model import Padim
from utils.padim.model_file import UPDATE_ENTRY_TYPES, content_checksum, load_model, save_model

HOLDOUT_RATIO = 0.2  # every part of a 5-way split of 24 images still holds one out
UPDATE_FLAGS = ["--device", "cpu", "--batch_size", "8"]
CPU = torch.device("cpu")


def _train(class_dir: Path, results: Path, other: tuple[str, ...] = ()) -> Path:
    flags = ["--data_path", str(class_dir), "--base_results_dir", str(results), "--holdout_ratio", str(HOLDOUT_RATIO)]
    assert run_experiment.main(TRAIN_FLAGS + flags + list(other)) == 0
    return results / "r" / class_dir.name


def _update(model: Path, added: list[str], output: Path) -> int:
    return update.main(
        ["--model", str(model), *[f for a in added for f in ("--add", a)], "--output", str(output), *UPDATE_FLAGS]
    )


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _parts(texture_root: Path, tmp_path: Path, count: int) -> list[list[Path]]:
    """brick's training images split into `count` parts, each copied into a folder of its own."""
    images = list_images(texture_root / "brick" / "train" / "good")
    parts = []
    for number, chunk in enumerate(np.array_split(np.arange(len(images)), count)):
        folder = tmp_path / f"part{number}"
        folder.mkdir()
        parts.append([Path(shutil.copy(images[i], folder / images[i].name)) for i in chunk])
    return parts


VARIANT = ("--projection", "semi_orthogonal", "--neighbourhood", "3", "--image_score", "grid_max")
SHRUNK_NON_SQUARE = ("--covariance", "ledoit_wolf", "--resize", "48x72", "--cropsize", "0")


@pytest.mark.parametrize(
    "count, other",
    [
        (2, ()),
        pytest.param(5, (), marks=pytest.mark.slow),
        pytest.param(2, VARIANT, marks=pytest.mark.slow),
        pytest.param(2, SHRUNK_NON_SQUARE, marks=pytest.mark.slow),
    ],
)
def test_updates_equal_one_fit_on_all_the_images_and_rescore_the_threshold_images(texture_root, tmp_path, count, other):
    """fit(part 1), then update.py with each further part in turn: the mean and the precision factor equal a
    fit on exactly the images the model trained on (all of them but those it holds out) within 1e-5 relative;
    each update held out its share of the new images, the original held-out images are still among the
    threshold images, and the threshold is their quantile under the fit's statistics; for the embedding and
    score variants too (the stored projection, the neighbourhood, the image score)."""
    parts = _parts(texture_root, tmp_path, count)
    class_dir = class_with(parts[0], texture_root / "brick", tmp_path / "brick")
    model = _train(class_dir, tmp_path / "results", other)
    original = load_model(model / "padim_model.pt")
    for number, part in enumerate(parts[1:], start=1):
        output = tmp_path / f"updated{number}"
        assert _update(model, [str(part[0].parent)], output) == 0
        model = output
    content, path, weights = read_model(model, None)
    assert [u["held_out"] for u in content["updates"]] == [round(HOLDOUT_RATIO * len(p)) for p in parts[1:]]
    threshold_images = {Path(p) for p, _ in content["threshold_images"]}
    assert {Path(p) for p, _ in original["threshold_images"]} < threshold_images
    all_images = [image.resolve() for part in [list_images(class_dir / "train" / "good"), *parts[1:]] for image in part]
    fitted = [image for image in all_images if image not in threshold_images]
    assert content["n_train"] == len(fitted) == len(all_images) - len(threshold_images)

    loaded = build(content, path, weights, CPU, 8)
    updated = loaded.scorer.stats
    scorer = loaded.scorer
    settings = (scorer.projection is not None, scorer.neighbourhood, scorer.image_score, scorer.covariance)
    assert (
        settings
        == {
            (): (False, 1, "map_max", "empirical"),
            VARIANT: (True, 3, "grid_max", "empirical"),
            SHRUNK_NON_SQUARE: (False, 1, "map_max", "ledoit_wolf"),
        }[other]
    )
    assert loaded.geometry.input_size == ((48, 72) if other == SHRUNK_NON_SQUARE else (56, 56))
    reference = Padim(
        scorer.extractor,
        scorer.index,
        loaded.geometry.input_size,
        CPU,
        CPU,
        CPU,
        projection=scorer.projection,
        neighbourhood=scorer.neighbourhood,
        image_score=scorer.image_score,
        covariance=scorer.covariance,
        epsilon=scorer.epsilon,
    )
    fit = FitConfig(batch_size=8, num_workers=0, threshold_quantile=original["threshold_provenance"]["quantile"])
    loader = trainer.class_loader(trainer.good_samples(fitted), loaded.geometry, fit, 0, CPU)
    stats = reference.fit(batch.images for batch in loader)
    assert _relative_difference(updated.mean, stats.mean) < 1e-5
    assert _relative_difference(updated.factor.dense(), stats.factor.dense()) < 1e-5
    thresholds, provenance, _, _ = trainer.threshold_of(
        reference, trainer.good_samples(sorted(threshold_images)), "", loaded.geometry, fit, 0, trainer.World()
    )
    assert provenance["n_images"] == len(threshold_images) == content["threshold_provenance"]["n_images"]
    assert abs(thresholds.image - content["threshold"]) <= 1e-5 * thresholds.image
    assert abs(thresholds.map - content["map_threshold"]) <= 1e-5 * thresholds.map
    assert load_model(tmp_path / "results" / "r" / "brick" / "padim_model.pt")["checksum"] == original["checksum"]


def _darker(paths: list[Path], folder: Path) -> list[Path]:
    """Good images of a darker batch of material: the same texture at half the brightness."""
    folder.mkdir()
    written = []
    for number, path in enumerate(paths):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) * 0.5
        written.append(folder / f"dark_{number:03d}.png")
        Image.fromarray(pixels.round().astype(np.uint8)).save(written[-1])
    return written


def _anomalous(model: Path, images: list[Path], output: Path) -> pd.Series:
    inputs = [flag for image in images for flag in ("--input", str(image))]
    assert predict.main(["--model", str(model), *inputs, "--output", str(output), *PREDICT_FLAGS]) == 0
    return pd.read_csv(output / "predictions.csv").is_anomalous


def test_a_model_taught_a_variation_it_flagged_stops_flagging_it_and_still_flags_defects(trained, tmp_path):
    """brick trained on its usual brightness flags every good image of a darker batch; updated with them it
    flags none of them, nor darker good images it was not given, while every defect image stays above."""
    class_dir = next(Path(p).parents[2] for p in trained.scores)
    dark = _darker(list_images(class_dir / "train" / "good") + list_images(class_dir / "test" / "good"), tmp_path / "d")
    added, unseen = dark[:24], dark[24:]
    defects = [p for p in trained.scores if p.parent.name != "good"]
    assert _anomalous(trained.model_dir, added, tmp_path / "p1").all()
    assert _anomalous(trained.model_dir, unseen, tmp_path / "p2").all()
    assert _update(trained.model_dir, [str(p) for p in added], tmp_path / "updated") == 0
    assert not _anomalous(tmp_path / "updated", added, tmp_path / "q1").any()
    assert not _anomalous(tmp_path / "updated", unseen, tmp_path / "q2").any()
    assert _anomalous(tmp_path / "updated", defects, tmp_path / "q3").all()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_model_saved_before_sums_were_kept_scores_as_before_but_is_refused_for_update(
    trained, texture_root, tmp_path, capsys
):
    """A version-5 file (no sums, no threshold images, no updates) loads and scores exactly as the same
    model's version-6 file; update.py stops with one line saying why it cannot be updated."""
    content = torch.load(trained.model_dir / "padim_model.pt", weights_only=True)
    old = {key: value for key, value in content.items() if key not in UPDATE_ENTRY_TYPES and key != "checksum"}
    old["format_version"] = 5
    old["checksum"] = content_checksum(old)
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "padim_model.pt")
    images = [str(p) for p in list_images(texture_root / "brick" / "test" / "good")]
    scores = []
    for model in (trained.model_dir, tmp_path / "old"):
        output = tmp_path / f"predicted_{model.name}"
        inputs = [flag for image in images for flag in ("--input", image)]
        assert predict.main(["--model", str(model), *inputs, "--output", str(output), *PREDICT_FLAGS]) == 0
        scores.append(pd.read_csv(output / "predictions.csv").score.tolist())
    assert scores[0] == scores[1]
    capsys.readouterr()
    assert _update(tmp_path / "old", images, tmp_path / "updated") == 1
    line = _one_error_line(capsys)
    assert "cannot be updated" in line and "version 5" in line
    assert not (tmp_path / "updated").exists()


def test_missing_threshold_images_are_said_and_counted(texture_root, tmp_path, caplog):
    """An original held-out image deleted since the fit: the update warns with the count, sets the threshold on
    the rest plus the new held-out ones, and records how many were missing."""
    images = list_images(texture_root / "brick" / "train" / "good")
    class_dir = class_with(images[:16], texture_root / "brick", tmp_path / "brick")
    model = _train(class_dir, tmp_path / "results")
    recorded = load_model(model / "padim_model.pt")["threshold_images"]
    Path(recorded[0][0]).unlink()
    folder = tmp_path / "new"
    folder.mkdir()
    for path in images[16:]:
        shutil.copy(path, folder / path.name)
    with caplog.at_level(logging.WARNING):
        assert _update(model, [str(folder)], tmp_path / "updated") == 0
    assert f"1 of the {len(recorded)} images the threshold was set on are missing or changed" in caplog.text
    content = load_model(tmp_path / "updated" / "padim_model.pt")
    held_out = round(HOLDOUT_RATIO * len(images[16:]))
    assert content["threshold_provenance"]["n_missing"] == 1
    assert content["threshold_provenance"]["n_images"] == len(recorded) - 1 + held_out
    assert Path(recorded[0][0]).as_posix() not in [p for p, _ in content["threshold_images"]]


def test_unreadable_added_images_are_skipped_and_counted_and_the_update_is_recorded(trained, tmp_path, capsys, caplog):
    """A file that does not decode is skipped and counted; the record says what was added (its digests'
    digest, the new count), and predict.py logs it."""
    class_dir = next(Path(p).parents[2] for p in trained.scores)
    good = list_images(class_dir / "test" / "good")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert _update(trained.model_dir, [str(p) for p in good] + [str(broken)], tmp_path / "updated") == 0
    before = load_model(trained.model_dir / "padim_model.pt")
    content = load_model(tmp_path / "updated" / "padim_model.pt")
    [record] = content["updates"]
    assert record["skipped"] == 1 and record["fitted"] + record["held_out"] == len(good)
    assert record["n_train"] == content["n_train"] == before["n_train"] + record["fitted"]
    assert content["fingerprint"] != before["fingerprint"]
    assert "1 unreadable" in capsys.readouterr().out
    with caplog.at_level(logging.INFO):
        _anomalous(tmp_path / "updated", good[:1], tmp_path / "predicted")
    assert f"update 1: {record['time']}" in caplog.text and f"{content['n_train']} fitted images in all" in caplog.text


def test_an_update_that_cannot_be_made_writes_nothing(trained, texture_root, tmp_path, capsys, monkeypatch):
    """The input model's own folder as output, no image, a model whose input size gives another feature grid
    than its statistics', a non-finite statistic: one line each, exit 1, no model written."""
    image = str(texture_root / "brick" / "test" / "good" / "000.png")
    assert _update(trained.model_dir, [image], trained.model_dir) == 1
    assert "holds the model to update" in _one_error_line(capsys)
    assert _update(trained.model_dir, [str(tmp_path / "none*.png")], tmp_path / "a") == 1
    assert "no image found in --add" in _one_error_line(capsys)
    content = {k: v for k, v in load_model(trained.model_dir / "padim_model.pt").items() if k != "checksum"}
    save_model(tmp_path / "cropped" / "padim_model.pt", {**content, "cropsize": 48})
    assert _update(tmp_path / "cropped", [image], tmp_path / "b") == 1
    assert "feature grid" in _one_error_line(capsys)
    fitted_update = Padim.update

    def poisoned(self, image_batches):
        stats = fitted_update(self, image_batches)
        stats.mean[0, 0] = float("nan")
        return stats

    monkeypatch.setattr(Padim, "update", poisoned)
    assert _update(trained.model_dir, [image], tmp_path / "c") == 1
    assert "non-finite" in _one_error_line(capsys)
    assert not any((tmp_path / name / "padim_model.pt").exists() for name in "abc")
