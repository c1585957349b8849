"""What the GPU will run, read from the cubin: a static report of every kernel variant a run launches.

    python -m reglue.kernels.report --arch 90 --preset reglue-sit-xl-2 --json OUT.json [--markdown OUT.md]
    python -m reglue.kernels.report --measure ...     # on a GPU: measured µs beside each floor

No GPU needed. The fused ops are called at the run's real shapes on CPU tensors while their
Triton launches are *recorded* instead of run (``recording_launches``); each recorded launch is
specialised by Triton's own JIT binder (``triton.runtime.jit.create_function_from_signature`` and
``JITFunction._pack_args``, as ``JITFunction.run`` does on a GPU: 16-byte alignment of pointers
and divisibility of ints by 16 become ``tt.divisibility`` attributes, constexprs are bound), then
compiled with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` by the bundled ptxas.
The cubin is read with the bundled ``cuobjdump``: registers, local memory, spill instructions
(STL/LDL), shared memory, the width of every global load/store, tensor-core instructions
(HMMA = ``mma``, HGMMA = ``wgmma``) and asynchronous copies (LDGSTS = ``cp.async``, UTMALDG = TMA).

The figures are compiler facts (static instruction counts, not executed ones) and roofline
floors from data-sheet peaks (``reglue.kernels.roofline``), not measured speeds. Run with
TRITON_INTERPRET unset: under the interpreter the kernels are not compiled at all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from triton.runtime.autotuner import Autotuner

from . import _partials, _utils, adaln, conv, rmsnorm
from .roofline import SM_COUNT, compressor_encoder_convs, conv3x3_bytes_flops, floor_us, row_op_bytes

KERNELS = {
    "adaln_fwd": (adaln, "_adaln_fwd_tuned"),
    "adaln_bwd": (adaln, "_adaln_bwd_kernel"),
    "rms_norm_fwd": (rmsnorm, "_rms_norm_fwd_tuned"),
    "rms_norm_bwd": (rmsnorm, "_rms_norm_bwd_kernel"),
    "conv3x3": (conv, "_conv3x3_tuned"),
    "column_sum": (_partials, "_column_sum_kernel"),
}
"""Every Triton kernel the launchers of reglue.kernels call: name -> (module, attribute); the
forward kernels are autotuned (each candidate config is its own variant here); ``column_sum``
finishes every backward's (N, D) / (D,) gradients from their fp32 partial rows."""

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# Per-SM limits of sm_80 / sm_90 (CUDA occupancy calculator): registers, threads, blocks, shared
# memory usable by blocks, the driver's per-block shared reservation, register allocation unit.
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024
REG_ALLOC_UNIT = 256  # registers, per warp


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The shapes the fused ops see in one rank's training step.

    batch: images per GPU; tokens: T of the SiT sequence; feature_grid: side of the DINOv2 map the
    compressor encodes; compressor_channels: None without the REGLUE compressor."""

    batch: int
    tokens: int
    hidden_size: int
    head_dim: int
    num_heads: int
    qk_norm: bool
    compressor_channels: Optional[Tuple[int, ...]]
    feature_grid: int
    dtype: torch.dtype = torch.bfloat16
    conv_dtype: torch.dtype = torch.bfloat16
    tf32: bool = False
    """fp32 convolutions run TF32 (``torch.backends.cuda.matmul.allow_tf32``, which the trainer sets on CUDA)."""


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its arguments as the launcher passed them, the grid, and
    which op (and fwd/bwd) launched it."""

    kernel_name: str
    kernel: object
    args: tuple
    kwargs: dict
    grid: tuple
    op: str = ""
    mode: str = ""
    candidate: str = ""


