"""run_class(): data -> fit -> save -> score -> metrics -> plots for ONE class.

The single-class path of run_experiment.py, written as if there were one process: the math
lives in utils/padim, the metrics in utils/evaluation, the figures in utils/reporting, the data
in datasets/. Under torchrun with --distribute images, `ranks` (utils.runtime.distributed.World)
is where the processes meet: each scores its part of a set, the fit's sums are added up, rank 0
decides on a cached model and alone evaluates and writes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    Geometry,
    ImageDataset,
    Sample,
    build_flips,
    evaluation_frame,
    image_loader,
    readable_batches,
)
from datasets.split import ClassFiles, ClassSplit, DataError, seeded_split, split_class
from utils.config import DeviceConfig, FitConfig, ModelConfig
from utils.evaluation import metrics
from utils.evaluation.results import ScoredSet, evaluate
from utils.evaluation.summary import ClassEvaluation, MapSummary
from utils.padim.anomaly_map import Thresholds, map_maxima, to_original_resolution
from utils.padim.backbones import FeatureExtractor, pick_device
from utils.padim.embedding import channel_index, semi_orthogonal_matrix
from utils.padim.model import GaussianStats, GridMismatchError, Padim
from utils.padim.model_file import (
    MODEL_FILENAME,
    PROJECTION_ENTRY,
    ModelFileError,
    load_model,
    projection_from_content,
    save_model,
    stats_content,
    stats_from_content,
    sums_from_content,
    training_fingerprint,
)
from utils.reporting.plotting import plot_class_results
from utils.runtime.distributed import World
from utils.runtime.output_files import atomic_write, file_sha256

log = logging.getLogger(__name__)

SCORES_FILENAME = "scores.csv"
DEFECT_TYPES_FILENAME = "defect_types.csv"
MIN_HOLDOUT_IMAGES = 20
MIN_KEPT_SHARE = 2 / 3
MODEL_IDENTITY_KEYS = (
    "backbone",
    "weights_id",
    "layers",
    "resize",
    "cropsize",
    "resize_width",
    "fingerprint",
    "training_config",
)
HELD_OUT_SOURCE = "held-out normal training images"
TRAINING_SOURCE = "training images (too few to hold any out; biased low)"


class NonFiniteError(ValueError):
    """A NaN or an infinity where a score, statistic or threshold must be: the class fails, it is never a metric."""


def require_finite_scores(scores: np.ndarray, what: str) -> None:
    """NonFiniteError naming how many of `what` got a non-finite score."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise NonFiniteError(f"{bad} of {scores.size} {what} got a non-finite score (NaN or infinity)")


def resolve_devices(config: DeviceConfig) -> dict[str, torch.device]:
    """Backbone, statistics and Mahalanobis devices; a GPU request without CUDA falls back with a warning."""
    return {
        "backbone": pick_device(config.device, "--device cuda"),
        "stats": pick_device("cuda" if config.stats_on_gpu else "cpu", "--stats_on_gpu"),
        "mahalanobis": pick_device("cuda" if config.mahalanobis_on_gpu else "cpu", "--mahalanobis_on_gpu"),
    }


def geometry_of(model: ModelConfig) -> Geometry:
    """The model-input geometry of a configuration."""
    return Geometry(model.resize, model.cropsize, model.resize_width)


def build_model(extractor: FeatureExtractor, model: ModelConfig, devices: dict[str, torch.device]) -> Padim:
    """The untrained model of a configuration: the seeded channel subset of the extractor's dims (or all of them
    and the seeded semi-orthogonal projection), the neighbourhood, the image score, the covariance estimator and
    epsilon, the input size, the devices."""
    reduced_dim = extractor.reduced_dim(model.reduced_dim)
    if model.projection == "semi_orthogonal":
        index = torch.arange(extractor.dims)
        projection = semi_orthogonal_matrix(extractor.dims, reduced_dim, model.seed)
    else:
        index, projection = channel_index(extractor.dims, reduced_dim, model.seed), None
    return Padim(
        extractor,
        index,
        geometry_of(model).input_size,
        devices["backbone"],
        devices["stats"],
        devices["mahalanobis"],
        projection=projection,
        neighbourhood=model.neighbourhood,
        image_score=model.image_score,
        covariance=model.covariance,
        epsilon=model.epsilon,
    )


