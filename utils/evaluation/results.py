"""One class's results: the scored test set, every metric of master_results.csv (RESULT_COLUMNS, in
their order) and the per-defect-type table (DEFECT_TYPE_COLUMNS): the one schema the tables,
the report and the comparison read."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from datasets.images import Sample
from utils.evaluation import metrics
from utils.evaluation.summary import ClassEvaluation, MapSummary
from utils.padim.anomaly_map import Thresholds

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "class_name",
    "roc_auc",
    "optimal_threshold",
    "map_threshold",
    "precision",
    "recall",
    "f1_score",
    "false_positive_rate",
    "precision_ci_low",
    "precision_ci_high",
    "recall_ci_low",
    "recall_ci_high",
    "false_positive_rate_ci_low",
    "false_positive_rate_ci_high",
    "true_negatives",
    "false_positives",
    "false_negatives",
    "true_positives",
    "roc_auc_ci_low",
    "roc_auc_ci_high",
    "pr_auc",
    "pixel_roc_auc",
    "pixel_aupro",
    "n_defect_pixels",
    "n_good_pixels",
    "f1_max",
    "n_train",
    "n_holdout",
    "n_test",
    "n_skipped",
    "fit_seconds",
    "eval_seconds",
    "status",
]


@dataclass
class ScoredSet:
    """Scores of the readable samples of a set, in order, their maps' maxima (what a map threshold is a quantile
    of: utils.padim.anomaly_map.map_maxima), and (test sets) the summary of their maps."""

    samples: list[Sample]
    scores: np.ndarray
    map_maxima: np.ndarray
    skipped: int
    maps: MapSummary | None = None

    @classmethod
    def join(cls, parts: list[ScoredSet]) -> ScoredSet:
        """The parts of a set scored by several ranks, in rank order: the whole set's ScoredSet."""
        first = parts[0]
        for part in parts[1:]:
            if first.maps is not None:
                first.maps.absorb(part.maps)
        return cls(
            samples=[sample for part in parts for sample in part.samples],
            scores=np.concatenate([part.scores for part in parts]),
            map_maxima=np.concatenate([part.map_maxima for part in parts]),
            skipped=sum(part.skipped for part in parts),
            maps=first.maps,
        )


def evaluate(scored: ScoredSet, thresholds: Thresholds, name: str, has_ground_truth: bool) -> ClassEvaluation:
    """All metrics of one class (the image ones at `thresholds.image`); an undefined one is None and the reason
    is logged."""
    threshold = thresholds.image
    result = ClassEvaluation(
        name, scored.samples, scored.scores, scored.maps, threshold, thresholds.map, has_ground_truth
    )
    labels, scores = result.labels, result.scores
    summary = {
        "roc_auc": metrics.image_auroc(labels, scores),
        "pr_auc": metrics.average_precision(labels, scores),
    }
    if summary["roc_auc"] is None:
        log.warning(
            "%s: image AUROC/AP undefined: the test set has only %s images",
            name,
            "good" if labels.sum() == 0 else "defect",
        )
    ci = metrics.bootstrap_auroc_ci(labels, scores, seed=0)
    summary["roc_auc_ci_low"], summary["roc_auc_ci_high"] = ci if ci else (None, None)
    point = metrics.operating_point(labels, scores, threshold)
    summary.update(
        {
            "optimal_threshold": threshold,
            "map_threshold": thresholds.map,
            "precision": point.precision,
            "recall": point.recall,
            "f1_score": point.f1,
            "false_positive_rate": point.false_positive_rate,
            "true_negatives": point.true_negatives,
            "false_positives": point.false_positives,
            "false_negatives": point.false_negatives,
            "true_positives": point.true_positives,
        }
    )
    for rate, interval in point.intervals().items():
        summary[f"{rate}_ci_low"], summary[f"{rate}_ci_high"] = interval if interval else (None, None)
    best = metrics.f1_max(labels, scores)
    summary["f1_max"] = best[0] if best else None
    summary["pixel_roc_auc"], summary["pixel_aupro"] = None, None
    summary["n_defect_pixels"], summary["n_good_pixels"] = None, None
    if has_ground_truth:
        pixels = result.maps.pixel_histogram()
        summary["n_defect_pixels"], summary["n_good_pixels"] = int(pixels.inside.sum()), int(pixels.outside.sum())
        curves = pixels.curves()
        if curves is None:
            log.warning("%s: pixel metrics undefined: no defect pixels (or no good pixels) in the masks", name)
        else:
            summary["pixel_roc_auc"], summary["pixel_aupro"] = metrics.pixel_metrics(curves)
            result.pixel_curves = curves.thinned()
    else:
        log.info("%s: no ground_truth folder, pixel metrics not computed", name)
    result.summary = summary
    result.defect_types = defect_type_table(result)
    return result


DEFECT_TYPE_COLUMNS = [
    "defect",
    "n_images",
    "recall",
    "recall_ci_low",
    "recall_ci_high",
    "roc_auc",
    "pixel_roc_auc",
    "pixel_aupro",
]


def defect_type_table(result: ClassEvaluation) -> pd.DataFrame:
    """Per defect type: its images, recall at the operating threshold (95% Wilson interval), image AUROC
    against the good test images, and pixel AUROC / AUPRO over the good images and that type's masked ones."""
    types = np.array([sample.defect for sample in result.samples])
    labels, good = result.labels, result.labels == 0
    rows = []
    for defect in sorted(set(types[labels == 1])):
        of_type = (types == defect) & (labels == 1)
        caught = int((result.scores[of_type] > result.threshold).sum())
        interval = metrics.wilson_interval(caught, int(of_type.sum()))
        row = {
            "defect": defect,
            "n_images": int(of_type.sum()),
            "recall": caught / of_type.sum(),
            "recall_ci_low": interval[0],
            "recall_ci_high": interval[1],
            "roc_auc": metrics.image_auroc(labels[good | of_type], result.scores[good | of_type]),
        }
        if result.has_ground_truth:
            curves = result.maps.pixel_histogram([defect]).curves()
            if curves is not None:
                row["pixel_roc_auc"], row["pixel_aupro"] = metrics.pixel_metrics(curves)
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=DEFECT_TYPE_COLUMNS)
