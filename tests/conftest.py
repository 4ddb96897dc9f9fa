"""Shared fixtures: small synthetic MVTec-layout folders made by the demo generator."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.demo_data import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def texture_root(tmp_path_factory) -> Path:
    """Two texture classes, small enough for a random-init backbone run in seconds."""
    return make_demo_dataset(tmp_path_factory.mktemp("textures"), textures=("brick", "gravel"),
                             n_train=24, n_test_good=6, n_test_defect=4, size=64, seed=3)
