"""Multi-layer patch embeddings: a seeded channel subset of the hooked maps on the first map's grid."""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from utils.grid import resample_centred, stride_ratio


def channel_index(total_dims: int, reduced_dim: int, seed: int) -> torch.Tensor:
    """Sorted random subset of `reduced_dim` of `total_dims` channels, the same for the same seed."""
    if not 0 < reduced_dim <= total_dims:
        raise ValueError(f"reduced_dim must be in 1..{total_dims}, got {reduced_dim}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_dims, generator=generator)[:reduced_dim].sort().values


def select_channels(channels_last: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., len(index)) along the last dimension.

    torch.gather with the index broadcast over the other dimensions: 6-8x faster than
    index_select on a last dimension (wide_resnet50_2 maps of a batch: 1.6 vs 12.8 ms).
    """
    return torch.gather(channels_last, -1, index.expand(*channels_last.shape[:-1], -1))


def chosen_maps(feature_maps: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Each (B, C, H, W) map cut down to its channels in `index`, in the same layout.

    embedding_blocks(chosen_maps(maps, index), every channel) equals embedding_blocks(maps,
    index): what a batch held for later needs of its maps (wide_resnet50_2: 1.7 of 5.6 MB
    per image). A map with no chosen channel stays as an empty one, so the grid is still the
    first map's. A map whose every channel is chosen is passed on as it is, not copied
    (efficientnet_lite0 keeps all 144: 0.16 s of copies over magnetic_tile's images).
    """
    return [feature_map if local.numel() == feature_map.shape[1]
            else select_channels(feature_map.permute(0, 2, 3, 1), local).permute(0, 3, 1, 2)
            for feature_map, local in _local_channels(feature_maps, index)]


def _local_channels(feature_maps: list[torch.Tensor], index: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(map, its channels in `index` counted from the map's first): `index` numbers the channels
    of all maps one after the other."""
    offset = 0
    for feature_map in feature_maps:
        channels = feature_map.shape[1]
        yield feature_map, (index[(index >= offset) & (index < offset + channels)] - offset).to(feature_map.device)
        offset += channels


def embedding_blocks(batches: list[list[torch.Tensor]], index: torch.Tensor,
                     max_elements: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """The embedding of one or more batches, one after the other along the batch dimension, as bands
    of grid rows: (first row, (B, rows, W, D) float32 block), top to bottom.

    Each batch is its list of feature maps. A patch's embedding is the chosen channels of every
    map, deeper maps resampled onto the first map's grid at the centres of its cells
    (utils.grid), so every channel of a patch describes the same spot of the image. Channels
    last: how the backbones' maps already lie (channels_last) and how the Gaussian reads a
    patch, so no transposed copy is made. Several batches go into one band without joining
    their maps first (Padim scores groups of batches at once). Bands of at most `max_elements`
    (None: one band) keep every temporary small and in cache: one full embedding of a batch of
    32 is 58 MB for EfficientNet-Lite0 and 220 MB for wide_resnet50_2, and every allocation
    that large costs page faults again.
    """
    layers = [_selected_layers(feature_maps, index) for feature_maps in batches]
    edges = list(itertools.accumulate((len(feature_maps[0]) for feature_maps in batches), initial=0))
    _, _, height, width = batches[0][0].shape
    dims = index.numel()
    rows_per_band = height if max_elements is None else max(1, min(height, max_elements // (edges[-1] * width * dims)))
    for top in range(0, height, rows_per_band):
        bottom = min(top + rows_per_band, height)
        block = torch.empty(edges[-1], bottom - top, width, dims, dtype=torch.float32, device=batches[0][0].device)
        for batch_layers, first, stop in zip(layers, edges, edges[1:]):
            _fill_band(block[first:stop], batch_layers, (height, width), top, bottom)
        yield top, block


def _selected_layers(feature_maps: list[torch.Tensor], index: torch.Tensor) -> list[tuple[torch.Tensor, slice | torch.Tensor]]:
    """(channels-last map, its chosen channels) for every map with any: coarse maps are small, so
    their channels are selected once here; the first grid's are selected band by band."""
    _, _, height, width = feature_maps[0].shape
    layers = []
    for feature_map, local in _local_channels(feature_maps, index):
        if local.numel() == 0:
            continue
        channels_last = feature_map.permute(0, 2, 3, 1)
        if local.numel() == feature_map.shape[1]:
            local = slice(None)  # every channel: a view, no copy
        elif channels_last.shape[1:3] != (height, width):
            channels_last, local = select_channels(channels_last, local), slice(None)
        layers.append((channels_last, local))
    return layers


def _fill_band(block: torch.Tensor, layers: list, grid: tuple[int, int], top: int, bottom: int) -> None:
    """Write grid rows top..bottom of one batch's embedding into `block` (B, rows, W, D)."""
    filled = 0
    for channels_last, local in layers:
        if channels_last.shape[1:3] == grid:
            part = channels_last[:, top:bottom]
            part = part if isinstance(local, slice) else select_channels(part, local)
            block[..., filled:filled + part.shape[-1]] = part
        else:
            ratio = stride_ratio(grid[0], channels_last.shape[1])
            part = resample_centred(channels_last, grid, ratio, rows=slice(top, bottom),
                                    out=block[..., filled:filled + channels_last.shape[-1]])
        filled += part.shape[-1]
