"""The model file: tensors and plain metadata only, written atomically, loaded without pickle code,
and sealed with a sha256 of its content so that a damaged copy is refused, never scored.

Everything predict.py needs to score an image lives here, so it never needs the training data.
Since version 6 it also holds what update.py needs to add images exactly (the sums the Gaussian
was formed from, the images the threshold was set on) and the history of such updates; files of
version 5 load and score as before, but cannot be updated. Since version 7 the training config may
name a variant embedding, score or covariance (projection, neighbourhood, image_score, covariance,
epsilon; absent: the defaults, as in every earlier file), a semi-orthogonal projection's matrix is
stored (`projection_matrix`), so that scoring never depends on regenerating it, `resize_width` gives
a height x width input (VARIANT_DEFAULTS: what files of versions 5 and 6 load with), and the sums
include the fourth moments Ledoit-Wolf needs. Since version 8 it holds the map threshold beside the
threshold (`map_threshold`: the same quantile of the held-out good images' map maxima, what regions are
drawn against); earlier map_max files take their threshold, the same quantity, and earlier files of a grid
image score, whose threshold is in other units than the map, are refused (load_model).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from datasets.images import Sample
from utils.cli import first_line
from utils.config import COVARIANCES, IMAGE_SCORES, NEIGHBOURHOODS, PROJECTIONS, ModelConfig
from utils.padim.anomaly_map import same_quantity
from utils.padim.gaussian import GaussianSums
from utils.padim.model import GaussianStats
from utils.padim.triangular import TriangularBlocks
from utils.runtime.output_files import atomic_write

MODEL_FORMAT = "padim-suite-model"
MODEL_FORMAT_VERSION = 8
UPDATABLE_SINCE = 6  # version 5 files hold no sums: they score, but cannot be updated
VARIANTS_SINCE = 7  # earlier files load with VARIANT_DEFAULTS
MAP_THRESHOLD_SINCE = 8  # earlier map_max files load with their threshold as the map threshold
READABLE_VERSIONS = (5, 6, 7, 8)  # files of earlier versions hold no checksum, cannot be verified and are refused
MODEL_FILENAME = "padim_model.pt"
ENTRY_TYPES = {  # what save_model writes: any other type is a hand-made or damaged file
    "backbone": str,
    "weights_id": str,
    "layers": list,
    "channel_index": torch.Tensor,
    "resize": int,
    "cropsize": int,
    "normalization_mean": list,
    "normalization_std": list,
    "mean": torch.Tensor,
    "precision_factor": list,
    "grid": list,
    "n_train": int,
    "threshold": float,
    "threshold_provenance": dict,
    "fingerprint": str,
    "training_config": dict,
    "class_name": str,
    "checksum": str,
}
UPDATE_ENTRY_TYPES = {  # since version 6: what an exact update needs, and the updates made
    "sums_shift": torch.Tensor,
    "sums_first": torch.Tensor,
    "sums_second": list,
    "threshold_images": list,
    "updates": list,
}
PROJECTION_ENTRY = "projection_matrix"  # since version 7, with a semi-orthogonal projection only: W (D, k) float32
VARIANT_KEYS = ("projection", "neighbourhood", "image_score")  # in training_config when not the defaults
VARIANT_ENTRY_TYPES = {  # since version 7: the model's variant settings
    "resize_width": (int, type(None)),  # the width of a height x width input (None: square or short side)
}
VARIANT_DEFAULTS = {"resize_width": None}  # what a file before version 7 was fitted with
MAP_THRESHOLD_ENTRY_TYPES = {"map_threshold": float}  # since version 8
FOURTH_MOMENT_ENTRY_TYPES = {  # since version 7, absent from models updated from version 6 files: Ledoit-Wolf's sums
    "sums_third": torch.Tensor,
    "sums_fourth": torch.Tensor,
}
ZIP_END_RECORD = b"PK\x05\x06"  # torch.save writes a zip archive; this record, without comment, is its last 22 bytes


class ModelFileError(Exception):
    """A model file that is missing, damaged, of another format, or unsafe to load."""


def entry_types(version: int) -> dict:
    """The entries (and their types) a file of `version` holds."""
    return (
        ENTRY_TYPES
        | (UPDATE_ENTRY_TYPES if version >= UPDATABLE_SINCE else {})
        | (VARIANT_ENTRY_TYPES if version >= VARIANTS_SINCE else {})
        | (MAP_THRESHOLD_ENTRY_TYPES if version >= MAP_THRESHOLD_SINCE else {})
    )


def required_keys(version: int) -> set[str]:
    return {"format", "format_version", *entry_types(version)}


def training_fingerprint(samples: list[Sample], root: Path) -> str:
    """sha256 over the fit images' relative paths and bytes: a cached model is reused only for the same set."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(str(sample.path.relative_to(root)).encode())
        digest.update(hashlib.sha256(sample.path.read_bytes()).digest())
    return digest.hexdigest()