def class_loader(
    samples: list[Sample],
    geometry: Geometry,
    fit: FitConfig,
    seed: int,
    device: torch.device,
    augment: list | None = None,
) -> DataLoader:
    """The DataLoader of one pass over a class's images: the fit's batch size and workers, the run's seed."""
    dataset = ImageDataset(samples, geometry, augment, max_pixels=fit.max_image_pixels)
    return image_loader(dataset, fit.batch_size, fit.num_workers, device, seed)


def model_identity(
    model: ModelConfig,
    fit: FitConfig,
    weights_id: str,
    layers: list[str],
    index: torch.Tensor,
    fingerprint: str,
    precision: str = "fp32",
    dims: int | None = None,
) -> dict:
    """What makes a saved model this run's model (MODEL_IDENTITY_KEYS): the backbone, its weights and
    stages, the geometry, the training images, and the settings that change the fitted statistics or the
    threshold (the same `settings()` experiment.json records). The engine is not among them (its maps equal
    torch's), a reduced precision is. `dims`: the embedding's channels when a projection makes them fewer
    than the index's."""
    return {
        "backbone": model.architecture,
        "weights_id": weights_id,
        "layers": layers,
        "resize": model.resize,
        "cropsize": model.cropsize,
        "resize_width": model.resize_width,
        "fingerprint": fingerprint,
        "training_config": {
            "reduced_dim": int(index.numel()) if dims is None else dims,
            "channel_index": index.tolist(),
            "seed": model.seed,
            **model.variant_settings(),
            **fit.settings(),
            **({"precision": precision} if precision != "fp32" else {}),
        },
    }


def display_pixels(images: torch.Tensor, i: int) -> np.ndarray:
    """The i-th normalised model input of a (B, 3, H, W) batch back to uint8 RGB (H, W, 3), for a figure."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    pixels = torch.addcmul(mean, images[i].cpu().permute(1, 2, 0), std)
    return pixels.mul_(255).clamp_(0, 255).round_().to(torch.uint8).numpy()


def frame_maps(maps: torch.Tensor, batch: Batch, geometry: Geometry) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each map of a batch with the mask, in its image's evaluation frame (datasets.images.evaluation_frame):
    a pixel the model never saw (outside the centre crop) scores that map's minimum; no mask file, no defect."""
    frames = []
    for amap, (width, height), mask in zip(maps, batch.sizes, batch.frame_masks):
        frame = evaluation_frame(width, height)
        projected = to_original_resolution(amap, height, width, geometry, float(amap.min()), frame)
        frames.append((projected.numpy(), mask if mask is not None else np.zeros(frame, dtype=bool)))
    return frames


def score_samples(
    model: Padim,
    samples: list[Sample],
    geometry: Geometry,
    fit: FitConfig,
    seed: int,
    description: str,
    maps: MapSummary | None = None,
) -> ScoredSet:
    """Scores of every readable sample; each batch's maps are folded into `maps` (when given) and dropped,
    so memory does not grow with the number of images."""
    skipped: list[str] = []
    kept, scores, maxima = [], [], []
    loader = class_loader(samples, geometry, fit, seed, model.device)
    batches = readable_batches(loader, description, lambda _, reason: skipped.append(reason))
    for batch, batch_maps, batch_scores in model.stream_anomaly_maps((batch, batch.images) for batch in batches):
        batch_samples = [samples[i] for i in batch.indices]
        if maps is not None and torch.isfinite(batch_scores).all():  # a non-finite score fails the class below
            display = partial(display_pixels, batch.images)
            frames = frame_maps(batch_maps, batch, geometry)
            maps.add(batch_samples, batch_scores.numpy(), batch_maps.numpy(), batch.masks.numpy(), display, frames)
        kept.extend(batch_samples)
        scores.append(batch_scores.numpy())
        maxima.append(map_maxima(batch_maps).numpy())
    return ScoredSet(
        samples=kept,
        scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
        map_maxima=np.concatenate(maxima) if maxima else np.zeros(0, np.float32),
        skipped=len(skipped),
        maps=maps,
    )


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


def reusable_model(
    path: Path, identity: dict, projection: torch.Tensor | None, save_distribution: bool
) -> tuple[dict, GaussianStats] | None:
    """The matching cached model when reuse is asked for (--save_distribution); an earlier run's model that
    does not match is removed when this run will not replace it, so it never sits beside other results."""
    cached = cached_model(path, identity, projection)
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


