"""Patch distances -> smoothed anomaly maps at the model input size -> image scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

BLUR_SIGMA = 4.0
BLUR_KERNEL = 2 * int(4 * BLUR_SIGMA + 0.5) + 1


def anomaly_maps(distances: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w) distances -> (B, size, size): bilinear (align_corners=False), then Gaussian blur sigma 4."""
    upsampled = F.interpolate(distances.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(upsampled, kernel_size=[BLUR_KERNEL, BLUR_KERNEL], sigma=[BLUR_SIGMA, BLUR_SIGMA])[:, 0]


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of its map, in raw Mahalanobis units."""
    return maps.flatten(1).amax(dim=1)
