"""run_class_processing(): data -> fit -> save -> score -> metrics -> plots for ONE class.

An orchestrator: the math lives in utils/, the data in datasets/; this file only wires
them together, times them and turns the outcome into one master_results.csv row.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    Geometry,
    ImageDataset,
    Sample,
    build_flips,
    collate_skipping_failures,
)
from datasets.split import ClassSplit, DataError, load_class
from utils.evaluation import metrics
from utils.evaluation.summary import ClassEvaluation, MapSummary
from utils.padim.backbones import FeatureExtractor
from utils.padim.embedding import channel_index
from utils.padim.model import GaussianStats, Padim
from utils.padim.model_file import (
    MODEL_FILENAME,
    ModelFileError,
    load_model,
    save_model,
    stats_content,
    stats_from_content,
    training_fingerprint,
)
from utils.reporting.plotting import plot_class_results
from utils.runtime.distributed import World
from utils.runtime.output_files import atomic_write

log = logging.getLogger(__name__)

SCORES_FILENAME = "scores.csv"
DEFECT_TYPES_FILENAME = "defect_types.csv"
MIN_HOLDOUT_IMAGES = 20
MIN_KEPT_SHARE = 2 / 3
MODEL_IDENTITY_KEYS = ("backbone", "weights_id", "layers", "resize", "cropsize", "fingerprint", "training_config")


@dataclass
class ScoredSet:
    """Scores of the readable samples of a set, in order, and (test sets) the summary of their maps."""

    samples: list[Sample]
    scores: np.ndarray
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
            skipped=sum(part.skipped for part in parts),
            maps=first.maps,
        )


class NonFiniteError(ValueError):
    """A NaN or an infinity where a score, statistic or threshold must be: the class fails, it is never a metric."""


def require_finite_scores(scores: np.ndarray, what: str) -> None:
    """NonFiniteError naming how many of `what` got a non-finite score."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise NonFiniteError(f"{bad} of {scores.size} {what} got a non-finite score (NaN or infinity)")


def image_loader(
    samples: list[Sample], geometry: Geometry, args: argparse.Namespace, device: torch.device, augment=None
) -> DataLoader:
    """The DataLoader every pass over images uses (fit, hold-out, test, and the benchmark's forward-only pass);
    batches are pinned only for a backbone on `device` CUDA (pinning asks CUDA for its context)."""
    return DataLoader(
        ImageDataset(samples, geometry, augment),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=collate_skipping_failures,
        generator=torch.Generator().manual_seed(args.seed),
        pin_memory=device.type == "cuda",
    )


def readable_batches(loader: DataLoader, description: str, skipped: list[str]) -> Iterator[Batch]:
    """Readable batches with a progress bar; each unreadable image is warned about once and recorded."""
    with tqdm(total=len(loader.dataset), desc=description, unit="img", leave=False) as bar:
        for batch in loader:
            for _, reason in batch.failures:
                log.warning("skipped %s", reason)
                skipped.append(reason)
            bar.update(len(batch.indices) + len(batch.failures))
            if batch.indices:
                yield batch


