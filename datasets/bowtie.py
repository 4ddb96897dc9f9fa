"""BowTie layout (what data/process_data.py writes): like MVTec, usually without ground_truth.

Test normals are test/good plus a seeded, disjoint `test_sample_ratio` share of train/good,
so a product line with few set-aside good parts still has normals to test on.
"""

from __future__ import annotations

from pathlib import Path

from datasets.split import ClassSplit, build_split


def load_class(class_dir: Path, *, holdout_ratio: float, seed: int, test_sample_ratio: float = 0.2) -> ClassSplit:
    return build_split(class_dir, test_share_of_train=test_sample_ratio, holdout_ratio=holdout_ratio, seed=seed)
