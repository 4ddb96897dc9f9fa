"""Multi-layer patch embeddings: a seeded channel subset of the hooked maps, on the first map's grid."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from utils.grid import resample_centred, stride_ratio


def channel_index(total_dims: int, reduced_dim: int, seed: int) -> torch.Tensor:
    """Sorted random subset of `reduced_dim` of `total_dims` channels, the same for the same seed."""
    if not 0 < reduced_dim <= total_dims:
        raise ValueError(f"reduced_dim must be in 1..{total_dims}, got {reduced_dim}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_dims, generator=generator)[:reduced_dim].sort().values


def chosen_channels(feature_maps: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Each (B, C, H, W) map cut down to its channels in `index`, channels last (B, H, W, c).

    `index` numbers the channels of all maps one after the other. Only these are kept while
    batches wait to be scored or fitted together, so a map with no chosen channel stays as
    an empty one (its grid still counts).
    """
    chosen, offset = [], 0
    for feature_map in feature_maps:
        channels = feature_map.shape[1]
        local = index[(index >= offset) & (index < offset + channels)] - offset
        chosen.append(feature_map.permute(0, 2, 3, 1)[..., local.to(feature_map.device)])
        offset += channels
    return chosen


def embedding_bands(
    group: list[list[torch.Tensor]], max_elements: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """The embedding (B, H, W, D) of a group of batches (each its chosen maps, chosen_channels),
    one after the other along the batch dimension, as bands of grid rows: (first row, band).

    Deeper maps are resampled onto the first map's grid at the centres of its cells
    (utils.grid), so every channel of a patch describes the same spot of the image. Bands of
    at most `max_elements` values (None: one band) bound the memory: the whole embedding of
    128 images of wide_resnet50_2 would take 880 MB.
    """
    levels = [torch.cat(level) for level in zip(*group)]  # the group's batches joined, map by map
    first = levels[0]
    images, height, width, _ = first.shape
    dims = sum(level.shape[-1] for level in levels)
    step = height if max_elements is None else max(1, min(height, max_elements // (images * width * dims)))
    for top in range(0, height, step):
        rows = slice(top, top + step)
        resampled = [
            resample_centred(level, (height, width), stride_ratio(height, level.shape[1]), rows) for level in levels[1:]
        ]
        yield top, torch.cat([first[:, rows], *resampled], dim=-1).float()