@contextlib.contextmanager
def recording_launches(record: List[Launch], sm_count: int):
    """Within the block, ``kernel[grid](...)`` of every reglue kernel appends a Launch to ``record``
    instead of running, and the ops take their Triton path on CPU tensors (the launchers' own
    layout, tile and stride decisions are what is recorded) with ``sm_count`` SMs to size for."""
    if _utils.interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it")
    saved = []
    for name, (module, attr) in KERNELS.items():
        kernel = getattr(module, attr)

        def run(*args, grid, warmup, _name=name, _kernel=kernel, **kwargs):
            if not isinstance(_kernel, Autotuner):
                record.append(Launch(_name, _kernel, args, kwargs, tuple(grid)))
                return
            _kernel.nargs = dict(zip(_kernel.arg_names, args))  # what prune_configs reads
            candidates = _kernel.prune_configs(kwargs)
            for i, config in enumerate(candidates):
                full = {**kwargs, **config.all_kwargs()}
                record.append(Launch(_name, _kernel.fn, args, full, tuple(grid({**_kernel.nargs, **full})),
                                     candidate=f"{i + 1}/{len(candidates)}"))
            _kernel.nargs = None

        saved.append((kernel, kernel.__dict__.get("run")))
        kernel.run = run
    patched = [(m, "can_run_triton", lambda t: True) for m in (adaln, conv, rmsnorm)]
    patched += [(m, "reduction_programs", lambda device: 4 * sm_count) for m in (adaln, rmsnorm)]
    patched = [(m, name, new, getattr(m, name)) for m, name, new in patched]
    for module, name, new, _ in patched:
        setattr(module, name, new)
    try:
        yield record
    finally:
        for module, name, _, value in patched:
            setattr(module, name, value)
        for kernel, run in saved:
            if run is None:
                del kernel.run
            else:
                kernel.run = run


def _tag(record: List[Launch], start: int, op: str, mode: str) -> None:
    for launch in record[start:]:
        launch.op, launch.mode = op, mode


def record_run_launches(shapes: RunShapes, arch: int, device: str = "cpu") -> List[Launch]:
    """The kernel launches of one training step at ``shapes`` on sm_``arch`` (each distinct call
    once): a SiT block's three adaLN ops forward and backward, the final layer's modulation, QK
    RMSNorm when enabled, and the compressor encoder's convolutions (inference). The grid-stride
    reductions size their grids for that GPU's SM count, as they would on it. ``device="cuda"``
    records on GPU tensors (of this GPU's SM count), which ``measure_us`` then launches for real."""
    n, t, d, dt = shapes.batch, shapes.tokens, shapes.hidden_size, shapes.dtype
    record: List[Launch] = []
    sm_count = (torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda"
                else SM_COUNT[arch])

    def empty(*shape, dtype=dt):
        return torch.empty(shape, dtype=dtype, device=device)

    def leaf(*shape):
        return empty(*shape).requires_grad_()

    def step(op: str, fn, *inputs):
        start = len(record)
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        _tag(record, start, op, "fwd")
        start = len(record)
        torch.autograd.grad(outs, inputs, [torch.empty_like(o) for o in outs], allow_unused=True)
        _tag(record, start, op, "bwd")

    with recording_launches(record, sm_count), _utils.tf32_allowed(shapes.tf32):
        x, y = leaf(n, t, d), leaf(n, t, d)
        block_mod = leaf(n, 6 * d)  # SiTBlock: adaLN_modulation(c).chunk(6) gives strided views
        shift, scale, gate = block_mod[:, :d], block_mod[:, d:2 * d], block_mod[:, 2 * d:3 * d]
        step("adaln_modulate", lambda: adaln.adaln_modulate(x, shift, scale, eps=1e-6), x, block_mod)
        step("gated_residual_adaln", lambda: adaln.gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6),
             x, y, block_mod)
        step("gated_residual", lambda: adaln.gated_residual(x, y, gate), x, y, block_mod)
        final_mod = leaf(n, 2 * d)  # FinalLayer: chunk(2)
        step("adaln_modulate (final layer)",
             lambda: adaln.adaln_modulate(x, final_mod[:, :d], final_mod[:, d:], eps=1e-6), x, final_mod)
        if shapes.qk_norm:  # Attention: q of qkv (N, T, 3, H, hd).permute(2, 0, 3, 1, 4)
            qkv = leaf(n, t, 3, shapes.num_heads, shapes.head_dim)
            q = qkv.permute(2, 0, 3, 1, 4)[0]
            w = leaf(shapes.head_dim)
            step("rms_norm (q/k)", lambda: rmsnorm.rms_norm(q, w, 1e-6), qkv, w)
        if shapes.compressor_channels:
            g = shapes.feature_grid
            with torch.no_grad():
                for c_in, c_out, residual, relu in compressor_encoder_convs(shapes.compressor_channels):
                    start = len(record)
                    cl = torch.channels_last  # compressor_encode_fused runs NHWC throughout
                    xc = empty(n, c_in, g, g, dtype=shapes.conv_dtype).contiguous(memory_format=cl)
                    res = empty(n, c_out, g, g, dtype=shapes.conv_dtype).contiguous(memory_format=cl) if residual else None
                    weight = conv.pack_conv_weight(empty(c_out, c_in, 3, 3, dtype=shapes.conv_dtype))
                    conv.fused_conv2d(xc, weight, empty(c_out, dtype=shapes.conv_dtype), res, relu)
                    _tag(record, start, f"conv {c_in}->{c_out}{' +res' if residual else ''}{' relu' if relu else ''}", "fwd")
    return record


