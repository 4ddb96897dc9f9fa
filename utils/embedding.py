"""Multi-layer patch embeddings: a seeded channel subset of the hooked maps on the first map's grid."""
from __future__ import annotations

import torch

from utils.grid import resample_centred, stride_ratio


def channel_index(total_dims: int, reduced_dim: int, seed: int) -> torch.Tensor:
    """Sorted random subset of `reduced_dim` of `total_dims` channels, the same for the same seed."""
    if not 0 < reduced_dim <= total_dims:
        raise ValueError(f"reduced_dim must be in 1..{total_dims}, got {reduced_dim}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_dims, generator=generator)[:reduced_dim].sort().values


def embed(feature_maps: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) float32: the chosen channels of every map, deeper maps resampled onto the first grid.

    Deeper maps are sampled at the centres of the first grid's cells (utils.grid), not
    nearest-upsampled, so every channel of a patch describes the same spot of the image.
    Selecting before up-sampling gives the same result as concatenating everything first
    (the index is sorted) without materialising the unused channels at full resolution.
    """
    grid = feature_maps[0].shape[-2:]
    parts, offset = [], 0
    for feature_map in feature_maps:
        channels = feature_map.shape[1]
        local = index[(index >= offset) & (index < offset + channels)] - offset
        offset += channels
        if local.numel() == 0:
            continue
        part = feature_map.index_select(1, local.to(feature_map.device)).float()
        if part.shape[-2:] != grid:
            part = resample_centred(part, grid, stride_ratio(grid[0], part.shape[-2]))
        parts.append(part)
    return torch.cat(parts, dim=1).contiguous()
