"""Patch distances -> smoothed anomaly maps at the model input size -> image scores, and the
regions of a map above the map threshold at the image's original resolution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from datasets.images import Geometry
from utils.padim.grid import centred_weights, linear_taps, stride_ratio

BLUR_SIGMA = 4.0  # the paper's
TOP_K_CELLS = 9  # grid_top_k_mean: as many cells as a 3 x 3 neighbourhood, so a defect of a few cells still counts
PROJECTION_ROWS = 256  # to_original_resolution: output rows computed together (bounds its temporaries)


def blur_radius(sigma: float) -> int:
    """Taps on each side of a Gaussian kernel truncated at 4 sigma (scipy's default truncate)."""
    return int(4 * sigma + 0.5)


def gaussian_taps(radius: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 1-D kernel of the map's blur: 2 * radius + 1 normalised Gaussian weights; sigma 0 is no blur."""
    if sigma == 0:
        return torch.ones(1, dtype=dtype, device=device)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


@dataclass(frozen=True)
class MapOperator:
    """The anomaly map of patch distances: bilinear at the patches' true centres (utils.padim.grid),
    then a Gaussian blur of sigma 4 truncated at 4 sigma with mirrored borders
    (scipy.ndimage.gaussian_filter(mode="mirror", truncate=4)).

    Both steps are linear and separable, so the map is two matrices: maps = rows @ d @ cols^T.
    Each matrix is one axis of it: the bilinear weights of resample_centred, blurred along
    that axis with gaussian_taps and mirrored borders. Built in float64 on the CPU (no
    device's reduced-precision convolution reaches the weights), then moved to `device` as
    float32. tests/reference.py holds the two steps as written (smooth_upsample) to hold it to.
    """

    rows: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def build(cls, grid: tuple[int, int], size: tuple[int, int], device: torch.device) -> MapOperator:
        """The operator from a (h, w) grid of cells to a (height, width) model input."""
        ratio = stride_ratio(size[1], grid[1])  # one ratio for both axes
        radius = min(blur_radius(BLUR_SIGMA), min(size) - 1)  # one kernel for both axes
        kernel = gaussian_taps(radius, BLUR_SIGMA, torch.float64, torch.device("cpu")).view(1, 1, -1)

        def axis(length: int, cells: int) -> torch.Tensor:
            upsampling = centred_weights(length, cells, ratio, torch.float64, torch.device("cpu"))  # (length, cells)
            padded = F.pad(upsampling.T.unsqueeze(1), (radius, radius), mode="reflect")
            return F.conv1d(padded, kernel)[:, 0].T.to(device, torch.float32).contiguous()

        return cls(axis(size[0], grid[0]), axis(size[1], grid[1]))

    def __call__(self, distances: torch.Tensor) -> torch.Tensor:
        """(B, h, w) distances -> (B, height, width) anomaly maps."""
        return self.rows @ distances @ self.cols.T


@dataclass(frozen=True)
class Thresholds:
    """A model's two thresholds, the same quantile of the same held-out good images: `image`, of their image
    scores, decides (score > image); `map`, of their map maxima (map_maxima), is where map pixels count as
    anomalous: regions, areas, masks, heat-map scales. A grid score is in other units than the blurred map
    (its maximum is higher), so one number cannot serve both; for map_max the two are equal."""

    image: float
    map: float

    def with_image_threshold(self, value: float, image_score: str) -> Thresholds:
        """Another image threshold (predict.py --threshold): for map_max the same quantity as the map
        threshold, which moves with it; for a grid score the map threshold stays the model's."""
        return Thresholds(value, value if same_quantity(image_score) else self.map)


def same_quantity(image_score: str) -> bool:
    """Whether an image threshold on `image_score` is a map threshold too: map_max scores an image by its
    map's maximum, in the map's units; a grid score is in other units (Thresholds)."""
    return image_score == "map_max"


def map_maxima(maps: torch.Tensor) -> torch.Tensor:
    """(B,) maxima of (B, H, W) maps: the map_max image score, and what the map threshold is a quantile of."""
    return maps.flatten(1).amax(dim=1)


def image_scores(maps: torch.Tensor, distances: torch.Tensor, kind: str = "map_max") -> torch.Tensor:
    """(B,) image scores, in Mahalanobis units, from the (B, S, S) maps and the (B, h, w) distances they
    were made of: map_max, the maximum of the up-sampled, blurred map (PaDiM's); grid_max, the maximum of
    the raw grid (no blur flattens a peak one cell wide); grid_top_k_mean, the mean of its TOP_K_CELLS
    highest cells (all of them on a smaller grid)."""
    if kind == "map_max":
        return map_maxima(maps)
    cells = distances.flatten(1)
    if kind == "grid_max":
        return cells.amax(dim=1)
    if kind == "grid_top_k_mean":
        return cells.topk(min(TOP_K_CELLS, cells.shape[1]), dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score {kind!r}")


def interpolation_taps(length: int, scale: float, offset: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two map pixels (length, 2) and their bilinear weights (length, 2, float64) of each of the `length`
    original pixels of one axis.

    Original pixel centre c lies at c * scale - offset in map pixels (scale: resized / original
    length, offset: crop start). Pixels outside the map get zero weights; at the map's edges
    the nearest pixel is repeated.
    """
    position = (torch.arange(length, dtype=torch.float64) + 0.5) * scale - offset
    inside = (position >= 0) & (position < size)
    taps, weights = linear_taps(position - 0.5, size)
    return taps, weights * inside.unsqueeze(1)


def to_original_resolution(
    amap: torch.Tensor,
    height: int,
    width: int,
    geometry: Geometry,
    outside: float = 0.0,
    frame: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(H, W) map at the model input -> (height, width) map of the original image, or the map in `frame`,
    a (rows, columns) grid laid evenly over the whole image (a reduced evaluation frame).

    Bilinear between pixel centres inside the box the model saw (Geometry's resize and crop);
    `outside` elsewhere (the centre crop cut those pixels away, so they were never scored). Each
    output pixel reads two map pixels per axis (interpolation_taps): the work grows with the output,
    not with the output times the map; PROJECTION_ROWS rows at a time, so that a huge image's
    projection holds one copy of its output.
    """
    new_width, new_height = geometry.resized_size(width, height)
    top, left = geometry.crop_origin(width, height)
    frame_height, frame_width = frame or (height, width)
    row_taps, row_weights = interpolation_taps(frame_height, new_height / frame_height, top, amap.shape[-2])
    column_taps, column_weights = interpolation_taps(frame_width, new_width / frame_width, left, amap.shape[-1])
    row_weights, column_weights = row_weights.to(amap.dtype), column_weights.to(amap.dtype)
    first, second = amap.index_select(0, row_taps[:, 0]), amap.index_select(0, row_taps[:, 1])
    rows = torch.addcmul(first * row_weights[:, :1], second, row_weights[:, 1:])  # (height, W)
    projected = torch.empty(frame_height, frame_width, dtype=amap.dtype)
    for part, out in zip(rows.split(PROJECTION_ROWS), projected.split(PROJECTION_ROWS)):
        torch.mul(part.index_select(1, column_taps[:, 0]), column_weights[:, 0], out=out)
        out.addcmul_(part.index_select(1, column_taps[:, 1]), column_weights[:, 1])
    if outside:  # a pixel was cut away when its row or its column lies outside the crop (zero weights)
        projected[row_weights.sum(1) == 0] = outside
        projected[:, column_weights.sum(1) == 0] = outside
    return projected


@dataclass(frozen=True)
class Region:
    """A connected area of a map above the map threshold: its bounding box, pixel count, peak and mean score."""

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float
    mean: float


def first_block(labels: np.ndarray, label: int, box: tuple[slice, slice]) -> tuple[int, int]:
    """(row pair, column pair) of the region's first 2 x 2 block in raster order of blocks.

    Regions are numbered in this order, the one of OpenCV's block-based labelling that regions.csv's
    region ids follow (it differs from the order of first pixels when two regions begin in the same
    pair of rows)."""
    rows, columns = box
    pair = labels[rows.start : rows.start // 2 * 2 + 2, columns] == label
    return rows.start // 2, (columns.start + int(np.flatnonzero(pair.any(axis=0))[0])) // 2


def anomaly_regions(amap: np.ndarray, threshold: float, min_area: int) -> list[Region]:
    """The 8-connected regions of `amap` above `threshold`, in the order of first_block; regions under
    `min_area` pixels are dropped as specks."""
    labels, _ = ndimage.label(amap > threshold, structure=np.ones((3, 3), dtype=bool))
    boxes = ndimage.find_objects(labels)
    areas = np.bincount(labels.ravel(), minlength=len(boxes) + 1)
    kept = [label for label in range(1, len(boxes) + 1) if areas[label] >= min_area]
    kept.sort(key=lambda label: first_block(labels, label, boxes[label - 1]))
    peaks = ndimage.maximum(amap, labels, kept) if kept else []
    means = ndimage.mean(amap, labels, kept) if kept else []
    regions = []
    for label, peak, mean in zip(kept, peaks, means):
        rows, columns = boxes[label - 1]
        width, height = columns.stop - columns.start, rows.stop - rows.start
        regions.append(Region(columns.start, rows.start, width, height, int(areas[label]), float(peak), float(mean)))
    return regions
