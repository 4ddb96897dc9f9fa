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


def cholesky(matrices: torch.Tensor) -> torch.Tensor:
    """torch.linalg.cholesky of symmetric positive-definite (P, n, n) matrices, reading their lower
    triangle only; through NumPy on the CPU. ValueError when one is not positive definite."""
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
