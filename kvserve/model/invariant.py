"""Row-count rules that keep GEMM results per row independent of how many rows share the call.

Measured on this project's CPU build of torch (MKL sgemm, oneDNN bf16), see tests/model/test_invariance.py:
  float32   x[rows] @ W^T gives bit-identical rows for any row count >= 12 and for any multiple of 4, but a
            different (small-M) kernel with another summation order for M in {1,2,3,5,6,7,9,10,11};
  bfloat16  identical rows for every row count except 1: a single row takes a GEMV path (seen with the
            real down_proj weights, K = 1536) whose sums differ from the GEMM's.
So float32 GEMMs with a row count in that set are padded with zero rows to the next multiple of 4, and
one-row bfloat16 GEMMs to two rows. With
weights streaming from RAM the padded call costs about the same as the unpadded one (memory bound).
On CUDA, cuBLAS picks split-K by shape; exactness there is not claimed (documented in the README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def invariant_rows(m: int, dtype: torch.dtype) -> int:
    """The row count to run a GEMM with so that each row's result is the same as in any larger batch."""
    if dtype == torch.float32 and m < 12 and m % 4:
        return (m + 3) // 4 * 4
    if dtype in (torch.bfloat16, torch.float16) and m == 1:
        return 2
    return m


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose rows do not depend on the number of rows in x (x: (M, in))."""
    m = x.shape[0]
    mp = invariant_rows(m, x.dtype) if x.device.type == "cpu" else m
    if mp == m:
        return F.linear(x, weight, bias)
    return F.linear(F.pad(x, (0, 0, 0, mp - m)), weight, bias)[:m]
