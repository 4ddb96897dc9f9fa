"""The evaluated class: what trainer computes once and the metrics tables and plots read."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from datasets.images import Sample
from utils import metrics


@dataclass
class ClassEvaluation:
    """Everything the metrics and plots need about one class's test set, computed once."""

    name: str
    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    images: np.ndarray
    threshold: float
    has_ground_truth: bool
    summary: dict = field(default_factory=dict)
    pixel_curves: metrics.PixelCurves | None = None
    defect_types: pd.DataFrame | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)

    @property
    def with_mask(self) -> np.ndarray:
        """Images that count in the pixel metrics: good ones, and defect ones that have a mask."""
        return np.array([s.label == 0 or s.mask_path is not None for s in self.samples], dtype=bool)