def display_pixels(images: torch.Tensor, i: int) -> np.ndarray:
    """The i-th normalised model input of a (B, 3, H, W) batch back to uint8 RGB (H, W, 3), for a figure."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    pixels = torch.addcmul(mean, images[i].cpu().permute(1, 2, 0), std)
    return pixels.mul_(255).clamp_(0, 255).round_().to(torch.uint8).numpy()


def score_samples(
    model: Padim,
    samples: list[Sample],
    geometry: Geometry,
    args: argparse.Namespace,
    description: str,
    maps: MapSummary | None = None,
) -> ScoredSet:
    """Scores of every readable sample; each batch's maps are folded into `maps` (when given) and dropped,
    so memory does not grow with the number of images."""
    skipped: list[str] = []
    kept, scores = [], []
    loader = image_loader(samples, geometry, args, model.device)
    batches = ((batch, batch.images) for batch in readable_batches(loader, description, skipped))
    for batch, batch_maps, batch_scores in model.stream_anomaly_maps(batches):
        batch_samples = [samples[i] for i in batch.indices]
        if maps is not None and torch.isfinite(batch_scores).all():  # a non-finite score fails the class below
            display = partial(display_pixels, batch.images)
            maps.add(batch_samples, batch_scores.numpy(), batch_maps.numpy(), batch.masks.numpy(), display)
        kept.extend(batch_samples)
        scores.append(batch_scores.numpy())
    return ScoredSet(
        samples=kept,
        scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
        skipped=len(skipped),
        maps=maps,
    )


def _training_config(args: argparse.Namespace, index: torch.Tensor) -> dict:
    """Settings that change the fitted statistics or the threshold; part of the model's identity."""
    return {
        "reduced_dim": int(index.numel()),
        "channel_index": index.tolist(),
        "seed": args.seed,
        "holdout_ratio": args.holdout_ratio,
        "threshold_quantile": args.threshold_quantile,
        "augmentations": [args.horizontal_flip, args.vertical_flip, args.augmentation_prob]
        if args.augmentations_enabled
        else None,
    }


def log_split(split: ClassSplit, dims: int) -> None:
    """How many images went where, and a warning when the fit or the hold-out is too small to mean much."""
    defects = sum(sample.label for sample in split.test)
    moved = f", {split.moved_to_test} moved to the test normals (--test_sample_ratio)" if split.moved_to_test else ""
    log.info(
        "%s: good training images: %d fit, %d held out for the threshold%s; test: %d good, %d defect",
        split.name,
        len(split.fit),
        len(split.holdout),
        moved,
        len(split.test) - defects,
        defects,
    )
    if 0 < len(split.holdout) < MIN_HOLDOUT_IMAGES:
        log.warning(
            "%s: the threshold rests on %d held-out good images: its false-positive rate on new good parts "
            "may be far from the quantile's; hold out more (--holdout_ratio) or add good training images",
            split.name,
            len(split.holdout),
        )
    if len(split.fit) < dims:
        log.warning(
            "%s: %d images fitted for %d dimensions: each position's covariance rests mostly on its "
            "regulariser; add good training images (at least %d) or lower --reduced_dim",
            split.name,
            len(split.fit),
            dims,
            dims,
        )


def warn_on_crop_losses(samples: list[Sample], geometry: Geometry, name: str) -> None:
    """Warn when the centre crop drops more than a third of the images' area on average: a defect
    there is never seen, which elongated parts pay for in detection."""
    shares = []
    for sample in samples:
        try:
            with Image.open(sample.path) as image:
                shares.append(geometry.kept_share(*image.size))
        except (OSError, ValueError, SyntaxError):  # unreadable: skipped and reported when it is read
            continue
    if shares and np.mean(shares) < MIN_KEPT_SHARE:
        log.warning(
            "%s: the crop keeps %.0f%% of each image on average; defects outside it are never seen; "
            "--cropsize 0 keeps the whole part",
            name,
            100 * np.mean(shares),
        )


def _reusable_model(path: Path, identity: dict, save_distribution: bool) -> tuple[dict, GaussianStats] | None:
    """The matching cached model when reuse is asked for (--save_distribution); an earlier run's model that
    does not match is removed when this run will not replace it, so it never sits beside other results."""
    cached = _cached_model(path, identity)
    if save_distribution:
        return cached
    if cached is None and path.is_file():
        path.unlink()
        log.warning(
            "removed %s: an earlier run's model that does not match this run's results "
            "(add --save_distribution to save this run's)",
            path,
        )
    return None


def _cached_model(path: Path, identity: dict) -> tuple[dict, GaussianStats] | None:
    """The saved model and its statistics when it was made from the same backbone, settings and training images."""
    if not path.is_file():
        return None
    try:
        content = load_model(path)
        stats = stats_from_content(content)
    except ModelFileError as err:
        log.warning("cached model not used, refitting: %s", err)
        return None
    changed = [key for key in MODEL_IDENTITY_KEYS if content[key] != identity[key]]
    if changed:
        log.warning("cached model %s differs in %s: refitting", path, ", ".join(changed))
        return None
    log.info("cached model %s matches this run", path)
    return content, stats


