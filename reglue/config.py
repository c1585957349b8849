"""Run configuration: dataclasses validated at construction, so a bad value fails at start.

A run is a :class:`Config` made of sections (model, method, encoders, data, optim, parallel,
train). Presets (``reglue.presets``) return full configs; command-line flags and ``--set
section.field=value`` override fields. Every error names the field and why it is wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from reglue.kernels._utils import KERNEL_CHOICES


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def unknown_name(kind: str, name: str, known) -> str:
    """``unknown KIND 'NAME'; did you mean A or B?``: the nearest of ``known`` (difflib), or all of
    them when none is near (short lists: sections, a section's fields, presets)."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:
        names = f"{', '.join(close[:-1])} or {close[-1]}" if len(close) > 1 else close[0]
        return f"unknown {kind} {name!r}; did you mean {names}?"
    return f"unknown {kind} {name!r}; choose from {', '.join(known)}"


def parse_set_items(items) -> Dict[str, str]:
    """``--set SECTION.FIELD=VALUE`` flags -> ``{"SECTION.FIELD": "VALUE"}`` (for :func:`apply_overrides`)."""
    overrides = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        overrides[key.strip()] = value
    return overrides


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _choice(value, name: str, choices) -> None:
    _require(value in choices, name, f"must be one of {list(choices)}, got {value!r}")


METHODS = ("sit", "repa", "redi", "reg", "reglue")
KERNEL_SETTINGS = ("auto",) + KERNEL_CHOICES
ATTENTION = ("auto", "fa3", "fa2", "xformers", "sdpa", "math")
REFERENCE_PRECISIONS = ("fp16", "fp32")


@dataclass
class ModelConfig:
    """SiT backbone. ``arch`` is a registry key (``SiT-XL/2``) or ``custom`` with explicit sizes."""

    arch: str = "SiT-XL/2"
    depth: Optional[int] = None
    """Overrides the registry depth (required for ``custom``)."""
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    encoder_depth: int = 8
    """Block whose output the REPA projector reads (4 for B/2, 8 for XL/2)."""
    projector_dim: int = 2048
    qk_norm: bool = False
    kernels: str = "auto"
    """Fused adaLN/gate/RMSNorm/compressor-conv ops: ``triton`` kernels, ``eager`` PyTorch, or
    ``auto``: the kernels on CUDA (each checked once against its reference on the device; one that
    fails runs eager), eager on the CPU. Resolved at run start (``reglue.train.parallelize``)."""
    attention: str = "auto"
    """Attention backend: auto (FA3 -> FA2 -> xformers -> SDPA), or one of them by name."""
    mlp_gelu: str = "tanh"
    """The blocks' MLP activation: ``tanh`` (GELU's tanh approximation: SiT's, which every
    published checkpoint was trained with) or ``exact`` (erf GELU: on the CPU about 3x cheaper,
    the tiny demo's)."""

    def __post_init__(self):
        from reglue.models.sit import GELU_APPROXIMATIONS, SiT_models

        _require(self.arch == "custom" or self.arch in SiT_models, "model.arch",
                 f"unknown architecture {self.arch!r}; known: custom, {', '.join(SiT_models)}")
        if self.arch == "custom":
            for name in ("depth", "hidden_size", "num_heads", "patch_size"):
                _require(getattr(self, name) is not None, f"model.{name}", "required when model.arch is 'custom'")
        for name in ("depth", "hidden_size", "num_heads", "patch_size"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and value > 0), f"model.{name}", f"must be a positive int, got {value!r}")
        _require(self.num_classes > 0, "model.num_classes", "must be positive")
        _require(0.0 <= self.class_dropout_prob < 1.0, "model.class_dropout_prob", "must be in [0, 1)")
        _require(self.mlp_ratio > 0, "model.mlp_ratio", "must be positive")
        _require(self.projector_dim > 0, "model.projector_dim", "must be positive")
        _choice(self.kernels, "model.kernels", KERNEL_SETTINGS)
        _choice(self.attention, "model.attention", ATTENTION)
        _choice(self.mlp_gelu, "model.mlp_gelu", GELU_APPROXIMATIONS)
        sizes = self.sizes()
        _require(sizes["hidden_size"] % sizes["num_heads"] == 0, "model.num_heads",
                 f"hidden_size {sizes['hidden_size']} is not divisible by num_heads {sizes['num_heads']}")
        _require(1 <= self.encoder_depth <= sizes["depth"], "model.encoder_depth",
                 f"must be in [1, depth={sizes['depth']}], got {self.encoder_depth}")

    def sizes(self) -> Dict[str, int]:
        """depth, hidden_size, num_heads, patch_size after applying overrides to the registry entry."""
        if self.arch == "custom":
            base = {}
        else:
            from reglue.models.sit import SIT_SIZES

            size, patch = self.arch[len("SiT-"):].split("/")
            depth, hidden, heads = SIT_SIZES[size]
            base = {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": int(patch)}
        for name in ("depth", "hidden_size", "num_heads", "patch_size"):
            if getattr(self, name) is not None:
                base[name] = getattr(self, name)
        return base


@dataclass
class MethodConfig:
    """What is denoised and which losses are used.

    sit: latents only. repa: + alignment. redi: latents ⊕ PCA of DINOv2 features.
    reg: + [CLS] token + alignment. reglue: latents ⊕ compressed features + [CLS] + alignment.
    """

    name: str = "reglue"
    path: str = "linear"
    t_sampling: str = "uniform"
    t_lognormal_mean: float = 0.0
    t_lognormal_std: float = 1.0
    semantic_channels: int = 16
    """Channels of the semantic input: compressor output (reglue) or PCA components (redi)."""
    lambda_semantic: float = 1.0
    semantic_milestones: Tuple[Tuple[int, float], ...] = ()
    """(step, factor) pairs: from ``step`` on, λs is multiplied by ``factor`` (XL: halved at 250k, quartered at 500k)."""
    lambda_cls: float = 0.03
    lambda_align: float = 0.5
    semantic_dropout_prob: float = 0.0
    """ReDi ``--dino-drop-prob``: probability that a sample's clean semantic channels are zeroed and
    its semantic loss dropped (per sample; see ``reglue.diffusion.transport.training_losses``). What
    representation guidance (``sample.representation_guidance_scale``) needs; ReDi's README uses
    0.2 for it, its default recipe 0 (off)."""

    def __post_init__(self):
        _choice(self.name, "method.name", METHODS)
        from reglue.diffusion.transport import PATHS, T_SAMPLINGS

        _choice(self.path, "method.path", PATHS)
        _choice(self.t_sampling, "method.t_sampling", T_SAMPLINGS)
        _require(self.t_lognormal_std > 0, "method.t_lognormal_std", "must be positive")
        _require(self.semantic_channels > 0, "method.semantic_channels", "must be positive")
        for name in ("lambda_semantic", "lambda_cls", "lambda_align"):
            _require(getattr(self, name) >= 0, f"method.{name}", "must be >= 0")
        _require(0 <= self.semantic_dropout_prob < 1, "method.semantic_dropout_prob",
                 f"must be in [0, 1), got {self.semantic_dropout_prob}")
        _require(self.semantic_dropout_prob == 0 or self.semantic != "none", "method.semantic_dropout_prob",
                 f"method {self.name!r} has no semantic channels to drop (redi and reglue have)")
        self.semantic_milestones = tuple(tuple(m) for m in self.semantic_milestones)
        steps = [m[0] for m in self.semantic_milestones]
        _require(all(len(m) == 2 for m in self.semantic_milestones), "method.semantic_milestones", "must be (step, factor) pairs")
        _require(steps == sorted(steps), "method.semantic_milestones", "steps must be increasing")

    @property
    def semantic(self) -> str:
        """Which semantic input is concatenated to the latents: none, compressor or pca."""
        return {"redi": "pca", "reglue": "compressor"}.get(self.name, "none")

    @property
    def use_cls(self) -> bool:
        return self.name in ("reg", "reglue")

    @property
    def use_align(self) -> bool:
        return self.name in ("repa", "reg", "reglue")

    @property
    def needs_dinov2(self) -> bool:
        return self.name != "sit"

    def semantic_weight(self, step: int) -> float:
        """λs at ``step`` after the milestones."""
        weight = self.lambda_semantic
        for milestone, factor in self.semantic_milestones:
            if step >= milestone:
                weight = self.lambda_semantic * factor
        return weight


@dataclass
class EncoderConfig:
    """Frozen encoders: DINOv2 (semantics and alignment targets), the compressor or PCA, SD-VAE."""

    dinov2: str = "vit_base_patch14_reg4_dinov2"
    dinov2_weights: Optional[str] = None
    """A timm hub name, a local file, or None for random init (tests and the tiny demo only)."""
    dinov2_overrides: Dict[str, Any] = field(default_factory=dict)
    """timm keyword overrides (embed_dim, depth, num_heads) for tiny random encoders."""
    feature_layers: Tuple[int, ...] = (8, 9, 10, 11)
    feature_stats: Optional[str] = None
    """Per-channel mean/std file; None computes them over the first images at start (demo)."""
    compressor: Optional[str] = None
    """Trained compressor weights (reglue). None = random init (tiny demo only)."""
    compressor_channels: Tuple[int, ...] = (3072, 256, 16)
    pca: Optional[str] = None
    """Stored PCA (redi). None fits it on the first images at start."""
    vae: str = "stabilityai/sd-vae-ft-ema"
    """diffusers hub name, a local folder, ``tiny-random`` (tests), or ``patch-pca``: a patch
    autoencoder (PCA encoder, nearest-exemplar decoder) fitted to the run's images at start and
    kept in the run directory (the CPU demo; ``reglue.models.autoencoder``), or the
    ``.safetensors`` file of one."""
    dtype: str = "bf16"
    """Compute dtype of the frozen encoders on CUDA (fp32 on CPU)."""
    precompute_targets: bool = False
    """Run the frozen encoders over every training image once at start (in fixed batches, so a
    resumed run gets the same numbers) and keep their outputs on the device; each step then
    gathers its batch's targets (by the dataset ``index`` the torch loader's batches carry; DALI
    batches run the encoders as usual) instead of running DINOv2, the compressor and the VAE encoder.
    For small datasets without augmentation (the CPU demo: about a fifth of its step time);
    refused when the targets would take more than ``PRECOMPUTE_LIMIT_BYTES``; off under
    ``--reference`` (the published loops run their encoders on every batch)."""

    @property
    def embed_dim(self) -> int:
        """Width of the DINOv2 tokens ([CLS] and alignment target dimension)."""
        return int(self.dinov2_overrides.get("embed_dim", 768))

    def __post_init__(self):
        self.feature_layers = tuple(self.feature_layers)
        self.compressor_channels = tuple(self.compressor_channels)
        _require(len(self.feature_layers) > 0, "encoders.feature_layers", "must name at least one block")
        _require(len(self.compressor_channels) >= 2, "encoders.compressor_channels", "needs at least (in, out)")
        _choice(self.dtype, "encoders.dtype", ("bf16", "fp16", "fp32"))


@dataclass
class DataConfig:
    """Training data: prepared shards / the published layout (``path``), or the synthetic demo set."""

    path: Optional[str] = None
    """A ``reglue prepare`` directory or the published layout (images/ + vae-sd/); None = the
    built-in procedurally generated dataset."""
    image_size: int = 256
    backend: str = "auto"
    """dali (decoding on the GPU, "mixed"; on the CPU without one), torch (DataLoader + PIL), or
    auto: DALI when ``nvidia.dali`` imports and ``path`` is set, else torch."""
    num_workers: int = 2
    """torch: DataLoader worker processes. DALI: CPU threads, and Python worker processes
    reading the samples (0 = read in the main thread)."""
    synthetic_size: int = 4096
    synthetic_classes: int = 8

    def __post_init__(self):
        _require(self.image_size % 8 == 0 and self.image_size > 0, "data.image_size", "must be a positive multiple of 8 (VAE factor)")
        _choice(self.backend, "data.backend", ("auto", "dali", "torch"))
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.synthetic_size > 0, "data.synthetic_size", "must be positive")
        _require(self.synthetic_classes > 0, "data.synthetic_classes", "must be positive")

    @property
    def latent_size(self) -> int:
        return self.image_size // 8


