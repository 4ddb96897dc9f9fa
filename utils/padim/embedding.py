"""Multi-layer patch embeddings on the first map's grid: a seeded channel subset of the hooked maps, or all
of their channels projected by a seeded semi-orthogonal matrix; optionally averaged over 3 x 3 cells."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from utils.padim.grid import resample_centred, stride_ratio


def channel_index(total_dims: int, reduced_dim: int, seed: int) -> torch.Tensor:
    """Sorted random subset of `reduced_dim` of `total_dims` channels, the same for the same seed."""
    if not 0 < reduced_dim <= total_dims:
        raise ValueError(f"reduced_dim must be in 1..{total_dims}, got {reduced_dim}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_dims, generator=generator)[:reduced_dim].sort().values


def semi_orthogonal_matrix(total_dims: int, reduced_dim: int, seed: int) -> torch.Tensor:
    """(total_dims, reduced_dim) float32 W with W^T W = I, the same for the same seed (Kim et al. 2021).

    The Q of the QR of a seeded standard Gaussian matrix (float64), its columns' signs chosen so
    that R's diagonal is positive: that makes Q unique, so no LAPACK's sign choice moves it.
    """
    if not 0 < reduced_dim <= total_dims:
        raise ValueError(f"reduced_dim must be in 1..{total_dims}, got {reduced_dim}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(total_dims, reduced_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()


def split_channel_index(index: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    """`index` numbers the channels of all maps one after the other (each map has `channels[k]`):
    -> every map's own chosen channels, counted from its first."""
    edges = list(itertools.accumulate(channels, initial=0))
    return [index[(index >= low) & (index < high)] - low for low, high in itertools.pairwise(edges)]


def chosen_channels(feature_maps: list[torch.Tensor], local_indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each (B, C, H, W) map cut down to its chosen channels (split_channel_index), channels last (B, H, W, c).

    Only these are kept while batches wait to be scored or fitted together; a map with no
    chosen channel stays as an empty one (its grid still counts). index_select, not advanced indexing:
    the same values, copied several times faster from either memory layout.
    """
    return [
        feature_map.permute(0, 2, 3, 1).index_select(3, local)
        for feature_map, local in zip(feature_maps, local_indices)
    ]


def projected_channels(feature_maps: list[torch.Tensor], level_rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each (B, C_l, H, W) map projected by its rows W_l (C_l, k) of the projection, channels last (B, H, W, k).

    The projection is linear across channels and the resampling onto the first grid linear per
    channel, so projecting each level first and summing the resampled levels (patch_embedding's
    `projected`) equals projecting the whole embedding; only k channels of each level are kept.
    """
    return [feature_map.permute(0, 2, 3, 1) @ rows for feature_map, rows in zip(feature_maps, level_rows)]


def patch_embedding(
    chosen: list[torch.Tensor], rows: slice = slice(None), out: torch.Tensor | None = None, projected: bool = False
) -> torch.Tensor:
    """One batch's chosen maps -> the `rows` of its embedding (B, rows, W, D), written into `out` when given.

    Deeper maps are resampled onto the first map's grid at the centres of its cells
    (utils.padim.grid), so every channel of a patch describes the same spot of the image. Chosen
    channels are put side by side; `projected` levels (projected_channels) are added up.
    """
    first = chosen[0]
    height, width = first.shape[1:3]
    resampled = [
        resample_centred(level, (height, width), stride_ratio(height, level.shape[1]), rows) for level in chosen[1:]
    ]
    parts = [first[:, rows], *resampled]
    if projected:
        total = sum(parts[1:], parts[0])
        return total if out is None else out.copy_(total)
    return torch.cat(parts, dim=-1) if out is None else torch.cat(parts, dim=-1, out=out)


def neighbourhood_mean(embedding: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, D) -> each cell's mean over the size x size cells around it that lie inside the grid.

    At the border only the neighbours inside the grid count (avg_pool2d's count_include_pad=False),
    so a border cell is not pulled towards zero; size 1 is the embedding itself.
    """
    if size == 1:
        return embedding
    pooled = F.avg_pool2d(embedding.permute(0, 3, 1, 2), size, stride=1, padding=size // 2, count_include_pad=False)
    return pooled.permute(0, 2, 3, 1)


def embedding_bands(
    group: list[list[torch.Tensor]], max_elements: int | None = None, projected: bool = False, neighbourhood: int = 1
) -> Iterator[tuple[int, torch.Tensor]]:
    """The embedding (B, H, W, D) of a group of batches (each its chosen maps), one after the other
    along the batch dimension, as bands of grid rows: (first row, band).

    Each batch's embedding is written straight into its rows of the band. Bands of at most
    `max_elements` values (None: one band) bound the memory: the whole embedding is B·H·W·D
    float32 values. With a `neighbourhood` mean (neighbourhood_mean) a band is built with the
    neighbourhood // 2 rows above and below it that lie in the grid (its halo), so that its cells
    average the same neighbours as on the whole grid.
    """
    _, height, width, _ = group[0][0].shape
    edges = list(itertools.accumulate((len(chosen[0]) for chosen in group), initial=0))
    dims = group[0][0].shape[-1] if projected else sum(level.shape[-1] for level in group[0])
    halo = neighbourhood // 2
    step = height if max_elements is None else max(1, min(height, max_elements // (edges[-1] * width * dims)))
    for top in range(0, height, step):
        low, high = max(0, top - halo), min(height, top + step + halo)
        band = torch.empty(edges[-1], high - low, width, dims, device=group[0][0].device)
        for chosen, start, stop in zip(group, edges, edges[1:]):
            patch_embedding(chosen, slice(low, high), out=band[start:stop], projected=projected)
        rows = len(range(height)[top : top + step])
        yield top, neighbourhood_mean(band, neighbourhood)[:, top - low : top - low + rows]
