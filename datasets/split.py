"""A class's images in any layout (ClassFiles), and their seeded split into fit / hold-out / test.

Every layout lists its images as ClassFiles (the training normals, the test samples with labels,
defect types and masks); split_class splits them the same way whatever the layout, so the same
images give the same results as MVTec folders, a folder layout or a manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets import MOVES_TRAIN_SHARE, FolderLayout
from datasets.files import list_images, non_image_files
from datasets.images import Sample

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
LAYOUT_FLAGS = (
    "--dataset mvtec (class folders with train/ and test/), --dataset bowtie (folders data/process_data.py "
    "wrote), --dataset folder --normal_dir DIR --abnormal_dir DIR... (a folder of good images and one per "
    "defect type), --dataset csv --manifest FILE (a CSV list of images)"
)


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


@dataclass(frozen=True)
class ClassFiles:
    """One class's images before the split, whatever the layout: the normal training images (in a fixed
    order: the seeded split depends on it), the test samples, whether a share of the training normals
    moves to the test set, the non-image files passed over; `root` is what the training images' paths are
    taken relative to (the model file's fingerprint); `train_where` / `test_where` name where the images
    were looked for, in messages."""

    name: str
    train: tuple[Path, ...]
    test: tuple[Sample, ...]
    has_ground_truth: bool
    moves_train_share: bool
    root: Path
    train_where: str
    test_where: str
    ignored_files: tuple[Path, ...] = ()

    @property
    def images(self) -> int:
        return len(self.train) + len(self.test)


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


def class_folder_files(layout: str, class_dir: Path) -> ClassFiles:
    """The images of an MVTec or BowTie class folder (train/good, test/good, test/<defect>, ground_truth)."""
    test, has_ground_truth = test_samples(class_dir)
    return ClassFiles(
        name=class_dir.name,
        train=tuple(list_images(class_dir / "train" / "good")),
        test=tuple(test),
        has_ground_truth=has_ground_truth,
        moves_train_share=MOVES_TRAIN_SHARE[layout],
        root=class_dir,
        train_where=str(class_dir / "train" / "good"),
        test_where=str(class_dir / "test"),
        ignored_files=tuple(ignored_files(class_dir)),
    )


def matched_masks(folder: Path, images: list[Path]) -> dict[Path, Path]:
    """The mask of each image found in `folder` by the image's stem, with or without the _mask suffix."""
    masks = {path.stem: path for path in list_images(folder)}
    found = {}
    for path in images:
        mask = masks.get(path.stem + MASK_SUFFIX) or masks.get(path.stem)
        if mask is not None:
            found[path] = mask
    return found


def folder_layout_files(layout: FolderLayout) -> ClassFiles:
    """The images of `--dataset folder`: good images to train on, each abnormal folder a defect type named
    after it, good test images from `normal_test_dir` (else a seeded share of the good images moves), masks
    from `mask_dir` (or its sub-folder named after the defect type, when there is one). DataError for a
    folder that is not there; missing masks are reported and left out of the pixel metrics."""
    folders = [layout.normal_dir, *layout.abnormal_dirs, layout.normal_test_dir, layout.mask_dir]
    for folder in folders:
        if folder is not None and not folder.is_dir():
            raise DataError(f"{folder} is not a folder")
    names = [folder.name for folder in layout.abnormal_dirs]
    repeated = sorted({name for name in names if names.count(name) > 1} | ({"good"} & set(names)))
    if repeated:
        raise DataError(f"--abnormal_dir: defect types are named after their folders; {', '.join(repeated)} twice")
    test = [Sample(path, 0, "good") for path in list_images(layout.normal_test_dir)] if layout.normal_test_dir else []
    missing = []
    for folder in sorted(layout.abnormal_dirs, key=lambda folder: folder.name):
        images = list_images(folder)
        masks = {}
        if layout.mask_dir is not None:
            mask_folder = layout.mask_dir / folder.name
            masks = matched_masks(mask_folder if mask_folder.is_dir() else layout.mask_dir, images)
            missing += [path for path in images if path not in masks]
        test += [Sample(path, 1, folder.name, masks.get(path)) for path in images]
    if missing:
        log.warning(
            "%s: %d defect images have no mask in %s (%s%s); they are left out of the pixel metrics",
            layout.name,
            len(missing),
            layout.mask_dir,
            ", ".join(path.name for path in missing[:5]),
            ", ..." if len(missing) > 5 else "",
        )
    image_folders = [layout.normal_dir, layout.normal_test_dir, *layout.abnormal_dirs]
    ignored = [path for folder in image_folders if folder for path in non_image_files(folder)]
    for path in ignored:
        log.warning("skipped %s: not an image file (extensions: png, jpg, jpeg, bmp, tif, tiff)", path)
    return ClassFiles(
        name=layout.name,
        train=tuple(list_images(layout.normal_dir)),
        test=tuple(test),
        has_ground_truth=layout.mask_dir is not None,
        moves_train_share=layout.normal_test_dir is None,
        root=layout.normal_dir.parent,
        train_where=str(layout.normal_dir),
        test_where=" ".join(str(folder) for folder in [layout.normal_test_dir, *layout.abnormal_dirs] if folder),
        ignored_files=tuple(ignored),
    )


def split_class(files: ClassFiles, *, holdout_ratio: float, seed: int, test_sample_ratio: float) -> ClassSplit:
    """Seeded, disjoint split of the training normals -> (test normals when the layout moves a share,
    hold-out normals, fit images); DataError when no training or no test image is left."""
    if not files.train:
        raise DataError(f"no training images in {files.train_where}")
    moved_share = test_sample_ratio if files.moves_train_share else 0.0
    remaining, moved_to_test = seeded_split(list(files.train), moved_share, seed)
    fit, holdout = seeded_split(remaining, holdout_ratio, seed + 1)
    if not fit:
        fit, holdout = holdout, []
    test = [Sample(p, 0, "good") for p in moved_to_test] + list(files.test)
    if not test:
        raise DataError(f"no test images in {files.test_where}")
    return ClassSplit(
        name=files.name,
        fit=[Sample(p, 0, "good") for p in fit],
        holdout=[Sample(p, 0, "good") for p in holdout],
        test=test,
        has_ground_truth=files.has_ground_truth,
        ignored_files=list(files.ignored_files),
        moved_to_test=len(moved_to_test),
    )


def load_class(
    layout: str, class_dir: Path, *, holdout_ratio: float, seed: int, test_sample_ratio: float
) -> ClassSplit:
    """A class folder of the mvtec or bowtie layout split into fit / hold-out / test samples."""
    return split_class(
        class_folder_files(layout, class_dir),
        holdout_ratio=holdout_ratio,
        seed=seed,
        test_sample_ratio=test_sample_ratio,
    )
