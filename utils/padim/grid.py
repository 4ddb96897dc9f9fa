"""Where feature cells sit on the image, and resampling that keeps them there.

Cell j of a stage with stride s is centred on input pixel s*j: every backbone here pads its
odd kernels symmetrically. Nearest or align_corners=False up-sampling treats the cell as
covering pixels s*j .. s*j+s-1 instead, which moves deep features, and so the heat map, up
to s/2 pixels right and down. Sampling at the cells' true centres removes that shift (the
evidence: docs/algorithm.md).
"""

from __future__ import annotations

import math

import torch


def stride_ratio(fine: int, coarse: int) -> int:
    """Power-of-two stride between two grids of one backbone (robust to odd input sizes)."""
    return 2 ** round(math.log2(fine / coarse))


def linear_taps(positions: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two source samples (n, 2) and their weights (n, 2) of the linear value at each of `positions`.

    Positions are in source-sample units (sample k at k), clamped to [0, size - 1], so past
    either end the border sample is repeated (both taps then name it).
    """
    source = positions.clamp(0, size - 1)
    low = source.floor().long().clamp(max=size - 1)
    weight = source - low
    taps = torch.stack([low, (low + 1).clamp(max=size - 1)], dim=1)
    return taps, torch.stack([1 - weight, weight], dim=1)


def linear_weights(positions: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) matrix: row i holds the linear-interpolation weights (linear_taps) of source position
    positions[i]. One matrix per axis turns separable bilinear resampling into two matmuls."""
    taps, weights = linear_taps(positions, size)
    matrix = torch.zeros(len(positions), size, dtype=positions.dtype, device=positions.device)
    return matrix.scatter_add_(1, taps, weights)


def centred_weights(count: int, source: int, ratio: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(count, source) weights of one axis: output index i takes the linear value at source position i / ratio."""
    positions = torch.arange(count, dtype=torch.float64, device=device) / ratio
    return linear_weights(positions, source).to(dtype)


def resample_centred(maps: torch.Tensor, size: tuple[int, int], ratio: int, rows: slice = slice(None)) -> torch.Tensor:
    """(B, h, w, C) -> (B, size[0], size[1], C), channels last, or only the output `rows`:
    output index i takes the bilinear value at source position i / ratio on both axes.

    Channels last, as the backbones' maps lie (channels_last) and as the Gaussian reads a
    patch. Positions past the last source cell take the border value. Two matmuls with
    centred_weights, down the rows then across, neither of which moves the channels.
    """
    batch, height, width, channels = maps.shape
    down = centred_weights(size[0], height, ratio, maps.dtype, maps.device)[rows]  # (r, h)
    across = centred_weights(size[1], width, ratio, maps.dtype, maps.device)  # (W, w)
    resampled_rows = down @ maps.reshape(batch, height, width * channels)  # (B, r, w * C)
    count = len(down)
    return (across @ resampled_rows.view(batch * count, width, channels)).view(batch, count, size[1], channels)
