"""Plots of one class: every file is written, readable, in the right place, and shows the reported numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from datasets.images import Sample
from trainer import ScoredSet, evaluate
from utils import metrics, plotting
from utils.evaluation import ClassEvaluation

SIZE = 64
CLASS_FILES = [
    "roc_curve.png",
    "pr_curve.png",
    "score_distribution.png",
    "confusion_matrix.png",
    "mean_anomaly_maps.png",
    "patch_score_distribution_normal.png",
    "patch_score_distribution_abnormal.png",
    "patch_score_distribution_comparative.png",
]


def _samples(with_masks: bool) -> list[Sample]:
    """16 good and 12 defect images of two types; two good stems collide, one stem has spaces and non-ASCII."""
    good = [Sample(Path(f"/data/c/test/good/{i:03d}.png"), 0, "good") for i in range(15)]
    good.append(Sample(Path("/data/c/train/good/000.png"), 0, "good"))  # same map as test/good/000 below
    defects = []
    for i in range(12):
        defect = "crack" if i % 2 else "scratch"
        stem = "bild größe 1" if i == 0 else f"{i:03d}"
        mask = Path(f"/data/c/ground_truth/{defect}/{stem}_mask.png") if with_masks and i != 11 else None
        defects.append(Sample(Path(f"/data/c/test/{defect}/{stem}.png"), 1, defect, mask))
    return good + defects


def make_result(with_masks: bool = True, good_only: bool = False) -> ClassEvaluation:
    """A synthetic class scored by the real `trainer.evaluate`, with FPs (bright good images)
    and FNs (faint defects)."""
    rng = np.random.default_rng(7)
    samples = _samples(with_masks)
    if good_only:
        samples = [s for s in samples if s.label == 0]
    n = len(samples)
    maps = rng.gamma(4.0, 1.0, (n, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.label == 1:
            top, left = rng.integers(4, SIZE - 20, 2)
            region = (slice(top, top + 14), slice(left, left + 10))
            maps[i][region] += 6.0 if i % 3 else 1.5
            masks[i][region] = sample.mask_path is not None
        elif i in (2, 5):
            maps[i, 30:34, 30:34] += 10.0
    maps[15] = maps[0]
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    scores = maps.reshape(n, -1).max(axis=1)
    threshold = float(np.quantile(scores[:16], 0.8))
    scored = ScoredSet(samples, scores, maps, masks, images, skipped=0)
    return evaluate(scored, threshold, "synthetic", has_ground_truth=with_masks)


@pytest.fixture(scope="module")
def result() -> ClassEvaluation:
    return make_result()


@pytest.fixture(scope="module")
def plotted_with(result, tmp_path_factory):
    """plot_class_results' output folder for a max_visualizations value, made once per module."""
    folders: dict[int, Path] = {}

    def plotted(limit: int) -> Path:
        if limit not in folders:
            folders[limit] = tmp_path_factory.mktemp(f"plots_{limit}")
            plotting.plot_class_results(result, folders[limit], max_visualizations=limit)
        return folders[limit]

    return plotted


@pytest.fixture(scope="module")
def plotted(plotted_with) -> Path:
    return plotted_with(2)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


def _category_files(out: Path) -> dict[str, set[str]]:
    root = out / "visualizations"
    return {c: {p.name for p in (root / c).glob("*.png")} for c in plotting.CATEGORIES}


def test_fixture_has_every_outcome(result):
    point = metrics.operating_point(result.labels, result.scores, result.threshold)
    assert min(point.true_negatives, point.false_positives, point.false_negatives, point.true_positives) >= 1


