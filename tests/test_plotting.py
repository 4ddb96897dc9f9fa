"""Plots of one class: every file is written, readable, in the right place, and shows the reported numbers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from datasets.images import Sample
from utils.evaluation import metrics
from utils.evaluation.results import ScoredSet, evaluate
from utils.evaluation.summary import CATEGORIES, CLOSEST_CALLS, ClassEvaluation, MapSummary, outcome
from utils.padim.anomaly_map import Thresholds
from utils.reporting import plotting

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


@dataclass
class Synthetic:
    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    images: np.ndarray
    threshold: float


def synthetic(with_masks: bool = True, good_only: bool = False) -> Synthetic:
    """A synthetic test set with FPs (bright good images) and FNs (faint defects)."""
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
    return Synthetic(samples, scores, maps, masks, images, float(np.quantile(scores[:16], 0.8)))


def make_result(with_masks: bool = True, good_only: bool = False, limit: int = 2) -> ClassEvaluation:
    """The synthetic set folded into a MapSummary in batches of 5, evaluated by the real `results.evaluate`."""
    data = synthetic(with_masks, good_only)
    thresholds = Thresholds(data.threshold, data.threshold)
    summary = MapSummary(thresholds, (SIZE, SIZE), limit)
    for start in range(0, len(data.samples), 5):
        rows = slice(start, start + 5)
        display = partial(lambda offset, i: data.images[offset + i], start)
        frames = list(zip(data.maps[rows], data.masks[rows]))  # the evaluation frame is the model input here
        summary.add(data.samples[rows], data.scores[rows], data.maps[rows], data.masks[rows], display, frames)
    scored = ScoredSet(data.samples, data.scores, data.maps.reshape(len(data.maps), -1).max(1), skipped=0, maps=summary)
    return evaluate(scored, thresholds, "synthetic", has_ground_truth=with_masks)


@pytest.fixture(scope="module")
def result() -> ClassEvaluation:
    return make_result()


@pytest.fixture(scope="module")
def plotted_with(tmp_path_factory):
    """plot_class_results' output folder for a max_visualizations value, made once per module."""
    folders: dict[int, Path] = {}

    def plotted(limit: int) -> Path:
        if limit not in folders:
            folders[limit] = tmp_path_factory.mktemp(f"plots_{limit}")
            plotting.plot_class_results(make_result(limit=limit), folders[limit])
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
    return {c: {p.name for p in (root / c).glob("*.png")} for c in CATEGORIES}


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


def test_categories_file_each_image_by_the_one_outcome_rule():
    """TN/FP/FN/TP from the true label and the call; a score equal to the threshold is called good."""
    assert [outcome(label, called) for label in (0, 1) for called in (False, True)] == list(CATEGORIES)
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([1.0, 3.0, 3.0, 4.0, 2.0, np.nan])
    categories = plotting.confusion_categories(labels, scores, 2.0)
    assert {name: indices.tolist() for name, indices in categories.items()} == {
        "TN": [0, 4],
        "FP": [1],
        "FN": [5],
        "TP": [2, 3],
    }


def summary_over(
    batches: list[int], samples: list[Sample], scores: np.ndarray, maps: np.ndarray, limit: int
) -> MapSummary:
    """The MapSummary of the images folded in `batches` (their sizes), each batch a summary of its own that the
    first absorbs, as the ranks of a distributed run do; threshold 4, no defect pixels, 4 x 4 maps."""
    summaries, start = [], 0
    for size in batches:
        summary = MapSummary(Thresholds(4.0, 4.0), (4, 4), limit)
        rows = slice(start, start + size)
        masks = np.zeros((size, 4, 4), bool)
        summary.add(samples[rows], scores[rows], maps[rows], masks, lambda i: maps[0], list(zip(maps[rows], masks)))
        summaries.append(summary)
        start += size
    for part in summaries[1:]:
        summaries[0].absorb(part)
    return summaries[0]


@pytest.mark.parametrize("batches", [[5], [2, 3], [1, 1, 1, 1, 1]])
def test_kept_images_are_the_furthest_from_the_threshold_whatever_the_batches(batches):
    """Five good images above the threshold (all FP); kept per limit, furthest first, ties in test order,
    whether folded in one batch, several, or as summaries of parts that absorb each other."""
    scores = np.array([5.0, 9.0, 7.0, 9.0, 6.0], np.float32)
    samples = [Sample(Path(f"{i}.png"), 0, "good") for i in range(5)]
    maps = np.ones((5, 4, 4), np.float32) * scores[:, None, None]
    for limit, expected in ((3, [1, 3, 2]), (0, []), (-1, [1, 3, 2, 4, 0])):
        summary = summary_over(batches, samples, scores, maps, limit)
        kept = summary.shown_images("FP")
        assert [image.index for image in kept] == expected
        assert all(np.array_equal(image.map, maps[image.index]) for image in kept)


