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
from utils.gaussian import (CHUNK_ELEMENTS, GROUP_IMAGES, GaussianAccumulator, TriangularBlocks, band_positions,
                            mahalanobis, precision_factor_)

Key = TypeVar("Key")
Item = TypeVar("Item")


def image_groups(batches: Iterable[tuple[Item, int]], images_together: int) -> Iterator[list[Item]]:
    """Consecutive (item, images) batches gathered into groups of at least `images_together`
    images (a last one may be smaller)."""
    group, images = [], 0
    for item, count in batches:
        group.append(item)
        images += count
        if images >= images_together:
            yield group
            group, images = [], 0
    if group:
        yield group


class HeldMaps:
    """The chosen maps of up to `capacity` images, copied into buffers reserved and written once.

    Written at once, so that the buffers count in the memory of every fit, short or long:
    a fit's peak (a forward pass with the second moments and the held maps resident) does
    not depend on how many images it has.
    """

    def __init__(self, like: list[torch.Tensor], capacity: int):
        self.buffers = [torch.zeros(capacity, *maps.shape[2:], maps.shape[1], dtype=maps.dtype,
                                    device=maps.device).permute(0, 3, 1, 2) for maps in like]  # channels last, like `like`
        self.count = 0

    def has_room(self, images: int) -> bool:
        return self.count + images <= len(self.buffers[0])

    def add(self, maps: list[torch.Tensor]) -> None:
        images = len(maps[0])
        for buffer, batch_maps in zip(self.buffers, maps):
            buffer[self.count:self.count + images] = batch_maps
        self.count += images

    def take(self) -> list[torch.Tensor]:
        """The held maps (views of the buffers, valid until the next add); the holder is empty after."""
        held, self.count = [buffer[:self.count] for buffer in self.buffers], 0
        return held


@dataclass
class GaussianStats:
    """The fitted distribution: mean (P, D), precision factor (lower blocks of P (D, D)), grid (h, w), N images."""

    mean: torch.Tensor
    factor: TriangularBlocks
    grid: tuple[int, int]
    count: int

    def is_finite(self) -> bool:
        """False when the mean or the factor holds a NaN or an infinity: such a model must never score."""
        return bool(torch.isfinite(self.mean).all()) and all(bool(torch.isfinite(block).all()) for block in self.factor.blocks)


class Padim:
    """Fit a Gaussian per patch position on good images; score images by Mahalanobis distance."""

    def __init__(self, extractor: FeatureExtractor, index: torch.Tensor, input_size: int,
                 device: torch.device, stats_device: torch.device, mahalanobis_device: torch.device,
                 band_elements: int | None = CHUNK_ELEMENTS, images_together: int = GROUP_IMAGES):
        self.extractor = extractor
        self.index = index
        self.input_size = input_size
        self.device = device
        self.stats_device = stats_device
        self.mahalanobis_device = mahalanobis_device
        self.band_elements = band_elements
        self.images_together = images_together
        self.stats: GaussianStats | None = None
        self.map_operator: MapOperator | None = None

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    def chosen_features(self, batches: Iterable[tuple[Key, torch.Tensor]]) -> Iterator[tuple[tuple[Key, list[torch.Tensor]], int]]:
        """((key, the batch's maps cut down to the chosen channels), images) for every (key, images) batch."""
        for key, images in batches:
            maps = chosen_maps(self.features(images), self.index)
            yield (key, maps), len(maps[0])

    def bands(self, group: list[list[torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
        """The group's embedding (its batches' chosen maps) in bands of grid rows small enough to stay in cache."""
        every_channel = torch.arange(self.index.numel(), device=self.index.device)
        return embedding_blocks(group, every_channel, self.band_elements)

    def fit(self, image_batches: Iterable[torch.Tensor]) -> GaussianStats:
        """One pass: the embeddings of groups of batches are folded into running sums band by band and dropped.

        The second moments are read and written whole at every update (2.4 GB for
        wide_resnet50_2), so batches are held until `images_together` images are (HeldMaps:
        only their chosen channels, 128 images of wide_resnet50_2 take 220 MB). On 2 cores,
        wide_resnet50_2's 686 fit images in groups of 128 took 5.8-7.2 s, in groups of 64
        6.6-8.1 s. The first batch goes alone, so that the second moments too are written
        before the second forward pass in a short fit as in a long one.
        """
        accumulator, held, grid = None, None, None
        for (_, maps), images in self.chosen_features((None, images) for images in image_batches):
            if accumulator is None:
                grid = tuple(maps[0].shape[-2:])
                accumulator = GaussianAccumulator(self.index.numel(), grid[0] * grid[1], self.stats_device)
                accumulator.update(self.bands([maps]))
                held = HeldMaps(maps, max(self.images_together, images))
                continue
            if not held.has_room(images) and held.count:
                accumulator.update(self.bands([held.take()]))
            if held.has_room(images):
                held.add(maps)
            else:  # a batch larger than the holder (the first one was short)
                accumulator.update(self.bands([maps]))
        if accumulator is None:
            raise ValueError("no readable training images")
        if held.count:
            accumulator.update(self.bands([held.take()]))
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
        `images_together` images at a time.

        Mahalanobis reads each position's precision factor once per product: the more images
        a product covers, the less often per image (wide_resnet50_2's shape, 640 images, with
        torch.bmm: 32 per product 6.6 s, 64 5.8 s, 128 5.3 s). So batches are held until the group is large
        enough, then scored in one pass and handed back one by one; only their chosen
        channels are held (chosen_maps: 128 images of wide_resnet50_2 take 220 MB).
        """
        for group in image_groups(self.chosen_features(batches), self.images_together):
            yield from self._group_maps(group)

    def _group_maps(self, group: list[tuple[Key, list[torch.Tensor]]]) -> Iterator[tuple[Key, torch.Tensor, torch.Tensor]]:
        sizes = [len(features[0]) for _, features in group]
        distances = torch.empty(sum(sizes), *self.stats.grid, device=self.mahalanobis_device)
        for top, band in self.bands([maps for _, maps in group]):
            positions = band_positions(top, band)
            distances[:, top:top + band.shape[1]] = mahalanobis(band, self.stats.mean[positions], self.stats.factor[positions])
        maps = self.map_operator(distances).cpu()
        scores = image_scores(maps)
        for (key, _), batch_maps, batch_scores in zip(group, maps.split(sizes), scores.split(sizes)):
            yield key, batch_maps, batch_scores