# --------------------------------------------------------------------------------------------
# Specialise and compile as the JIT would
# --------------------------------------------------------------------------------------------


def specialise(launch: Launch, arch: int):
    """(ASTSource, options) for ``launch`` on sm_``arch``, computed by Triton's JIT binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def variant_key(launch: Launch, arch: int) -> str:
    """What makes two launches the same compiled kernel: the source and its specialisation."""
    src, options = specialise(launch, arch)
    return f"{launch.kernel_name}|{src.signature}|{src.constants}|{src.attrs}|{options}"


def specialisation(launch: Launch, arch: int) -> Dict:
    """The launch's specialisation as the JIT computes it: ``signature``, each runtime argument's
    type (``*bf16`` a pointer, ``i32``, ``fp32``); ``specialisation``, each argument the binder
    specialised: ``"16"`` where it asserts divisibility by 16 (a pointer's 16-byte alignment, an
    int's value: ``tt.divisibility``), the value where an int became a constant (1)."""
    src, _ = specialise(launch, arch)
    names = list(src.signature)
    declared = {p.name for p in launch.kernel.params if p.is_constexpr}
    special = {names[path[0]]: str(value) for path, attrs in src.attrs.items()
               for attr, value in attrs if attr == "tt.divisibility"}
    special.update({names[path[0]]: value for path, value in src.constants.items() if names[path[0]] not in declared})
    return {"signature": {name: ty for name, ty in src.signature.items() if ty != "constexpr"}, "specialisation": special}


def compact_specialisation(row: Dict) -> str:
    """``X,Y *bf16:16; M i32; stride *i32:16; out_sc=1``: the arguments grouped by type, ``:16``
    for divisibility by 16, ``=v`` for an int specialised to a constant."""
    groups: List[Tuple[str, List[str]]] = []
    special = row["specialisation"]
    for name, ty in list(row["signature"].items()) + [(n, None) for n in special if n not in row["signature"]]:
        kind = f"={special[name]}" if ty is None else f" {ty}" + (f":{special[name]}" if name in special else "")
        if groups and groups[-1][0] == kind and ty is not None:
            groups[-1][1].append(name)
        else:
            groups.append((kind, [name]))
    return "; ".join(",".join(names) + kind for kind, names in groups)


def compile_launch(launch: Launch, arch: int):
    """The CompiledKernel (cubin in ``.asm["cubin"]``) Triton builds for ``launch`` on sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, options = specialise(launch, arch)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


# --------------------------------------------------------------------------------------------
# Reading the cubin
# --------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _access_bits(opcode: str) -> int:
    """Width in bits of a global load/store opcode (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32)."""
    parts = opcode.split(".")
    for bits in ("128", "64"):
        if bits in parts:
            return int(bits)
    if any(p in ("U16", "S16") for p in parts):
        return 16
    if any(p in ("U8", "S8") for p in parts):
        return 8
    return 32


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


INSTRUCTION_FACTS = ("spill_instructions", "global_loads", "global_loads_128", "global_stores", "global_stores_128",
                     "narrowest_load_bits", "plain_loads_before_last_cp_async", "cp_async", "tma_loads", "mma", "wgmma",
                     "fma_fp32")
"""The facts :func:`sass_facts` reads from the disassembly (the others come from the resource usage)."""


def sass_facts(cubin: bytes, instructions: bool = True) -> Dict:
    """Registers, local memory and (``instructions``) the instruction mix of one kernel's cubin
    (static counts). The disassembly costs ~0.3 s of CPU per cubin, the resource usage ~3 ms:
    without ``instructions`` the :data:`INSTRUCTION_FACTS` are None."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        if instructions:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    resources = {"registers": int(usage.get("REG", 0)), "local_bytes": int(usage.get("LOCAL", 0)),
                 "stack_bytes": int(usage.get("STACK", 0))}
    if not instructions:
        return {**resources, **dict.fromkeys(INSTRUCTION_FACTS)}
    ops = [m.group(1) for line in sass.splitlines() if (m := _OPCODE.match(line))]
    loads = [_access_bits(o) for o in ops if o.startswith(("LDG.", "LDGSTS."))]  # cp.async reads global memory too
    stores = [_access_bits(o) for o in ops if o.startswith("STG.")]
    return {
        **resources,
        "spill_instructions": sum(o.startswith(("STL", "LDL")) for o in ops),
        "global_loads": len(loads),
        "global_loads_128": sum(b == 128 for b in loads),
        "global_stores": len(stores),
        "global_stores_128": sum(b == 128 for b in stores),
        "narrowest_load_bits": min(loads) if loads else None,
        "plain_loads_before_last_cp_async": _plain_loads_before_last_cp_async(ops),
        "cp_async": sum(o.startswith("LDGSTS") for o in ops),
        "tma_loads": sum(o.startswith("UTMALDG") for o in ops),
        "mma": sum(o.startswith("HMMA") for o in ops),
        "wgmma": sum(o.startswith("HGMMA") for o in ops),
        "fma_fp32": sum(o.startswith("FFMA") for o in ops),
    }


