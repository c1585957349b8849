"""How a run executes, decided in one place.

- :func:`resolve_execution`: ``model.kernels``, ``parallel.compile`` and ``parallel.reference``
  resolved for the device at run start. ``auto`` = on CUDA the fused Triton ops (each checked
  once against its reference on this GPU; one that fails runs eager, loudly) and regional
  compile; on the CPU eager without compile. ``reference`` = the published execution.
- :func:`build_parallel_model`, in torchtitan's order: activation checkpointing per block ->
  regional ``torch.compile`` (each block, then the embedders, projectors and final layer) ->
  ``fully_shard`` per block then the root (FSDP2 on the run's mesh, ``reglue.train.mesh``: flat
  FSDP on one node, HSDP across nodes; bf16 params / ``parallel.reduce_dtype`` reductions on CUDA).
- :func:`loss_fn`: the training loss with its elementwise stages compiled; the frozen encoders
  compile their own regions (``reglue.train.targets``).
- :func:`execution_metrics`: what a metrics record says about all this.

The model holds architecture only; everything about execution is decided here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional

import torch
import torch._functorch.config
import torch.nn as nn

from reglue.config import Config, ParallelConfig
from reglue.diffusion.transport import loss_inputs, loss_terms, training_losses
from reglue.runtime import DistInfo
from reglue.train.mesh import ParallelMesh, build_mesh, ddp_mesh
from reglue.train.reference import PUBLISHED_FIND_UNUSED_PARAMETERS, autocast_forward, reference_autocast_dtype

log = logging.getLogger("reglue.parallelize")

COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False}
"""Every region: one graph, no graph breaks; static shapes (each step has the same shapes)."""


# --------------------------------------------------------------------------------------------
# What runs: kernels, compile, reference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """The resolved execution of a run on one device.

    fused_ops: ops of ``reglue.kernels`` that run as Triton kernels (the model's ``kernels``);
    eager_ops: ops the run uses that run as their PyTorch reference; failed_ops: op -> why it
    failed the device self-check; compile: regional torch.compile; attention: the SiT's backend.
    """

    fused_ops: FrozenSet[str]
    eager_ops: FrozenSet[str]
    compile: bool
    attention: str
    reference: bool = False
    failed_ops: Dict[str, str] = field(default_factory=dict)
    compile_fallback: bool = False
    """parallel.compile=auto: a region that fails to compile runs eager (``compile_region``)."""

    def summary(self) -> Dict:
        record = {"fused_ops": sorted(self.fused_ops), "eager_ops": sorted(self.eager_ops), "compile": self.compile,
                  "reference": self.reference}
        if self.failed_ops:  # the first line of each op's self-check error
            record["self_check_failed"] = {op: error.splitlines()[0] for op, error in sorted(self.failed_ops.items())}
        if compile_fallbacks:
            record["compile_fallbacks"] = dict(sorted(compile_fallbacks.items()))
        return record


def ops_used(config: Config) -> FrozenSet[str]:
    """The fused ops a run of ``config`` calls: the adaLN ops always, RMSNorm with QK-norm, the
    convolutions with the REGLUE compressor."""
    ops = {"adaln_modulate", "gated_residual", "gated_residual_adaln"}
    if config.model.qk_norm:
        ops.add("rms_norm")
    if config.method.semantic == "compressor":
        ops.add("fused_conv2d")
    return frozenset(ops)


def _needs_self_check(device: torch.device) -> bool:
    """Kernels meet the device before a run trusts them on CUDA; on the CPU they only run in the
    Triton interpreter (tests), which the kernel tests cover."""
    return device.type == "cuda"


def _check_sizes(config: Config):
    from reglue.kernels.selfcheck import CheckSizes

    sizes = config.model.sizes()
    grid = config.data.latent_size // sizes["patch_size"]
    channels = config.encoders.compressor_channels
    return CheckSizes(hidden_size=sizes["hidden_size"], head_dim=sizes["hidden_size"] // sizes["num_heads"],
                      tokens=grid * grid + int(config.method.use_cls), conv_channels=(channels[0], channels[1]))


def _self_checked(config: Config, device: torch.device, ops: FrozenSet[str]) -> Dict[str, str]:
    """op -> error for the ops that fail the self-check on ``device`` in the dtypes the run uses,
    agreed over ranks (an op runs fused only where it passed on every rank, so all ranks run the
    same arithmetic). The convolutions run only in the frozen encoders' dtype (the compressor
    encodes their features), so that is the one they are checked in; the other ops in fp32 and
    the dtypes of the parameters and the frozen encoders."""
    from reglue.kernels.selfcheck import check_fused_ops
    from reglue.models.encoders import frozen_dtype

    frozen = frozen_dtype(config.encoders.dtype, device)
    dtypes = {torch.float32, compute_param_dtype(config.parallel, device), frozen}
    order = sorted(ops)
    results = {}
    for group, group_dtypes in ((sorted(ops - {"fused_conv2d"}), dtypes), (sorted(ops & {"fused_conv2d"}), {frozen})):
        if group:
            results.update(check_fused_ops(device, sorted(group_dtypes, key=str), _check_sizes(config), group))
    passed = torch.tensor([results[op] is None for op in order], dtype=torch.int32, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(passed, op=torch.distributed.ReduceOp.MIN)
    return {op: results[op] or "failed the self-check on another rank" for op, ok in zip(order, passed.tolist()) if not ok}


_resolved: Dict[tuple, Execution] = {}


def resolve_execution(config: Config, device: torch.device) -> Execution:
    """The execution of ``config`` on ``device`` (cached: the self-check runs once per process)."""
    model, par = config.model, config.parallel
    key = (str(device), model.kernels, par.compile, par.reference, model.attention, ops_used(config),
           _check_sizes(config), par.param_dtype, config.encoders.dtype)
    if key in _resolved:
        return _resolved[key]
    used = ops_used(config)
    failed: Dict[str, str] = {}
    if par.reference:  # the published code runs timm attention (SDPA) and eager PyTorch
        execution = Execution(frozenset(), used, compile=False, attention="sdpa", reference=True)
    else:
        wants_kernels = model.kernels == "triton" or (model.kernels == "auto" and device.type == "cuda")
        if wants_kernels and _needs_self_check(device):
            failed = _self_checked(config, device, used)
        fused = used - set(failed) if wants_kernels else frozenset()
        compile_ = device.type == "cuda" if par.compile == "auto" else par.compile
        execution = Execution(frozenset(fused), used - fused, compile_, model.attention, failed_ops=failed,
                              compile_fallback=compile_ and par.compile == "auto")
    log.info("execution on %s: fused kernels %s, eager %s%s; compile %s%s", device, sorted(execution.fused_ops) or "none",
             sorted(execution.eager_ops) or "none", f" (failed the self-check: {sorted(failed)})" if failed else "",
             "per region" if execution.compile else "off", "; published reference execution" if par.reference else "")
    _resolved[key] = execution
    return execution


def execution_metrics(config: Config, device: torch.device) -> Dict:
    """For a metrics record: which ops run fused / eager, whether the step is compiled and, if it
    is, how many graphs have been compiled so far (constant after the first steps: no recompiles)."""
    execution = resolve_execution(config, device)
    record = execution.summary()
    if execution.compile:
        from torch._dynamo.utils import counters

        record["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    return record


compile_fallbacks: Dict[str, str] = {}
"""Regions that failed to compile under ``parallel.compile=auto`` and run eager in this process:
region name -> the error's first line (in the metrics' execution record)."""


def _is_compile_failure(exc: BaseException) -> bool:
    """Dynamo or Inductor failed (tracing, lowering, codegen, a backend compiler such as Triton's
    ptxas): torch raises all of these as TorchDynamoException (InductorError, BackendCompilerFailed)."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


