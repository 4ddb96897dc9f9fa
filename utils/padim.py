"""The PaDiM model: extractor + channel index + per-position Gaussian, with fit and score.

Holds tensors only; data loading, files and metrics stay with the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from utils.anomaly_map import MapOperator, image_scores
from utils.backbones import FeatureExtractor
from utils.embedding import embed
from utils.gaussian import GaussianAccumulator, mahalanobis, precision_factor_


@dataclass
class GaussianStats:
    """The fitted distribution: mean (P, D), precision factor (P, D, D), grid (h, w), N images."""

    mean: torch.Tensor
    factor: torch.Tensor
    grid: tuple[int, int]
    count: int


class Padim:
    """Fit a Gaussian per patch position on good images; score images by Mahalanobis distance."""

    def __init__(self, extractor: FeatureExtractor, index: torch.Tensor, input_size: int,
                 device: torch.device, stats_device: torch.device, mahalanobis_device: torch.device):
        self.extractor = extractor
        self.index = index
        self.input_size = input_size
        self.device = device
        self.stats_device = stats_device
        self.mahalanobis_device = mahalanobis_device
        self.stats: GaussianStats | None = None
        self.map_operator: MapOperator | None = None

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return embed(self.extractor(images), self.index)

    def fit(self, image_batches: Iterable[torch.Tensor]) -> GaussianStats:
        """One pass: every batch's embedding is folded into running sums and dropped."""
        accumulator, grid = None, None
        for images in image_batches:
            emb = self.embedding(images)
            if accumulator is None:
                grid = tuple(emb.shape[-2:])
                accumulator = GaussianAccumulator(emb.shape[1], grid[0] * grid[1], self.stats_device)
            accumulator.update(emb)
        if accumulator is None:
            raise ValueError("no readable training images")
        mean, covariance = accumulator.finalize()
        self.use(GaussianStats(mean, precision_factor_(covariance), grid, accumulator.count))
        return self.stats

    def use(self, stats: GaussianStats) -> None:
        """Adopt fitted (or loaded) statistics, placed where the Mahalanobis distances are computed."""
        device = self.mahalanobis_device
        self.stats = GaussianStats(stats.mean.to(device), stats.factor.to(device), stats.grid, stats.count)
        self.map_operator = MapOperator.build(stats.grid, self.input_size, device)

    def anomaly_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, S, S), scores (B,)) on the CPU, S = model input size."""
        distances = mahalanobis(self.embedding(images), self.stats.mean, self.stats.factor)
        maps = self.map_operator(distances).cpu()
        return maps, image_scores(maps)