def _plain_loads_before_last_cp_async(ops: Sequence[str]) -> int:
    """Plain global loads (LDG) issued before the kernel's last cp.async: in the prologue and the
    pipelined main loop. 0 means every operand of the loop arrives by cp.async (the loads after
    it are the epilogue's: bias, residual)."""
    cp = [i for i, o in enumerate(ops) if o.startswith("LDGSTS")]
    return sum(o.startswith("LDG.") for o in ops[:cp[-1]]) if cp else 0


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> Dict:
    """Resident blocks and warps per SM from registers, shared memory and block size, and which of
    the three limits it."""
    warp_regs = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (REGS_PER_SM // warp_regs) // num_warps,
        "threads": MAX_WARPS_PER_SM // num_warps,
        "shared memory": SHARED_PER_SM[arch] // (shared + SHARED_RESERVED_PER_BLOCK),
        "blocks": MAX_BLOCKS_PER_SM,
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / MAX_WARPS_PER_SM, "occupancy_limit": limiter}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _bytes_flops(launch: Launch, shapes: RunShapes) -> Tuple[int, int]:
    """Minimum traffic and FLOPs of the op behind ``launch`` at the run's shape."""
    n, t, d = shapes.batch, shapes.tokens, shapes.hidden_size
    elem = shapes.dtype.itemsize
    if launch.kernel_name == "column_sum":  # read the fp32 partial rows, write the sums
        part, out = launch.args[0], launch.args[1]
        return part.numel() * part.element_size() + out.numel() * out.element_size(), 0
    if launch.kernel_name.startswith("conv"):
        x, c_in, c_out = launch.args[0], launch.args[6], launch.args[7]
        return conv3x3_bytes_flops(x.shape[0], c_in, c_out, x.shape[2], x.shape[3], x.element_size(),
                                   launch.kwargs["HAS_RESIDUAL"])
    op = launch.op.split(" ")[0]
    if op == "rms_norm":
        return row_op_bytes("rms_norm", (n, shapes.num_heads, t, shapes.head_dim), 1, elem, launch.mode), 0
    return row_op_bytes(op, (n, t, d), n, elem, launch.mode), 0


_compiled: Dict[str, Tuple[object, bytes, Dict]] = {}


def _compile_and_read(key: str, launch: Launch, arch: int, instructions: bool = True):
    """(metadata, cubin facts) of a variant, compiled once per process (disassembled once, when
    ``instructions`` is first asked for)."""
    if key not in _compiled:
        compiled = compile_launch(launch, arch)
        cubin = compiled.asm["cubin"]
        _compiled[key] = compiled.metadata, cubin, sass_facts(cubin, instructions)
    meta, cubin, facts = _compiled[key]
    if instructions and facts["spill_instructions"] is None:
        facts = sass_facts(cubin)
        _compiled[key] = meta, cubin, facts
    return meta, facts