class _EagerOnCompileFailure:
    """Calls ``compiled``; if it fails to compile (lazily, at a call: torch.compile compiles at the
    first call and at every recompile), warns once per region name, records it in
    :data:`compile_fallbacks`, and from then on calls ``eager``. Other errors propagate.

    The backward graph is compiled with the forward, inside this guard (:func:`compile_region`
    sets AOTAutograd's ``force_non_lazy_backward_lowering``): otherwise it compiles lazily at the
    first ``.backward()`` (static shapes), where a failure (Inductor, ptxas) would stop the run.
    Regions of one name are copies of one code (the N blocks of a
    model): once one has failed, the others run eager without compiling it again (the same
    failure, N times the compile time, otherwise)."""

    def __init__(self, compiled: Callable, eager: Callable, name: str, on_fallback: Callable = lambda: None):
        self.compiled, self.eager, self.name, self.on_fallback = compiled, eager, name, on_fallback
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed and self.name in compile_fallbacks:  # a copy of this region failed to compile
            self.failed = True
            self.on_fallback()
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                if not _is_compile_failure(exc):
                    raise
                self.failed = True
                self.on_fallback()
                if self.name not in compile_fallbacks:
                    compile_fallbacks[self.name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    log.warning("\n%s\nCOMPILE FAILED: region %r runs eager for this process (parallel.compile=auto; "
                                "--compile makes this an error). Error:\n%s\n%s", "!" * 100, self.name, exc, "!" * 100)
        return self.eager(*args, **kwargs)


def compile_region(fn: Callable, name: str = "", fallback: bool = False) -> Callable:
    """``torch.compile`` with :data:`COMPILE_OPTIONS`; a module compiles in place (``module.compile``
    keeps its state-dict keys free of ``_orig_mod.``) and is returned.

    ``fallback`` (``parallel.compile=auto``): a compile failure of this region, whenever it comes
    (at its first call), makes the region run eager instead of stopping the run, with one warning
    naming it (``name``) and an entry in the metrics. Without it (``parallel.compile=true``) the
    failure propagates. Ranks decide on their own: the collectives (FSDP2's hooks) sit outside
    the compiled regions, so a rank whose region fell back still runs the same collectives, and
    computes the same math eagerly (rounding may differ from the compiled ranks). With ``fallback``
    every backward graph of this process compiles with its forward (a process-wide AOTAutograd
    setting, set once: a config patch around each call would cost ~13 us per region per step),
    at the first call and at any recompile alike, so its failure falls back too."""
    name = name or getattr(fn, "__name__", type(fn).__name__)
    if fallback:
        torch._functorch.config.force_non_lazy_backward_lowering = True
    if isinstance(fn, nn.Module):
        fn.compile(**COMPILE_OPTIONS)
        if fallback:
            def to_eager(module=fn):
                module._compiled_call_impl = None  # nn.Module.__call__ then runs _call_impl eagerly

            fn._compiled_call_impl = _EagerOnCompileFailure(fn._compiled_call_impl, fn._call_impl, name, to_eager)
        return fn
    compiled = torch.compile(fn, **COMPILE_OPTIONS)
    return _EagerOnCompileFailure(compiled, fn, name) if fallback else compiled


@functools.lru_cache(maxsize=None)
def _compiled_loss(fallback: bool) -> Callable:
    return functools.partial(training_losses, inputs_fn=compile_region(loss_inputs, "loss inputs", fallback),
                             terms_fn=compile_region(loss_terms, "loss terms", fallback))


def loss_fn(config: Config, device: torch.device) -> Callable:
    """``training_losses``, with its stages before and after the model compiled when the run
    compiles (the model's own regions are compiled separately); same signature."""
    execution = resolve_execution(config, device)
    return _compiled_loss(execution.compile_fallback) if execution.compile else training_losses


# --------------------------------------------------------------------------------------------
# The model: activation checkpointing -> compile -> FSDP2
# --------------------------------------------------------------------------------------------


def _sac_policy():
    """Selective AC: keep matmul and attention outputs, recompute the cheap elementwise ops."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default}
    # FlashAttention-2/3 register their kernels as torch ops when installed: never recompute those.
    for namespace, name in (("flash_attn", "_flash_attn_forward"), ("flash_attn_3", "fwd"), ("xformers", "efficient_attention_forward_cutlass")):
        op = getattr(getattr(torch.ops, namespace, None), name, None) if hasattr(torch.ops, namespace) else None
        if op is not None and hasattr(op, "default"):
            save.add(op.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(block: nn.Module, mode: str) -> nn.Module:
    if mode == "off":
        return block
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "full":
        return checkpoint_wrapper(block, preserve_rng_state=False)
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return checkpoint_wrapper(
        block, preserve_rng_state=False, context_fn=functools.partial(create_selective_checkpoint_contexts, _sac_policy())
    )


def compute_param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    """FSDP2 compute dtype of the parameters: ``parallel.param_dtype`` on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if (device.type == "cuda" and cfg.param_dtype == "bf16") else torch.float32


def reduce_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    """dtype of FSDP2's gradient reductions: ``parallel.reduce_dtype`` on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if (device.type == "cuda" and cfg.reduce_dtype == "bf16") else torch.float32


def use_fsdp(dist_info: DistInfo) -> bool:
    """FSDP2 whenever several ranks train, and on a single GPU (for its mixed-precision policy)."""
    return dist_info.distributed or dist_info.device.type == "cuda"


def run_mesh(config: Config, dist_info: DistInfo) -> ParallelMesh:
    """The run's mesh (:mod:`reglue.train.mesh`), with a ``DeviceMesh`` when the run shards; the
    published reference execution runs DDP on the default group (:func:`ddp_mesh`)."""
    if config.parallel.reference:
        return ddp_mesh(config.parallel, dist_info)
    return build_mesh(config.parallel, dist_info, shards=use_fsdp(dist_info))


def build_parallel_model(config: Config, dist_info: DistInfo, mesh: Optional[ParallelMesh] = None) -> nn.Module:
    """The run's SiT, built on the meta device, parallelised on ``mesh`` (default: :func:`run_mesh`),
    and materialised on the device.

    ``parallel.reference`` instead reproduces the published execution (``reglue.train.reference``):
    an eager fp32 model whose forward runs under the recipe's autocast (fp16 recipes on CUDA),
    wrapped in DDP when several ranks train.
    """
    from reglue.models import build_model

    cfg = config.parallel
    execution = resolve_execution(config, dist_info.device)
    with torch.device("meta"):
        model = build_model(config, kernels=execution.fused_ops, attention=execution.attention)
    if execution.reference:
        materialize(model, dist_info.device, config.train.seed)
        autocast_dtype = reference_autocast_dtype(config, dist_info.device)
        if autocast_dtype is not None:
            autocast_forward(model, dist_info.device.type, autocast_dtype)
        if dist_info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[dist_info.device] if dist_info.device.type == "cuda" else None,
                                            find_unused_parameters=PUBLISHED_FIND_UNUSED_PARAMETERS[config.method.name])
        return model
    mesh = mesh or run_mesh(config, dist_info)
    return materialize(parallelize(model, cfg, dist_info, mesh, execution.compile), dist_info.device, config.train.seed)


def compile_model(model: nn.Module, fallback: bool = False) -> None:
    """Regional compile of a SiT: every block (one graph shared by all of them), then the embedders
    (``embed``), the REPA projectors (``project``) and the final layer (``head``); ``fallback``
    as in :func:`compile_region`."""
    for block in model.blocks:
        compile_region(block, "SiT block", fallback)
    model.embed = compile_region(model.embed, "SiT embedders", fallback)
    if len(model.projectors):
        model.project = compile_region(model.project, "REPA projectors", fallback)
    model.head = compile_region(model.head, "SiT final layer", fallback)


def parallelize(model: nn.Module, cfg: ParallelConfig, dist_info: DistInfo, mesh: ParallelMesh, compile: bool) -> nn.Module:
    """AC -> compile -> FSDP2 on ``mesh`` of a (meta-device) SiT; parameters are materialised afterwards."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = apply_activation_checkpointing(block, cfg.activation_checkpointing)
    if compile:
        compile_model(model, fallback=cfg.compile == "auto")
    if mesh.device_mesh is not None:
        import warnings

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # nn.Linear on (N, T, D) returns a view, so the projector outputs are views; nothing
        # modifies them in place, which is what this FSDP2 warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        param_dtype, reduce = compute_param_dtype(cfg, dist_info.device), reduce_dtype(cfg, dist_info.device)
        if cfg.reduce_dtype == "bf16" and reduce != torch.bfloat16:
            log.warning("parallel.reduce_dtype=bf16 applies on CUDA; on %s the gradient reductions run in fp32",
                        dist_info.device.type)
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)
        # Frozen parameters (the fixed sin-cos position embedding) need no gradient reduction and
        # no optimizer state: every rank keeps its own full copy instead of all-gathering it twice
        # a step. Sharded, a (1, T, D) embedding would also be padded to one row per rank (dim 0),
        # 4x its size over 4 ranks.
        frozen = {p for p in model.parameters() if not p.requires_grad}
        shard = functools.partial(fully_shard, mesh=mesh.fsdp_mesh, reshard_after_forward=cfg.reshard_after_forward,
                                  ignored_params=frozen or None)
        for block in model.blocks:
            shard(block, mp_policy=mp)
        # The root keeps its inputs as given: t must reach the timestep embedding in fp32 (bf16
        # would round it to ~3 significant digits); the embedders cast x themselves.
        shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce, cast_forward_inputs=False))
    return model


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-device (possibly sharded) model on ``device`` and initialise it one
    parameter at a time: each full parameter is a pure function of (seed, name), and a rank keeps
    only its shard. The whole model never exists unsharded on one rank, and every world size
    starts from bit-identical weights."""
    from reglue.models.sit import param_generator
    from reglue.runtime import clean_name

    model.to_empty(device=device)
    for name, param in model.named_parameters():
        key = clean_name(name)
        full = model.init_tensor(key, tuple(param.shape), param_generator(seed, key))
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(full.to(device), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
    return model
