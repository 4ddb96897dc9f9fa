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


class HeldMaps:
    """The chosen maps of up to `capacity` images, copied into buffers reserved and written once."""

    def __init__(self, like: list[torch.Tensor], capacity: int):
        self.buffers = [torch.zeros(capacity, *maps.shape[2:], maps.shape[1], dtype=maps.dtype,
                                    device=maps.device).permute(0, 3, 1, 2) for maps in like]  # channels last, like `like`
        self.count = 0

    def fits(self, like: list[torch.Tensor], capacity: int) -> bool:
        """Whether these buffers take maps like `like`, `capacity` images of them."""
        return (len(self.buffers[0]) >= capacity and len(self.buffers) == len(like)
                and all(buffer.shape[1:] == maps.shape[1:] and buffer.dtype == maps.dtype and buffer.device == maps.device
                        for buffer, maps in zip(self.buffers, like)))

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
        self.held: HeldMaps | None = None

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    def held_groups(self, batches: Iterable[tuple[Key, torch.Tensor]],
                    first_alone: bool) -> Iterator[tuple[list[tuple[Key, int]], list[torch.Tensor]]]:
        """((key, images) of each batch, the group's chosen maps) for groups of `images_together`
        images of the (key, images) batches, in order; the last group may be smaller.

        Between forward passes only the chosen channels wait (chosen_maps: 128 images of
        wide_resnet50_2 take 220 MB), copied into buffers that the model reserves once and
        keeps for every later fit and scoring (HeldMaps), so short and long runs peak alike
        and the held-out threshold reserves nothing new. A fit's first batch goes alone
        (`first_alone`), so that the second moments are resident before the buffers and the
        second forward pass. The maps handed over are valid until the caller asks for the
        next group.
        """
        held, waiting = None, []
        for key, images in batches:
            maps = chosen_maps(self.features(images), self.index)
            count = len(maps[0])
            if held is None:
                if first_alone:
                    yield [(key, count)], maps
                held = self._holder(maps, max(self.images_together, count))
                if first_alone:
                    continue
            if not held.has_room(count) and waiting:
                yield waiting, held.take()
                waiting = []
            if not held.has_room(count):  # a batch larger than the holder (the first one was short)
                yield [(key, count)], maps
                continue
            held.add(maps)
            waiting.append((key, count))
            if held.count >= self.images_together:
                yield waiting, held.take()
                waiting = []
        if waiting:
            yield waiting, held.take()

    def _holder(self, like: list[torch.Tensor], capacity: int) -> HeldMaps:
        """The model's empty HeldMaps for maps like `like`, reserved anew only when those it has do not fit."""
        if self.held is None or not self.held.fits(like, capacity):
            self.held = None  # the old buffers go before the new ones are reserved
            self.held = HeldMaps(like, capacity)
        self.held.take()  # emptied: a pass that was not run to its end may have left maps in it
        return self.held

    def bands(self, maps: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """The embedding of a group's chosen maps in bands of grid rows small enough to stay in cache."""
        every_channel = torch.arange(self.index.numel(), device=self.index.device)
        return embedding_blocks([maps], every_channel, self.band_elements)

    def fit(self, image_batches: Iterable[torch.Tensor]) -> GaussianStats:
        """One pass: the embeddings of groups of batches (held_groups) are folded into running sums
        band by band and dropped.

        The second moments are read and written whole at every update (2.4 GB for
        wide_resnet50_2), so the more images an update brings the better: on 2 cores,
        wide_resnet50_2's 686 fit images in groups of 128 took 5.8-7.2 s, in groups of 64 6.6-8.1 s.
        """
        accumulator, grid = None, None
        for _, maps in self.held_groups(((None, images) for images in image_batches), first_alone=True):
            if accumulator is None:
                grid = tuple(maps[0].shape[-2:])
                accumulator = GaussianAccumulator(self.index.numel(), grid[0] * grid[1], self.stats_device)
            accumulator.update(self.bands(maps))
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
        """(key, maps, scores) of every (key, images) batch, in order; the distances of
        `images_together` images at a time (held_groups).

        Mahalanobis reads each position's precision factor once per product: the more images
        a product covers, the less often per image (wide_resnet50_2's shape, 640 images, with
        torch.bmm: 32 per product 6.6 s, 64 5.8 s, 128 5.3 s).
        """
        for waiting, group_maps in self.held_groups(batches, first_alone=False):
            sizes = [images for _, images in waiting]
            distances = torch.empty(sum(sizes), *self.stats.grid, device=self.mahalanobis_device)
            for top, band in self.bands(group_maps):
                positions = band_positions(top, band)
                distances[:, top:top + band.shape[1]] = mahalanobis(band, self.stats.mean[positions],
                                                                    self.stats.factor[positions])
            maps = self.map_operator(distances).cpu()
            scores = image_scores(maps)
            for (key, _), batch_maps, batch_scores in zip(waiting, maps.split(sizes), scores.split(sizes)):
                yield key, batch_maps, batch_scores