def report_rows(shapes: RunShapes, arch: int, launches: Optional[Sequence[Launch]] = None,
                measure: bool = False, instructions: Callable[[str], bool] = lambda kernel: True) -> List[Dict]:
    """One row per distinct compiled variant a run at ``shapes`` launches on sm_``arch``;
    ``measure`` (on a CUDA GPU of that arch) adds each variant's measured median µs;
    ``instructions(kernel name)`` False: that kernel's rows have no instruction mix (None)."""
    if launches is None:
        launches = record_run_launches(shapes, arch, "cuda" if measure else "cpu")
    rows: Dict[str, Dict] = {}
    for launch in launches:
        key = variant_key(launch, arch)
        if key in rows:
            rows[key]["ops"].append(f"{launch.op} {launch.mode}")
            continue
        row = {"kernel": launch.kernel_name, "ops": [f"{launch.op} {launch.mode}"], "arch": f"sm_{arch}",
               "constexprs": {k: v for k, v in launch.kwargs.items() if k not in _OPTIONS},
               **specialisation(launch, arch),
               "grid": list(launch.grid), "autotune_candidate": launch.candidate}
        try:
            meta, facts = _compile_and_read(key, launch, arch, instructions(launch.kernel_name))
        except Exception as exc:  # every failing variant is reported, not just the first
            row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            rows[key] = row
            continue
        occ = occupancy(facts["registers"], meta.shared, meta.num_warps, arch)
        ctas = 1
        for g in launch.grid:
            ctas *= int(g)
        bytes_, flops = _bytes_flops(launch, shapes)
        row.update(
            cubin=_cubin_path(meta),
            num_warps=meta.num_warps, num_stages=meta.num_stages, shared_bytes=meta.shared,
            **facts, **occ,
            ctas=ctas, waves=ctas / (occ["blocks_per_sm"] * SM_COUNT[arch]) if occ["blocks_per_sm"] else None,
            bytes=bytes_, flops=flops, floor_us=floor_us(bytes_, flops, arch),
        )
        if measure:
            row["measured_us"] = round(measure_us(launch), 2)
        rows[key] = row
    return list(rows.values())


def measure_us(launch: Launch) -> float:
    """Median µs of ``launch`` run for real on its (CUDA) tensors, by ``triton.testing.do_bench``.
    The tensors hold whatever memory they were given: the time, not the values, is wanted."""
    import triton.testing

    def run():
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)

    return triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median") * 1e3


def _cubin_path(meta) -> str:
    """Where Triton's cache keeps this variant's cubin (TRITON_CACHE_DIR, default ~/.triton/cache)."""
    from triton.runtime.cache import get_cache_manager

    return os.path.join(get_cache_manager(meta.hash).cache_dir, f"{meta.name}.cubin")


def share_128(row: Dict) -> Optional[float]:
    """Fraction of the kernel's global load/store instructions that move 128 bits."""
    total = row["global_loads"] + row["global_stores"]
    return (row["global_loads_128"] + row["global_stores_128"]) / total if total else None


def limiter(row: Dict) -> str:
    """What bounds the kernel, in words: the roofline side and anything in its code that keeps it off the floor."""
    notes = []
    bound = "compute" if row["flops"] and row["flops"] / row["bytes"] > _ridge(row) else "memory"
    notes.append(f"{bound}-bound")
    if row["spill_instructions"]:
        notes.append(f"{row['spill_instructions']} spill instructions")
    share = share_128(row)
    if share is not None and share < 1:
        notes.append(f"{share:.0%} of global accesses 128-bit (narrowest {row['narrowest_load_bits']} bit)")
    if row["occupancy"] < 0.5:
        notes.append(f"occupancy {row['occupancy']:.0%} ({row['occupancy_limit']})")
    sms = SM_COUNT[int(row["arch"][3:])]
    if row["ctas"] < sms:
        notes.append(f"grid of {row['ctas']} CTAs leaves {sms - row['ctas']} of {sms} SMs idle")
    elif row["waves"] is not None and row["waves"] < 1:
        notes.append(f"one partial wave ({row['waves']:.0%} of the resident CTA slots)")
    if row["flops"] and not (row["mma"] or row["wgmma"]):
        notes.append("no tensor-core MMA")
    return "; ".join(notes)


