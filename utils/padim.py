"""The PaDiM model: extractor + channel index + per-position Gaussian, with fit and score.

Holds tensors only; data loading, files and metrics stay with the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import torch

from utils.anomaly_map import MapOperator, image_scores
from utils.backbones import FeatureExtractor
from utils.embedding import chosen_maps, embedding_blocks
from utils.gaussian import (CHUNK_ELEMENTS, SCORED_IMAGES, GaussianAccumulator, TriangularBlocks, band_positions,
                            mahalanobis, precision_factor_)

Key = TypeVar("Key")


@dataclass
class GaussianStats:
    """The fitted distribution: mean (P, D), precision factor (lower blocks of P (D, D)), grid (h, w), N images."""

    mean: torch.Tensor
    factor: TriangularBlocks
    grid: tuple[int, int]
    count: int


class Padim:
    """Fit a Gaussian per patch position on good images; score images by Mahalanobis distance."""

    def __init__(self, extractor: FeatureExtractor, index: torch.Tensor, input_size: int,
                 device: torch.device, stats_device: torch.device, mahalanobis_device: torch.device,
                 band_elements: int | None = CHUNK_ELEMENTS, scored_together: int = SCORED_IMAGES):
        self.extractor = extractor
        self.index = index
        self.input_size = input_size
        self.device = device
        self.stats_device = stats_device
        self.mahalanobis_device = mahalanobis_device
        self.band_elements = band_elements
        self.scored_together = scored_together
        self.stats: GaussianStats | None = None
        self.map_operator: MapOperator | None = None

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    def bands(self, features: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """The batch's embedding in bands of grid rows small enough to stay in cache (see embedding_blocks)."""
        return embedding_blocks([features], self.index, self.band_elements)

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
        [(_, maps, scores)] = self.stream_anomaly_maps([(None, images)])
        return maps, scores

    def stream_anomaly_maps(self, batches: Iterable[tuple[Key, torch.Tensor]]) -> Iterator[tuple[Key, torch.Tensor, torch.Tensor]]:
        """(key, maps, scores) of every (key, images) batch, in order; the distances of at least
        `scored_together` images at a time.

        Mahalanobis reads each position's precision factor once per product: the more images
        a product covers, the less often per image (wide_resnet50_2's shape, 640 images: 32
        per product 6.6 s, 64 5.8 s, 128 5.3 s). So batches are held until the group is large
        enough, then scored in one pass and handed back one by one; only their chosen
        channels are held (chosen_maps: 128 images of wide_resnet50_2 take 220 MB).
        """
        group: list[tuple[Key, list[torch.Tensor]]] = []
        for key, images in batches:
            group.append((key, chosen_maps(self.features(images), self.index)))
            if sum(len(features[0]) for _, features in group) >= self.scored_together:
                yield from self._group_maps(group)
                group = []
        if group:
            yield from self._group_maps(group)

    def _group_maps(self, group: list[tuple[Key, list[torch.Tensor]]]) -> Iterator[tuple[Key, torch.Tensor, torch.Tensor]]:
        sizes = [len(features[0]) for _, features in group]
        distances = torch.empty(sum(sizes), *self.stats.grid, device=self.mahalanobis_device)
        every_channel = torch.arange(self.index.numel(), device=self.index.device)
        for top, band in embedding_blocks([maps for _, maps in group], every_channel, self.band_elements):
            positions = band_positions(top, band)
            distances[:, top:top + band.shape[1]] = mahalanobis(band, self.stats.mean[positions], self.stats.factor[positions])
        maps = self.map_operator(distances).cpu()
        scores = image_scores(maps)
        for (key, _), batch_maps, batch_scores in zip(group, maps.split(sizes), scores.split(sizes)):
            yield key, batch_maps, batch_scores