def _threshold(
    model: Padim, split: ClassSplit, geometry: Geometry, args: argparse.Namespace, world: World
) -> tuple[float, dict, int]:
    """Operating threshold from held-out good images; from the fit images only when there are none.

    Each rank scores its share; every rank gets every score, so all agree on the threshold
    (and on a failure). Returns (threshold, provenance, this rank's unreadable images)."""
    source, samples = "held-out normal training images", split.holdout
    if not samples:
        source, samples = "training images (too few to hold any out; biased low)", split.fit
        log.warning("%s: no held-out normal images; threshold taken from the training images", split.name)
    scored = score_samples(model, world.part(samples), geometry, args, "threshold")
    scores = np.concatenate(world.everyone(scored.scores))
    if scores.size == 0:
        raise DataError("no readable image to set the threshold")
    require_finite_scores(scores, "threshold images")
    value = metrics.threshold_from_normals(scores, args.threshold_quantile)
    provenance = {"source": source, "quantile": args.threshold_quantile, "n_images": int(scores.size)}
    return value, provenance, scored.skipped


def build_model(extractor: FeatureExtractor, args: argparse.Namespace, devices: dict[str, torch.device]) -> Padim:
    """The untrained model of a run: the seeded channel subset of the extractor's dims, the input size, the devices."""
    index = channel_index(extractor.dims, args.reduced_dim or extractor.default_reduced_dim, args.seed)
    input_size = Geometry(args.resize, args.cropsize).input_size
    return Padim(extractor, index, input_size, devices["backbone"], devices["stats"], devices["mahalanobis"])


def fit_or_load(
    model: Padim,
    split: ClassSplit,
    class_dir: Path,
    geometry: Geometry,
    args: argparse.Namespace,
    identity: dict,
    model_path: Path,
    world: World,
) -> tuple[float, dict, int]:
    """Fit the Gaussian and set the threshold, or take both from a matching cached model file.

    With several ranks (--distribute images) rank 0 decides on the cached model and shares it;
    each rank fits its share of the images and the sums are added up (World.merge_sums).
    Returns (threshold, provenance, this rank's unreadable images)."""
    cached = world.from_root(_reusable_model(model_path, identity, args.save_distribution) if world.is_root else None)
    if cached is not None:
        content, stats = cached
        model.use(stats)
        return content["threshold"], content["threshold_provenance"], 0
    augment = (
        build_flips(args.horizontal_flip, args.vertical_flip, args.augmentation_prob)
        if args.augmentations_enabled
        else None
    )
    skipped: list[str] = []
    torch.manual_seed(args.seed)
    loader = image_loader(world.part(split.fit), geometry, args, model.device, augment)
    batches = readable_batches(loader, "fit", skipped)
    stats = model.fit((batch.images for batch in batches), merge=world.merge_sums)
    if not stats.is_finite():
        raise NonFiniteError("the fitted mean or precision factor holds a non-finite number")
    threshold, provenance, threshold_skipped = _threshold(model, split, geometry, args, world)
    if args.save_distribution and world.is_root:
        save_model(
            model_path,
            {
                **identity,
                "channel_index": model.index,
                "normalization_mean": list(IMAGENET_MEAN),
                "normalization_std": list(IMAGENET_STD),
                **stats_content(stats),
                "threshold": threshold,
                "threshold_provenance": provenance,
                "class_name": split.name,
            },
        )
        log.info("saved model %s", model_path)
    return threshold, provenance, len(skipped) + threshold_skipped


def evaluate(scored: ScoredSet, threshold: float, name: str, has_ground_truth: bool) -> ClassEvaluation:
    """All metrics of one class; an undefined one is None and the reason is logged."""
    result = ClassEvaluation(name, scored.samples, scored.scores, scored.maps, threshold, has_ground_truth)
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
    if has_ground_truth:
        curves = result.maps.pixel_histogram().curves()
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


