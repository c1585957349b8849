"""Column sums of fp32 partial rows: how a backward's (N, D) / (D,) gradients are finished.

The backward kernels write one fp32 partial row per program (no atomics: deterministic); every
partial of one backward lives in one (R, C, D) buffer, and ``column_sums`` adds each of its R
stacks of C rows in a fixed order in fp32 and stores the sums in the gradients' dtype: one launch
after the backward kernel, whatever the number of gradients, the cast included.
"""

import torch

from ._utils import cdiv, device_guard, empty_output, interpreter_enabled, next_power_of_2, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _column_sum_kernel(PART, OUT, C, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """OUT (R, D) = PART (R, C, D) summed over C (both contiguous); program (r, column block)
        walks the C rows BLOCK_C at a time: the same order on every call."""
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            offs = (r * C + c)[:, None] * D + cols[None, :]
            acc += tl.load(PART + offs, mask=(c < C)[:, None] & cmask[None, :], other=0.0)
        tl.store(OUT + r * D + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cmask)


def _column_tile(c: int, d: int) -> tuple:
    """(BLOCK_C, BLOCK_D): on a GPU column blocks of <= 256 fp32 (128-bit per thread at 4 warps)
    and 2048 elements a tile; the interpreter takes whole rows and few, big programs."""
    if interpreter_enabled():
        block_d = next_power_of_2(d)
        return max(1, min(next_power_of_2(c), 32768 // block_d)), block_d
    block_d = min(next_power_of_2(d), 256)
    return max(1, min(next_power_of_2(c), 2048 // block_d)), block_d


def column_sums(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, C, D) fp32 partial rows, contiguous -> (R, D) sums over C in ``dtype``, in one launch."""
    r, c, d = part.shape
    out = empty_output((r, d), dtype, part.device)
    if out.numel() == 0:
        return out
    block_c, block_d = _column_tile(c, d)
    with device_guard(part):
        _column_sum_kernel[(r, cdiv(d, block_d))](part, out, c, D=d, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4)
    return out
