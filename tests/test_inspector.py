"""Outputs an inspector can act on: intervals at the operating threshold, recall per defect type,
and a warning when the centre crop hides much of each image."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage.measure import label as measure_label
from skimage.measure import regionprops
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from datasets.images import Geometry, Sample
from trainer import warn_on_crop_losses
from utils.evaluation import metrics
from utils.evaluation.results import defect_type_table
from utils.evaluation.summary import ClassEvaluation, MapSummary
from utils.padim.anomaly_map import Thresholds, anomaly_regions, to_original_resolution
from utils.reporting.images import OUTLINE_COLOUR, draw_regions

Z95 = 1.959963984540054


def _wilson_closed_form(successes: int, trials: int) -> tuple[float, float]:
    p, z2 = successes / trials, Z95**2
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z95 / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials**2))
    return centre - half, centre + half


@pytest.mark.parametrize("successes, trials", [(0, 10), (10, 10), (3, 10), (45, 50), (1, 1), (0, 1)])
def test_wilson_interval_matches_statsmodels_and_the_closed_form(successes, trials):
    low, high = metrics.wilson_interval(successes, trials)
    assert (low, high) == pytest.approx(proportion_confint(successes, trials, alpha=0.05, method="wilson"), abs=1e-12)
    assert (low, high) == pytest.approx(_wilson_closed_form(successes, trials), abs=1e-9)
    assert -1e-12 <= low <= successes / trials + 1e-12 and successes / trials <= high + 1e-12 <= 1 + 2e-12
    if successes == 0:
        assert low == pytest.approx(0, abs=1e-12) and high > 0
    if successes == trials:
        assert high == pytest.approx(1) and low < 1


def test_no_trials_give_no_interval():
    assert metrics.wilson_interval(0, 0) is None


def test_operating_point_rates_and_intervals():
    labels = np.array([0] * 8 + [1] * 5)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 1.2, 0.2, 0.8, 1.1, 1.5, 2.0])
    point = metrics.operating_point(labels, scores, 0.7)
    assert (point.true_negatives, point.false_positives, point.false_negatives, point.true_positives) == (6, 2, 1, 4)
    assert point.false_positive_rate == pytest.approx(2 / 8)
    intervals = point.intervals()
    assert intervals["precision"] == pytest.approx(_wilson_closed_form(4, 6))
    assert intervals["recall"] == pytest.approx(_wilson_closed_form(4, 5))
    assert intervals["false_positive_rate"] == pytest.approx(_wilson_closed_form(2, 8))


def _evaluation(has_ground_truth: bool = True) -> tuple[ClassEvaluation, np.ndarray, np.ndarray]:
    """A hand-made test set (6 good images, 4 'crack' and 3 'dent', 8x8 maps with masks), evaluated, with its maps
    and masks."""
    rng = np.random.default_rng(0)
    types = ["good"] * 6 + ["crack"] * 4 + ["dent"] * 3
    samples = [
        Sample(Path(f"{i}.png"), int(t != "good"), t, Path(f"{i}_mask.png") if t != "good" else None)
        for i, t in enumerate(types)
    ]
    scores = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 6.0, 2.2, 5.0, 7.0, 8.0, 1.2, 4.5, 9.0])
    maps = rng.random((13, 8, 8)).astype(np.float32)
    masks = np.zeros((13, 8, 8), bool)
    for i in range(6, 13):
        masks[i, 2:5, 3:6] = True
        maps[i, 2:5, 3:6] += 0.5 * (i % 3)
    summary = MapSummary(Thresholds(4.0, 4.0), (8, 8), 0)
    frames = list(zip(maps, masks))  # the evaluation frame is the model input here
    summary.add(samples, scores, maps, masks, lambda i: np.zeros((8, 8, 3), np.uint8), frames)
    return ClassEvaluation("part", samples, scores, summary, 4.0, 4.0, has_ground_truth), maps, masks


def test_defect_types_recall_and_auroc_against_sklearn():
    result, maps, masks = _evaluation()
    table = defect_type_table(result).set_index("defect")
    assert list(table.index) == ["crack", "dent"] and list(table.n_images) == [4, 3]
    assert table.recall["crack"] == pytest.approx(3 / 4) and table.recall["dent"] == pytest.approx(2 / 3)
    assert (table.recall_ci_low["crack"], table.recall_ci_high["crack"]) == pytest.approx(_wilson_closed_form(3, 4))
    good = np.arange(6)
    for defect, rows in (("crack", np.arange(6, 10)), ("dent", np.arange(10, 13))):
        chosen = np.r_[good, rows]
        labels = (np.arange(13) >= 6).astype(int)[chosen]
        assert table.roc_auc[defect] == pytest.approx(roc_auc_score(labels, result.scores[chosen]))
        pixels = roc_auc_score(masks[chosen].reshape(-1), maps[chosen].reshape(-1))
        assert table.pixel_roc_auc[defect] == pytest.approx(pixels, abs=1e-4)


def test_defect_types_without_masks_leave_pixel_columns_empty():
    table = defect_type_table(_evaluation(has_ground_truth=False)[0])
    assert table.pixel_roc_auc.isna().all() and table.pixel_aupro.isna().all() and table.roc_auc.notna().all()


@pytest.mark.parametrize(
    "width, height, kept",
    [
        (512, 256, 224**2 / (256 * 512)),
        (256, 256, 224**2 / 256**2),
        (300, 900, 224**2 / (256 * 768)),
        (100, 50, 224**2 / (256 * 512)),
    ],
)
def test_kept_share_of_the_centre_crop(width, height, kept):
    assert Geometry(256, 224).kept_share(width, height) == pytest.approx(kept)
    assert Geometry(256, 0).kept_share(width, height) == 1.0


@pytest.mark.parametrize("size, warned", [((448, 224), True), ((300, 300), False)])
def test_crop_warning_for_elongated_images_only(tmp_path: Path, caplog, size, warned):
    samples = []
    for number in range(3):
        path = tmp_path / f"{number}.png"
        Image.new("RGB", size).save(path)
        samples.append(Sample(path, 0, "good"))
    with caplog.at_level(logging.WARNING):
        warn_on_crop_losses(samples, Geometry(256, 224), "tiles")
    assert (
        "tiles: the crop keeps 38% of each image on average; defects outside it are never seen; "
        "--cropsize 0 keeps the whole part" in caplog.text
    ) == warned
    assert ("the crop keeps" in caplog.text) == warned


def test_regions_have_exact_boxes_areas_and_scores_and_specks_are_dropped():
    amap = np.zeros((20, 30), np.float32)
    amap[2:5, 3:9] = 5.0
    amap[3, 4] = 6.5
    amap[10:18, 20:22] = 7.0
    amap[17, 22] = 7.0  # diagonal neighbour: the same 8-connected region
    amap[15, 5] = 9.0  # a speck
    regions = anomaly_regions(amap, 1.0, min_area=2)
    assert [(r.x, r.y, r.width, r.height, r.area) for r in regions] == [(3, 2, 6, 3, 18), (20, 10, 3, 8, 17)]
    assert regions[0].peak == 6.5 and regions[0].mean == pytest.approx((17 * 5.0 + 6.5) / 18)
    assert regions[1].peak == 7.0 and regions[1].mean == 7.0
    assert len(anomaly_regions(amap, 1.0, min_area=1)) == 3
    assert anomaly_regions(amap, 10.0, min_area=1) == []


def test_regions_at_the_original_resolution_of_a_cropped_non_square_image():
    """A block of the 32 x 32 model input, mapped back through resize 32 / crop 32 of a 128 x 64 image
    (scale 2, crop offset 16 resized columns): its box lands exactly at 2x its place plus the offset."""
    amap = torch.zeros(32, 32)
    amap[8:16, 8:16] = 10.0
    full = to_original_resolution(amap, 64, 128, Geometry(32, 32)).numpy()
    [region] = anomaly_regions(full, 5.0, min_area=1)
    assert (region.x, region.y, region.width, region.height, region.area) == (48, 16, 16, 16, 256)


def test_regions_are_numbered_by_their_first_pair_of_rows_then_column():
    """B's first pixel comes first in a pixel scan (row 0), but A reaches the first 2 x 2 block column of
    rows 0-1 first: A, then B, as OpenCV's block labelling numbered them."""
    amap = np.zeros((6, 8), np.float32)
    amap[1:4, 1] = 2.0  # A, first pixel (1, 1)
    amap[0:2, 5] = 3.0  # B, first pixel (0, 5)
    amap[3, 4] = 4.0  # C, rows 2-3
    boxes = [(r.x, r.y, r.width, r.height, r.area) for r in anomaly_regions(amap, 1.0, min_area=1)]
    assert boxes == [(1, 1, 1, 3, 3), (5, 0, 1, 2, 2), (4, 3, 1, 1, 1)]


