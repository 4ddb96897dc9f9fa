"""The model file: tensors and plain metadata only, written atomically, loaded without pickle code.

Everything predict.py needs to score an image lives here, so it never needs the training data.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from datasets.images import Sample
from utils.gaussian import TriangularBlocks
from utils.padim import GaussianStats

MODEL_FORMAT = "padim-suite-model"
MODEL_FORMAT_VERSION = 4  # 4: precision factor as the lower row blocks of W (utils.gaussian.TriangularBlocks)
# 3: the same numbers as column blocks of W^T, read by transposing them; 2: centre-aligned
# resampling (utils.grid), its dense factor and version 1's statistics are not read
READABLE_VERSIONS = (3, MODEL_FORMAT_VERSION)
MODEL_FILENAME = "padim_model.pt"
REQUIRED_KEYS = {
    "format", "format_version", "backbone", "weights_id", "layers", "channel_index", "resize", "cropsize",
    "normalization_mean", "normalization_std", "mean", "precision_factor", "grid", "n_train",
    "threshold", "threshold_provenance", "fingerprint", "training_config", "class_name",
}


class ModelFileError(Exception):
    """A model file that is missing, damaged, of another format, or unsafe to load."""


def training_fingerprint(samples: list[Sample], root: Path) -> str:
    """sha256 over the fit images' relative paths and bytes: a cached model is reused only for the same set."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(str(sample.path.relative_to(root)).encode())
        digest.update(hashlib.sha256(sample.path.read_bytes()).digest())
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` then rename onto `path`: an interrupted run never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stats_content(stats: GaussianStats) -> dict:
    """The model file's entries for the fitted Gaussian, on the CPU."""
    return {"mean": stats.mean.cpu(), "precision_factor": stats.factor.to("cpu").blocks,
            "grid": list(stats.grid), "n_train": stats.count}


def stats_from_content(content: dict) -> GaussianStats:
    """The fitted Gaussian back from a loaded model file's entries (stats_content's inverse).

    ModelFileError when mean and precision factor do not fit the grid and the channel index (a
    damaged or hand-made file, or version 2's dense factor): scoring would fail deep inside
    the Mahalanobis step, or worse, not fail. The factor's blocks may split the rows
    anywhere (files written with another BLOCK_WIDTH), as long as they cover the triangle.
    Version 3 files hold the transposes of these blocks (W^T's columns): they are turned.
    """
    mean, factor, grid = content["mean"], content["precision_factor"], content["grid"]
    dims = len(content["channel_index"])
    positions = math.prod(grid) if all(isinstance(side, int) and side > 0 for side in grid) else -1
    blocks_ok = isinstance(factor, list) and len(factor) > 0 and all(isinstance(b, torch.Tensor) and b.dim() == 3 for b in factor)
    if blocks_ok and content.get("format_version", MODEL_FORMAT_VERSION) == 3:
        factor = [block.transpose(1, 2).contiguous() for block in factor]
    edges = list(itertools.accumulate((block.shape[1] for block in factor), initial=0)) if blocks_ok else []
    if not (isinstance(mean, torch.Tensor) and tuple(mean.shape) == (positions, dims) and blocks_ok
            and all(a < b for a, b in itertools.pairwise(edges)) and edges[-1] == dims
            and [tuple(block.shape) for block in factor] == TriangularBlocks.shapes(positions, dims, lower=True, edges=edges)):
        raise ModelFileError(f"statistics shapes do not match grid {list(grid)} and {dims} channels")
    return GaussianStats(mean, TriangularBlocks(list(factor), lower=True), tuple(grid), content["n_train"])


def save_model(path: Path, content: dict) -> None:
    content = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **content}
    missing = REQUIRED_KEYS - content.keys()
    if missing:
        raise ValueError(f"model content lacks {sorted(missing)}")
    atomic_write(path, lambda tmp: torch.save(content, tmp))


def load_model(path: Path) -> dict:
    """Load and validate a model file; never unpickles anything but tensors and plain data."""
    if path.is_dir():
        path = path / MODEL_FILENAME
    if not path.is_file():
        raise ModelFileError(f"{path}: no model file (train with run_experiment.py --save_distribution)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(f"{path}: refused, it holds objects other than tensors and plain data (it could run code)") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a readable model file, truncated or damaged ({str(err).splitlines()[0]})") from err
    if not isinstance(content, dict) or content.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not a PaDiM suite model file")
    if content.get("format_version") not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: model format version {content.get('format_version')}, this tool reads "
                             f"{' and '.join(map(str, READABLE_VERSIONS))}; retrain it")
    missing = REQUIRED_KEYS - content.keys()
    if missing:
        raise ModelFileError(f"{path}: incomplete model file, lacks {sorted(missing)}")
    return content
