"""Per-position multivariate Gaussian: streaming fit, precision factor, batched Mahalanobis.

For every position p of the embedding grid (P = H*W of them), over the N training patches x:

    mu_p = mean(x),  S_p = cov(x) + epsilon I,  S_p = L_p L_p^T,  W_p = L_p^-1,
    d_p(x) = sqrt((x - mu_p)^T S_p^-1 (x - mu_p)) = |W_p (x - mu_p)|

cov(x) is the unbiased covariance ('empirical', PaDiM's), or the maximum-likelihood one shrunk towards
a multiple of I by Ledoit-Wolf's or OAS's rule (scikit-learn's estimators), all from streamed sums.

All positions at once, with batched linear algebra; never a Python loop over patches. The
symmetric S and the triangular W are stored as row blocks of their triangles
(utils.padim.triangular).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from utils.config import COVARIANCES, ModelConfig
from utils.padim.fast_paths import cholesky_ex, chunk_workers
from utils.padim.triangular import TriangularBlocks

CHUNK_ELEMENTS = 2**22  # bounds Mahalanobis' temporaries
# matrices per chunk of the factorisation: a worker's temporaries stay cache-sized (tuning)
FACTOR_CHUNK_ELEMENTS = 2**21
FACTOR_CHUNK_MATRICES = 32
FACTOR_DEVICE_CHUNK_ELEMENTS = 2**27  # on a GPU: a few large chunks of float64 matrices


class Peers(Protocol):
    """The processes that fit shares of one set of images (utils.runtime.distributed.World): what
    GaussianAccumulator.merged needs of them."""

    def everyone(self, item: Any) -> list: ...

    def broadcast_(self, tensor: torch.Tensor, source: int) -> None: ...

    def all_reduce_(self, tensor: torch.Tensor) -> None: ...


def positions_first(embedding: torch.Tensor) -> torch.Tensor:
    """(B, H, W, D) -> (P, B, D), a view: with D innermost, batched matmul reads it as fast as a copy."""
    return embedding.flatten(1, 2).transpose(0, 1)


def band_positions(top: int, band: torch.Tensor) -> slice:
    """The grid positions (row-major) of a band (B, rows, W, D) whose first grid row is `top`."""
    width = band.shape[2]
    return slice(top * width, (top + band.shape[1]) * width)


def shifted_fourth_moments(
    count: int,
    first: torch.Tensor,
    second_times_c: torch.Tensor,
    second_trace: torch.Tensor,
    third: torch.Tensor,
    fourth: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum |y - c|^2 (y - c) (P, D), sum |y - c|^4 (P,)) from sums over the same y (float64).

    The sums over y: n, S1 = sum y, S2 c (S2 = sum y y^T), tr S2 = sum |y|^2, third = sum |y|^2 y, fourth
    = sum |y|^4. With |y - c|^2 = |y|^2 - 2 y.c + |c|^2, its square and its product with y - c sum to
    terms in those alone: this is how the sums move to another shift (c = new - old) and how
    Ledoit-Wolf's sum |x - mean|^4 is read (c = mean - shift), never holding the embeddings.
    """
    r = c.square().sum(dim=1)
    first_c = (first * c).sum(dim=1)
    c_second_c = (second_times_c * c).sum(dim=1)
    new_fourth = (
        fourth
        - 4 * (third * c).sum(dim=1)
        + 4 * c_second_c
        + 2 * r * second_trace
        - 4 * r * first_c
        + count * r.square()
    )
    new_third = (
        third - 2 * second_times_c + r.unsqueeze(1) * first - c * (second_trace - 2 * first_c + count * r).unsqueeze(1)
    )
    return new_third, new_fourth