@pytest.mark.parametrize("seed", range(4))
def test_regions_match_skimage_regionprops(seed):
    """Boxes, areas, peaks and means against skimage's 8-connected labelling, in the order of each
    region's first 2 x 2 block (row pair, then column pair), specks under min_area left out."""
    rng = np.random.default_rng(seed)
    amap = ndimage.gaussian_filter(rng.standard_normal((60, 80)), 1.5).astype(np.float32)
    threshold = float(np.quantile(amap, 0.8))
    props = [p for p in regionprops(measure_label(amap > threshold, connectivity=2), amap) if p.area >= 3]
    props.sort(key=lambda p: min((row // 2, column // 2) for row, column in p.coords))
    expected = [
        (p.bbox[1], p.bbox[0], p.bbox[3] - p.bbox[1], p.bbox[2] - p.bbox[0], p.area, p.intensity_max, p.intensity_mean)
        for p in props
    ]
    found = [(r.x, r.y, r.width, r.height, r.area, r.peak, r.mean) for r in anomaly_regions(amap, threshold, 3)]
    assert len(found) == len(expected) > 3
    for mine, reference in zip(found, expected):
        assert mine[:6] == reference[:6] and mine[6] == pytest.approx(reference[6], rel=1e-6)


def _within(outline: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose centre lies within `radius` of a pixel of `outline`."""
    return ndimage.distance_transform_edt(~outline) <= radius


@pytest.mark.parametrize(("shape", "radius"), [((20, 24), 1), ((12, 1500), 2)])
def test_region_boxes_cover_the_pixels_within_the_pen_of_the_box_edge(shape, radius):
    """2 px boxes (3 px on images of 1500 px or more) cover what OpenCV's thick rectangle did: every pixel
    within 1 (2) of the box's edge pixels, corners rounded; a box at the image's edge is clipped."""
    image = np.zeros((*shape, 3), np.uint8)
    regions = anomaly_regions(np.pad(np.ones((5, 7)), ((3, 3), (4, 8))), 0.5, 1)  # x 4..10, y 3..7
    regions += anomaly_regions(np.pad(np.ones((2, 3)), ((0, 9), (0, 9))), 0.5, 1)  # at the top-left corner
    drawn = draw_regions(image, regions)
    assert drawn is image
    edge = np.zeros(shape, bool)
    edge[3:8, 4:11] = True
    edge[4:7, 5:10] = False
    edge[0:2, 0:3] = True
    painted = (drawn == OUTLINE_COLOUR).all(axis=2)
    assert np.array_equal(painted, _within(edge, radius))
    assert not (drawn[~painted] != 0).any()


def test_region_box_is_opencvs_thickness_2_rectangle():
    """The box of x 4..10, y 2..8 as cv2.rectangle(thickness=2) drew it (copied from its output)."""
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    [region] = anomaly_regions(np.pad(np.ones((7, 7)), ((2, 2), (4, 2))), 0.5, 1)
    drawn = draw_regions(np.zeros((11, 13, 3), np.uint8), [region])
    assert np.array_equal((drawn == OUTLINE_COLOUR).all(axis=2), expected)
