"""Turning a class folder (train/good, test/good, test/<defect>) into fit / hold-out / test samples.

Shared by the MVTec and BowTie layouts; they differ only in whether a share of train/good
moves to the test set (datasets.MOVES_TRAIN_SHARE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets import MOVES_TRAIN_SHARE
from datasets.images import Sample, list_images, non_image_files

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"


class DataError(Exception):
    """A class folder that cannot be used (no training images, no test images)."""


@dataclass
class ClassSplit:
    """Samples of one class: `fit` builds the Gaussian, `holdout` (good, unseen) sets the threshold."""

    name: str
    fit: list[Sample]
    holdout: list[Sample]
    test: list[Sample]
    has_ground_truth: bool
    ignored_files: list[Path]
    moved_to_test: int = 0


def is_class_dir(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def find_classes(root: Path) -> list[Path]:
    """`root` itself when it is a class, else every sub-folder with train/ and test/."""
    if is_class_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_class_dir(p))


def seeded_split(paths: list[Path], ratio: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split off round(ratio * n) paths, reproducibly for a seed; returns (kept, split_off)."""
    count = int(round(ratio * len(paths)))
    if count == 0:
        return list(paths), []
    chosen = set(np.random.default_rng(seed).choice(len(paths), size=count, replace=False).tolist())
    kept = [p for i, p in enumerate(paths) if i not in chosen]
    split_off = [p for i, p in enumerate(paths) if i in chosen]
    return kept, split_off


def test_samples(class_dir: Path) -> tuple[list[Sample], bool]:
    """test/good (label 0) and test/<defect> (label 1) with their masks; and whether ground truth exists."""
    test_root = class_dir / "test"
    gt_root = class_dir / "ground_truth"
    has_ground_truth = gt_root.is_dir()
    samples = [Sample(p, 0, "good") for p in list_images(test_root / "good")]
    missing = 0
    for defect_dir in sorted(d for d in test_root.iterdir() if d.is_dir() and d.name != "good"):
        masks = {m.stem: m for m in list_images(gt_root / defect_dir.name)} if has_ground_truth else {}
        for path in list_images(defect_dir):
            mask = masks.get(path.stem + MASK_SUFFIX)
            missing += has_ground_truth and mask is None
            samples.append(Sample(path, 1, defect_dir.name, mask))
    if missing:
        log.warning(
            "%s: %d defect images have no mask; they are left out of the pixel metrics", class_dir.name, missing
        )
    return samples, has_ground_truth


def ignored_files(class_dir: Path) -> list[Path]:
    """Non-image files among the class's image folders, each warned about once."""
    folders = [class_dir / "train" / "good", *sorted(d for d in (class_dir / "test").iterdir() if d.is_dir())]
    ignored = [path for folder in folders for path in non_image_files(folder)]
    for path in ignored:
        log.warning("skipped %s: not an image file (extensions: png, jpg, jpeg, bmp, tif, tiff)", path)
    return ignored


def build_split(class_dir: Path, *, test_share_of_train: float, holdout_ratio: float, seed: int) -> ClassSplit:
    """Seeded, disjoint split: train/good -> (test normals, hold-out normals, fit images)."""
    train_good = list_images(class_dir / "train" / "good")
    if not train_good:
        raise DataError(f"no training images in {class_dir / 'train' / 'good'}")
    remaining, moved_to_test = seeded_split(train_good, test_share_of_train, seed)
    fit, holdout = seeded_split(remaining, holdout_ratio, seed + 1)
    if not fit:
        fit, holdout = holdout, []
    test, has_ground_truth = test_samples(class_dir)
    ignored = ignored_files(class_dir)
    test = [Sample(p, 0, "good") for p in moved_to_test] + test
    if not test:
        raise DataError(f"no test images in {class_dir / 'test'}")
    return ClassSplit(
        name=class_dir.name,
        fit=[Sample(p, 0, "good") for p in fit],
        holdout=[Sample(p, 0, "good") for p in holdout],
        test=test,
        has_ground_truth=has_ground_truth,
        ignored_files=ignored,
        moved_to_test=len(moved_to_test),
    )


def load_class(
    layout: str, class_dir: Path, *, holdout_ratio: float, seed: int, test_sample_ratio: float
) -> ClassSplit:
    """A class folder of `layout` (datasets.DATASET_LAYOUTS) split into fit / hold-out / test samples."""
    moved = test_sample_ratio if MOVES_TRAIN_SHARE[layout] else 0.0
    return build_split(class_dir, test_share_of_train=moved, holdout_ratio=holdout_ratio, seed=seed)