def stats_content(stats: GaussianStats) -> dict:
    """The model file's entries for the fitted Gaussian and the sums it was formed from, on the CPU."""
    if stats.sums is None:
        raise ValueError("the statistics carry no sums (fit with keep_sums) and could never be updated")
    sums = stats.sums.to("cpu")
    fourth_moments = {"sums_third": sums.third, "sums_fourth": sums.fourth} if sums.fourth is not None else {}
    return {
        "mean": stats.mean.cpu(),
        "precision_factor": stats.factor.to("cpu").blocks,
        "grid": list(stats.grid),
        "n_train": stats.count,
        "sums_shift": sums.shift,
        "sums_first": sums.first,
        "sums_second": sums.second.blocks,
        **fourth_moments,
    }


def model_variant(content: dict) -> dict:
    """The model's projection, neighbourhood and image score: its training config's, the defaults where
    absent (every file before version 7, and the defaults since). ModelFileError for one this code does
    not know."""
    defaults = ModelConfig()
    variant = {key: content["training_config"].get(key, getattr(defaults, key)) for key in VARIANT_KEYS}
    known = {"projection": PROJECTIONS, "neighbourhood": NEIGHBOURHOODS, "image_score": IMAGE_SCORES}
    for key, values in known.items():
        if variant[key] not in values:
            raise ModelFileError(f"{key} {variant[key]!r} is unknown to this version (known: {list(values)})")
    return variant


def projection_from_content(content: dict) -> torch.Tensor | None:
    """The stored projection W (D, k) of a semi-orthogonal model, None for a channel subset.

    ModelFileError for a variant this code does not know (model_variant), a projection without its matrix
    (or a matrix without the projection), or a matrix that does not fit the channel index (all D channels,
    in order) or is not finite.
    """
    variant = model_variant(content)
    matrix = content.get(PROJECTION_ENTRY)
    if (variant["projection"] == "semi_orthogonal") != (matrix is not None):
        raise ModelFileError(f"projection {variant['projection']!r} with{'' if matrix is not None else 'out'} a matrix")
    if matrix is None:
        return None
    index = content["channel_index"]
    if not (
        isinstance(matrix, torch.Tensor)
        and matrix.dtype == torch.float32
        and matrix.dim() == 2
        and torch.equal(torch.as_tensor(index), torch.arange(matrix.shape[0]))
        and bool(torch.isfinite(matrix).all())
    ):
        raise ModelFileError(f"the projection matrix does not fit the {len(index)} channels or is not finite")
    return matrix


def stats_from_content(content: dict) -> GaussianStats:
    """The fitted Gaussian back from a loaded model file's entries (stats_content's inverse).

    ModelFileError when mean and precision factor do not fit the grid and the channel index,
    or hold a non-finite number: scoring would fail deep inside the Mahalanobis step, or
    worse, not fail. The factor's blocks may split the rows anywhere (files written with
    another BLOCK_WIDTH), as long as they cover the triangle.
    """
    mean, factor, grid = content["mean"], content["precision_factor"], content["grid"]
    projection = projection_from_content(content)
    dims = len(content["channel_index"]) if projection is None else projection.shape[1]
    positions = math.prod(grid) if all(isinstance(side, int) and side > 0 for side in grid) else -1
    blocks_ok = (
        isinstance(factor, list)
        and len(factor) > 0
        and all(isinstance(b, torch.Tensor) and b.dim() == 3 for b in factor)
    )
    edges = list(itertools.accumulate((block.shape[1] for block in factor), initial=0)) if blocks_ok else []
    if not (
        isinstance(mean, torch.Tensor)
        and tuple(mean.shape) == (positions, dims)
        and blocks_ok
        and all(a < b for a, b in itertools.pairwise(edges))
        and edges[-1] == dims
        and [tuple(block.shape) for block in factor]
        == TriangularBlocks.shapes(positions, dims, lower=True, edges=edges)
    ):
        raise ModelFileError(f"statistics shapes do not match grid {list(grid)} and {dims} channels")
    stats = GaussianStats(mean, TriangularBlocks(list(factor), lower=True), tuple(grid), content["n_train"])
    if not stats.is_finite():
        raise ModelFileError("the mean or precision factor holds a non-finite number")
    return stats