@dataclass
class OptimConfig:
    """AdamW (torch-native, fused on CUDA), no weight decay, gradient clipping, optional warm-up."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be positive")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass
class ParallelConfig:
    """Activation checkpointing -> regional compile -> FSDP2, in that order, on a 2-D device mesh
    ``replicate_degree`` x ``shard_degree`` (``reglue.train.mesh``): the parameters are sharded
    over the ranks of a shard group and replicated over the groups (HSDP)."""

    replicate_degree: Union[int, str] = "auto"
    """How many copies of the sharded model (data-parallel groups that all-reduce their gradient
    shards). ``auto``: world size / ``shard_degree``."""
    shard_degree: Union[int, str] = "auto"
    """How many ranks share one copy of the parameters, gradients and optimizer state. ``auto``:
    the processes of one node (torchrun's ``LOCAL_WORLD_SIZE``), or world / ``replicate_degree``
    when that is set. So by default parameters are sharded within a node (NVLink) and replicated
    across nodes: only the gradient all-reduce of each rank's shard crosses the network. ``1`` x
    world (``replicate_degree=1``) is flat FSDP over every rank; world x 1 (``shard_degree=1``)
    is pure replication (DDP-like, the whole model and optimizer on every rank)."""
    reduce_dtype: str = "fp32"
    """dtype of the gradient reductions (reduce-scatter, and HSDP's all-reduce across nodes) on
    CUDA; the CPU reduces in fp32. ``bf16`` halves the bytes of the gradient reductions (a quarter
    less traffic per step under flat FSDP, half of HSDP's cross-node bytes) but sums in bf16:
    8 significand bits, so the rounding of the sum grows with the number of ranks and small
    gradient components are lost; fp32 is the safe default (torchtitan's too)."""

    compile: Union[bool, str] = "auto"
    """torch.compile what the step runs, region by region (each SiT block, the embedders, projectors
    and final layer, the loss, the frozen DINOv2 blocks and the semantic target): true, false, or
    ``auto``: on CUDA yes, on the CPU no. Resolved at run start."""
    activation_checkpointing: str = "off"
    """off, full or selective (keep matmul and attention outputs, recompute the rest), per SiT block."""
    reshard_after_forward: bool = True
    param_dtype: str = "bf16"
    """Mixed precision of the sharded parameters on CUDA (fp32 on CPU)."""
    reference: bool = False
    """Reproduce the published recipe's execution for comparison (``reglue.train.reference``): eager
    PyTorch, no fused kernels, no compile, the recipe's precision (``reference_precision``), DDP, a
    host sync every step for logging, samples drawn in fp32 as the published ``generate.py``."""
    reference_precision: str = "fp16"
    """The published recipe's precision, which ``reference`` runs on CUDA (the CPU runs fp32).
    ``fp16``: the model's forward under fp16 autocast with fp32 outputs, a loss scaler, and the
    frozen DINOv2 (and REGLUE's compressor) under the same autocast: accelerate ``--mixed-precision
    fp16`` (REPA, REG, REGLUE). ``fp32``: no autocast, no scaler (SiT, ReDi). TF32 matmuls in
    both. Each method preset sets its own."""

    def __post_init__(self):
        _require(self.compile == "auto" or isinstance(self.compile, bool), "parallel.compile",
                 f"must be true, false or 'auto', got {self.compile!r}")
        _choice(self.activation_checkpointing, "parallel.activation_checkpointing", ("off", "full", "selective"))
        _choice(self.param_dtype, "parallel.param_dtype", ("bf16", "fp32"))
        _choice(self.reduce_dtype, "parallel.reduce_dtype", ("bf16", "fp32"))
        for name in ("replicate_degree", "shard_degree"):
            value = getattr(self, name)
            _require(value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                     f"parallel.{name}", f"must be 'auto' or a positive integer, got {value!r}")
        _choice(self.reference_precision, "parallel.reference_precision", REFERENCE_PRECISIONS)


SAMPLERS = ("sde", "euler", "heun")
EVAL_METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")
"""What ``reglue evaluate`` and the in-training evaluation can score, in their canonical order."""
GUIDANCE_RULES = ("standard", "reglue-vae-cfg")


@dataclass
class SampleConfig:
    """How images are drawn from a model: each preset carries the sampler its paper evaluates with.

    ``reglue generate``, ``reglue sample`` and the run's sample grids use it unless flags override.
    Guidance (``reglue.diffusion.samplers``) uses ``cfg_scale`` (1 = none) at times t in
    ``guidance_interval`` (t = 1 is noise), on the first ``guide_channels`` channels (None = all;
    4 = the VAE latents only; 3 = SiT's published first three), combined by ``guidance_rule``; the
    [CLS] token uses ``cls_cfg_scale`` (None = cfg_scale, 0 = conditional only).
    """

    sampler: str = "sde"
    """sde (Euler-Maruyama, as published), euler or heun (probability-flow ODE)."""
    steps: int = 250
    cfg_scale: float = 1.0
    cls_cfg_scale: Optional[float] = None
    guidance_interval: Tuple[float, float] = (0.0, 1.0)
    guide_channels: Optional[int] = None
    guidance_rule: str = "standard"
    """standard: ``uncond + s (cond - uncond)`` at every guided step. reglue-vae-cfg: the published
    REGLUE sampler with ``--vae_cfg true`` exactly: ``cond + s (cond - uncond)`` on the first
    ``guide_channels`` (4) channels on every stochastic step, then the standard formula on all
    channels on the last, deterministic step; nothing guided unless s > 1. SDE only."""
    representation_guidance_scale: float = 1.0
    """ReDi's representation guidance (``sample_ddp.py --rg-scale``; 1 = off): the prediction with
    the semantic channels of x zeroed is the unconditional branch. Needs a model trained with
    ``method.semantic_dropout_prob`` > 0 and cfg_scale 1 (the published code uses one or the other)."""

    def __post_init__(self):
        _choice(self.sampler, "sample.sampler", SAMPLERS)
        _require(isinstance(self.steps, int) and self.steps >= 2, "sample.steps", f"must be an int >= 2, got {self.steps!r}")
        _require(self.cfg_scale >= 1, "sample.cfg_scale", f"must be >= 1 (1 = no guidance), got {self.cfg_scale}")
        _require(self.cls_cfg_scale is None or self.cls_cfg_scale >= 0, "sample.cls_cfg_scale",
                 f"must be None (= cfg_scale), 0 (conditional only) or > 0, got {self.cls_cfg_scale}")
        self.guidance_interval = tuple(float(v) for v in self.guidance_interval)
        _require(len(self.guidance_interval) == 2, "sample.guidance_interval", "must be (low, high)")
        low, high = self.guidance_interval
        _require(0 <= low <= high <= 1, "sample.guidance_interval", f"needs 0 <= low <= high <= 1, got {low, high}")
        _require(self.guide_channels is None or self.guide_channels >= 1, "sample.guide_channels",
                 f"must be None (all channels) or >= 1, got {self.guide_channels}")
        _choice(self.guidance_rule, "sample.guidance_rule", GUIDANCE_RULES)
        if self.guidance_rule == "reglue-vae-cfg":
            _require(self.sampler == "sde", "sample.guidance_rule",
                     f"'reglue-vae-cfg' is the published SDE sampler's rule; sample.sampler is {self.sampler!r}")
            _require(self.guide_channels is not None, "sample.guidance_rule",
                     "'reglue-vae-cfg' guides the VAE channels: set sample.guide_channels=4 (as published)")
        _require(self.representation_guidance_scale >= 1, "sample.representation_guidance_scale",
                 f"must be >= 1 (1 = off), got {self.representation_guidance_scale}")
        if self.representation_guidance_scale != 1:
            _require(self.cfg_scale == 1 and self.guidance_rule == "standard", "sample.representation_guidance_scale",
                     "representation guidance excludes classifier-free guidance (as in ReDi's sample_ddp.py): "
                     "set sample.cfg_scale=1")

    def sampler_options(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`reglue.diffusion.samplers.sample` for these settings."""
        return {"sampler": self.sampler, "num_steps": self.steps, "cfg_scale": self.cfg_scale,
                "cls_cfg_scale": self.cls_cfg_scale, "guidance_interval": self.guidance_interval,
                "guide_channels": self.guide_channels, "guidance_rule": self.guidance_rule,
                "representation_guidance_scale": self.representation_guidance_scale}


@dataclass
class TrainConfig:
    """Loop, logging, checkpoints, EMA and sampling."""

    name: str = "run"
    out_dir: str = "runs"
    max_steps: int = 400_000
    global_batch_size: int = 256
    micro_batch_size: Optional[int] = None
    """Per-rank batch per forward; None = global / world size (gradient accumulation fills the rest)."""
    seed: int = 0
    ema_decay: float = 0.9999
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_last: int = 3
    sample_every: int = 0
    """Write an EMA sample grid (``sample`` section settings) every this many steps; 0 = only at the end."""
    num_sample_images: int = 16
    eval_every: int = 0
    """Score EMA samples against ``eval_ref`` every this many steps (FID and friends); 0 = never."""
    eval_samples: int = 10_000
    """Samples per in-training evaluation, shared by all ranks."""
    eval_ref: Optional[str] = None
    """Reference batch (``.npz`` with statistics, ``reglue evaluate --make-ref``); None skips evaluation."""
    eval_sampler: str = "sde"
    """In-training evaluation sampler (cheaper than the ``sample`` section's paper setting)."""
    eval_steps: int = 50
    """Sampler steps of the in-training evaluation; guidance follows the ``sample`` section."""
    eval_batch_size: int = 64
    """Images per sampling block of the in-training evaluation (per device)."""
    eval_metrics: Tuple[str, ...] = ("fid",)
    """Of fid, sfid, is, pr, fd_dinov2 (as ``reglue evaluate --metrics``); pr computes the reference
    images' features once at the first evaluation."""
    eval_inception_weights: Optional[str] = None
    """Inception weights file for the in-training evaluation; None = the file torch-fidelity caches
    (``reglue evaluate`` looks in the same places); ``random`` = a seeded random network (a
    pipeline check: its scores are not FID)."""
    resume: str = "auto"
    """auto (latest checkpoint in the run dir if any), none, or a checkpoint path."""
    tensorboard: bool = True
    """Also log to TensorBoard (``<run>/tb``) when the tensorboard package is installed."""
    metrics_plot: bool = True
    """Draw ``<run>/metrics.png`` (the curves of metrics.jsonl) at checkpoints a minute apart and at
    the end (about a second of rank 0's time each on a CPU, most of it matplotlib's); false: none
    (``reglue plot RUN`` draws it from metrics.jsonl later; the tests switch it off where they do
    not read the plot)."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases under this project (needs the wandb package)."""
    max_nonfinite_steps: int = 10
    """Abort after this many consecutive steps with a non-finite loss or gradient norm (skipped on the
    device; noticed at the next log or checkpoint step)."""
    inject_nonfinite_steps: Tuple[int, ...] = ()
    """Fault injection (tests, drills): make the loss NaN at these steps."""
    deterministic: bool = False

    def __post_init__(self):
        _require(self.max_steps > 0, "train.max_steps", "must be positive")
        _require(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        _require(self.micro_batch_size is None or self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
        for name in ("log_every", "ckpt_every", "keep_last", "num_sample_images", "max_nonfinite_steps", "eval_samples"):
            _require(getattr(self, name) > 0, f"train.{name}", "must be positive")
        for name in ("sample_every", "eval_every"):
            _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0 (0 = off)")
        self.inject_nonfinite_steps = tuple(int(s) for s in self.inject_nonfinite_steps)
        _choice(self.eval_sampler, "train.eval_sampler", SAMPLERS)
        _require(self.eval_steps >= 2, "train.eval_steps", "must be >= 2")
        _require(self.eval_batch_size > 0, "train.eval_batch_size", "must be positive")
        self.eval_metrics = tuple(self.eval_metrics)
        for name in self.eval_metrics:
            _choice(name, "train.eval_metrics", EVAL_METRICS)
        _require(bool(self.name) and "/" not in self.name, "train.name", "must be a non-empty name without '/'")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Cross-section checks (each section validated itself already)."""
        if self.parallel.reference:
            _require(self.model.kernels != "triton" and self.parallel.compile is not True, "parallel.reference",
                     "runs the published execution (eager, no compile): drop --kernels triton / --compile, or --reference")
        sizes = self.model.sizes()
        latent = self.data.latent_size
        _require(latent % sizes["patch_size"] == 0, "model.patch_size",
                 f"latent grid {latent} (image_size {self.data.image_size} / 8) is not divisible by patch size {sizes['patch_size']}")
        _require(sizes["hidden_size"] % 4 == 0, "model.hidden_size", "must be divisible by 4 (2-D sin-cos positions)")
        if self.method.semantic == "compressor":
            _require(self.encoders.compressor_channels[-1] == self.method.semantic_channels, "encoders.compressor_channels",
                     f"last entry {self.encoders.compressor_channels[-1]} must equal method.semantic_channels {self.method.semantic_channels}")
        if self.sample.guide_channels is not None:
            _require(self.sample.guide_channels <= self.in_channels, "sample.guide_channels",
                     f"{self.sample.guide_channels} exceeds the model's {self.in_channels} input channels")
        if self.sample.representation_guidance_scale != 1:
            _require(self.method.semantic != "none" and not self.method.use_cls, "sample.representation_guidance_scale",
                     f"representation guidance needs semantic channels and no [CLS] token (redi); method is {self.method.name!r}")
            _require(self.method.semantic_dropout_prob > 0, "sample.representation_guidance_scale",
                     "needs a model trained with method.semantic_dropout_prob > 0 (ReDi: --dino-drop-prob 0.2)")
        if self.sample.guidance_rule == "reglue-vae-cfg" and self.train.eval_every:
            _require(self.train.eval_sampler == "sde", "train.eval_sampler",
                     "sample.guidance_rule 'reglue-vae-cfg' needs the SDE sampler for in-training evaluation too")
        if self.method.use_align:
            grid = latent // sizes["patch_size"]
            enc_patch = self.encoders.dinov2_overrides.get("patch_size", 14)
            enc_grid = (self.data.image_size * 224 // 256) // enc_patch
            fix = f"use patch size {latent // enc_grid}" if enc_grid and latent % enc_grid == 0 else "change the image size"
            _require(grid == enc_grid, "model.patch_size",
                     f"alignment needs the SiT token grid ({grid}x{grid}) to equal the DINOv2 patch grid ({enc_grid}x{enc_grid}); {fix}")

    @property
    def in_channels(self) -> int:
        return 4 + (self.method.semantic_channels if self.method.semantic != "none" else 0)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        """A config from its JSON form; a wrong JSON type anywhere is one ConfigError naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object of sections, got {_json_name(d)}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"config: {unknown_name('section', unknown[0], known)}")
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = typing.get_type_hints(cls)[f.name]
            values = d.get(f.name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{f.name}: expected an object of fields, got {_json_name(values)}")
            hints = typing.get_type_hints(section_cls)
            fields = [sf.name for sf in dataclasses.fields(section_cls)]
            bad = sorted(set(values) - set(fields))
            if bad:
                raise ConfigError(f"{f.name}.{bad[0]}: {unknown_name(f'field of {f.name}', bad[0], fields)}")
            for name, value in values.items():
                _require(_json_type_ok(value, hints[name]), f"{f.name}.{name}",
                         f"expected {_describe_type(hints[name])}, got {json.dumps(value, default=str)[:60]}")
            sections[f.name] = section_cls(**values)
        return cls(**sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path, flag: str = "--config") -> "Config":
        """A config.json (e.g. a run's); a missing, unparsable or mistyped file is one ConfigError."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise ConfigError(f"{flag} {path}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{flag} {path}: not valid JSON ({exc})") from None
        except ConfigError as exc:
            raise ConfigError(f"{flag} {path}: {exc}") from None


def _json_type_ok(value, annotation) -> bool:
    """Whether a JSON value fits a field annotation (bool is not a number; ints pass as floats)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_json_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_json_type_ok(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_json_type_ok(v, a) for v, a in zip(value, args)))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _describe_type(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return f"{_describe_type(args[0])} or null"
    if typing.get_origin(annotation) is tuple:
        targs = typing.get_args(annotation)
        plural = {int: "integers", float: "numbers", str: "strings"}
        if len(targs) == 2 and targs[1] is Ellipsis and targs[0] in plural:
            return f"a list of {plural[targs[0]]}"
        return "a list" if len(targs) == 2 and targs[1] is Ellipsis else f"a list of {len(targs)} values"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _json_name(value) -> str:
    return {list: "a list", dict: "an object", int: "an integer", str: "a string"}.get(type(value), type(value).__name__)


def _type_name(annotation) -> str:
    """``float``, ``Tuple[int, ...]``: how a field's type reads in an error."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _coerce(value: str, annotation, name: str):
    """Parse a command-line string into the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if value.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # e.g. Union[bool, str] ("auto"): the first type that parses
        for choice in args[:-1]:
            try:
                return _coerce(value, choice, name)
            except ConfigError:
                pass
        return _coerce(value, args[-1], name)
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("use true or false")
        if annotation in (int, float, str):
            return annotation(value)
        if origin in (tuple, dict, list) or annotation in (tuple, dict, list):
            example = "{'key': 1}" if (origin or annotation) is dict else "(1, 2)"
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"write a Python literal, e.g. {example}") from None
            if isinstance(parsed, (int, float)) and origin is tuple:
                parsed = (parsed,)
            if not isinstance(parsed, (tuple, list, dict)):
                raise ValueError(f"write a Python literal, e.g. {example}")
            return parsed
    except ValueError as exc:
        # int("x") says no more than "cannot parse 'x' as int"
        detail = "" if annotation in (int, float, str) else f" ({exc})"
        raise ConfigError(f"{name}: cannot parse {value!r} as {_type_name(annotation)}{detail}") from None
    raise ConfigError(f"{name}: unsupported field type {_type_name(annotation)}")


def apply_overrides(config: Config, overrides: Dict[str, Any]) -> Config:
    """Return a new, validated config with ``{"section.field": value}`` overrides applied.

    String values are parsed according to the field type; other values are used as given.
    """
    d = config.to_dict()
    hints = typing.get_type_hints(Config)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"{key}: expected SECTION.FIELD")
        if section not in d:
            raise ConfigError(f"{key}: {unknown_name('section', section, d)}")
        section_hints = typing.get_type_hints(hints[section])
        if name not in section_hints:
            raise ConfigError(f"{key}: {unknown_name(f'field of {section}', name, section_hints)}")
        d[section][name] = _coerce(value, section_hints[name], key) if isinstance(value, str) else value
    return Config.from_dict(d)