@pytest.mark.parametrize("seed", range(5))
def test_categories_match_operating_point(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    scores = rng.integers(0, 6, 50).astype(float)
    threshold = 3.0
    categories = plotting.confusion_categories(labels, scores, threshold)
    point = metrics.operating_point(labels, scores, threshold)
    counts = {
        "TN": point.true_negatives,
        "FP": point.false_positives,
        "FN": point.false_negatives,
        "TP": point.true_positives,
    }
    assert {c: len(i) for c, i in categories.items()} == counts
    assert np.array_equal(np.sort(np.concatenate(list(categories.values()))), np.arange(50))
    assert (scores[categories["TN"]] <= threshold).all() and (labels[categories["TN"]] == 0).all()
    assert (scores[categories["TP"]] > threshold).all() and (labels[categories["TP"]] == 1).all()


def test_selection_takes_the_furthest_from_threshold_first():
    scores = np.array([5.0, 9.0, 7.0, 9.0, 6.0])
    indices = np.array([0, 1, 2, 3, 4])
    assert plotting.select_for_visualization(indices, scores, 4.0, 3).tolist() == [1, 3, 2]
    assert plotting.select_for_visualization(indices, scores, 4.0, 0).size == 0
    assert plotting.select_for_visualization(indices, scores, 4.0, -1).tolist() == [1, 3, 2, 4, 0]


def test_file_names_keep_the_stem_and_drop_unsafe_characters():
    assert plotting.visualization_name(Sample(Path("/x/bild größe 1.png"), 1, "crack")) == "crack_bild größe 1.png"
    assert plotting.visualization_name(Sample(Path("/x/a:b?.png"), 1, 'c*"d')) == "c__d_a_b_.png"


def test_thinned_curves_keep_the_ends_and_the_areas():
    rng = np.random.default_rng(0)
    x = np.r_[0.0, np.sort(rng.random(100_000)), 1.0]
    curves = metrics.PixelCurves(x, np.sqrt(x), x**0.3)
    thin = curves.thinned(2000)
    assert 2 < thin.fpr.size <= 3 * 2000 + 2
    assert (thin.fpr[0], thin.tpr[-1]) == (0.0, 1.0) and np.isin(thin.fpr, x).all()
    assert abs(np.trapezoid(thin.tpr, thin.fpr) - np.trapezoid(curves.tpr, curves.fpr)) < 1e-3
    assert abs(np.trapezoid(thin.pro, thin.fpr) - np.trapezoid(curves.pro, curves.fpr)) < 1e-3


def test_every_class_file_is_a_readable_png(plotted):
    for name in [*CLASS_FILES, "pro_curve.png"]:
        width, height = _png_size(plotted / name)
        assert width >= 300 and height >= 250, name
    assert _png_size(plotted / "roc_curve.png") == (1000, 460)


@pytest.mark.parametrize("limit", [0, 2, -1])
def test_visualizations_per_category_respect_the_limit(result, plotted_with, limit):
    out = plotted_with(limit)
    categories = plotting.confusion_categories(result.labels, result.scores, result.threshold)
    files = _category_files(out)
    for category, indices in categories.items():
        expected = len(indices) if limit < 0 else min(limit, len(indices))
        assert len(files[category]) == expected, category
        if limit < 0:
            names = set(plotting._unique_names(result.samples, indices))
            assert files[category] == names
    assert (out / "visualizations").is_dir() == (limit != 0)


def test_visualizations_are_named_by_defect_and_stem_in_their_category(result, plotted_with):
    out = plotted_with(-1)
    categories = plotting.confusion_categories(result.labels, result.scores, result.threshold)
    files = _category_files(out)
    for category, indices in categories.items():
        for index in indices:
            sample = result.samples[index]
            assert any(name.startswith(f"{sample.defect}_{sample.path.stem}") for name in files[category])
    collided = [i for i, s in enumerate(result.samples) if s.label == 0 and s.path.stem == "000"]
    assert len(collided) == 2
    good_files = files["TN"] | files["FP"]
    assert "good_000.png" in good_files and f"good_000_{collided[1]}.png" in good_files
    assert "scratch_bild größe 1.png" in files["TP"] | files["FN"]
    width, height = plotting.IMAGE_FIGURE_SIZE
    some = next((out / "visualizations" / "TP").glob("*.png"))
    assert _png_size(some) == (int(width * plotting.DPI), int(height * plotting.DPI))


def test_rerun_with_a_lower_limit_removes_stale_figures(result, tmp_path):
    categories = plotting.confusion_categories(result.labels, result.scores, result.threshold)
    scale = plotting.class_colour_scale(result.maps)
    plotting.write_visualizations(result, categories, scale, tmp_path / "visualizations", 3)
    plotting.write_visualizations(result, categories, scale, tmp_path / "visualizations", 1)
    assert {c: len(names) for c, names in _category_files(tmp_path).items()} == {
        c: min(1, len(i)) for c, i in categories.items()
    }


def test_mean_map_titles_carry_the_reported_counts(result):
    categories = plotting.confusion_categories(result.labels, result.scores, result.threshold)
    figure = plotting.mean_maps_figure(result.maps, categories, result.name)
    titles = {ax.get_title().split(" ")[0]: ax.get_title() for ax in figure.axes if ax.get_title()}
    summary = result.summary
    reported = {
        "TN": summary["true_negatives"],
        "FP": summary["false_positives"],
        "FN": summary["false_negatives"],
        "TP": summary["true_positives"],
    }
    for category, count in reported.items():
        assert titles[category].endswith(f"n={count}")


def test_an_empty_category_gets_a_panel_that_says_so(result):
    categories = {
        c: np.array([], dtype=int) if c == "FN" else i
        for c, i in plotting.confusion_categories(result.labels, result.scores, result.threshold).items()
    }
    figure = plotting.mean_maps_figure(result.maps, categories, "x")
    panel = next(ax for ax in figure.axes if ax.get_title().startswith("FN"))
    assert panel.get_title().endswith("n=0")
    assert [t.get_text() for t in panel.texts] == ["no images in this category"]
    assert not panel.images


def test_confusion_matrix_draws_the_summary_counts(result):
    counts = plotting.summary_counts(result.summary)
    figure = plotting.confusion_figure(counts, result.summary, result.threshold, result.name)
    texts = sorted(t.get_text() for t in figure.axes[0].texts)
    s = result.summary
    assert texts == sorted(
        [
            f"TN\n{s['true_negatives']}",
            f"FP\n{s['false_positives']}",
            f"FN\n{s['false_negatives']}",
            f"TP\n{s['true_positives']}",
        ]
    )


def test_curve_legends_carry_the_reported_metrics(result):
    summary = result.summary
    roc = plotting.roc_figure(result)
    legends = [" ".join(t.get_text() for t in ax.get_legend().get_texts()) for ax in roc.axes]
    assert f"AUROC {summary['roc_auc']:.3f}" in legends[0]
    assert f"pixel AUROC {summary['pixel_roc_auc']:.3f}" in legends[1]
    pr = plotting.pr_figure(result)
    assert f"AP {summary['pr_auc']:.3f}" in pr.axes[0].get_legend().get_texts()[0].get_text()
    pro = plotting.pro_figure(result.name, result.pixel_curves, summary["pixel_aupro"])
    texts = [t.get_text() for t in pro.axes[0].get_legend().get_texts()]
    assert f"{summary['pixel_aupro']:.3f}" in texts[0] and "FPR limit 0.3" in texts[1]
    assert [line.get_xdata()[0] for line in pro.axes[0].lines[1:]] == [metrics.AUPRO_FPR_LIMIT]


def test_summary_counts_from_another_threshold_are_warned_about(result, caplog):
    categories = plotting.confusion_categories(result.labels, result.scores, result.threshold)
    counts = plotting.summary_counts(result.summary)
    plotting._warn_on_count_mismatch("x", counts, categories)
    assert not caplog.records
    plotting._warn_on_count_mismatch("x", counts + np.array([[1, -1], [0, 0]]), categories)
    assert "differ" in caplog.text


def test_heat_maps_share_the_class_scale(result):
    scale = plotting.class_colour_scale(result.maps)
    assert (scale.vmin, scale.vmax) == (float(result.maps.min()), float(result.maps.max()))
    drawer = plotting.ImageFigure((SIZE, SIZE), scale, result.threshold)
    for index in (0, len(result.samples) - 1):
        drawer.draw(result.images[index], result.maps[index], result.masks[index], "t")
        assert drawer.heat_panel.get_clim() == (scale.vmin, scale.vmax)
    assert "class scale" in drawer.figure.axes[-1].get_ylabel()


def test_ground_truth_outline_drawn_only_with_a_mask(result):
    drawer = plotting.ImageFigure((SIZE, SIZE), plotting.class_colour_scale(result.maps), result.threshold)
    with_mask = next(i for i, s in enumerate(result.samples) if s.mask_path is not None)
    drawer.draw(result.images[with_mask], result.maps[with_mask], result.masks[with_mask], "t")
    changed = (np.asarray(drawer.input_panel.get_array()) != result.images[with_mask]).any(axis=-1)
    assert (
        changed.any()
        and (np.abs(np.argwhere(changed).mean(0) - np.argwhere(result.masks[with_mask]).mean(0)) < 3).all()
    )
    assert "ground truth" in drawer.panel_titles[0].get_text()
    drawer.draw(result.images[0], result.maps[0], None, "t")
    assert np.array_equal(drawer.input_panel.get_array(), result.images[0])
    assert drawer.panel_titles[0].get_text() == "input"


def test_pixel_samples_come_from_the_right_pixels(result, monkeypatch):
    monkeypatch.setattr(plotting, "PIXEL_SAMPLE_LIMIT", 500)
    normal, abnormal = plotting.pixel_samples(result)
    assert normal.values.size == 500 and normal.total == 16 * SIZE * SIZE
    in_masks = result.maps[result.masks]
    assert abnormal.total == in_masks.size and abnormal.values.size == 500
    assert np.isin(abnormal.values, in_masks).all()
    again, _ = plotting.pixel_samples(result)
    assert np.array_equal(again.values, normal.values)


def test_without_masks_no_pro_curve_and_abnormal_uses_all_defect_pixels(tmp_path):
    unmasked = make_result(with_masks=False)
    plotting.plot_class_results(unmasked, tmp_path, max_visualizations=1)
    assert not (tmp_path / "pro_curve.png").exists()
    for name in CLASS_FILES:
        assert _png_size(tmp_path / name)
    assert _png_size(tmp_path / "roc_curve.png") == (500, 460)
    _, abnormal = plotting.pixel_samples(unmasked)
    assert abnormal.total == 12 * SIZE * SIZE and "all pixels" in abnormal.label


def test_a_test_set_of_good_images_only_still_plots(tmp_path):
    good_only = make_result(good_only=True)
    plotting.plot_class_results(good_only, tmp_path)
    for name in CLASS_FILES:
        assert _png_size(tmp_path / name)
    assert not (tmp_path / "pro_curve.png").exists()


def test_no_figure_is_left_open(plotted):
    assert plt.get_fignums() == []