@pytest.mark.parametrize("batches", [[11], [4, 7], [1] * 11])
def test_closest_calls_get_figures_beside_the_furthest_whatever_the_batches(batches):
    """report.html shows the CLOSEST_CALLS highest-scored good and lowest-scored defect images: MapSummary keeps
    them (ties: the earlier image), each filed under its outcome after that outcome's furthest, whether folded in
    one batch, several, or as summaries of parts; with limit 0 nothing is kept."""
    scores = np.array([5.0, 9.0, 7.0, 9.0, 6.0, 3.0, 8.0, 3.0, 2.5, 10.0, 12.0], np.float32)
    labels = [0] * 5 + [1] * 6
    samples = [Sample(Path(f"{i}.png"), label, "good" if label == 0 else "crack") for i, label in enumerate(labels)]
    maps = np.ones((11, 4, 4), np.float32) * scores[:, None, None]
    for limit, expected in (
        (1, {"TN": [], "FP": [1, 3, 2, 4], "FN": [8, 5, 7], "TP": [10, 6]}),
        (0, dict.fromkeys(CATEGORIES, [])),
    ):
        summary = summary_over(batches, samples, scores, maps, limit)
        kept = {name: summary.figure_images(name) for name in CATEGORIES}
        assert {name: [image.index for image in images] for name, images in kept.items()} == expected
        assert all(np.array_equal(image.map, maps[image.index]) for images in kept.values() for image in images)
        assert [image.index for image in summary.closest_calls(0)] == ([1, 3, 2, 4] if limit else [])


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


def _figure_indices(result: ClassEvaluation, limit: int) -> dict[str, set[int]]:
    """Per category, the images that get a figure, by their definition: the `limit` furthest from the threshold
    (-1 all, 0 none; ties: the earlier image), and unless `limit` is 0 the CLOSEST_CALLS highest-scored good
    and lowest-scored defect images (ties: the earlier)."""
    labels, scores = result.labels, result.scores.astype(float)
    order = np.arange(labels.size)
    calls = set()
    if limit != 0:
        for label, key in ((0, -scores), (1, scores)):
            ranked = np.lexsort((order, key))
            calls |= set(ranked[labels[ranked] == label][:CLOSEST_CALLS].tolist())
    chosen = {}
    for category, indices in plotting.confusion_categories(labels, scores, result.threshold).items():
        ranked = indices[np.lexsort((indices, -np.abs(scores[indices] - result.threshold)))]
        furthest = ranked if limit < 0 else ranked[:limit]
        chosen[category] = set(furthest.tolist()) | (calls & set(indices.tolist()))
    return chosen


@pytest.mark.parametrize("limit", [0, 2, -1])
def test_visualizations_per_category_respect_the_limit(result, plotted_with, limit):
    """Up to `limit` figures per category plus the report's closest calls; 0 none, -1 all."""
    out = plotted_with(limit)
    categories = plotting.confusion_categories(result.labels, result.scores, result.threshold)
    files = _category_files(out)
    expected = _figure_indices(result, limit)
    for category, indices in categories.items():
        assert len(files[category]) == len(expected[category]) <= len(indices), category
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
    scale = plotting.class_colour_scale(np.array([result.maps.low, result.maps.high]))
    plotting.write_visualizations(make_result(limit=3), scale, tmp_path / "visualizations")
    plotting.write_visualizations(make_result(limit=1), scale, tmp_path / "visualizations")
    expected = _figure_indices(result, 1)
    assert {c: len(names) for c, names in _category_files(tmp_path).items()} == {
        c: len(expected[c]) for c in categories
    }


def test_mean_maps_and_their_titles_carry_the_reported_counts(result):
    data = synthetic()
    categories = plotting.confusion_categories(result.labels, result.scores, result.threshold)
    means = result.maps.mean_maps()
    for category, indices in categories.items():
        np.testing.assert_allclose(means[category], data.maps[indices].mean(axis=0), rtol=1e-5)
    figure = plotting.mean_maps_figure(result.maps, result.name)
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


