"""Numerical facts about this machine that tests condition their exactness checks on."""

import torch


def _blas_rows_batch_invariant() -> bool:
    """Whether this BLAS computes a row of ``x @ W.T`` identically for any batch of whole
    64-row tiles (true of MKL's AVX-512 and SSE kernels, not of its AVX2 ones). Where it is
    not, chunking can only be invariant up to rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 20, generator=gen)
    for out_features in (80, 1):
        w = torch.randn(out_features, 20, generator=gen)
        full = torch.nn.functional.linear(x, w)
        for rows in (64, 128, 192, 1024, 2048):
            if not torch.equal(torch.nn.functional.linear(x[:rows], w), full[:rows]):
                return False
    return True


BLAS_ROWS_BATCH_INVARIANT = _blas_rows_batch_invariant()
