"""Detection and localization metrics as plain functions on arrays.

Image level: AUROC (+ stratified bootstrap CI), average precision, F1-max (test-optimised),
and the confusion at an operating threshold chosen from held-out normal images only, with
Wilson intervals for its precision, recall and false-positive rate.
Pixel level: AUROC and AUPRO up to a false-positive rate of 0.3, as in the MVTec AD evaluation,
from pixel score histograms accumulated batch by batch (PixelHistogram), so their memory does
not grow with the test set. A metric that is undefined for the data returns None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import bootstrap, rankdata
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score
from statsmodels.stats.proportion import proportion_confint

AUPRO_FPR_LIMIT = 0.3


def _both_classes(labels: np.ndarray) -> bool:
    return np.unique(labels).size == 2


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else None


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(average_precision_score(labels, scores)) if _both_classes(labels) else None


def pairwise_auroc(negatives: np.ndarray, positives: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC as the Mann-Whitney statistic: the share of (defect, good) pairs where the defect image
    scores higher, ties counting half; equal to roc_auc_score, but along `axis` of stacked samples."""
    ranks = rankdata(np.concatenate([negatives, positives], axis=axis), axis=axis)
    n_negatives, n_positives = negatives.shape[axis], positives.shape[axis]
    positive_rank_sum = np.take(ranks, np.arange(n_negatives, n_negatives + n_positives), axis=axis).sum(axis)
    return (positive_rank_sum - n_positives * (n_positives + 1) / 2) / (n_positives * n_negatives)


def bootstrap_auroc_ci(
    labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile CI of the AUROC, resampling good and defect images separately (so every
    resample has both classes and the class balance of the test set). All resamples are
    ranked at once: a loop of roc_auc_score took seconds per class."""
    if not _both_classes(labels):
        return None
    interval = bootstrap(
        (scores[labels == 0], scores[labels == 1]),
        pairwise_auroc,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        vectorized=True,
        paired=False,
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(interval.low), float(interval.high)


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

        The exact curves hold a point per distinct score (up to one per test pixel, in three arrays); every
        dropped point lies within one cell of a kept one, so plots lose nothing visible.
        """
        keep = np.zeros(self.fpr.size, dtype=bool)
        for values in (self.fpr, self.tpr, self.pro):
            cells = np.floor(values * resolution)
            keep[1:] |= cells[1:] != cells[:-1]
        keep[[0, -1]] = True
        return PixelCurves(self.fpr[keep], self.tpr[keep], self.pro[keep])


HISTOGRAM_RELATIVE_WIDTH = 1e-4  # bins 0.01% wide: pixel AUROC within ~1e-5 of the exact one (docs/algorithm.md)
HISTOGRAM_DECADES = 3  # the bins cover threshold / 10^3 .. threshold x 10^3
REGION_CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connected ground-truth regions


@dataclass(frozen=True)
class ScoreBins:
    """Log-spaced bins of pixel scores, fixed before scoring: `count` bins of relative width `width`
    from `low` up; a value below `low` falls in the first bin, one above the last in the last."""

    low: float
    width: float
    count: int

    @classmethod
    def around(cls, scale: float) -> ScoreBins:
        """Bins around a score scale (the operating threshold), HISTOGRAM_DECADES either side."""
        scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        count = int(np.ceil(2 * HISTOGRAM_DECADES * np.log(10) / np.log1p(HISTOGRAM_RELATIVE_WIDTH)))
        return cls(scale / 10**HISTOGRAM_DECADES, HISTOGRAM_RELATIVE_WIDTH, count)

    def index(self, values: np.ndarray) -> np.ndarray:
        """The bin of every value (in place on one float64 copy: a batch of maps is millions of values)."""
        with np.errstate(divide="ignore"):
            position = np.log(values, dtype=np.float64)
        position -= np.log(self.low)
        position /= np.log1p(self.width)
        np.floor(position, out=position)
        np.clip(position, 0, self.count - 1, out=position)
        return position.astype(np.int64)

    def centres(self) -> np.ndarray:
        """A representative value per bin (geometric centre), for drawing distributions."""
        return self.low * np.power(1 + self.width, np.arange(self.count) + 0.5)


class PixelHistogram:
    """Pixel scores of a set of images, as counts on fixed bins: outside the masks, inside them, and
    inside weighted by 1 / (area of the pixel's ground-truth region), whose sum above a threshold is
    the summed overlap of every region (PRO's numerator). Memory is the bins', whatever the images.

    Histograms on the same bins add up (`+=`): one per defect type, per rank, per batch.
    """

    def __init__(self, bins: ScoreBins):
        self.bins = bins
        self.outside = np.zeros(bins.count, np.int64)
        self.inside = np.zeros(bins.count, np.int64)
        self.overlap = np.zeros(bins.count, np.float64)
        self.regions = 0

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Fold in (B, H, W) maps with their (B, H, W) boolean masks."""
        index = self.bins.index(maps)
        count = self.bins.count
        self.outside += np.bincount(index[~masks], minlength=count)
        self.inside += np.bincount(index[masks], minlength=count)
        for image_index, mask in zip(index, masks):
            labelled, regions = ndimage.label(mask, structure=REGION_CONNECTIVITY)
            if regions:
                area = np.bincount(labelled.reshape(-1))
                inside = labelled > 0
                self.overlap += np.bincount(image_index[inside], weights=1.0 / area[labelled[inside]], minlength=count)
                self.regions += regions

    def __iadd__(self, other: PixelHistogram) -> PixelHistogram:
        self.outside += other.outside
        self.inside += other.inside
        self.overlap += other.overlap
        self.regions += other.regions
        return self

    def curves(self) -> PixelCurves | None:
        """Pixel ROC and PRO curves with one point per bin edge, thresholds descending (None without
        both defect-free and defect pixels). A bin's pixels count as tied, as equal scores are."""
        positives, negatives = int(self.inside.sum()), int(self.outside.sum())
        if positives == 0 or negatives == 0:
            return None
        used = np.flatnonzero(self.inside + self.outside)[::-1]
        tpr = np.cumsum(self.inside[::-1])[self.bins.count - 1 - used] / positives
        fpr = np.cumsum(self.outside[::-1])[self.bins.count - 1 - used] / negatives
        pro = np.cumsum(self.overlap[::-1])[self.bins.count - 1 - used] / max(self.regions, 1)
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
