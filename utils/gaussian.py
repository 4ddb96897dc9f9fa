"""Per-position multivariate Gaussian: streaming fit, precision factor, batched Mahalanobis.

Positions are the P = H*W cells of the embedding grid; every function works on all of them
at once with batched linear algebra, never a Python loop over patches.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

COVARIANCE_EPSILON = 0.01
CHUNK_ELEMENTS = 2**22  # bounds the temporaries of the factorisation and of Mahalanobis
SINGLE_THREAD_BELOW_DIMS = 256


def positions_first(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (P, B, D), contiguous: batched matmul on a strided view is 10-40x slower."""
    return embedding.flatten(2).permute(2, 0, 1).contiguous()


class GaussianAccumulator:
    """One streaming pass of sums over the training embeddings; memory independent of N.

    Sums are taken around a shift (the first batch's mean) so that the float32 second-moment
    sum does not cancel catastrophically when the covariance is formed.
    """

    def __init__(self, dims: int, positions: int, device: torch.device):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(positions, dims, dtype=torch.float64, device=device)
        self.outer = torch.zeros(positions, dims, dims, dtype=torch.float32, device=device)

    def update(self, embedding: torch.Tensor) -> None:
        x = positions_first(embedding.to(self.outer.device, torch.float32))  # a fresh copy: safe to centre in place
        if self.shift is None:
            self.shift = x.mean(dim=1, keepdim=True)
        centred = x.sub_(self.shift)
        self.sum += centred.sum(dim=1, dtype=torch.float64)
        self.outer.baddbmm_(centred.transpose(1, 2), centred)
        self.count += centred.shape[1]

    def finalize(self, epsilon: float = COVARIANCE_EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (P, D), covariance (P, D, D)): unbiased, plus epsilon * I; the buffer is reused in place."""
        if self.count == 0:
            raise ValueError("no training embeddings were accumulated")
        centred_mean = self.sum / self.count
        mean = (centred_mean + self.shift[:, 0, :].double()).float()
        covariance = self.outer
        if self.count > 1:
            m = centred_mean.float().unsqueeze(2)
            covariance.baddbmm_(m, m.transpose(1, 2), alpha=-float(self.count))
            covariance.div_(self.count - 1)
        else:
            covariance.zero_()
        covariance.diagonal(dim1=1, dim2=2).add_(epsilon)
        self.outer = torch.empty(0)
        return mean, covariance


def precision_factor_(covariance: torch.Tensor) -> torch.Tensor:
    """Overwrite each S_p with W_p = L_p^-1 (S_p = L_p L_p^T), so that d^2 = |W_p (x - mu_p)|^2.

    Factorised in float64 chunk by chunk (accuracy where it matters, memory bounded), stored
    back in the caller's float32 buffer.
    """
    positions, dims, _ = covariance.shape
    chunk = max(1, CHUNK_ELEMENTS // (dims * dims))
    identity = torch.eye(dims, dtype=torch.float64, device=covariance.device)
    with _single_cpu_thread(covariance.device, dims):
        for start in range(0, positions, chunk):
            block = covariance[start:start + chunk].double()
            lower, info = torch.linalg.cholesky_ex(block)
            if int(info.max()) > 0:
                raise ValueError("a covariance matrix is not positive definite (non-finite features?)")
            covariance[start:start + chunk] = torch.linalg.solve_triangular(lower, identity, upper=False).float()
    return covariance


@contextmanager
def _single_cpu_thread(device: torch.device, dims: int):
    """Thousands of small factorisations run faster on one CPU thread, and do not stall when the
    cores are busy (144 dims: 2-4 s on one thread, 5-121 s on two under load). Large ones
    gain from threads (550 dims: 0.47 s on two, 0.78 s on one, per 100 matrices)."""
    if device.type != "cpu" or dims >= SINGLE_THREAD_BELOW_DIMS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, H, W) Mahalanobis distance of every patch to its position's Gaussian.

    Computed over chunks of positions, so the temporaries stay small whatever the batch size.
    """
    batch, dims, height, width = embedding.shape
    patches = positions_first(embedding.to(mean.device, torch.float32))
    distances = torch.empty(patches.shape[:2], dtype=torch.float32, device=mean.device)
    chunk = max(1, CHUNK_ELEMENTS // (batch * dims))
    for start in range(0, patches.shape[0], chunk):
        stop = start + chunk
        centred = patches[start:stop] - mean[start:stop].unsqueeze(1)
        whitened = torch.bmm(centred, factor[start:stop].transpose(1, 2))
        distances[start:stop] = whitened.square_().sum(dim=2).sqrt_()
    return distances.transpose(0, 1).reshape(batch, height, width)