def cached_model(path: Path, identity: dict, projection: torch.Tensor | None) -> tuple[dict, GaussianStats] | None:
    """The saved model and its statistics when it was made from the same backbone, settings, training images
    and projection matrix (bit for bit: a regenerated one that drifted would not score like the saved one)."""
    if not path.is_file():
        return None
    try:
        content = load_model(path)
        stats = stats_from_content(content)
        saved_projection = projection_from_content(content)
    except ModelFileError as err:
        log.warning("cached model not used, refitting: %s", err)
        return None
    changed = [key for key in MODEL_IDENTITY_KEYS if content[key] != identity[key]]
    same_projection = (saved_projection is None) == (projection is None) and (
        projection is None or torch.equal(saved_projection, projection)
    )
    if not same_projection:
        changed.append("projection matrix")
    if changed:
        log.warning("cached model %s differs in %s: refitting", path, ", ".join(changed))
        return None
    log.info("cached model %s matches this run", path)
    return content, stats


def threshold_of(
    model: Padim, samples: list[Sample], source: str, geometry: Geometry, fit: FitConfig, seed: int, ranks: World
) -> tuple[Thresholds, dict, list[Sample], int]:
    """Operating threshold: the quantile of good `samples`' scores, and the map threshold, the same quantile of
    the same maps' maxima (one scoring pass gives both). Each rank scores its part; every rank gets every
    score, so all agree on the thresholds (and on a failure). Returns (thresholds, provenance, the samples
    scored, this rank's unreadable images)."""
    scored = score_samples(model, ranks.part(samples), geometry, fit, seed, "threshold")
    scores = np.concatenate(ranks.everyone(scored.scores))
    maxima = np.concatenate(ranks.everyone(scored.map_maxima))
    if scores.size == 0:
        raise DataError("no readable image to set the threshold")
    require_finite_scores(scores, "threshold images")
    require_finite_scores(maxima, "threshold images' maps")
    thresholds = Thresholds(
        metrics.threshold_from_normals(scores, fit.threshold_quantile),
        metrics.threshold_from_normals(maxima, fit.threshold_quantile),
    )
    provenance = {"source": source, "quantile": fit.threshold_quantile, "n_images": int(scores.size)}
    kept = [sample for part in ranks.everyone(scored.samples) for sample in part]
    return thresholds, provenance, kept, scored.skipped


def threshold_from_holdout(
    model: Padim, split: ClassSplit, geometry: Geometry, fit: FitConfig, seed: int, ranks: World
) -> tuple[Thresholds, dict, list[Sample], int]:
    """Operating threshold from held-out good images; from the fit images only when there are none (threshold_of)."""
    source, samples = HELD_OUT_SOURCE, split.holdout
    if not samples:
        source, samples = TRAINING_SOURCE, split.fit
        log.warning("%s: no held-out normal images; threshold taken from the training images", split.name)
    return threshold_of(model, samples, source, geometry, fit, seed, ranks)


def threshold_record(samples: list[Sample]) -> list[list[str]]:
    """[path, sha256 of its bytes] of the images a threshold was set on: an update rescores those still there."""
    return [[str(sample.path.resolve()), file_sha256(sample.path)] for sample in samples]


def fit_or_load(
    model: Padim,
    split: ClassSplit,
    geometry: Geometry,
    fit: FitConfig,
    seed: int,
    identity: dict,
    model_path: Path,
    ranks: World,
) -> tuple[Thresholds, dict, int]:
    """Fit the Gaussian and set the thresholds, or take them from a matching cached model file.

    Rank 0 decides on the cached model and shares it; each rank fits its part of the images and the
    sums are added up (Padim.fit's peers). A saved model keeps the sums and the threshold's images, so
    that update.py can add images to it exactly. Returns (thresholds, provenance, this rank's unreadable
    images)."""
    cached = ranks.from_root(
        reusable_model(model_path, identity, model.projection, fit.save_distribution) if ranks.is_root else None
    )
    if cached is not None:
        content, stats = cached
        model.use(stats)
        thresholds = Thresholds(content["threshold"], content["map_threshold"])
        return thresholds, content["threshold_provenance"], 0
    augment = build_flips(fit.flips.horizontal, fit.flips.vertical, fit.flips.probability) if fit.flips else None
    skipped: list[str] = []
    torch.manual_seed(seed)
    loader = class_loader(ranks.part(split.fit), geometry, fit, seed, model.device, augment)
    batches = readable_batches(loader, "fit", lambda _, reason: skipped.append(reason))
    stats = model.fit((batch.images for batch in batches), peers=ranks, keep_sums=fit.save_distribution)
    if not stats.is_finite():
        raise NonFiniteError("the fitted mean or precision factor holds a non-finite number")
    thresholds, provenance, scored, threshold_skipped = threshold_from_holdout(model, split, geometry, fit, seed, ranks)
    if fit.save_distribution and ranks.is_root:
        save_model(
            model_path,
            {
                **identity,
                "channel_index": model.index,
                **({PROJECTION_ENTRY: model.projection} if model.projection is not None else {}),
                "normalization_mean": list(IMAGENET_MEAN),
                "normalization_std": list(IMAGENET_STD),
                **stats_content(stats),
                "threshold": thresholds.image,
                "map_threshold": thresholds.map,
                "threshold_provenance": provenance,
                "threshold_images": threshold_record(scored),
                "updates": [],
                "class_name": split.name,
            },
        )
        log.info("saved model %s", model_path)
    return thresholds, provenance, len(skipped) + threshold_skipped