def ledoit_wolf_shrinkage(
    count: int, dims: int, trace: torch.Tensor, frobenius_squared: torch.Tensor, fourth: torch.Tensor
) -> torch.Tensor:
    """Ledoit & Wolf's (2004) shrinkage (P,) of the maximum-likelihood covariances S, as scikit-learn's
    ledoit_wolf_shrinkage computes it: from tr S, |S|_F^2 and sum_k |x_k - mean|^4 per position."""
    beta = (fourth / count - frobenius_squared) / (dims * count)
    delta = (frobenius_squared - trace.square() / dims) / dims
    beta = torch.minimum(beta, delta)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    return torch.where(delta == 0, torch.zeros_like(beta), beta / safe).clamp(0.0, 1.0)


def oas_shrinkage(count: int, dims: int, trace: torch.Tensor, frobenius_squared: torch.Tensor) -> torch.Tensor:
    """Chen et al.'s (2010) Oracle Approximating Shrinkage (P,) of the maximum-likelihood covariances S,
    as scikit-learn's OAS computes it: from tr S and |S|_F^2 alone."""
    alpha = frobenius_squared / dims**2
    mu_squared = (trace / dims).square()
    numerator = alpha + mu_squared
    denominator = (count + 1) * (alpha - mu_squared / dims)
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.ones_like(numerator), (numerator / safe).clamp(max=1.0))


@dataclass
class GaussianSums:
    """What adds up over images, kept in the model file so that images can be added exactly later:
    the image count, the shift (P, D) the sums are taken around, the first moments (P, D, float64) and
    the upper blocks of the second moments (float32), all of y = x - shift; and (None in models saved
    before they were kept) sum |y|^2 y (P, D) and sum |y|^4 (P,) in float64, what Ledoit-Wolf needs."""

    count: int
    shift: torch.Tensor
    first: torch.Tensor
    second: TriangularBlocks
    third: torch.Tensor | None = None
    fourth: torch.Tensor | None = None

    def is_finite(self) -> bool:
        extra = [t for t in (self.third, self.fourth) if t is not None]
        return all(bool(torch.isfinite(t).all()) for t in (self.shift, self.first, *self.second.blocks, *extra))

    def to(self, device: torch.device | str) -> GaussianSums:
        third, fourth = (None if t is None else t.to(device) for t in (self.third, self.fourth))
        return GaussianSums(
            self.count, self.shift.to(device), self.first.to(device), self.second.to(device), third, fourth
        )


