"""The PaDiM model: extractor + channel index (or projection) + per-position Gaussian, with fit and score.

Holds tensors only; data loading, files and metrics stay with the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from utils.config import ModelConfig
from utils.padim.anomaly_map import MapOperator, image_scores
from utils.padim.backbones import FeatureExtractor
from utils.padim.embedding import chosen_channels, embedding_bands, projected_channels, split_channel_index
from utils.padim.gaussian import (
    GaussianAccumulator,
    GaussianSums,
    Peers,
    band_positions,
    mahalanobis,
    precision_factor_,
)
from utils.padim.triangular import TriangularBlocks

GROUP_IMAGES = 128  # images fitted or scored in one pass: each (D, D) matrix is read once per group (tuning)
BAND_ELEMENTS = 2**22  # values per band of embedding rows: bounds its memory (tuning)

Key = TypeVar("Key")
Item = TypeVar("Item")
Grid = tuple[int, int]


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


class GridMismatchError(ValueError):
    """Images whose embedding grid is not the one the statistics were fitted on."""


@dataclass
class GaussianStats:
    """The fitted distribution: mean (P, D), precision factor (lower blocks of P (D, D)), grid (h, w), N images;
    and, when kept for the model file, the sums it was formed from (what an exact update needs)."""

    mean: torch.Tensor
    factor: TriangularBlocks
    grid: tuple[int, int]
    count: int
    sums: GaussianSums | None = None

    def is_finite(self) -> bool:
        """False when the mean or the factor holds a NaN or an infinity: such a model must never score."""
        return bool(torch.isfinite(self.mean).all()) and all(
            bool(torch.isfinite(block).all()) for block in self.factor.blocks
        )


class Padim:
    """Fit a Gaussian per patch position on good images; score images by Mahalanobis distance.

    The embedding keeps the channels of `index`, or, with a `projection` W (D, k) of all D hooked
    channels (`index` then numbers them all), their projection; each cell is averaged over its
    `neighbourhood` (utils.padim.embedding); `image_score` names utils.padim.anomaly_map.image_scores'.
    The covariance estimator and epsilon (ModelConfig's) say how each position's covariance is formed.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        index: torch.Tensor,
        input_size: tuple[int, int],
        device: torch.device,
        stats_device: torch.device,
        mahalanobis_device: torch.device,
        band_elements: int | None = BAND_ELEMENTS,
        images_together: int = GROUP_IMAGES,
        projection: torch.Tensor | None = None,
        neighbourhood: int = ModelConfig.neighbourhood,
        image_score: str = ModelConfig.image_score,
        covariance: str = ModelConfig.covariance,
        epsilon: float = ModelConfig.epsilon,
    ):
        self.extractor = extractor
        self.index = index
        self.local_index = [local.to(device) for local in split_channel_index(index, extractor.channels)]
        self.projection = projection
        self.level_rows = (
            None if projection is None else [rows.to(device) for rows in projection.split(extractor.channels)]
        )
        self.neighbourhood = neighbourhood
        self.image_score = image_score
        self.input_size = input_size
        self.device = device
        self.stats_device = stats_device
        self.mahalanobis_device = mahalanobis_device
        self.band_elements = band_elements
        self.images_together = images_together
        self.covariance = covariance
        self.epsilon = epsilon
        self.stats: GaussianStats | None = None
        self.map_operator: MapOperator | None = None

    @property
    def dims(self) -> int:
        """D, the channels of the embedding."""
        return self.index.numel() if self.projection is None else self.projection.shape[1]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    def reduced(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The hooked maps cut down to the chosen channels, or projected: channels last, only what is kept."""
        if self.level_rows is None:
            return chosen_channels(feature_maps, self.local_index)
        return projected_channels(feature_maps, self.level_rows)

    def chosen_features(
        self, batches: Iterable[tuple[Key, torch.Tensor]], device: torch.device
    ) -> Iterator[tuple[tuple[Key, list[torch.Tensor]], int]]:
        """((key, the batch's maps cut down to the chosen channels, on `device`), images) for every
        (key, images) batch.

        Only the chosen (or projected) maps cross from the backbone's device to the Gaussian's, and
        the embedding is built there: the deeper maps cross before they are resampled onto the
        first map's grid, so a fraction of the embedding's bytes travel.
        """
        for key, images in batches:
            chosen = [level.to(device) for level in self.reduced(self.features(images))]
            yield (key, chosen), len(chosen[0])

    def groups(
        self, batches: Iterable[tuple[Key, torch.Tensor]], device: torch.device
    ) -> Iterator[list[tuple[Key, list[torch.Tensor]]]]:
        """The batches' chosen maps, on `device`, in groups of at least `images_together` images.

        Fitting and scoring read every position's (D, D) matrix once per group, so the more
        images a group holds, the fewer times per image; only the chosen channels are held.
        """
        return image_groups(self.chosen_features(batches, device), self.images_together)

    def bands(self, group: list[tuple[Key, list[torch.Tensor]]]) -> Iterator[tuple[int, torch.Tensor]]:
        """The group's embedding in bands of grid rows (embedding_bands)."""
        chosen = [chosen for _, chosen in group]
        return embedding_bands(chosen, self.band_elements, self.level_rows is not None, self.neighbourhood)

    def new_accumulator(self, grid: Grid) -> GaussianAccumulator:
        return GaussianAccumulator(self.dims, grid[0] * grid[1], self.stats_device)

    def fit(
        self, image_batches: Iterable[torch.Tensor], peers: Peers | None = None, keep_sums: bool = False
    ) -> GaussianStats:
        """One pass: each group's embedding is folded into running sums band by band and dropped.

        With `peers` (the other processes of a run, each fitting a share of the images) the sums of
        all of them are added up (GaussianAccumulator.merged) before the Gaussian is formed. With
        `keep_sums` the statistics carry a copy of the sums (for the model file; one more covariance
        in memory).
        """
        return self._accumulate(None, None, image_batches, peers, keep_sums)

    def update(self, image_batches: Iterable[torch.Tensor]) -> GaussianStats:
        """Add images to the current statistics, exactly: the sums they were formed from go on with the
        new images' embeddings, then the Gaussian is formed again (the new statistics keep the sums)."""
        if self.stats is None or self.stats.sums is None:
            raise ValueError("the model holds no sums to add images to")
        accumulator = GaussianAccumulator.resumed(self.stats.sums, self.stats_device)
        return self._accumulate(accumulator, self.stats.grid, image_batches, None, True)

    def _accumulate(
        self,
        accumulator: GaussianAccumulator | None,
        grid: Grid | None,
        image_batches: Iterable[torch.Tensor],
        peers: Peers | None,
        keep_sums: bool,
    ) -> GaussianStats:
        """Fold the images into `accumulator` (a new one when None), then form the Gaussian (Padim.fit)."""
        for group in self.groups(((None, images) for images in image_batches), self.stats_device):
            group_grid = tuple(group[0][1][0].shape[1:3])
            if accumulator is None:
                grid, accumulator = group_grid, self.new_accumulator(group_grid)
            elif group_grid != grid:
                raise GridMismatchError(
                    f"the images give a {group_grid[0]}x{group_grid[1]} feature grid, "
                    f"the statistics are for {grid[0]}x{grid[1]}"
                )
            accumulator.update(self.bands(group))
        if peers is not None:
            accumulator, grid = GaussianAccumulator.merged(accumulator, grid, peers, self.new_accumulator)
        if accumulator is None:
            raise ValueError("no readable training images")
        sums = accumulator.sums() if keep_sums else None
        mean, covariance = accumulator.finalize(self.covariance, self.epsilon)
        self.use(GaussianStats(mean, precision_factor_(covariance), grid, accumulator.count, sums))
        return self.stats

    def use(self, stats: GaussianStats) -> None:
        """Adopt fitted (or loaded) statistics, placed where the Mahalanobis distances are computed."""
        device = self.mahalanobis_device
        self.stats = GaussianStats(stats.mean.to(device), stats.factor.to(device), stats.grid, stats.count, stats.sums)
        self.map_operator = MapOperator.build(stats.grid, self.input_size, device)

    def anomaly_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)) on the CPU, (H, W) = model input size."""
        [(_, maps, scores)] = self.stream_anomaly_maps([(None, images)])
        return maps, scores

    def stream_anomaly_maps(
        self, batches: Iterable[tuple[Key, torch.Tensor]]
    ) -> Iterator[tuple[Key, torch.Tensor, torch.Tensor]]:
        """(key, maps, scores) of every (key, images) batch, in order, scored a group at a time."""
        for group in self.groups(batches, self.mahalanobis_device):
            sizes = [len(chosen[0]) for _, chosen in group]
            distances = torch.empty(sum(sizes), *self.stats.grid, device=self.mahalanobis_device)
            for top, band in self.bands(group):
                positions = band_positions(top, band)
                distances[:, top : top + band.shape[1]] = mahalanobis(
                    band, self.stats.mean[positions], self.stats.factor[positions]
                )
            maps = self.map_operator(distances)
            scores = image_scores(maps, distances, self.image_score).cpu()
            maps = maps.cpu()
            for (key, _), batch_maps, batch_scores in zip(group, maps.split(sizes), scores.split(sizes)):
                yield key, batch_maps, batch_scores
