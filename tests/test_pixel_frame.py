"""Pixel metrics over the full original frame (issue 37, item 1): every configuration of a data set is scored
on the same pixels; a pixel the model never saw (outside the centre crop) scores its map's minimum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import run_experiment
import trainer
from datasets.images import Batch, Geometry, Sample, evaluation_frame, frame_mask
from tests.helpers import CPU_RUN_FLAGS
from utils.evaluation import metrics
from utils.evaluation.summary import MapSummary
from utils.padim.anomaly_map import Thresholds


def test_pixels_outside_the_crop_score_the_minimum_and_count():
    """A 4 x 8 image, resize 2, crop 2: the model saw original columns 2..5 only (tests/test_predict.py works
    the geometry out by hand). Its defect lies in columns 0..2: one column of it inside the crop."""
    geometry = Geometry(2, 2)
    amap = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = np.zeros((4, 8), bool)
    mask[1:3, 0:3] = True
    batch = Batch(
        amap[None, None].expand(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), [0], [], [(8, 4)], [mask]
    )
    [(frame_map, frame_defects)] = trainer.frame_maps(amap[None], batch, geometry)
    inside = torch.tensor(
        [[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]]
    )
    expected = np.full((4, 8), 1.0, np.float32)  # the map's minimum
    expected[:, 2:6] = inside.numpy()
    np.testing.assert_allclose(frame_map, expected, rtol=0, atol=1e-6)
    assert frame_defects is mask

    summary = MapSummary(Thresholds(2.0, 2.0), (2, 2), 0)
    samples = [Sample(Path("crack.png"), 1, "crack", Path("crack_mask.png"))]
    summary.add(samples, np.array([4.0]), amap[None].numpy(), np.zeros((1, 2, 2), bool), None, [(frame_map, mask)])
    pixels = summary.pixel_histogram()
    assert (int(pixels.inside.sum()), int(pixels.outside.sum())) == (6, 26)
    reference = metrics.PixelHistogram(summary.bins)
    reference.add(expected[None], mask[None])
    np.testing.assert_array_equal(pixels.inside, reference.inside)
    np.testing.assert_array_equal(pixels.outside, reference.outside)


def test_a_good_image_without_mask_counts_every_pixel_as_good():
    batch = Batch(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), [0], [], [(5, 3)], [None])
    [(frame_map, defects)] = trainer.frame_maps(torch.ones(1, 2, 2), batch, Geometry(2, 0))
    assert frame_map.shape == defects.shape == (3, 5) and not defects.any()


def test_large_images_are_evaluated_in_a_frame_that_depends_on_the_image_only():
    assert evaluation_frame(900, 300) == (300, 900)
    assert evaluation_frame(2048, 2048) == (2048, 2048)
    assert evaluation_frame(8000, 6000) == (6000 // 4, 8000 // 4)  # 48 MP over 4 MP: factor 4 (16 > 12)
    mask = Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8)))
    np.testing.assert_array_equal(frame_mask(mask, (2, 2)), np.eye(2, dtype=bool))
    assert frame_mask(None, (2, 2)) is None


@pytest.mark.slow
def test_crop_settings_of_the_same_data_count_the_same_pixels(texture_root: Path, tmp_path: Path):
    """One comparison run at crop 0 and crop 56: equal n_defect_pixels / n_good_pixels, and they are the
    pixels of the test images and their mask files."""
    class_dir = texture_root / "brick"
    flags = [
        *CPU_RUN_FLAGS,
        "--data_path",
        str(class_dir),
        "--base_results_dir",
        str(tmp_path),
        "--cropsize",
        "0",
        "56",
    ]
    assert run_experiment.main(flags) == 0
    table = pd.read_csv(tmp_path / "mvtec_comparison" / "comparison.csv")
    assert sorted(table.cropsize) == [0, 56]
    defect = sum(int((np.asarray(Image.open(p)) >= 128).sum()) for p in (class_dir / "ground_truth").glob("*/*.png"))
    images = list((class_dir / "test").glob("*/*.png"))
    total = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in images)
    assert defect > 0
    assert list(table.n_defect_pixels) == [defect, defect]
    assert list(table.n_good_pixels) == [total - defect, total - defect]