def expectation(row: Dict) -> str:
    """What a GPU run of the variant should show: its floor, and the bar it is held to."""
    if row["flops"] and row["flops"] / row["bytes"] > _ridge(row):
        return f">= {row['floor_us']:.1f} µs (tensor-core bound); target <= {row['floor_us'] / 0.6:.1f} µs (60% of the dense peak)"
    return f">= {row['floor_us']:.1f} µs (bandwidth bound); target <= {row['floor_us'] / 0.85:.1f} µs (85% of peak bandwidth)"


def _ridge(row: Dict) -> float:
    from .roofline import PEAKS

    bandwidth, peak = PEAKS[int(row["arch"][3:])]
    return peak / bandwidth


def markdown(rows: Sequence[Dict], title: str) -> str:
    """The report as a markdown table, a line per kernel variant."""
    lines = [f"## {title}", "",
             "| kernel | ops | warps | regs | spills | smem KB | blocks/SM (warps) | 128-bit ld/st | MMA | cp.async/TMA | CTAs (waves) | MB | GFLOP | floor µs | measured µs | limits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ops = ", ".join(row["ops"])
        if "error" in row:
            lines.append(f"| {row['kernel']} | {ops} | FAILED to compile: {row['error'].splitlines()[0]} |")
            continue
        share = share_128(row)
        mma = f"wgmma {row['wgmma']}" if row["wgmma"] else (f"mma {row['mma']}" if row["mma"] else "-")
        asyncs = f"cp.async {row['cp_async']}" if row["cp_async"] else (f"TMA {row['tma_loads']}" if row["tma_loads"] else "-")
        waves = f"{row['ctas']} ({row['waves']:.2f})" if row["waves"] is not None else str(row["ctas"])
        lines.append(
            f"| {row['kernel']} {_flags(row)} | {ops} | {row['num_warps']} | {row['registers']} | {row['spill_instructions']} "
            f"| {row['shared_bytes'] / 1024:.1f} | {row['blocks_per_sm']} ({row['warps_per_sm']}) "
            f"| {'-' if share is None else f'{share:.0%}'} ({row['global_loads_128']}/{row['global_loads']} ld, "
            f"{row['global_stores_128']}/{row['global_stores']} st) | {mma} | {asyncs} | {waves} "
            f"| {row['bytes'] / 1e6:.1f} | {row['flops'] / 1e9:.1f} | {row['floor_us']:.1f} | {row.get('measured_us', '')} "
            f"| {limiter(row)} |")
    lines += ["", "What limits each variant, and what the GPU should show (the targets are bars to hold a GPU run to, "
              "not measurements):", ""]
    lines += [f"- `{row['kernel']} {_flags(row)}` ({', '.join(row['ops'])}): {limiter(row)}. GPU: {expectation(row)}. "
              f"Launch specialisation: `{compact_specialisation(row)}`."
              for row in rows if "error" not in row]
    return "\n".join(lines) + "\n"


DOC_HEADER = """# Kernel report: what the compiler builds for the GPU

Generated by `python -m reglue.kernels.report --arch 90,80 --preset reglue-sit-xl-2 --qk-norm --markdown docs/kernels-sm90.md`
(no GPU needed). Every launch a SiT-XL/2 REGLUE training step makes (32 images per GPU) is recorded
from the real launchers, specialised as Triton's JIT specialises it at launch, compiled by the
bundled ptxas and read back from the cubin with cuobjdump. Registers, spills, shared memory,
occupancy, access widths and instruction counts are **compiler facts** (static counts); the floors
are **roofline floors** from data-sheet peaks (H100 SXM 3.35 TB/s and 989 TFLOP/s dense bf16;
A100 SXM 2.0 TB/s and 312 TFLOP/s) at the minimum traffic of each op. None of it is a measured
speed: `bash bench/gpu_validate.sh` fills the measured µs column on a GPU (`--measure`).
QK RMSNorm rows apply with `model.qk_norm=true` (off in the paper presets).

"""


def _flags(row: Dict) -> str:
    c = row["constexprs"]
    on = [k.removeprefix("HAS_").lower() for k, v in c.items() if isinstance(v, bool) and v]
    if row.get("signature", {}).get("X") == "*fp32" and "PRECISION" in c:  # fp32 dots: TF32 or exact
        on.append(c["PRECISION"])
    blocks = " ".join(f"{k[6:]}{v}" for k, v in sorted(c.items()) if k.startswith("BLOCK"))
    tuned = f" autotune {row['autotune_candidate']}" if row.get("autotune_candidate") else ""
    return f"[{' '.join(on)}{' ' if on else ''}{blocks}{tuned}]"


def shapes_of_preset(name: str, batch: int) -> RunShapes:
    """The shapes of one rank of a preset run with ``batch`` images per GPU, bf16 on a GPU.

    The one import from the config layer (the command line's preset), kept here, out of the kernels."""
    from reglue.presets import get_preset

    config = get_preset(name)
    sizes = config.model.sizes()
    grid = config.data.latent_size // sizes["patch_size"]
    compressor = config.method.semantic == "compressor"
    return RunShapes(
        batch=batch, tokens=grid * grid + int(config.method.use_cls), hidden_size=sizes["hidden_size"],
        head_dim=sizes["hidden_size"] // sizes["num_heads"], num_heads=sizes["num_heads"], qk_norm=config.model.qk_norm,
        compressor_channels=tuple(config.encoders.compressor_channels) if compressor else None,
        feature_grid=(config.data.image_size * 224 // 256) // 14,
        dtype=torch.bfloat16 if config.parallel.param_dtype == "bf16" else torch.float32,
        conv_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.encoders.dtype],
        tf32=True,  # the trainer allows TF32 on CUDA
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capabilities, comma-separated (80: A100, 90: H100)")
    parser.add_argument("--preset", default="reglue-sit-xl-2")
    parser.add_argument("--batch", type=int, default=32, help="images per GPU (the published 256 over 8 GPUs: 32)")
    parser.add_argument("--qk-norm", action="store_true", help="also report QK RMSNorm (model.qk_norm=true)")
    parser.add_argument("--measure", action="store_true",
                        help="on a CUDA GPU: also time each variant (its arch replaces --arch)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", help="write the markdown report here")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
        bad = [a for a in archs if a not in SM_COUNT]
        if bad:
            raise ValueError(f"--arch {bad[0]} is not one of {sorted(SM_COUNT)}")
        shapes = shapes_of_preset(args.preset, args.batch)
    except (KeyError, ValueError) as exc:
        print(f"reglue.kernels.report: {exc.args[0]}", file=sys.stderr)
        return 2
    if _utils.interpreter_enabled():
        print("reglue.kernels.report: TRITON_INTERPRET is set, so the kernels are interpreted, not compiled; unset it",
              file=sys.stderr)
        return 2
    if args.measure:
        if not torch.cuda.is_available():
            print("reglue.kernels.report: --measure needs a CUDA GPU", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        archs = [10 * major + minor]
        if archs[0] not in SM_COUNT:
            print(f"reglue.kernels.report: no peaks for sm_{archs[0]} (known: {sorted(SM_COUNT)})", file=sys.stderr)
            return 2
    if args.qk_norm:
        shapes = dataclasses.replace(shapes, qk_norm=True)
    reports = []
    for arch in archs:
        title = (f"{args.preset}, sm_{arch}: N={shapes.batch}, T={shapes.tokens}, D={shapes.hidden_size}, "
                 f"head_dim={shapes.head_dim}, compressor {shapes.compressor_channels} on "
                 f"{shapes.feature_grid}x{shapes.feature_grid}")
        reports.append({"title": title, "arch": arch, "rows": report_rows(shapes, arch, measure=args.measure)})
    text = DOC_HEADER + "\n".join(markdown(r["rows"], r["title"]) for r in reports)
    if args.json:
        shape_record = dataclasses.asdict(shapes) | {"dtype": str(shapes.dtype), "conv_dtype": str(shapes.conv_dtype)}
        with open(args.json, "w") as f:
            json.dump({"shapes": shape_record, "reports": reports}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)
    return 1 if any("error" in row for r in reports for row in r["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())

