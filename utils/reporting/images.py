"""How the tools draw: heat colours, overlays, region boxes and the PNG writer, for predict.py's
outputs and the class figures alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image

from utils.padim.anomaly_map import Region
from utils.runtime.output_files import atomic_write

HEAT_COLORMAP = "inferno"  # every heat map the tools draw, figures and predict.py alike
OVERLAY_ALPHA = 0.5
OUTLINE_COLOUR = (0, 255, 255)  # cyan, apart from every colour of the heat scale: region boxes, ground-truth outlines
PNG_COMPRESS_LEVEL = 1


def heat_colour_map() -> Colormap:
    """The heat scale as matplotlib draws it (imshow panels, colour bars and the figures' overlays)."""
    return matplotlib.colormaps[HEAT_COLORMAP]


def heat_colour_table() -> np.ndarray:
    """(256, 3) uint8 colours of the heat scale, the lowest to the highest level of heat_colours (predict.py's
    fixed scale; the figures colour through heat_colour_map so their overlays match matplotlib's colour bars)."""
    return np.round(heat_colour_map()(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def heat_colours(amap: np.ndarray, top: float, table: np.ndarray) -> np.ndarray:
    """A score map as RGB on the fixed scale 0 .. `top`, so colours mean the same in every image of a class."""
    levels = np.clip(np.rint(amap / top * 255.0), 0, 255).astype(np.uint8)
    return table[levels]


def blend_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image with its (H, W, 3) uint8 heat-map colours laid over it, as every overlay the tools draw."""
    return np.rint((1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * heat).astype(np.uint8)


def pen(radius: int) -> np.ndarray:
    """(2 radius + 1)^2 footprint of a round pen: the pixels within `radius` of its centre."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def box_outline(height: int, width: int, radius: int) -> np.ndarray:
    """(height + 2 radius, width + 2 radius) pixels a round pen of `radius` covers when it traces the edge
    of a height x width box whose top-left pixel is at (radius, radius): straight bands along the sides,
    rounded outer corners (OpenCV's thick rectangle)."""
    outline = np.zeros((height + 2 * radius, width + 2 * radius), dtype=bool)
    span = 2 * radius + 1
    bottom, right = height - 1, width - 1
    outline[:span, radius : radius + width] = outline[bottom : bottom + span, radius : radius + width] = True
    outline[radius : radius + height, :span] = outline[radius : radius + height, right : right + span] = True
    for top in (0, bottom):
        for left in (0, right):
            outline[top : top + span, left : left + span] |= pen(radius)
    return outline


def draw_regions(image: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
    """`image` (H, W, 3 uint8) with each region's bounding box drawn on it in place, in OUTLINE_COLOUR: the
    pixels within 1 px of the box's edge (2 px on images whose larger side is 1500 px or more), the
    boxes OpenCV's rectangle of thickness 2 (3) drew."""
    radius = 1 if max(image.shape[:2]) < 1500 else 2
    for region in regions:
        outline = box_outline(region.height, region.width, radius)
        top, left = region.y - radius, region.x - radius  # the outline's place; it may reach past the image
        window = image[max(top, 0) : top + outline.shape[0], max(left, 0) : left + outline.shape[1]]
        window[outline[max(-top, 0) :, max(-left, 0) :][: window.shape[0], : window.shape[1]]] = OUTLINE_COLOUR
    return image


def write_png(picture: np.ndarray | Figure, path: Path) -> None:
    """`picture` (uint8 pixels, or a figure at its own dpi) as a PNG, atomically like every output of the suite.

    zlib level 1: encoding is most of the time of writing an image, and level 1 is much faster than
    PIL's default for slightly larger files (tuning; benchmarks/README.md)."""
    if isinstance(picture, Figure):
        options = {"compress_level": PNG_COMPRESS_LEVEL}
        atomic_write(path, lambda tmp: picture.savefig(tmp, format="png", dpi=picture.dpi, pil_kwargs=options))
    else:
        atomic_write(
            path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        )
