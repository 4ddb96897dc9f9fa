"""The PaDiM model: extractor + channel index + per-position Gaussian, with fit and score.

Holds tensors only; data loading, files and metrics stay with the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from utils.anomaly_map import MapOperator, image_scores
from utils.backbones import FeatureExtractor
from utils.embedding import embedding_blocks
from utils.gaussian import (CHUNK_ELEMENTS, GaussianAccumulator, TriangularBlocks, band_positions, mahalanobis,
                            precision_factor_)


@dataclass
class GaussianStats:
    """The fitted distribution: mean (P, D), precision factor (upper blocks of P (D, D)), grid (h, w), N images."""

    mean: torch.Tensor
    factor: TriangularBlocks
    grid: tuple[int, int]
    count: int


class Padim:
    """Fit a Gaussian per patch position on good images; score images by Mahalanobis distance."""

    def __init__(self, extractor: FeatureExtractor, index: torch.Tensor, input_size: int,
                 device: torch.device, stats_device: torch.device, mahalanobis_device: torch.device,
                 band_elements: int | None = CHUNK_ELEMENTS):
        self.extractor = extractor
        self.index = index
        self.input_size = input_size
        self.device = device
        self.stats_device = stats_device
        self.mahalanobis_device = mahalanobis_device
        self.band_elements = band_elements
        self.stats: GaussianStats | None = None
        self.map_operator: MapOperator | None = None

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    def bands(self, features: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """The batch's embedding in bands of grid rows small enough to stay in cache (see embedding_blocks)."""
        return embedding_blocks(features, self.index, self.band_elements)

    def fit(self, image_batches: Iterable[torch.Tensor]) -> GaussianStats:
        """One pass: every batch's embedding is folded into running sums band by band and dropped."""
        accumulator, grid = None, None
        for images in image_batches:
            features = self.features(images)
            if accumulator is None:
                grid = tuple(features[0].shape[-2:])
                accumulator = GaussianAccumulator(self.index.numel(), grid[0] * grid[1], self.stats_device)
            accumulator.update(self.bands(features))
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
        distances = torch.empty(len(images), *self.stats.grid, device=self.mahalanobis_device)
        for top, band in self.bands(self.features(images)):
            positions = band_positions(top, band)
            distances[:, top:top + band.shape[1]] = mahalanobis(band, self.stats.mean[positions], self.stats.factor[positions])
        maps = self.map_operator(distances).cpu()
        return maps, image_scores(maps)
