"""Shared helpers for the Triton kernels: can Triton run here, tile sizes, dtype handling."""

import contextlib
import warnings

import torch


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


KERNEL_CHOICES = ("eager", "triton")
"""Implementations of the fused ops: ``triton`` kernels or their ``eager`` PyTorch references."""

FUSED_OPS = ("adaln_modulate", "gated_residual", "gated_residual_adaln", "rms_norm", "fused_conv2d")
"""The ops with a Triton kernel; each can run fused or as its ``*_ref`` on its own."""


def fused_op_set(kernels) -> frozenset:
    """The ops that run as Triton kernels for a ``kernels`` setting: ``"eager"`` none, ``"triton"``
    all, or a collection of names from FUSED_OPS (e.g. the ops that passed the self-check)."""
    if isinstance(kernels, str):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES} or a set of op names, got {kernels!r}")
        return frozenset(FUSED_OPS) if kernels == "triton" else frozenset()
    ops = frozenset(kernels)
    unknown = sorted(ops - set(FUSED_OPS))
    if unknown:
        raise ValueError(f"unknown fused ops {unknown}; known: {list(FUSED_OPS)}")
    return ops


# Probed once at import: a cached probe function would be re-traced by torch.compile.
_TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    """True when ``import triton`` works."""
    return _TRITON_AVAILABLE


def _probe_interpreter() -> bool:
    """Does ``@triton.jit`` build interpreted kernels in this process?

    Triton decides when a kernel is decorated (at import), from ``TRITON_INTERPRET`` parsed its
    own way ("1", "true", "on", any case). Asking a probe kernel gives the answer the real kernels
    got, so the interpreter-only paths (tile sizes, the bf16 dot upcast in conv.py) can never be
    taken by compiled kernels, nor skipped by interpreted ones, whatever the variable holds or
    however it changes later.
    """
    if not _TRITON_AVAILABLE:
        return False
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False

    @triton.jit
    def _probe():
        pass

    return isinstance(_probe, InterpretedFunction)


_INTERPRETER = _probe_interpreter()


def interpreter_enabled() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETER


def can_run_triton(t: torch.Tensor) -> bool:
    """Triton can launch on ``t``: a CUDA tensor with Triton installed, or any tensor under the interpreter."""
    if not triton_available():
        return False
    return t.is_cuda or interpreter_enabled()


@contextlib.contextmanager
def tf32_allowed(allowed: bool):
    """TF32 for cuDNN convolutions and for matmuls on (``allowed``) or off within the block; the
    previous settings come back after it. (fused_conv2d's fp32 dots follow the matmul setting.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device for a launch.

    Triton launches on the *current* CUDA device and stream, not on the device of its pointer
    arguments; a tensor on cuda:1 while cuda:0 is current fails ("Pointer argument cannot be
    accessed from Triton") or runs on the wrong GPU. Custom ops get no device guard from the
    dispatcher, so every launch is wrapped in this.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_warned: set = set()


def warn_fallback_once(op: str) -> None:
    """Warn once per op that the eager reference runs instead of the Triton kernel."""
    if op in _warned:
        return
    _warned.add(op)
    warnings.warn(
        f"reglue.kernels.{op}: Triton cannot run here (no CUDA device and TRITON_INTERPRET is not 1); "
        "using the eager PyTorch reference instead.",
        RuntimeWarning,
        stacklevel=3,
    )


# Kernels compute in fp32 and accept these storage dtypes.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Largest hidden size a row kernel holds in registers at once (one row = one tile).
MAX_ROW_SIZE = 65536


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def check_dtypes(op: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"reglue.kernels.{op}: dtype {t.dtype} is not supported (use fp32, bf16 or fp16)")


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Type promotion as eager PyTorch applies it to ``x + a * b``."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def row_tile(row_size: int, n_rows: int, per_thread: int = 16, interpreter: bool = None) -> tuple:
    """(BLOCK_M rows, BLOCK_D columns, num_warps) for kernels that hold whole rows in registers.

    A program covers at least one full row (statistics need the whole row). On a GPU the warps
    are sized from the row: a row vector (weight, shift/scale, partial sums) is spread over all
    threads of the program, and at >= 8 elements per thread (BLOCK_D / 256 warps) its 2-byte
    accesses stay 128-bit; rows of <= 256 columns share 4 warps. Rows are then stacked until a
    thread holds ``per_thread`` elements of each tile tensor (backward kernels, with more live
    tensors, ask for fewer). The interpreter prefers big tiles: its cost is per program and per op.
    ``interpreter``: the tile for that build (default: how this process's kernels were built).
    """
    if row_size > MAX_ROW_SIZE:
        raise ValueError(f"row size {row_size} exceeds the supported maximum {MAX_ROW_SIZE}")
    block_d = max(next_power_of_2(row_size), 16)
    if interpreter_enabled() if interpreter is None else interpreter:
        return max(1, min(32768 // block_d, next_power_of_2(n_rows))), block_d, 4
    num_warps = min(block_d // 256, 16) if block_d >= 512 else 4
    block_m = max(1, min(num_warps * 32 * per_thread // block_d, next_power_of_2(n_rows)))
    return block_m, block_d, num_warps


def row_candidates(row_size: int, n_rows: int, interpreter: bool = None) -> list:
    """(BLOCK_M, num_warps) tiles the autotuner of a forward row kernel times: row_tile's choice at
    16 elements per thread and the tile of half the rows (one candidate on the interpreter)."""
    return list(dict.fromkeys(row_tile(row_size, n_rows, per_thread, interpreter)[::2] for per_thread in (16, 8)))


def row_configs(interpreter: bool) -> list:
    """Every (BLOCK_M, num_warps) :func:`row_candidates` can return for that build, whatever the
    row size and count: the autotuner's declared configs (pruned to a shape's candidates)."""
    sizes = [1 << i for i in range(17)]  # row sizes and counts by power-of-two class, 1 .. MAX_ROW_SIZE
    return sorted({tile for d in sizes for m in sizes for tile in row_candidates(d, m, interpreter)})


def autotuned_rows(kernel):
    """``triton.autotune`` of a row kernel (arguments ``M``, constexprs ``D``, ``BLOCK_M``) over
    :func:`row_candidates`, keyed on (D, M): the launcher passes everything but BLOCK_M and
    num_warps, and a grid that reads META["BLOCK_M"]."""
    import triton

    configs = [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in row_configs(interpreter_enabled())]

    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        wanted = row_candidates(args["D"], args["M"])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.num_warps) in wanted]

    return triton.autotune(configs, key=["D", "M"], prune_configs_by={"early_config_prune": prune})(kernel)


def reduction_programs(device: torch.device) -> int:
    """How many programs a grid-stride reduction should launch: a few waves of SMs on a GPU,
    one on the interpreter (each program there is a Python loop)."""
    if device.type == "cuda" and not interpreter_enabled():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Tests set this so every buffer a kernel should fully write starts as NaN: an element the
# kernel forgets stays NaN and fails the comparison instead of passing on leftover memory.
poison_outputs = False


def empty_output(shape, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled when ``poison_outputs`` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poison_outputs:
        out.fill_(float("nan"))
    return out
