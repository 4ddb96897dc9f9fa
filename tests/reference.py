"""Plain definitions the library's faster code is held to: the precision factor in dense torch, the
anomaly map as resampling then blur (utils.padim.anomaly_map.MapOperator's two matrices), and
triangles cut out of dense matrices into TriangularBlocks."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from utils.padim.anomaly_map import BLUR_SIGMA, blur_radius, gaussian_taps
from utils.padim.grid import resample_centred, stride_ratio
from utils.padim.triangular import TriangularBlocks, block_edges


def precision_factor_reference(covariance: torch.Tensor) -> torch.Tensor:
    """W = L^-1 of dense symmetric (P, D, D) covariances, in plain torch: the definition."""
    lower = torch.linalg.cholesky(covariance.double())
    identity = torch.eye(covariance.shape[-1], dtype=torch.float64, device=covariance.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).float()


def gaussian_blur(images: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """(B, 1, H, W) blurred by a separable Gaussian (truncated at 4 sigma, mirrored borders).

    Two 1-D passes instead of one 2-D kernel, the same result as
    scipy.ndimage.gaussian_filter(mode="mirror", truncate=4). Maps smaller than the kernel
    (inputs under 17 px) get it truncated to what mirroring allows.
    """
    radius = min(blur_radius(sigma), *(side - 1 for side in images.shape[-2:]))
    kernel = gaussian_taps(radius, sigma, images.dtype, images.device)
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def smooth_upsample(distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) distances -> (B, height, width) of `size`: bilinear at the patches' true centres
    (utils.padim.grid), Gaussian blur sigma 4. The definition of an anomaly map."""
    ratio = stride_ratio(size[1], distances.shape[-1])
    upsampled = resample_centred(distances.unsqueeze(-1), size, ratio)
    return gaussian_blur(upsampled.permute(0, 3, 1, 2))[:, 0]


def blocks_from_dense(matrices: torch.Tensor, lower: bool) -> TriangularBlocks:
    """(P, D, D) -> copies of the blocks of its lower (or upper) triangle, diagonal blocks whole."""
    spans = list(itertools.pairwise(block_edges(matrices.shape[-1])))
    if lower:
        return TriangularBlocks([matrices[:, start:stop, :stop].contiguous() for start, stop in spans], lower)
    return TriangularBlocks([matrices[:, start:stop, start:].contiguous() for start, stop in spans], lower)
