"""The CPU special case of the precision factor: Cholesky through NumPy, on worker threads.

torch.linalg.cholesky would do; NumPy's OpenBLAS LAPACK factors these small float64
matrices faster on one core and releases the GIL, so chunk_workers' threads factor chunks
side by side. Kept because it earns its place end to end (figures per backbone in
benchmarks/README.md, "Performance special cases"); tests hold it equal to torch's.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from threadpoolctl import threadpool_limits


def cholesky_ex(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.cholesky_ex of symmetric (P, n, n) matrices, reading their lower triangle only:
    (L, info), info non-zero where a matrix is not positive definite; through NumPy on the CPU,
    where a failure makes the whole chunk's info non-zero. Nothing waits for the device."""
    if matrices.device.type != "cpu":
        return torch.linalg.cholesky_ex(matrices)
    try:
        return torch.from_numpy(np.linalg.cholesky(matrices.numpy())), torch.zeros(len(matrices), dtype=torch.int32)
    except np.linalg.LinAlgError:
        return torch.full_like(matrices, float("nan")), torch.ones(len(matrices), dtype=torch.int32)


@contextmanager
def chunk_workers():
    """As many worker threads as torch has CPU threads, torch and the BLAS libraries set to one
    thread each meanwhile: many small factorisations scale by whole chunks per thread, where
    torch's own threading of each small one costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield threads
    finally:
        torch.set_num_threads(threads)