def write_scores(result: ClassEvaluation, path: Path) -> None:
    """Per-image scores and calls, the numbers behind every metric and the ones predict.py reproduces."""
    table = pd.DataFrame(
        {
            "path": [str(s.path) for s in result.samples],
            "defect": [s.defect for s in result.samples],
            "label": result.labels,
            "score": result.scores,
            "is_anomalous": result.scores > result.threshold,
        }
    )
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.9g"))


def run_class_processing(
    args: argparse.Namespace,
    class_dir: Path,
    test_class_dir: Path | None,
    extractor: FeatureExtractor,
    weights_id: str,
    out_dir: Path,
    devices: dict[str, torch.device],
    world: World | None = None,
) -> dict | None:
    """Process one class end to end and return its master_results row (raises DataError for a bad class).

    With a distributed `world` (--distribute images) the ranks share the fit, hold-out and test
    images; rank 0 alone evaluates, writes and returns the row, the others return None."""
    world = world or World()
    split = load_class(
        args.dataset,
        class_dir,
        holdout_ratio=args.holdout_ratio,
        seed=args.seed,
        test_sample_ratio=args.test_sample_ratio,
    )
    has_ground_truth = split.has_ground_truth
    if test_class_dir is not None:
        other = load_class(
            args.dataset, test_class_dir, holdout_ratio=0.0, seed=args.seed, test_sample_ratio=args.test_sample_ratio
        )
        split.test, has_ground_truth = other.test, other.has_ground_truth
    geometry = Geometry(args.resize, args.cropsize)
    model = build_model(extractor, args, devices)
    index = model.index
    log_split(split, index.numel())
    if world.is_root:
        warn_on_crop_losses(split.test, geometry, split.name)
    identity = {
        "backbone": extractor.spec.name,
        "weights_id": weights_id,
        "layers": list(extractor.layers),
        "resize": args.resize,
        "cropsize": args.cropsize,
        "fingerprint": training_fingerprint(split.fit + split.holdout, class_dir),
        "training_config": _training_config(args, index),
    }
    if world.is_root:
        out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    threshold, provenance, fit_skipped = fit_or_load(
        model, split, class_dir, geometry, args, identity, out_dir / MODEL_FILENAME, world
    )
    fit_seconds = time.perf_counter() - start
    log.info(
        "%s: threshold %.4f from %s (quantile %.3f of %d images)",
        split.name,
        threshold,
        provenance["source"],
        provenance["quantile"],
        provenance["n_images"],
    )

    start = time.perf_counter()
    summary = MapSummary(threshold, geometry.input_size, args.max_visualizations)
    scored = score_samples(model, world.part(split.test), geometry, args, "score", summary)
    scored.skipped += fit_skipped
    parts = world.to_root(scored)
    if parts is None:
        return None
    scored = ScoredSet.join(parts)
    if scored.scores.size == 0:
        raise DataError("no readable test image")
    require_finite_scores(scored.scores, "test images")
    result = evaluate(scored, threshold, split.name, has_ground_truth)
    eval_seconds = time.perf_counter() - start
    write_scores(result, out_dir / SCORES_FILENAME)
    if len(result.defect_types):
        log.info(
            "%s: per defect type at threshold %.4f:\n%s",
            split.name,
            threshold,
            result.defect_types.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"),
        )
    atomic_write(
        out_dir / DEFECT_TYPES_FILENAME, lambda tmp: result.defect_types.to_csv(tmp, index=False, float_format="%.6g")
    )
    plot_class_results(result, out_dir)
    return {
        **result.summary,
        "n_train": model.stats.count,
        "n_holdout": len(split.holdout),
        "n_test": int(scored.scores.size),
        "n_skipped": scored.skipped + len(split.ignored_files),
        "fit_seconds": round(fit_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "status": "ok",
    }