def test_an_empty_category_gets_a_panel_that_says_so():
    good_only = make_result(good_only=True)
    figure = plotting.mean_maps_figure(good_only.maps, "x")
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
    data = synthetic()
    scale = plotting.class_colour_scale(np.array([result.maps.low, result.maps.high]))
    assert (scale.vmin, scale.vmax) == (float(data.maps.min()), float(data.maps.max()))
    drawer = plotting.ImageFigure((SIZE, SIZE), scale, result.map_threshold)
    for index in (0, len(data.samples) - 1):
        drawer.draw(data.images[index], data.maps[index], data.masks[index], "t")
        assert drawer.heat_panel.get_clim() == (scale.vmin, scale.vmax)
    assert "class scale" in drawer.figure.axes[-1].get_ylabel()


def test_ground_truth_outline_drawn_only_with_a_mask():
    data = synthetic()
    scale = plotting.class_colour_scale(data.maps)
    drawer = plotting.ImageFigure((SIZE, SIZE), scale, data.threshold)
    with_mask = next(i for i, s in enumerate(data.samples) if s.mask_path is not None)
    drawer.draw(data.images[with_mask], data.maps[with_mask], data.masks[with_mask], "t")
    changed = (np.asarray(drawer.input_panel.get_array()) != data.images[with_mask]).any(axis=-1)
    assert (
        changed.any() and (np.abs(np.argwhere(changed).mean(0) - np.argwhere(data.masks[with_mask]).mean(0)) < 3).all()
    )
    assert "ground truth" in drawer.panel_titles[0].get_text()
    drawer.draw(data.images[0], data.maps[0], None, "t")
    assert np.array_equal(drawer.input_panel.get_array(), data.images[0])
    assert drawer.panel_titles[0].get_text() == "input"


def test_a_redrawn_image_figure_equals_the_figure_drawn_whole():
    """Only the panels and titles are redrawn over the kept background: after another image was drawn
    the pixels equal those of a new figure drawn in full (nothing of the earlier image left)."""
    data = synthetic()
    scale = plotting.class_colour_scale(data.maps)
    with_mask = next(i for i, s in enumerate(data.samples) if s.mask_path is not None)
    redrawn = plotting.ImageFigure((SIZE, SIZE), scale, data.threshold)
    redrawn.draw(data.images[with_mask], data.maps[with_mask], data.masks[with_mask], "an earlier, longer title")
    pixels = redrawn.draw(data.images[0], data.maps[0], None, "t")
    whole = plotting.ImageFigure((SIZE, SIZE), scale, data.threshold)
    whole.draw(data.images[0], data.maps[0], None, "t")
    for artist in whole.changing:
        artist.set_animated(False)
    whole.canvas.draw()
    assert pixels.shape == (360, 1000, 3)
    np.testing.assert_array_equal(pixels, np.asarray(whole.canvas.buffer_rgba())[..., :3])


def test_pixel_distributions_count_the_right_pixels(result):
    """Good images: all their pixels; defect images: the pixels inside the masks, bin by bin."""
    data = synthetic()
    normal, abnormal = plotting.pixel_distributions(result)
    bins = result.maps.bins
    good = data.maps[[s.label == 0 for s in data.samples]]
    np.testing.assert_array_equal(normal.counts, np.bincount(bins.index(good).ravel(), minlength=bins.count))
    in_masks = data.maps[data.masks]
    np.testing.assert_array_equal(abnormal.counts, np.bincount(bins.index(in_masks), minlength=bins.count))
    assert normal.label == f"good images: {16 * SIZE * SIZE:,} pixels"
    edges = np.linspace(float(data.maps.min()), float(data.maps.max()), 101)
    assert np.trapezoid(abnormal.density(edges), (edges[1:] + edges[:-1]) / 2) == pytest.approx(1.0, abs=0.05)


def test_without_masks_no_pro_curve_and_abnormal_uses_all_defect_pixels(tmp_path):
    unmasked = make_result(with_masks=False, limit=1)
    plotting.plot_class_results(unmasked, tmp_path)
    assert not (tmp_path / "pro_curve.png").exists()
    for name in CLASS_FILES:
        assert _png_size(tmp_path / name)
    assert _png_size(tmp_path / "roc_curve.png") == (500, 460)
    _, abnormal = plotting.pixel_distributions(unmasked)
    assert abnormal.counts.sum() == 12 * SIZE * SIZE and "all pixels" in abnormal.label


def test_a_test_set_of_good_images_only_still_plots(tmp_path):
    good_only = make_result(good_only=True)
    plotting.plot_class_results(good_only, tmp_path)
    for name in CLASS_FILES:
        assert _png_size(tmp_path / name)
    assert not (tmp_path / "pro_curve.png").exists()


def test_no_figure_is_left_open(plotted):
    assert plt.get_fignums() == []
