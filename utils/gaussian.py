"""Per-position multivariate Gaussian: streaming fit, precision factor, batched Mahalanobis.

Positions are the P = H*W cells of the embedding grid; every function works on all of them
at once with batched linear algebra, never a Python loop over patches.
"""
from __future__ import annotations

import itertools
import platform
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

COVARIANCE_EPSILON = 0.01
CHUNK_ELEMENTS = 2**22  # bounds the temporaries of the factorisation and of Mahalanobis
# Rows per stored block of a triangle: 550 dims in 4 blocks (5/8 of the full matrices),
# measured fastest: interleaved gaussian_steps runs, fit 7.3-7.5 s and Mahalanobis 5.8-5.9 s
# against 7.9-8.1 and 6.0-6.8 with 3 blocks (192), 8.8-8.9 and 6.3-6.4 with 5 (110).
BLOCK_WIDTH = 138
# batched_matmul's grouped convolutions: the shapes at which oneDNN measured faster than torch.bmm
CONVOLVED_ROWS = 128
CONVOLVED_INNER = 32
CONVOLVED_GROUPS = 16
# torch runs CPU convolutions through oneDNN on this machine, an x86 one (batched_matmul)
ONEDNN_ON_X86 = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
GROUP_IMAGES = 128  # images whose embeddings are added to the statistics, or scored, in one pass (utils.padim)
# Matrices per chunk of the precision factor: small enough that a worker's temporaries stay
# cache-sized, large enough that a chunk's many small ops are amortised. 3136 matrices on
# 2 cores, 550 dims: 13 per chunk 8.1 s, 6 per chunk 6.4 s; 144 dims: 202 per chunk 0.37 s,
# 25-32 0.26 s; 100 dims: 419 per chunk 0.22 s, 32 0.13 s.
FACTOR_CHUNK_ELEMENTS = 2**21
FACTOR_CHUNK_MATRICES = 32


