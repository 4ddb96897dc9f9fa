"""Large images: the decompression-bomb guard kept by default and raised by a flag, reduction as the image
is decoded (a 150 MP image in bounded memory), and the model input of a reduced image on the grid of
the full one's; images up to LARGE_IMAGE_PIXELS decode exactly as before."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from benchmarks.large_image import make_image
from datasets import DEFAULT_MAX_IMAGE_PIXELS
from datasets.images import (
    LARGE_IMAGE_PIXELS,
    Geometry,
    ImageDataset,
    Sample,
    decode_rgb,
    read_mask,
    read_rgb,
)
from tests.helpers import PREDICT_FLAGS, ROOT

GEOMETRY = Geometry(256, 224)


def smooth_image(width: int, height: int) -> Image.Image:
    """Smooth waves about 16 model-input pixels long: resampling changes them little, a grid shifted by one
    model-input pixel a lot."""
    period = min(width, height) / 14
    x = np.sin(np.arange(width, dtype=np.float32) * (2 * np.pi / period))
    y = np.cos(np.arange(height, dtype=np.float32) * (2 * np.pi / period))[:, None]
    pixels = np.stack([127.5 + 120 * x + 0 * y, 127.5 + 120 * y + 0 * x, 127.5 + 60 * (x + y)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def test_a_150_megapixel_jpeg_is_refused_by_default_and_decoded_in_bounded_memory_when_allowed(tmp_path):
    path = tmp_path / "line_scan.jpg"
    make_image(path, 15000, 10000, "L")
    assert 15000 * 10000 > DEFAULT_MAX_IMAGE_PIXELS
    refused = ImageDataset([Sample(path, 0, "good")], GEOMETRY)[0]
    assert refused[0] is None and "raise it with --max_image_pixels N (0: no limit)" in refused[1]
    command = [sys.executable, "-m", "benchmarks.large_image", "--measure", str(path), "reduced"]
    result = json.loads(subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    assert result["input"] == [3, 224, 224]
    assert result["added_mib"] < 100  # the whole image, decoded, is 143 MiB grey and 429 MiB as RGB


def test_a_map_projected_onto_a_150_megapixel_image_holds_little_more_than_its_output():
    """predict.py's full-size heat map: the projection's temporaries stay a fraction of the output (they were
    twice it when two dense matmuls and a blended border made it)."""
    command = [sys.executable, "-m", "benchmarks.large_image", "--measure_projection"]
    result = json.loads(subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    assert result["output_mib"] == 572  # 15000 x 10000 float32
    assert result["added_mib"] < 1.25 * result["output_mib"]


def test_images_up_to_the_large_size_decode_exactly_as_in_full(tmp_path):
    path = tmp_path / "normal.png"
    smooth_image(1200, 900).save(path)
    tensor = ImageDataset([Sample(path, 0, "good")], GEOMETRY)[0][0]
    assert torch.equal(tensor, GEOMETRY.image_transform()(read_rgb(path)))
    assert not decode_rgb(path, short_side=256).reduced


@pytest.mark.parametrize("cropsize", [224, 0])
def test_a_reduced_image_lands_on_the_full_images_grid_and_its_mask_stays_exact(tmp_path, cropsize):
    width, height = 5000, 3605  # reduced by 4, rounded up: 1250 x 902, whose own resize would be 1 pixel short
    assert width * height > LARGE_IMAGE_PIXELS
    path, mask_path = tmp_path / "large.png", tmp_path / "large_mask.png"
    smooth_image(width, height).save(path)
    mask = np.zeros((height, width), np.uint8)
    mask[1000:1800, 2000:3100] = 255
    Image.fromarray(mask).save(mask_path)
    geometry = Geometry(256, cropsize)
    decoded = decode_rgb(path, 0, short_side=256)
    assert decoded.reduced and decoded.size == (width, height) and min(decoded.image.size) >= 3 * 256
    dataset = ImageDataset([Sample(path, 1, "dent", mask_path)], geometry, pixels=True, max_pixels=0)
    pixels, mask_tensor, *_ = dataset[0]
    full = geometry.pixel_transform()(read_rgb(path, 0)).permute(1, 2, 0)
    assert pixels.shape == full.shape
    difference = (pixels.float() - full.float()).abs()
    assert difference.mean() < 3 and difference.max() <= 16  # grey levels: resampling; a grid 1 pixel off gives 7, 32
    expected_mask = geometry.mask_transform()(read_mask(mask_path, (width, height), 0))[0] > 0
    assert torch.equal(mask_tensor, expected_mask)


def test_exif_orientation_of_a_reduced_jpeg_gives_the_turned_size(tmp_path):
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter
    smooth_image(6000, 4000).save(path, exif=exif, quality=90)
    decoded = decode_rgb(path, 0, short_side=256)
    assert decoded.size == (4000, 6000) and decoded.reduced
    assert decoded.image.size[0] < decoded.image.size[1]


@pytest.mark.slow
def test_predict_writes_a_large_images_outputs_at_its_full_size(trained, tmp_path):
    path = tmp_path / "large.png"
    smooth_image(5000, 3605).save(path)
    out = tmp_path / "out"
    flags = ["--model", str(trained.model_dir), "--input", str(path), "--output", str(out), *PREDICT_FLAGS]
    assert predict.main([*flags, "--save_masks"]) == 0
    for folder in ("heatmaps", "overlays", "masks"):
        with Image.open(out / folder / "large.png") as image:
            assert image.size == (5000, 3605)
    assert predict.main([*flags, "--max_image_pixels", "10000000"]) == 1  # refused: the message names the flag
    assert "--max_image_pixels" in (out / "predictions.csv").read_text()
