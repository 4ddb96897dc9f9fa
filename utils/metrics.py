"""Detection and localization metrics as plain functions on arrays.

Image level: AUROC (+ stratified bootstrap CI), average precision, F1-max (test-optimised),
and the confusion at an operating threshold chosen from held-out normal images only, with
Wilson intervals for its precision, recall and false-positive rate.
Pixel level: AUROC and AUPRO up to a false-positive rate of 0.3, as in the MVTec AD evaluation.
A metric that is undefined for the data returns None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score
from statsmodels.stats.proportion import proportion_confint

AUPRO_FPR_LIMIT = 0.3


def _both_classes(labels: np.ndarray) -> bool:
    return np.unique(labels).size == 2


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else None


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(average_precision_score(labels, scores)) if _both_classes(labels) else None


def bootstrap_auroc_ci(
    labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile CI of the AUROC, resampling good and defect images separately (so every
    resample has both classes and the class balance of the test set)."""
    if not _both_classes(labels):
        return None
    rng = np.random.default_rng(seed)
    negatives, positives = scores[labels == 0], scores[labels == 1]
    resample_labels = np.r_[np.zeros(negatives.size), np.ones(positives.size)]
    aurocs = np.empty(resamples)
    for i in range(resamples):
        resampled = np.r_[rng.choice(negatives, negatives.size), rng.choice(positives, positives.size)]
        aurocs[i] = roc_auc_score(resample_labels, resampled)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(aurocs, [tail, 100 - tail])
    return float(low), float(high)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float] | None:
    """(best F1 over all thresholds, that threshold): optimised on the test labels, report it as such."""
    if not _both_classes(labels):
        return None
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0
    )
    best = int(np.argmax(f1[:-1]))
    return float(f1[best]), float(thresholds[best])


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion: keeps its coverage for small counts and at 0 or all
    successes, where the normal approximation collapses to a point. None without trials."""
    if trials == 0:
        return None
    low, high = proportion_confint(successes, trials, alpha=1 - level, method="wilson")
    return float(low), float(high)


def threshold_from_normals(normal_scores: np.ndarray, quantile: float) -> float:
    """Operating threshold from scores of good images the model never saw in training."""
    return float(np.quantile(normal_scores, quantile))


@dataclass
class OperatingPoint:
    """Confusion counts and rates of calling `score > threshold` anomalous."""

    threshold: float
    true_negatives: int
    false_positives: int
    false_negatives: int
    true_positives: int

    @property
    def precision(self) -> float | None:
        called = self.true_positives + self.false_positives
        return self.true_positives / called if called else None

    @property
    def recall(self) -> float | None:
        actual = self.true_positives + self.false_negatives
        return self.true_positives / actual if actual else None

    @property
    def false_positive_rate(self) -> float | None:
        normals = self.true_negatives + self.false_positives
        return self.false_positives / normals if normals else None

    def intervals(self) -> dict[str, tuple[float, float] | None]:
        """95% Wilson intervals of precision, recall and false-positive rate (None where undefined)."""
        return {
            "precision": wilson_interval(self.true_positives, self.true_positives + self.false_positives),
            "recall": wilson_interval(self.true_positives, self.true_positives + self.false_negatives),
            "false_positive_rate": wilson_interval(self.false_positives, self.true_negatives + self.false_positives),
        }

    @property
    def f1(self) -> float | None:
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denominator if denominator else None


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> OperatingPoint:
    predicted = (scores > threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return OperatingPoint(threshold, int(tn), int(fp), int(fn), int(tp))


@dataclass
class PixelCurves:
    """ROC (fpr, tpr) and PRO curve over all pixels, one point per distinct score, descending."""

    fpr: np.ndarray
    tpr: np.ndarray
    pro: np.ndarray

    def thinned(self, resolution: int = 2000) -> PixelCurves:
        """Only the points where a curve enters a new 1/resolution cell (plus both ends).

        The exact curves hold a point per distinct score (tens of millions, ~0.6 GB); every
        dropped point lies within one cell of a kept one, so plots lose nothing visible.
        """
        keep = np.zeros(self.fpr.size, dtype=bool)
        for values in (self.fpr, self.tpr, self.pro):
            cells = np.floor(values * resolution)
            keep[1:] |= cells[1:] != cells[:-1]
        keep[[0, -1]] = True
        return PixelCurves(self.fpr[keep], self.tpr[keep], self.pro[keep])


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Ground-truth regions: 8-connected components of each image's mask, numbered 1.. across all images."""
    structure = np.ones((3, 3), dtype=bool)
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        region_ids[i] = np.where(labelled > 0, labelled + regions, 0)
        regions += count
    return region_ids, regions


def pixel_curves(masks: np.ndarray, maps: np.ndarray) -> PixelCurves | None:
    """Exact pixel ROC and PRO curves from ONE sort of all pixel scores (None without both classes).

    PRO = mean over all ground-truth regions of the share of the region above the threshold;
    FPR over the defect-free pixels (as in the MVTec AD evaluation). Sharing the sort makes
    both metrics for ~600 images at 224 px a few seconds instead of a sort each.
    """
    flat_masks = masks.reshape(-1)
    positives = int(flat_masks.sum())
    negatives = flat_masks.size - positives
    if positives == 0 or negatives == 0:
        return None
    region_ids, regions = _label_regions(masks)
    region_weight = 1.0 / (np.bincount(region_ids.reshape(-1), minlength=regions + 1) * regions)
    region_weight[0] = 0.0
    flat_scores = maps.reshape(-1)
    order = np.argsort(flat_scores)[::-1]
    sorted_scores = flat_scores[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    sorted_ids = region_ids.reshape(-1)[order]
    in_defect = sorted_ids > 0
    tpr = np.cumsum(in_defect, dtype=np.int64)[last_of_each_score] / positives
    fpr = np.cumsum(~in_defect, dtype=np.int64)[last_of_each_score] / negatives
    pro = np.cumsum(region_weight[sorted_ids])[last_of_each_score]
    return PixelCurves(np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[0.0, pro])


def pixel_metrics(curves: PixelCurves, fpr_limit: float = AUPRO_FPR_LIMIT) -> tuple[float, float]:
    """(pixel AUROC, AUPRO up to `fpr_limit` divided by `fpr_limit`)."""
    auroc = float(np.trapezoid(curves.tpr, curves.fpr))
    return auroc, area_under_limited_curve(curves.fpr, curves.pro, fpr_limit) / fpr_limit


def area_under_limited_curve(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area of y(x) for x in [0, x_limit], interpolating y at x_limit; x ascending."""
    y_at_limit = np.interp(x_limit, x, y)
    inside = x < x_limit
    xs = np.r_[x[inside], x_limit]
    ys = np.r_[y[inside], y_at_limit]
    return float(np.trapezoid(ys, xs))
