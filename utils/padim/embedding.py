"""Multi-layer patch embeddings: a seeded channel subset of the hooked maps, on the first map's grid."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from utils.padim.grid import resample_centred, stride_ratio


def channel_index(total_dims: int, reduced_dim: int, seed: int) -> torch.Tensor:
    """Sorted random subset of `reduced_dim` of `total_dims` channels, the same for the same seed."""
    if not 0 < reduced_dim <= total_dims:
        raise ValueError(f"reduced_dim must be in 1..{total_dims}, got {reduced_dim}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_dims, generator=generator)[:reduced_dim].sort().values


def split_channel_index(index: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    """`index` numbers the channels of all maps one after the other (each map has `channels[k]`):
    -> every map's own chosen channels, counted from its first."""
    edges = list(itertools.accumulate(channels, initial=0))
    return [index[(index >= low) & (index < high)] - low for low, high in itertools.pairwise(edges)]


def chosen_channels(feature_maps: list[torch.Tensor], local_indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each (B, C, H, W) map cut down to its chosen channels (split_channel_index), channels last (B, H, W, c).

    Only these are kept while batches wait to be scored or fitted together; a map with no
    chosen channel stays as an empty one (its grid still counts).
    """
    return [feature_map.permute(0, 2, 3, 1)[..., local] for feature_map, local in zip(feature_maps, local_indices)]


def patch_embedding(
    chosen: list[torch.Tensor], rows: slice = slice(None), out: torch.Tensor | None = None
) -> torch.Tensor:
    """One batch's chosen maps -> the `rows` of its embedding (B, rows, W, D), written into `out` when given.

    Deeper maps are resampled onto the first map's grid at the centres of its cells
    (utils.padim.grid), so every channel of a patch describes the same spot of the image.
    """
    first = chosen[0]
    height, width = first.shape[1:3]
    resampled = [
        resample_centred(level, (height, width), stride_ratio(height, level.shape[1]), rows) for level in chosen[1:]
    ]
    parts = [first[:, rows], *resampled]
    return torch.cat(parts, dim=-1) if out is None else torch.cat(parts, dim=-1, out=out)


def embedding_bands(
    group: list[list[torch.Tensor]], max_elements: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """The embedding (B, H, W, D) of a group of batches (each its chosen maps), one after the other
    along the batch dimension, as bands of grid rows: (first row, band).

    Each batch's embedding is written straight into its rows of the band. Bands of at most
    `max_elements` values (None: one band) bound the memory: the whole embedding is B·H·W·D
    float32 values.
    """
    _, height, width, _ = group[0][0].shape
    edges = list(itertools.accumulate((len(chosen[0]) for chosen in group), initial=0))
    dims = sum(level.shape[-1] for level in group[0])
    step = height if max_elements is None else max(1, min(height, max_elements // (edges[-1] * width * dims)))
    for top in range(0, height, step):
        rows = slice(top, top + step)
        band = torch.empty(edges[-1], len(range(height)[rows]), width, dims, device=group[0][0].device)
        for chosen, start, stop in zip(group, edges, edges[1:]):
            patch_embedding(chosen, rows, out=band[start:stop])
        yield top, band
