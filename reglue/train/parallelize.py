"""Apply, in torchtitan's order: activation checkpointing per block -> ``block.compile()`` ->
``fully_shard`` per block then the root (FSDP2, bf16 params / fp32 reductions on CUDA).

The model holds architecture only; everything about execution is decided here.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn

from reglue.config import ParallelConfig
from reglue.runtime import DistInfo

log = logging.getLogger("reglue.parallelize")


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


def use_fsdp(dist_info: DistInfo) -> bool:
    """FSDP2 whenever several ranks train, and on a single GPU (for its mixed-precision policy)."""
    return dist_info.distributed or dist_info.device.type == "cuda"


def build_parallel_model(config, dist_info: DistInfo) -> nn.Module:
    """The run's SiT, built on the meta device, parallelised, and materialised on the device.

    ``parallel.reference`` instead reproduces the published execution: an eager model wrapped in
    DDP when several ranks train (fp16 autocast is applied by the trainer).
    """
    from reglue.models import build_model

    cfg = config.parallel
    with torch.device("meta"):
        # The published code runs timm attention (SDPA) and eager PyTorch.
        model = build_model(config, kernels="eager" if cfg.reference else None, attention="sdpa" if cfg.reference else None)
    if cfg.reference:
        materialize(model, dist_info.device, config.train.seed)
        if dist_info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[dist_info.device] if dist_info.device.type == "cuda" else None)
        return model
    return materialize(parallelize(model, cfg, dist_info), dist_info.device, config.train.seed)


def parallelize(model: nn.Module, cfg: ParallelConfig, dist_info: DistInfo) -> nn.Module:
    """AC -> compile -> FSDP2 on a (meta-device) SiT; parameters are materialised afterwards."""
    for i, block in enumerate(model.blocks):
        block = apply_activation_checkpointing(block, cfg.activation_checkpointing)
        if cfg.compile:
            block.compile(fullgraph=True, dynamic=False)
        model.blocks[i] = block
    if use_fsdp(dist_info):
        import warnings

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # nn.Linear on (N, T, D) returns a view, so the projector outputs are views; nothing
        # modifies them in place, which is what this FSDP2 warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        if not torch.distributed.is_initialized():
            _init_single_process_group(dist_info)
        param_dtype = compute_param_dtype(cfg, dist_info.device)
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        # The root keeps its inputs as given: t must reach the timestep embedding in fp32 (bf16
        # would round it to ~3 significant digits); the embedders cast x themselves.
        root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        fully_shard(model, mp_policy=root_mp, reshard_after_forward=cfg.reshard_after_forward)
    return model


def _init_single_process_group(dist_info: DistInfo) -> None:
    """FSDP2 needs a process group even for one GPU: a world of one on a local store."""
    import tempfile

    store = torch.distributed.FileStore(tempfile.mktemp(prefix="reglue-pg-"), 1)
    backend = "nccl" if dist_info.device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)


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