def unchanged(path: Path, digest: str) -> bool:
    """The file is there with the bytes it had (sha256)."""
    try:
        return path.is_file() and file_sha256(path) == digest
    except OSError:
        return False


def good_samples(paths: list[Path]) -> list[Sample]:
    return [Sample(path, 0, "good") for path in paths]


def images_digest(samples: list[Sample]) -> str:
    """sha256 over the images' sha256 digests, in order: which images an update added, in one string."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(bytes.fromhex(file_sha256(sample.path)))
    return digest.hexdigest()


def update_model(content: dict, model: Padim, paths: list[Path], geometry: Geometry, loading: FitConfig) -> dict:
    """The content of a new model file: `content`'s model (which `model` scores with) plus the good images
    `paths`, with statistics equal to one fit on the old and the new images together.

    Of the new images, the model's hold-out share (seeded) is held out for the threshold, unless its
    threshold came from the training images (then every new image is fitted and scored). The threshold is
    set again under the new statistics, on the images it was set on before that are still there unchanged
    (path and content digest) plus the new ones; missing ones and a smaller count than before are warned
    about. `loading` gives the batch size and workers. Raises DataError (no readable new image),
    NonFiniteError (a statistic that is not finite: fails closed), GridMismatchError.
    """
    config, updates = content["training_config"], content["updates"]
    seed = config["seed"]
    fit = replace(loading, holdout_ratio=config["holdout_ratio"], threshold_quantile=config["threshold_quantile"])
    model.use(replace(model.stats, sums=sums_from_content(content)))
    held_out_before = content["threshold_provenance"]["source"] == HELD_OUT_SOURCE
    fitted, held_out = seeded_split(paths, fit.holdout_ratio if held_out_before else 0.0, seed + 1 + len(updates))
    if not fitted:
        fitted, held_out = held_out, []
    augment = build_flips(*config["augmentations"]) if config["augmentations"] else None
    skipped: list[str] = []
    read: list[Sample] = []
    samples = good_samples(fitted)
    torch.manual_seed(seed)
    batches = readable_batches(
        class_loader(samples, geometry, fit, seed, model.device, augment),
        "update",
        lambda _, reason: skipped.append(reason),
    )

    def new_images():
        for batch in batches:
            read.extend(samples[index] for index in batch.indices)
            yield batch.images

    before = model.stats.count
    try:
        stats = model.update(new_images())
    except GridMismatchError:
        raise
    except ValueError as err:  # a covariance that is not positive definite
        raise NonFiniteError(f"after the update {err}: no model written") from err
    if not read:
        raise DataError(f"none of the {len(fitted)} images to add could be read")
    if not (stats.is_finite() and stats.sums.is_finite()):
        raise NonFiniteError("after the update the statistics hold a non-finite number: no model written")

    recorded = content["threshold_images"]
    available = [Path(path) for path, digest in recorded if unchanged(Path(path), digest)]
    missing = len(recorded) - len(available)
    if missing:
        log.warning(
            "%d of the %d images the threshold was set on are missing or changed since: the threshold is set "
            "without them",
            missing,
            len(recorded),
        )
    source = HELD_OUT_SOURCE if held_out_before else TRAINING_SOURCE
    threshold_images = good_samples(available + held_out) if held_out_before else good_samples(available) + read
    if not threshold_images:
        log.warning("no held-out image left to set the threshold on: it is taken from the added training images")
        source, threshold_images = TRAINING_SOURCE, read
    thresholds, provenance, scored, threshold_skipped = threshold_of(
        model, threshold_images, source, geometry, fit, seed, World()
    )
    old = content["threshold_provenance"]["n_images"]
    if provenance["n_images"] < old:
        log.warning(
            "the new threshold rests on %d images, fewer than the %d the model's rested on", provenance["n_images"], old
        )
    new_held_out, originals = {path.resolve() for path in held_out}, {path.resolve() for path in available}
    added_held_out = [sample for sample in scored if sample.path.resolve() in new_held_out]
    rescored = sum(sample.path.resolve() in originals for sample in scored)
    added = images_digest(read + added_held_out)
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "fitted": len(read),
        "held_out": len(added_held_out),
        "skipped": len(skipped) + threshold_skipped,
        "digest": added,
        "n_train": stats.count,
        "threshold": thresholds.image,
        "map_threshold": thresholds.map,
        "threshold_images": provenance["n_images"],
        "threshold_images_missing": missing,
    }
    log.info(
        "added %d images to the fit (%d -> %d) and %d to the threshold's; threshold %.4f -> %.4f, map threshold "
        "%.4f -> %.4f from %d images (%d of the model's, rescored)",
        len(read),
        before,
        stats.count,
        len(added_held_out),
        content["threshold"],
        thresholds.image,
        content["map_threshold"],
        thresholds.map,
        provenance["n_images"],
        rescored,
    )
    kept = {key: value for key, value in content.items() if key not in ("format", "format_version", "checksum")}
    return {
        **kept,
        **stats_content(stats),
        "fingerprint": hashlib.sha256((content["fingerprint"] + added).encode()).hexdigest(),
        "threshold": thresholds.image,
        "map_threshold": thresholds.map,
        "threshold_provenance": {**provenance, "n_missing": missing},
        "threshold_images": threshold_record(scored),
        "updates": [*updates, record],
    }


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


def run_class(
    files: ClassFiles,
    test_files: ClassFiles | None,
    model_config: ModelConfig,
    fit: FitConfig,
    extractor: FeatureExtractor,
    weights_id: str,
    out_dir: Path,
    devices: dict[str, torch.device],
    ranks: World | None = None,
) -> dict | None:
    """Process one class end to end and return its master_results row (raises DataError for a bad class).

    With several `ranks` (--distribute images) they share the fit, hold-out and test images; rank 0
    alone evaluates, writes and returns the row, the others return None."""
    ranks = ranks or World()
    seed = model_config.seed
    split = split_class(files, holdout_ratio=fit.holdout_ratio, seed=seed, test_sample_ratio=fit.test_sample_ratio)
    has_ground_truth = split.has_ground_truth
    if test_files is not None:
        other = split_class(test_files, holdout_ratio=0.0, seed=seed, test_sample_ratio=fit.test_sample_ratio)
        split.test, has_ground_truth = other.test, other.has_ground_truth
    geometry = geometry_of(model_config)
    model = build_model(extractor, model_config, devices)
    log_split(split, model.dims)
    if ranks.is_root:
        warn_on_crop_losses(split.test, geometry, split.name)
        out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = training_fingerprint(split.fit + split.holdout, files.root)
    identity = model_identity(
        model_config, fit, weights_id, list(extractor.layers), model.index, fingerprint, extractor.precision, model.dims
    )
    start = time.perf_counter()
    thresholds, provenance, fit_skipped = fit_or_load(
        model, split, geometry, fit, seed, identity, out_dir / MODEL_FILENAME, ranks
    )
    fit_seconds = time.perf_counter() - start
    log.info(
        "%s: threshold %.4f, map threshold %.4f, from %s (quantile %.3f of %d images)",
        split.name,
        thresholds.image,
        thresholds.map,
        provenance["source"],
        provenance["quantile"],
        provenance["n_images"],
    )

    start = time.perf_counter()
    summary = MapSummary(thresholds, geometry.input_size, fit.max_visualizations)
    scored = score_samples(model, ranks.part(split.test), geometry, fit, seed, "score", summary)
    scored.skipped += fit_skipped
    parts = ranks.to_root(scored)
    if parts is None:
        return None
    scored = ScoredSet.join(parts)
    if scored.scores.size == 0:
        raise DataError("no readable test image")
    require_finite_scores(scored.scores, "test images")
    result = evaluate(scored, thresholds, split.name, has_ground_truth)
    eval_seconds = time.perf_counter() - start
    write_scores(result, out_dir / SCORES_FILENAME)
    if len(result.defect_types):
        log.info(
            "%s: per defect type at threshold %.4f:\n%s",
            split.name,
            thresholds.image,
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