def covariance_settings(content: dict) -> tuple[str, float]:
    """(covariance estimator, epsilon) the model was fitted with: training_config's, the defaults where it
    names none (files before version 7, or fitted with the defaults). ModelFileError for unknown ones."""
    config = content["training_config"]
    covariance = config.get("covariance", ModelConfig.covariance)
    epsilon = config.get("epsilon", ModelConfig.epsilon)
    if covariance not in COVARIANCES:
        raise ModelFileError(f"unknown covariance estimator {covariance!r} (known: {', '.join(COVARIANCES)})")
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not (math.isfinite(epsilon) and epsilon >= 0)
    ):
        raise ModelFileError(f"epsilon {epsilon!r} is not a finite number >= 0")
    return covariance, float(epsilon)


def require_updatable(content: dict, path: Path) -> None:
    """ModelFileError (one line) for a model that holds no sums to add images to."""
    version = content.get("format_version")
    if not isinstance(version, int) or version < UPDATABLE_SINCE:
        raise ModelFileError(
            f"{path}: cannot be updated: it was saved in model format version {version!r}, before models kept "
            f"the sums an exact update needs (version {UPDATABLE_SINCE}); refit it with run_experiment.py "
            "--save_distribution, then update the new model"
        )


def sums_from_content(content: dict) -> GaussianSums:
    """The sums the model's Gaussian was formed from (stats_content's), checked against its statistics.

    ModelFileError when their shapes, types or count do not fit the mean, or when they hold a non-finite
    number: an update from them would be wrong, not merely inexact.
    """
    mean, count = content["mean"], content["n_train"]
    shift, first, second = content["sums_shift"], content["sums_first"], content["sums_second"]
    positions, dims = mean.shape
    if not (
        isinstance(shift, torch.Tensor)
        and shift.dtype == torch.float32
        and tuple(shift.shape) == (positions, dims)
        and isinstance(first, torch.Tensor)
        and first.dtype == torch.float64
        and tuple(first.shape) == (positions, dims)
        and all(isinstance(block, torch.Tensor) and block.dtype == torch.float32 for block in second)
        and [tuple(block.shape) for block in second] == TriangularBlocks.shapes(positions, dims, lower=False)
        and count > 0
    ):
        raise ModelFileError(f"the stored sums do not match the statistics ({positions} positions, {dims} channels)")
    third, fourth = content.get("sums_third"), content.get("sums_fourth")
    if (third is None) != (fourth is None) or not (
        third is None
        or (
            third.dtype == fourth.dtype == torch.float64
            and tuple(third.shape) == (positions, dims)
            and tuple(fourth.shape) == (positions,)
        )
    ):
        raise ModelFileError(f"the stored fourth moments do not match the statistics ({positions} positions)")
    sums = GaussianSums(count, shift, first, TriangularBlocks(list(second), lower=False), third, fourth)
    if not sums.is_finite():
        raise ModelFileError("the stored sums hold a non-finite number")
    return sums


def update_history(content: dict) -> list[str]:
    """One line per update the model went through (update.py), oldest first: for the logs."""
    lines = []
    for number, update in enumerate(content.get("updates", []), start=1):
        entry = update if isinstance(update, dict) else {}
        lines.append(
            f"update {number}: {entry.get('time', '?')}, {entry.get('fitted', '?')} good images added to the fit, "
            f"{entry.get('held_out', '?')} to the threshold's ({entry.get('skipped', '?')} unreadable skipped), "
            f"images digest {str(entry.get('digest', '?'))[:16]}, {entry.get('n_train', '?')} fitted images in all"
        )
    return lines


