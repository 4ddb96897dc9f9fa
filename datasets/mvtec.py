"""MVTec AD layout: <class>/train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png."""

from __future__ import annotations

from pathlib import Path

from datasets.split import ClassSplit, build_split


def load_class(class_dir: Path, *, holdout_ratio: float, seed: int, test_sample_ratio: float = 0.0) -> ClassSplit:
    """All of train/good is for training (minus the hold-out); the test set is test/ as it is."""
    del test_sample_ratio  # MVTec ships its own test normals
    return build_split(class_dir, test_share_of_train=0.0, holdout_ratio=holdout_ratio, seed=seed)
