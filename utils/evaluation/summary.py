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
from utils.padim.anomaly_map import Thresholds

CATEGORIES = ("TN", "FP", "FN", "TP")  # row-major order of the confusion matrix [[TN, FP], [FN, TP]]
CLOSEST_CALLS = 4  # per kind: the highest-scored good images and the lowest-scored defect images report.html shows


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
    """A test image kept for its per-image figure: its place in the test set, its outcome (TN/FP/FN/TP),
    and its map, mask (None: no mask file) and display pixels (H, W, 3 uint8)."""

    index: int
    outcome: str
    map: np.ndarray
    mask: np.ndarray | None
    image: np.ndarray


class KeptImages:
    """The `limit` images of highest key seen so far (ties: the earlier image; -1 all, 0 none): a min-heap
    whose root is the one to drop first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.heap: list[tuple[float, int, ShownImage]] = []

    def would_keep(self, key: float, index: int) -> bool:
        if self.limit < 0 or len(self.heap) < self.limit:
            return True
        return self.limit > 0 and (key, -index) > self.heap[0][:2]

    def offer(self, key: float, shown: ShownImage) -> None:
        heapq.heappush(self.heap, (key, -shown.index, shown))
        if 0 <= self.limit < len(self.heap):
            heapq.heappop(self.heap)

    def images(self) -> list[ShownImage]:
        """Highest key first, ties in test order."""
        return [shown for _, _, shown in sorted(self.heap, key=lambda entry: (-entry[0], -entry[1]))]


class MapSummary:
    """What evaluation keeps of a test set's anomaly maps, folded in batch by batch.

    - pixel histograms (metrics.PixelHistogram, on bins fixed around the map threshold) of the maps in the
      images' evaluation frames: of the good images, of each defect type's images that have masks, and
      of defect images without one;
    - the sum of the maps per TN/FP/FN/TP, for the mean maps; the lowest and highest map value;
    - per category, the `limit` images furthest from the threshold (ties: the earlier image;
      -1 all, 0 none), and, unless `limit` is 0, the closest calls report.html shows (the
      CLOSEST_CALLS highest-scored good and lowest-scored defect images): the per-image figures' images.

    Summaries of consecutive parts of a test set (ranks of a distributed run) `absorb` each other.
    """

    def __init__(self, thresholds: Thresholds, size: tuple[int, int], limit: int):
        self.threshold = thresholds.image
        self.bins = metrics.ScoreBins.around(thresholds.map)
        self.images = 0
        self.good_pixels = metrics.PixelHistogram(self.bins)
        self.defect_pixels: dict[str, metrics.PixelHistogram] = {}
        self.unmasked_pixels = metrics.PixelHistogram(self.bins)
        self.map_sums = {name: np.zeros(size) for name in CATEGORIES}
        self.map_counts = dict.fromkeys(CATEGORIES, 0)
        self.low, self.high = np.inf, -np.inf
        self.furthest = {name: KeptImages(limit) for name in CATEGORIES}  # key: distance from the threshold
        closest = CLOSEST_CALLS if limit else 0
        self.closest = {label: KeptImages(closest) for label in (0, 1)}  # key: score (good), -score (defect)

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
            closeness = float(score) if sample.label == 0 else -float(score)
            furthest = self.furthest[name].would_keep(distance, index)
            close = self.closest[sample.label].would_keep(closeness, index)
            if furthest or close:  # copies only of images that enter a heap
                mask = masks[i].copy() if sample.mask_path is not None else None
                shown = ShownImage(index, name, maps[i].copy(), mask, display(i))
                if furthest:
                    self.furthest[name].offer(distance, shown)
                if close:
                    self.closest[sample.label].offer(closeness, shown)
        self.images += len(samples)

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
        pairs = [
            *zip(self.furthest.values(), other.furthest.values()),
            *zip(self.closest.values(), other.closest.values()),
        ]
        moved = {id(shown): shown for _, kept in pairs for _, _, shown in kept.heap}  # an image may be in two heaps
        for shown in moved.values():
            shown.index += self.images
        for mine, kept in pairs:
            for key, _, shown in kept.heap:
                mine.offer(key, shown)
        self.images += other.images

    def shown_images(self, name: str) -> list[ShownImage]:
        """The category's kept images, furthest from the threshold first (ties in test order)."""
        return self.furthest[name].images()

    def closest_calls(self, label: int) -> list[ShownImage]:
        """The highest-scored good images (label 0) or lowest-scored defect images (label 1), in that order."""
        return self.closest[label].images()

    def figure_images(self, name: str) -> list[ShownImage]:
        """The category's images that get a per-image figure: the furthest from the threshold, then the closest
        calls of this outcome that are not among them."""
        furthest = self.shown_images(name)
        drawn = {shown.index for shown in furthest}
        calls = [shown for label in (0, 1) for shown in self.closest_calls(label) if shown.outcome == name]
        return furthest + [shown for shown in calls if shown.index not in drawn]

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
    map_threshold: float  # utils.padim.anomaly_map.Thresholds.map: the figures' line on map values
    has_ground_truth: bool
    summary: dict = field(default_factory=dict)
    pixel_curves: metrics.PixelCurves | None = None
    defect_types: pd.DataFrame | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)
