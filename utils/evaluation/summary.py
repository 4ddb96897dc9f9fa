"""The evaluated class: what trainer keeps of a test set while it is scored, and what the metrics
tables and plots read.

Scoring streams: per test image only its sample and score are kept; of the anomaly maps,
MapSummary keeps what the metrics and figures need in memory that does not grow with the
test set (pixel score histograms, a sum of maps per outcome, the value range) plus the few
images the per-image figures show. The pixel histograms are taken in each image's own
evaluation frame (datasets.images.evaluation_frame), so every configuration of a data set is
scored on the same pixels; the figures show the maps at the model input.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from datasets.images import Sample
from utils.evaluation import metrics

CATEGORIES = ("TN", "FP", "FN", "TP")  # row-major order of the confusion matrix [[TN, FP], [FN, TP]]


def outcome(label: int, called_defect: bool) -> str:
    """TN, FP, FN or TP of an image whose true label is `label` (1: defect) and that was or was not called a defect."""
    return CATEGORIES[2 * int(label) + int(called_defect)]


def category(label: int, score: float, threshold: float) -> str:
    """The outcome with metrics.operating_point's rule: `score > threshold` is called a defect."""
    return outcome(label, score > threshold)


def confusion_categories(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Test-set indices of TN, FP, FN and TP, by `category`'s rule (its index in CATEGORIES, for every image)."""
    codes = 2 * np.asarray(labels, dtype=int) + (np.asarray(scores) > threshold)
    return {name: np.flatnonzero(codes == code) for code, name in enumerate(CATEGORIES)}


@dataclass
class ShownImage:
    """A test image kept for its per-image figure: its place in the test set, its distance from the
    threshold, and its map, mask (None: no mask file) and display pixels (H, W, 3 uint8)."""

    index: int
    distance: float
    map: np.ndarray
    mask: np.ndarray | None
    image: np.ndarray


class MapSummary:
    """What evaluation keeps of a test set's anomaly maps, folded in batch by batch.

    - pixel histograms (metrics.PixelHistogram, on bins fixed around the threshold) of the maps in the
      images' evaluation frames: of the good images, of each defect type's images that have masks, and
      of defect images without one;
    - the sum of the maps per TN/FP/FN/TP, for the mean maps; the lowest and highest map value;
    - per category, the `limit` images furthest from the threshold (ties: the earlier image;
      -1 all, 0 none), the ones the per-image figures show.

    Summaries of consecutive parts of a test set (ranks of a distributed run) `absorb` each other.
    """

    def __init__(self, threshold: float, size: tuple[int, int], limit: int):
        self.threshold, self.limit = threshold, limit
        self.bins = metrics.ScoreBins.around(threshold)
        self.images = 0
        self.good_pixels = metrics.PixelHistogram(self.bins)
        self.defect_pixels: dict[str, metrics.PixelHistogram] = {}
        self.unmasked_pixels = metrics.PixelHistogram(self.bins)
        self.map_sums = {name: np.zeros(size) for name in CATEGORIES}
        self.map_counts = dict.fromkeys(CATEGORIES, 0)
        self.low, self.high = np.inf, -np.inf
        self.shown: dict[str, list[tuple[float, int, ShownImage]]] = {name: [] for name in CATEGORIES}

    def add(
        self,
        samples: list[Sample],
        scores: np.ndarray,
        maps: np.ndarray,
        masks: np.ndarray,
        display: Callable[[int], np.ndarray],
        frames: list[tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Fold in a batch: its samples, scores, (B, H, W) maps and masks at the model input, and each image's
        (map, bool mask) in its evaluation frame, which the pixel histograms count; display(i) gives the
        batch's i-th image as uint8 pixels, asked for only for images that may be shown."""
        self.low, self.high = min(self.low, float(maps.min())), max(self.high, float(maps.max()))
        for i, (sample, score) in enumerate(zip(samples, scores)):
            name = category(sample.label, score, self.threshold)
            self.map_sums[name] += maps[i]
            self.map_counts[name] += 1
            if sample.label == 0:
                histogram = self.good_pixels
            elif sample.mask_path is None:
                histogram = self.unmasked_pixels
            else:
                histogram = self.defect_pixels.setdefault(sample.defect, metrics.PixelHistogram(self.bins))
            frame_map, frame_mask = frames[i]
            histogram.add(frame_map[None], frame_mask[None])
            distance, index = abs(float(score) - self.threshold), self.images + i
            if self._would_keep(name, distance, index):  # copies only of images that enter the heap
                mask = masks[i].copy() if sample.mask_path is not None else None
                self._offer(name, ShownImage(index, distance, maps[i].copy(), mask, display(i)))
        self.images += len(samples)

    def _would_keep(self, name: str, distance: float, index: int) -> bool:
        heap = self.shown[name]
        if self.limit < 0 or len(heap) < self.limit:
            return True
        return self.limit > 0 and (distance, -index) > heap[0][:2]

    def _offer(self, name: str, shown: ShownImage) -> None:
        """Keep `shown` if it is among the `limit` furthest from the threshold of its category (a min-heap
        whose root is the least distant, of those the latest)."""
        heap = self.shown[name]
        heapq.heappush(heap, (shown.distance, -shown.index, shown))
        if 0 <= self.limit < len(heap):
            heapq.heappop(heap)

    def absorb(self, other: MapSummary) -> None:
        """Add the summary of the test images that follow this summary's."""
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.good_pixels += other.good_pixels
        self.unmasked_pixels += other.unmasked_pixels
        for defect, histogram in other.defect_pixels.items():
            self.defect_pixels.setdefault(defect, metrics.PixelHistogram(self.bins))
            self.defect_pixels[defect] += histogram
        for name in CATEGORIES:
            self.map_sums[name] += other.map_sums[name]
            self.map_counts[name] += other.map_counts[name]
            for _, _, shown in other.shown[name]:
                shown.index += self.images
                self._offer(name, shown)
        self.images += other.images

    def shown_images(self, name: str) -> list[ShownImage]:
        """The category's kept images, furthest from the threshold first (ties in test order)."""
        return [shown for _, _, shown in sorted(self.shown[name], key=lambda entry: (-entry[0], -entry[1]))]

    def mean_maps(self) -> dict[str, np.ndarray]:
        """The mean map of every category that has images."""
        return {name: self.map_sums[name] / count for name, count in self.map_counts.items() if count}

    def pixel_histogram(self, defects: list[str] | None = None) -> metrics.PixelHistogram:
        """The good images' histogram plus that of the masked images of `defects` (None: all types)."""
        total = metrics.PixelHistogram(self.bins)
        total += self.good_pixels
        for defect, histogram in self.defect_pixels.items():
            if defects is None or defect in defects:
                total += histogram
        return total


@dataclass
class ClassEvaluation:
    """Everything the metrics and plots need about one class's test set, computed once."""

    name: str
    samples: list[Sample]
    scores: np.ndarray
    maps: MapSummary
    threshold: float
    has_ground_truth: bool
    summary: dict = field(default_factory=dict)
    pixel_curves: metrics.PixelCurves | None = None
    defect_types: pd.DataFrame | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)
