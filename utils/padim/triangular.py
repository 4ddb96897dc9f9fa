"""Batches of triangular (D, D) matrices stored as blocks of rows.

The Gaussian of every grid position needs two triangles: the upper half of its symmetric
covariance and its lower-triangular precision factor W. Storing only the triangles, as row
blocks, keeps the fit's largest buffer at about 5/8 of the full matrices (wide_resnet50_2:
P = 3136 matrices of 550 dims) and lets every product skip the zero triangle. Whether this
pays is measured in benchmarks/README.md ("Performance special cases").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

BLOCK_WIDTH = 138  # rows per block: 550 dims in 4 blocks (tuning; benchmarks/README.md)


def block_edges(dims: int) -> list[int]:
    """Row edges 0 = e_0 < ... < e_n = dims of the blocks a triangle is stored in.

    Mirror-symmetric (e_k + e_(n-k) = dims): the upper blocks of a covariance then have the
    shapes of the lower blocks of its factor in reverse order, so the factor is written into
    the covariance's memory. An even count would need the middle edge at dims / 2, so odd
    dims get an odd count.
    """
    count = min(dims, max(2, round(dims / BLOCK_WIDTH)))
    count += (dims % 2) * (1 - count % 2)
    low = [(2 * k * dims + count) // (2 * count) for k in range(count // 2 + 1)]
    return low + [dims - edge for edge in reversed(low[: count + 1 - len(low)])]


@dataclass
class TriangularBlocks:
    """P triangular (D, D) matrices as contiguous blocks of rows; the zero triangle is not stored.

    Block k holds rows e_k..e_(k+1) (block_edges); lower: its columns 0..e_(k+1) (the
    precision factor W), upper: its columns e_k..D (the upper half of a symmetric covariance).
    Each block is one operand of a batched product as it lies in memory.
    """

    blocks: list[torch.Tensor]
    lower: bool

    @classmethod
    def zeros(cls, positions: int, dims: int, lower: bool, **tensor_options) -> TriangularBlocks:
        return cls([torch.zeros(shape, **tensor_options) for shape in cls.shapes(positions, dims, lower)], lower)

    @staticmethod
    def shapes(positions: int, dims: int, lower: bool, edges: list[int] | None = None) -> list[tuple[int, int, int]]:
        """The block shapes of P matrices of D dims split at `edges` (default block_edges(D)).

        Products with the blocks work for any split: a model file stored with another block
        width is read as it is.
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

    def __getitem__(self, positions: slice) -> TriangularBlocks:
        return TriangularBlocks([block[positions] for block in self.blocks], self.lower)

    def to(self, *args, **kwargs) -> TriangularBlocks:
        return TriangularBlocks([block.to(*args, **kwargs) for block in self.blocks], self.lower)

    def diagonal(self) -> torch.Tensor:
        """(P, D): the matrices' diagonals."""
        return torch.cat(
            [
                block[:, :, : stop - start].diagonal(dim1=1, dim2=2)
                for (start, stop), block in zip(self.spans, self.blocks)
            ],
            dim=1,
        )

    def symmetric_times(self, vectors: torch.Tensor) -> torch.Tensor:
        """(P, D): S v for the symmetric matrices S whose upper blocks these are (a block's square part is
        whole), multiplied in the blocks' dtype, returned in the vectors'."""
        v = vectors.to(self.blocks[0].dtype).unsqueeze(1)  # row vectors: the products read the blocks in order
        result = torch.zeros_like(v)
        for (first, stop), block in zip(self.spans, self.blocks):
            result[:, :, first:stop] += torch.bmm(v[:, :, first:], block.transpose(1, 2))
            result[:, :, stop:] += torch.bmm(v[:, :, first:stop], block[:, :, stop - first :])
        return result[:, 0].to(vectors.dtype)

    def symmetric_frobenius_squared(self) -> torch.Tensor:
        """(P,) float64: |S|_F^2 of the symmetric matrices whose upper blocks these are (the off-diagonal
        part of a block counts twice)."""
        total = torch.zeros(self.blocks[0].shape[0], dtype=torch.float64, device=self.blocks[0].device)
        for (start, stop), block in zip(self.spans, self.blocks):
            total += torch.linalg.vector_norm(block[:, :, : stop - start], dim=(1, 2)).double().square()
            total += 2 * torch.linalg.vector_norm(block[:, :, stop - start :], dim=(1, 2)).double().square()
        return total

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

    def lower_triangle_of_symmetric(self, dtype: torch.dtype) -> torch.Tensor:
        """(P, D, D) whose lower triangle is that of the symmetric matrices these upper blocks hold.

        The strict upper triangle is left unwritten: the reader (Cholesky) reads the lower one only.
        """
        first = self.blocks[0]
        matrices = torch.empty(first.shape[0], self.dims, self.dims, dtype=dtype, device=first.device)
        for (start, stop), block in zip(self.spans, self.blocks):
            matrices[:, start:, start:stop] = block.transpose(1, 2)
        return matrices