class GaussianAccumulator:
    """One streaming pass of sums over the training embeddings; memory independent of N.

    Sums are taken around a shift (the first group's mean), so that the float32 second-moment
    sum does not cancel catastrophically when the covariance is formed; the first moments are
    summed in float64. Only the upper blocks of the symmetric second moments are kept. Beside
    them, sum |y|^2 y and sum |y|^4 in float64 (O(P D), what Ledoit-Wolf needs); None when the
    accumulator goes on from sums saved without them.
    """

    def __init__(self, dims: int, positions: int, device: torch.device):
        self.count = 0
        self.shift = torch.zeros(positions, 1, dims, dtype=torch.float32, device=device)
        self.sum = torch.zeros(positions, dims, dtype=torch.float64, device=device)
        self.outer = TriangularBlocks.zeros(positions, dims, lower=False, dtype=torch.float32, device=device)
        self.third: torch.Tensor | None = torch.zeros(positions, dims, dtype=torch.float64, device=device)
        self.fourth: torch.Tensor | None = torch.zeros(positions, dtype=torch.float64, device=device)

    def update(self, bands: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Fold a group of images in, given as bands of grid rows (first row, (B, rows, W, D)) that cover the grid."""
        covered, images = 0, 0
        for top, band in bands:
            x = positions_first(band.to(self.sum.device, torch.float32))
            positions = band_positions(top, band)
            images = x.shape[1]
            if self.count == 0:
                self.shift[positions] = x.mean(dim=1, keepdim=True)
            centred = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (P, B, D) rows, as the products read them
            torch.sub(x, self.shift[positions], out=centred)
            for (first, stop), block in zip(self.outer.spans, self.outer.blocks):
                block[positions].baddbmm_(centred[..., first:stop].transpose(1, 2), centred[..., first:])
            if self.third is None:
                self.sum[positions] += centred.sum(dim=1)
            else:  # sum y and sum |y|^2 y in one product (one read of the group); the group's part in float32
                squares = torch.linalg.vector_norm(centred, dim=2, keepdim=True).square_()  # (P, B, 1)
                weights = torch.cat([torch.ones_like(squares), squares], dim=2).transpose(1, 2)  # (P, 2, B)
                first_and_third = torch.bmm(weights, centred)
                self.sum[positions] += first_and_third[:, 0]
                self.third[positions] += first_and_third[:, 1]
                self.fourth[positions] += squares.double().square().sum(dim=(1, 2))
            covered += x.shape[0]
        if covered != self.sum.shape[0]:
            raise ValueError(f"the bands covered {covered} of {self.sum.shape[0]} grid positions")
        self.count += images

    @classmethod
    def resumed(cls, sums: GaussianSums, device: torch.device) -> GaussianAccumulator:
        """An accumulator that goes on from saved sums: folding images in afterwards gives the sums
        one pass over the old and the new images would (up to float summation order)."""
        positions, dims = sums.first.shape
        accumulator = cls(dims, positions, device)
        accumulator.count = sums.count
        accumulator.shift.copy_(sums.shift.unsqueeze(1))
        accumulator.sum.copy_(sums.first)
        accumulator.outer = sums.second.to(device=device, dtype=torch.float32, copy=True)
        if sums.third is None or sums.fourth is None:
            accumulator.third = accumulator.fourth = None
        else:
            accumulator.third.copy_(sums.third)
            accumulator.fourth.copy_(sums.fourth)
        return accumulator

    def sums(self) -> GaussianSums:
        """A copy of the sums (finalize consumes them), for the model file."""
        third, fourth = (None if t is None else t.clone() for t in (self.third, self.fourth))
        outer = self.outer.to(dtype=torch.float32, copy=True)
        return GaussianSums(self.count, self.shift[:, 0, :].clone(), self.sum.clone(), outer, third, fourth)

    def moments(self) -> list[torch.Tensor]:
        """The sums that add up over disjoint sets of images (first moments, upper blocks of the second,
        the sums Ledoit-Wolf needs when kept)."""
        extra = [t for t in (self.third, self.fourth) if t is not None]
        return [self.sum, *self.outer.blocks, *extra]

    def shifted_fourth_moments(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum |y - c|^2 (y - c), sum |y - c|^4) of this accumulator's y = x - shift (c: (P, D) float64)."""
        if self.third is None or self.fourth is None:
            raise ValueError(
                "the sums hold no fourth moments (a model saved before they were kept): Ledoit-Wolf needs them; "
                "refit the model with run_experiment.py --save_distribution"
            )
        second_times_c = self.outer.symmetric_times(c)
        second_trace = self.outer.diagonal().double().sum(dim=1)
        return shifted_fourth_moments(self.count, self.sum, second_times_c, second_trace, self.third, self.fourth, c)

    def recentre(self, shift: torch.Tensor) -> None:
        """Re-express the sums around another shift (P, 1, D), so that sums of several accumulators
        (one per process) can be added.

        With y = x - a around the old shift a and delta = a - b: sum(x - b) = S1 + n delta and
        sum (x - b)(x - b)^T = S2 + v delta^T + delta v^T, where v = S1 + (n / 2) delta; the fourth
        moments by shifted_fourth_moments with c = -delta (before S1 and S2 move).
        """
        delta = (self.shift - shift)[:, 0, :].double()
        if self.third is not None:
            self.third, self.fourth = self.shifted_fourth_moments(-delta)
        v = (self.sum + delta * (self.count / 2)).float().unsqueeze(2)
        delta_column = delta.float().unsqueeze(2)
        for (start, stop), block in zip(self.outer.spans, self.outer.blocks):
            block.baddbmm_(v[:, start:stop], delta_column[:, start:].transpose(1, 2))
            block.baddbmm_(delta_column[:, start:stop], v[:, start:].transpose(1, 2))
        self.sum += delta * self.count
        self.shift.copy_(shift)

    @staticmethod
    def merged(
        accumulator: GaussianAccumulator | None,
        grid: tuple[int, int] | None,
        peers: Peers,
        new: Callable[[tuple[int, int]], GaussianAccumulator],
    ) -> tuple[GaussianAccumulator | None, tuple[int, int] | None]:
        """(sums, grid) of every peer added up (each fitted a share of the images): afterwards every peer
        holds the sums a single process fitting all images would, up to float summation order; (None,
        None) when no peer had a readable image.

        The sums are first re-expressed around one shared shift (the first fitting peer's), then
        all-reduced; a peer without readable images (no accumulator: `new` makes one for the grid)
        contributes zeros.
        """
        counts = peers.everyone((accumulator.count, grid) if accumulator is not None else (0, None))
        source = next((rank for rank, (count, _) in enumerate(counts) if count), None)
        if source is None:
            return None, None
        grid = counts[source][1]
        if accumulator is None:
            accumulator = new(grid)  # its sums start at zero
        shift = accumulator.shift.clone()
        peers.broadcast_(shift, source)
        accumulator.recentre(shift)
        for moment in accumulator.moments():
            peers.all_reduce_(moment)
        accumulator.count = sum(count for count, _ in counts)
        return accumulator, grid

    def finalize(
        self, covariance: str = ModelConfig.covariance, epsilon: float = ModelConfig.epsilon
    ) -> tuple[torch.Tensor, TriangularBlocks]:
        """(mean (P, D), covariance as upper blocks) plus epsilon * I; the buffers are reused in place.

        'empirical': the unbiased covariance (PaDiM's); 'ledoit_wolf', 'oas': the maximum-likelihood
        covariance S shrunk to (1 - s) S + s tr(S)/D I with scikit-learn's LedoitWolf / OAS shrinkage s.
        """
        if self.count == 0:
            raise ValueError("no training embeddings were accumulated")
        if covariance not in COVARIANCES:
            raise ValueError(f"unknown covariance {covariance!r} (known: {', '.join(COVARIANCES)})")
        centred_mean = self.sum / self.count
        mean = (centred_mean + self.shift[:, 0, :].double()).float()
        fourth = self.shifted_fourth_moments(centred_mean)[1] if covariance == "ledoit_wolf" else None
        result, m = self.outer, centred_mean.float().unsqueeze(2)
        divisor = self.count - 1 if covariance == "empirical" else self.count
        for (start, stop), block in zip(result.spans, result.blocks):
            if self.count > 1:
                block.baddbmm_(m[:, start:stop], m[:, start:].transpose(1, 2), alpha=-float(self.count))
                block.div_(divisor)
            else:
                block.zero_()
        diagonal_term = torch.full((result.blocks[0].shape[0], 1), epsilon, dtype=torch.float64, device=m.device)
        if covariance != "empirical":
            dims, trace = result.dims, result.diagonal().double().sum(dim=1)
            frobenius_squared = result.symmetric_frobenius_squared()
            if covariance == "ledoit_wolf":
                shrinkage = ledoit_wolf_shrinkage(self.count, dims, trace, frobenius_squared, fourth)
            else:
                shrinkage = oas_shrinkage(self.count, dims, trace, frobenius_squared)
            for block in result.blocks:
                block.mul_((1 - shrinkage).float()[:, None, None])
            diagonal_term += (shrinkage * trace / dims).unsqueeze(1)
        for (start, stop), block in zip(result.spans, result.blocks):
            block[:, :, : stop - start].diagonal(dim1=1, dim2=2).add_(diagonal_term.float())
        self.outer = None
        return mean, result


def require_positive_definite(info: torch.Tensor) -> None:
    """ValueError when any Cholesky `info` is non-zero: the one point where the factorisation waits for its device."""
    if bool(info.any()):
        raise ValueError(
            "a covariance matrix is not positive definite (non-finite features, or --epsilon 0 with fewer fit "
            "images than dimensions or a constant channel?)"
        )


def precision_factor_(covariance: TriangularBlocks) -> TriangularBlocks:
    """W = L^-1 (S = L L^T) of the covariances' upper blocks; returns W's lower blocks, written
    into the covariance's own memory (`covariance` is consumed).

    Cholesky in float64 (the covariances reach condition numbers of 1e5-1e6), the triangular
    inverse in float32 (L's condition number is only the square root of S's); the evidence is
    in docs/algorithm.md. A chunk of positions at a time: on CPU worker threads (fast_paths),
    or a few large chunks on a GPU. The factor's lower blocks have the covariance's upper
    blocks' shapes in reverse order (triangular.block_edges), and a chunk reads its positions'
    rows of every block before it writes them, so no second set of P matrices is made. Whether
    every matrix was positive definite is read once, at the end.
    """
    positions, dims = covariance.blocks[0].shape[0], covariance.dims
    factor = TriangularBlocks(covariance.blocks[::-1], lower=True)
    on_cpu = factor.blocks[0].device.type == "cpu"
    if on_cpu:
        chunk = min(FACTOR_CHUNK_MATRICES, max(1, FACTOR_CHUNK_ELEMENTS // (dims * dims)))
    else:
        chunk = max(1, FACTOR_DEVICE_CHUNK_ELEMENTS // (dims * dims))

    def factorise(start: int) -> torch.Tensor:
        rows = slice(start, start + chunk)
        lower, info = cholesky_ex(covariance[rows].lower_triangle_of_symmetric(torch.float64))
        lower = lower.float()
        identity = torch.eye(dims, dtype=lower.dtype, device=lower.device)
        inverse = torch.linalg.solve_triangular(lower, identity, upper=False)
        for (first, stop), block in zip(factor.spans, factor.blocks):
            block[rows] = inverse[:, first:stop, :stop]
        return info

    starts = range(0, positions, chunk)
    if on_cpu:
        with chunk_workers() as workers, ThreadPoolExecutor(workers) as pool:
            infos = list(pool.map(factorise, starts))
    else:
        infos = [factorise(start) for start in starts]
    require_positive_definite(torch.cat(infos))
    return factor


def mahalanobis(
    embedding: torch.Tensor, mean: torch.Tensor, factor: TriangularBlocks, max_elements: int | None = CHUNK_ELEMENTS
) -> torch.Tensor:
    """(B, H, W, D) -> (B, H, W) Mahalanobis distance of every patch to its position's Gaussian.

    d = |W (x - mu)|, block of rows by block: block k of W (x - mu) depends only on the first
    e_(k+1) entries of x - mu, so W's zero triangle is neither read nor multiplied. The
    patches of a position are the columns of one operand (P, D, B), so every product covers
    the whole batch; over chunks of positions of at most `max_elements` centred values
    (None: all positions at once, as an exported graph does for any batch size).
    """
    batch, height, width, dims = embedding.shape
    patches = positions_first(embedding.to(mean.device, torch.float32))  # (P, B, D), a view
    positions = patches.shape[0]
    chunk = positions if max_elements is None else max(1, max_elements // (batch * dims))
    distances = []
    for start in range(0, positions, chunk):
        rows = slice(start, start + chunk)
        columns = (patches[rows] - mean[rows].unsqueeze(1)).transpose(1, 2)  # (p, D, B)
        squares = sum(
            torch.bmm(block[rows], columns[:, :stop]).square().sum(dim=1)
            for (_, stop), block in zip(factor.spans, factor.blocks)
        )
        distances.append(squares.sqrt())
    return torch.cat(distances).transpose(0, 1).reshape(batch, height, width)