def block_edges(dims: int) -> list[int]:
    """Row edges 0 = e_0 < ... < e_n = dims of the blocks a triangle is stored in.

    Mirror-symmetric (e_k + e_(n-k) = dims): the upper blocks of a covariance then have the
    shapes of the lower blocks of its factor in reverse order, so the factor is written into
    the covariance's memory (precision_factor_). An even count would need the middle edge at
    dims / 2, so odd dims get an odd count.
    """
    count = min(dims, max(2, round(dims / BLOCK_WIDTH)))
    count += (dims % 2) * (1 - count % 2)
    low = [(2 * k * dims + count) // (2 * count) for k in range(count // 2 + 1)]
    return low + [dims - edge for edge in reversed(low[:count + 1 - len(low)])]


@dataclass
class TriangularBlocks:
    """A batch of P triangular (D, D) matrices as contiguous blocks of rows, the zero triangle not stored.

    Block k holds rows e_k..e_(k+1) (block_edges); lower: its columns 0..e_(k+1) (the precision
    factor W), upper: its columns e_k..D (the upper half of a symmetric covariance). Rows,
    because each block is then one operand of a batched product as it lies in memory (the
    second moments' update, W (x - mu)); products with the blocks skip the zeros: 550 dims in
    4 blocks hold 5/8 of the full matrices.
    """

    blocks: list[torch.Tensor]
    lower: bool

    @classmethod
    def empty(cls, positions: int, dims: int, lower: bool, **tensor_options) -> "TriangularBlocks":
        return cls([torch.empty(shape, **tensor_options) for shape in cls.shapes(positions, dims, lower)], lower)

    @classmethod
    def from_dense(cls, matrices: torch.Tensor, lower: bool) -> "TriangularBlocks":
        """(P, D, D) -> copies of the blocks of its lower (or upper) triangle, diagonal blocks whole."""
        spans = list(itertools.pairwise(block_edges(matrices.shape[-1])))
        if lower:
            return cls([matrices[:, start:stop, :stop].contiguous() for start, stop in spans], lower)
        return cls([matrices[:, start:stop, start:].contiguous() for start, stop in spans], lower)

    @staticmethod
    def shapes(positions: int, dims: int, lower: bool, edges: list[int] | None = None) -> list[tuple[int, int, int]]:
        """The block shapes of P matrices of D dims split at `edges` (default block_edges(D)).

        Products with the blocks work for any split: a model file whose factor was stored with
        another block width (an older BLOCK_WIDTH) is read as it is.
        """
        spans = itertools.pairwise(block_edges(dims) if edges is None else edges)
        return [(positions, stop - start, stop if lower else dims - start) for start, stop in spans]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(first, stop) rows of every block."""
        edges = itertools.accumulate((block.shape[1] for block in self.blocks), initial=0)
        return list(itertools.pairwise(edges))

    @property
    def dims(self) -> int:
        return self.spans[-1][1]

    def __getitem__(self, positions: slice) -> "TriangularBlocks":
        return TriangularBlocks([block[positions] for block in self.blocks], self.lower)

    def to(self, *args, **kwargs) -> "TriangularBlocks":
        return TriangularBlocks([block.to(*args, **kwargs) for block in self.blocks], self.lower)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(P, D, D) with the blocks in place and zeros elsewhere."""
        first = self.blocks[0]
        matrices = torch.zeros(first.shape[0], self.dims, self.dims, dtype=dtype or first.dtype, device=first.device)
        for (start, stop), block in zip(self.spans, self.blocks):
            if self.lower:
                matrices[:, start:stop, :stop] = block
            else:
                matrices[:, start:stop, start:] = block
        return matrices

    def lower_half(self, dtype: torch.dtype) -> torch.Tensor:
        """(P, D, D): the lower half of the symmetric matrices whose upper half the (upper) blocks hold;
        the strict upper triangle is left unwritten, for a reader of the lower one only
        (Cholesky: mirroring it would cost 4x the copy)."""
        first = self.blocks[0]
        matrices = torch.empty(first.shape[0], self.dims, self.dims, dtype=dtype, device=first.device)
        for (start, stop), block in zip(self.spans, self.blocks):
            matrices[:, start:, start:stop] = block.transpose(1, 2)
        return matrices


def batched_products(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """a @ b for batches of matrices, (P, n, k) @ (P, k, m), as (positions, their (p, n, m) products)
    pieces that cover the P matrices in order: a caller that reduces each product (Mahalanobis'
    sums of squares) never copies them into one (P, n, m) tensor (wide_resnet50_2's scoring:
    0.8 s of copies).

    On x86 CPUs torch's matmul goes to MKL, which runs AVX2 code on AMD processors, while its
    convolutions go to oneDNN, which uses AVX-512 where the CPU has it. A batch of products
    is a grouped 1x1 convolution (one group per matrix), and for the wide products of
    wide_resnet50_2's 550 dims it runs up to 2x faster than torch.bmm on a 2-core AMD EPYC,
    once oneDNN has built its kernels: (138 x 550) @ (550 x 128) at 380-425 against 175-200
    GFLOP/s. It is slow when the rows are few (the 50-100-row blocks of 100-200 dims:
    85-220 against bmm's 170-195) and when a call has many groups (32 fell to 80-200), so
    products of fewer than CONVOLVED_ROWS rows or CONVOLVED_INNER inner columns, other dtypes
    and other devices use torch.bmm, and a call convolves CONVOLVED_GROUPS matrices.

    A convolution's weight is its first operand laid out (n, k); when `a` is the transpose of
    a (k, n) matrix in memory, as X^T in the second moments' X^T X is, a transposed
    convolution takes it as it lies, where a convolution would first copy it transposed:
    the second moments of 128 images of wide_resnet50_2 in 0.48-0.52 s against 0.60-0.63 s.
    """
    positions, rows, inner = a.shape
    if not _convolves(a):
        yield slice(0, positions), torch.bmm(a, b)
        return
    transposed = a.stride(1) == 1 and a.stride(2) >= rows
    for start in range(0, positions, CONVOLVED_GROUPS):
        group = slice(start, start + CONVOLVED_GROUPS)
        count = min(CONVOLVED_GROUPS, positions - start)
        columns = b[group].reshape(1, count * inner, -1)
        if transposed:
            product = F.conv_transpose1d(columns, a[group].transpose(1, 2).reshape(count * inner, rows, 1), groups=count)
        else:
            product = F.conv1d(columns, a[group].reshape(count * rows, inner, 1), groups=count)
        yield group, product.view(count, rows, -1)


def batched_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """a @ b for batches of matrices, (P, n, k) @ (P, k, m), written into `out` (P, n, m), or added to
    what it holds when `accumulate`; through batched_products, or torch.bmm's own `out`."""
    if not _convolves(a):
        return out.baddbmm_(a, b) if accumulate else torch.bmm(a, b, out=out)
    for group, product in batched_products(a, b):
        if accumulate:
            out[group] += product
        else:
            out[group] = product
    return out


def _convolves(a: torch.Tensor) -> bool:
    """Whether batched_products takes a @ b as grouped convolutions (its docstring says when that is faster)."""
    _, rows, inner = a.shape
    return (a.device.type == "cpu" and ONEDNN_ON_X86 and a.dtype == torch.float32 and rows >= CONVOLVED_ROWS
            and inner >= CONVOLVED_INNER)


def positions_first(embedding: torch.Tensor) -> torch.Tensor:
    """(B, H, W, D) -> (P, B, D), a view: with D innermost, batched matmul reads it as fast as a copy."""
    return embedding.flatten(1, 2).transpose(0, 1)


def band_positions(top: int, band: torch.Tensor) -> slice:
    """The grid positions (row-major) of a band (B, rows, W, D) whose first grid row is `top`."""
    width = band.shape[2]
    return slice(top * width, (top + band.shape[1]) * width)


class GaussianAccumulator:
    """One streaming pass of sums over the training embeddings; memory independent of N.

    Sums are taken around a shift (the first group's mean) so that the float32 second-moment
    sum does not cancel catastrophically when the covariance is formed. Second moments are
    symmetric: only their upper blocks are accumulated (TriangularBlocks). They are read and
    written whole at every update (2.4 GB for wide_resnet50_2), so the caller hands over
    groups of many images at once (Padim.fit holds 128), which also makes the products
    wide enough for batched_matmul's fast path.
    """

    def __init__(self, dims: int, positions: int, device: torch.device):
        self.count = 0
        self.shift = torch.zeros(positions, 1, dims, dtype=torch.float32, device=device)
        self.sum = torch.zeros(positions, dims, dtype=torch.float64, device=device)
        # written by the first update: no separate pass to zero 2.4 GB for wide_resnet50_2
        self.outer = TriangularBlocks.empty(positions, dims, lower=False, dtype=torch.float32, device=device)

    def update(self, bands: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Fold a group of images in, given as bands of grid rows (first row, (B, rows, W, D)) that cover the grid."""
        covered, images = 0, 0
        for top, band in bands:
            x = positions_first(band.to(self.sum.device, torch.float32))
            positions = band_positions(top, band)
            images = x.shape[1]
            if self.count == 0:
                self.shift[positions] = x.mean(dim=1, keepdim=True)
            centred = torch.sub(x, self.shift[positions], out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
            self.sum[positions] += centred.sum(dim=1)  # a float32 sum of one group, accumulated in float64
            for (first, stop), block in zip(self.outer.spans, self.outer.blocks):
                batched_matmul(centred[..., first:stop].transpose(1, 2), centred[..., first:], out=block[positions],
                               accumulate=self.count > 0)  # the first update overwrites the uninitialised blocks
            covered += x.shape[0]
        if covered != self.sum.shape[0]:
            raise ValueError(f"the bands covered {covered} of {self.sum.shape[0]} grid positions")
        self.count += images

    def finalize(self, epsilon: float = COVARIANCE_EPSILON) -> tuple[torch.Tensor, TriangularBlocks]:
        """(mean (P, D), covariance as upper blocks): unbiased, plus epsilon * I; the buffers are reused in place."""
        if self.count == 0:
            raise ValueError("no training embeddings were accumulated")
        centred_mean = self.sum / self.count
        mean = (centred_mean + self.shift[:, 0, :].double()).float()
        covariance, m = self.outer, centred_mean.float().unsqueeze(2)
        for (start, stop), block in zip(covariance.spans, covariance.blocks):
            if self.count > 1:
                block.baddbmm_(m[:, start:stop], m[:, start:].transpose(1, 2), alpha=-float(self.count))
                block.div_(self.count - 1)
            else:
                block.zero_()
            block[:, :, :stop - start].diagonal(dim1=1, dim2=2).add_(epsilon)
        self.outer = None
        return mean, covariance


def precision_factor_(covariance: TriangularBlocks) -> TriangularBlocks:
    """W_p = L_p^-1 for every S_p = L_p L_p^T, so that d^2 = |W_p (x - mu_p)|^2; S's blocks are reused.

    Cholesky in float64 chunk by chunk (accuracy where it matters, memory bounded: the
    covariances reach condition numbers of 1e5-1e6, and a float32 Cholesky moves
    wide_resnet50_2's distances on magnetic_tile by up to 2.5e-3 relative), the triangular
    inverse in float32: L's condition number is only the square root of S's, and the
    distances differ from an all-float64 solve by at most 2e-6 relative.

    Returned as the lower blocks of W_p, written into the covariance's own blocks, which have
    those shapes in reverse order (block_edges): no second set of P matrices is ever made, and
    `covariance` is consumed. Two passes: chunks of positions get their Cholesky factor L, with
    its diagonal blocks inverted (W_kk = L_kk^-1), on the CPU one worker thread per core, each
    running its LAPACK and BLAS calls single-threaded (_chunk_workers); then _invert_below_diagonal_
    finishes W block row by block row over all positions at once.
    """
    positions, dims = covariance.blocks[0].shape[0], covariance.dims
    factor = TriangularBlocks(covariance.blocks[::-1], lower=True)
    chunk = min(FACTOR_CHUNK_MATRICES, max(1, FACTOR_CHUNK_ELEMENTS // (dims * dims)))

    def factorise(start: int) -> None:
        rows = slice(start, start + chunk)
        lower = cholesky(covariance[rows].lower_half(torch.float64)).float()
        for (first, stop), block in zip(factor.spans, factor.blocks):
            block[rows] = lower[:, first:stop, :stop]
            block[rows, :, first:] = lower_triangular_inverse(lower[:, first:stop, first:stop])

    starts = range(0, positions, chunk)
    if factor.blocks[0].device.type != "cpu":
        for start in starts:
            factorise(start)
    else:
        with _chunk_workers() as workers, ThreadPoolExecutor(workers) as pool:
            list(pool.map(factorise, starts))
    _invert_below_diagonal_(factor)
    return factor


def _invert_below_diagonal_(factor: TriangularBlocks) -> None:
    """Blocks holding L below the diagonal and W_kk = L_kk^-1 on it -> the blocks of W = L^-1, in place.

    Row k of L W = I gives W_k,<k = -W_kk (L_k,<k W_<k), where W_<k, the rows above, are done:
    a sum of products L_kj W_j, one per block row j < k, each over only the columns W_j has.
    Every product is a (rows x rows) block times a block of rows, batched over many positions
    (batched_matmul), where inverting each chunk's matrices by halves in the worker threads
    ran its smaller products at about a quarter of the rate: the factor of 3136 matrices of
    550 dims in 5.6 s against 6.5-6.9 s; 100-144 dims alike.
    """
    positions = factor.blocks[0].shape[0]
    spans = factor.spans
    for k, (first, stop) in enumerate(spans[1:], start=1):
        block = factor.blocks[k]
        step = max(1, CHUNK_ELEMENTS // ((stop - first) * first))
        for start in range(0, positions, step):
            rows = slice(start, start + step)
            count = min(step, positions - start)
            products = torch.zeros(count, stop - first, first, dtype=block.dtype, device=block.device)  # L_k,<k W_<k
            for (first_j, stop_j), above in zip(spans[:k], factor.blocks[:k]):
                batched_matmul(block[rows, :, first_j:stop_j], above[rows], out=products[:, :, :stop_j], accumulate=True)
            batched_matmul(block[rows, :, first:], products, out=block[rows, :, :first]).neg_()


def cholesky(matrices: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of symmetric positive-definite (P, n, n) matrices, reading their lower triangle only.

    On the CPU through NumPy, whose OpenBLAS LAPACK factors 550 dims in float64 at 1.6 ms
    a matrix on one core against 2.4-3.0 ms for torch's MKL on this AMD EPYC (MKL's AVX2
    code), and releases the GIL, so precision_factor_'s worker threads run it side by side.
    """
    if matrices.device.type == "cpu":
        try:
            return torch.from_numpy(np.linalg.cholesky(matrices.numpy()))
        except np.linalg.LinAlgError:
            pass
    else:
        lower, info = torch.linalg.cholesky_ex(matrices)
        if int(info.max()) == 0:
            return lower
    raise ValueError("a covariance matrix is not positive definite (non-finite features?)")


def lower_triangular_inverse(lower: torch.Tensor, smallest: int = 64) -> torch.Tensor:
    """Batched L^-1 of lower-triangular (..., n, n) matrices, by halves.

    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]: almost all of the work is
    batched matmul, which runs near the CPU's peak, where a triangular solve against the
    identity does three times the arithmetic at a lower rate. Both
    products have a triangular factor, whose zero quarter is skipped (_times_lower).
    Matrices of at most `smallest` rows are solved directly: on the diagonal blocks of
    3136 matrices of 550 dims (precision_factor_), leaves of 64 gave the factor in
    5.1-5.3 s, of 32 in 5.6-5.8 s, of 96 in 5.4-5.6 s and of 160 in 5.4-5.8 s.
    """
    n = lower.shape[-1]
    if n <= smallest:
        identity = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, identity, upper=False)
    half = n // 2
    top = lower_triangular_inverse(lower[..., :half, :half], smallest)
    bottom = lower_triangular_inverse(lower[..., half:, half:], smallest)
    inverse = torch.zeros_like(lower)
    inverse[..., :half, :half] = top
    inverse[..., half:, half:] = bottom
    inverse[..., half:, :half] = _lower_times(bottom, _times_lower(lower[..., half:, :half], top)).neg_()
    return inverse


def _times_lower(matrix: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """matrix @ lower, skipping the lower-triangular factor's zero upper-right quarter: 3/4 of the work."""
    half = lower.shape[-1] // 2
    product = torch.empty(*matrix.shape[:-1], lower.shape[-1], dtype=matrix.dtype, device=matrix.device)
    product[..., :half] = matrix @ lower[..., :half]
    product[..., half:] = matrix[..., half:] @ lower[..., half:, half:]
    return product


def _lower_times(lower: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """lower @ matrix, skipping the lower-triangular factor's zero upper-right quarter: 3/4 of the work."""
    half = lower.shape[-1] // 2
    product = torch.empty(*lower.shape[:-1], matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    product[..., :half, :] = lower[..., :half, :half] @ matrix[..., :half, :]
    product[..., half:, :] = lower[..., half:, :] @ matrix
    return product


@contextmanager
def _chunk_workers():
    """As many worker threads as torch has CPU threads, torch and the BLAS libraries set to one
    thread each meanwhile.

    Each factorisation is small: torch's own threading of a batch of them costs more than it
    gains and stalls when the cores are busy (144 dims: 2-4 s on one thread, 5-121 s on two
    under load). Whole chunks per thread scale instead: 3136 matrices of 144 dims in 0.46 s
    on two cores against 0.82 s on one; 550 dims as fast as torch's threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield threads
    finally:
        torch.set_num_threads(threads)


def mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, factor: TriangularBlocks) -> torch.Tensor:
    """(B, H, W, D) -> (B, H, W) Mahalanobis distance of every patch to its position's Gaussian.

    `factor` is precision_factor_'s lower blocks of W. The whitened patch W (x - mu) is taken
    block of rows by block: block k depends only on the first e_(k+1) entries of x - mu, so
    the zero triangle of W is neither multiplied nor read. The patches of a position are
    the columns of one operand (P, D, B), so every product covers the whole batch; computed
    over chunks of positions, so the temporaries stay small whatever the batch size.

    Grouped convolutions (batched_products) want those columns laid out (D, B), so the centred
    patches are copied so; torch.bmm reads them as the band holds them, (B, D) rows, through a
    transposed view: efficientnet_lite0's shape in 0.68-0.73 s against 0.78-0.83 s with the
    transposing copy, which wide_resnet50_2's convolutions need (3.4-3.5 s, 4.8-5.0 s without).
    """
    batch, height, width, dims = embedding.shape
    patches = positions_first(embedding.to(mean.device, torch.float32))  # (P, B, D), a view
    distances = torch.empty(patches.shape[0], batch, dtype=torch.float32, device=mean.device)
    chunk = max(1, CHUNK_ELEMENTS // (batch * dims))
    convolved = _convolves(factor.blocks[0])
    centred = torch.empty(min(chunk, patches.shape[0]) * batch * dims, dtype=torch.float32, device=mean.device)
    for start in range(0, patches.shape[0], chunk):
        rows = slice(start, start + chunk)
        count = min(chunk, patches.shape[0] - start)
        scratch = centred[:count * batch * dims]
        if convolved:
            columns = torch.sub(patches[rows].transpose(1, 2), mean[rows].unsqueeze(2), out=scratch.view(count, dims, batch))
        else:
            columns = torch.sub(patches[rows], mean[rows].unsqueeze(1), out=scratch.view(count, batch, dims)).transpose(1, 2)
        squares = torch.zeros(count, batch, dtype=torch.float32, device=mean.device)
        for (_, stop), block in zip(factor.spans, factor.blocks):
            for group, whitened in batched_products(block[rows], columns[:, :stop]):
                squares[group] += whitened.square_().sum(dim=1)
        distances[rows] = squares.sqrt_()
    return distances.transpose(0, 1).reshape(batch, height, width)