def _digest_value(digest, value) -> None:
    """Feed `value` to `digest` in an encoding that tells every type, length and number apart."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"tensor {data.dtype} {tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\n".encode())
        for key, item in sorted(value.items(), key=lambda pair: repr(pair[0])):
            _digest_value(digest, key)
            _digest_value(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)}\n".encode())
        for item in value:
            _digest_value(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise ModelFileError(f"unexpected {type(value).__name__} in the model content")


def content_checksum(content: dict) -> str:
    """sha256 of every entry but the checksum itself: any changed number, name or shape changes it."""
    digest = hashlib.sha256()
    _digest_value(digest, {key: value for key, value in content.items() if key != "checksum"})
    return digest.hexdigest()


def save_model(path: Path, content: dict) -> None:
    """Write the model file with its format, version and checksum."""
    content = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **content}
    missing = required_keys(MODEL_FORMAT_VERSION) - content.keys() - {"checksum"}
    if missing:
        raise ValueError(f"model content lacks {sorted(missing)}")
    content["checksum"] = content_checksum(content)
    atomic_write(path, lambda tmp: torch.save(content, tmp))


def _archive_intact(path: Path) -> bool:
    """The bytes the checksum cannot see are as torch.save wrote them.

    Nothing follows the zip archive's end record (torch.load ignores appended bytes), and the
    small records (pickled metadata, version, byte order) pass their CRC-32: a flip there can
    leave what they decode to unchanged (a storage's location tag, overridden by map_location).
    The tensor records are covered by the checksum.
    """
    with path.open("rb") as handle:
        if handle.seek(0, os.SEEK_END) < 22:
            return False
        handle.seek(-22, os.SEEK_END)
        if handle.read(4) != ZIP_END_RECORD:
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if "/data/" not in info.filename:
                    archive.read(info)
    except Exception:  # zipfile reports a damaged record in several exception types
        return False
    return True


def _looks_like_text(path: Path) -> bool:
    """True for a file whose first 4 KB decode as UTF-8 without NUL bytes (a model file is a zip archive)."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start > len(head) - 4 and b"\0" not in head  # a character cut at the 4 KB edge
    return b"\0" not in head


def _read_content(path: Path):
    """torch.load with tensors and plain data only; any failure to parse the bytes is damage, not a crash."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise ModelFileError(
                f"{path}: refused, it holds objects other than tensors and plain data (it could run code)"
            ) from err
        raise ModelFileError(
            f"{path}: refused, not a model file that loads as tensors and plain data "
            "(truncated, damaged, or another kind of file)"
        ) from err
    except Exception as err:  # a damaged archive or pickle surfaces as many exception types
        reason = first_line(err).split(". ")[0].rstrip(".")  # torch's sentences go on with advice on checkpoints
        raise ModelFileError(f"{path}: not a readable model file, truncated or damaged ({reason})") from err


def load_model(path: Path) -> dict:
    """Load and verify a model file: never unpickles anything but tensors and plain data, and
    refuses any content that differs from what save_model wrote (checksum)."""
    if path.is_dir():
        path = path / MODEL_FILENAME
    if not path.is_file():
        raise ModelFileError(f"{path}: no model file (train with run_experiment.py --save_distribution)")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file, not a model (an interrupted copy?)")
    graphs = [path.with_suffix(suffix) for suffix in (".onnx", ".xml")] if path.suffix == ".json" else []
    graphs = [graph for graph in graphs if graph.is_file()]
    if graphs:
        raise ModelFileError(
            f"{path}: the description of an exported graph, not a model file; pass --model {graphs[0]}"
        )
    if _looks_like_text(path):
        raise ModelFileError(
            f"{path}: a text file (a CSV or a log?), not a model file; pass a class results "
            f"folder or its {MODEL_FILENAME}"
        )
    content = _read_content(path)
    if not isinstance(content, dict) or content.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not a PaDiM suite model file")
    version = content.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ModelFileError(
            f"{path}: model format version {version!r}, this tool reads versions "
            f"{READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]} (earlier files carry no checksum); retrain it with "
            "run_experiment.py --save_distribution"
        )
    try:
        intact = content.get("checksum") == content_checksum(content) and _archive_intact(path)
    except ModelFileError as err:  # a type save_model never writes
        raise ModelFileError(f"{path}: damaged ({err})") from err
    if not intact:
        raise ModelFileError(f"{path}: damaged (checksum mismatch)")
    missing = required_keys(version) - content.keys()
    if missing:
        raise ModelFileError(f"{path}: incomplete model file, lacks {sorted(missing)}")
    optional = {key: kind for key, kind in FOURTH_MOMENT_ENTRY_TYPES.items() if key in content}
    mistyped = sorted(
        key
        for key, kind in (entry_types(version) | optional).items()
        if not isinstance(content[key], kind) or isinstance(content[key], bool)
    )
    if mistyped:
        raise ModelFileError(f"{path}: malformed model file, unexpected types of {', '.join(mistyped)}")
    if version < MAP_THRESHOLD_SINCE:
        content = {**content, "map_threshold": earlier_map_threshold(content, version, path)}
    for key in ("threshold", "map_threshold"):
        if not (math.isfinite(content[key]) and content[key] > 0):
            raise ModelFileError(f"{path}: {key} {content[key]!r} is not a positive finite number")
    return content if version >= VARIANTS_SINCE else {**VARIANT_DEFAULTS, **content}


def earlier_map_threshold(content: dict, version: int, path: Path) -> float:
    """The map threshold of a file saved before version 8 held one: its threshold when its image score is
    map_max (the map's maximum: the same quantity). A grid score's threshold is in the raw grid's units, higher
    than the blurred map's, so regions drawn against it would miss what the score calls anomalous; the map
    threshold needs the held-out images' maps, which the file does not hold: ModelFileError."""
    image_score = content["training_config"].get("image_score", ModelConfig.image_score)
    if same_quantity(image_score):
        return content["threshold"]
    raise ModelFileError(
        f"{path}: model format version {version} with image score {image_score!r} holds no map threshold, which "
        "regions, masks and heat maps need (its threshold is in grid units, not the map's); refit it with "
        "run_experiment.py --save_distribution"
    )
