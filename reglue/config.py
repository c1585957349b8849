"""Run configuration: dataclasses validated at construction, so a bad value fails at start.

A run is a :class:`Config` made of sections (model, method, encoders, data, optim, parallel,
train). Presets (``reglue.presets``) return full configs; command-line flags and ``--set
section.field=value`` override fields. Every error names the field and why it is wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from reglue.kernels._utils import KERNEL_CHOICES


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _choice(value, name: str, choices) -> None:
    _require(value in choices, name, f"must be one of {list(choices)}, got {value!r}")


METHODS = ("sit", "repa", "redi", "reg", "reglue")
ATTENTION = ("auto", "fa3", "fa2", "xformers", "sdpa", "math")


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
    kernels: str = "eager"
    """``eager`` PyTorch or ``triton`` fused adaLN/gate/RMSNorm kernels."""
    attention: str = "auto"
    """Attention backend: auto (FA3 -> FA2 -> xformers -> SDPA), or one of them by name."""

    def __post_init__(self):
        from reglue.models.sit import SiT_models

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
        _choice(self.kernels, "model.kernels", KERNEL_CHOICES)
        _choice(self.attention, "model.attention", ATTENTION)
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

    def __post_init__(self):
        _choice(self.name, "method.name", METHODS)
        from reglue.diffusion.transport import PATHS, T_SAMPLINGS

        _choice(self.path, "method.path", PATHS)
        _choice(self.t_sampling, "method.t_sampling", T_SAMPLINGS)
        _require(self.t_lognormal_std > 0, "method.t_lognormal_std", "must be positive")
        _require(self.semantic_channels > 0, "method.semantic_channels", "must be positive")
        for name in ("lambda_semantic", "lambda_cls", "lambda_align"):
            _require(getattr(self, name) >= 0, f"method.{name}", "must be >= 0")
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
    """diffusers hub name, a local folder, ``tiny-random`` (tests), or ``patch-pca``: a linear patch
    autoencoder fitted to the run's images at start and kept in the run directory (the CPU demo;
    ``reglue.models.autoencoder``), or the ``.safetensors`` file of one."""
    dtype: str = "bf16"
    """Compute dtype of the frozen encoders on CUDA (fp32 on CPU)."""

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
    """Activation checkpointing -> per-block compile -> FSDP2, in that order."""

    compile: bool = False
    activation_checkpointing: str = "off"
    reshard_after_forward: bool = True
    param_dtype: str = "bf16"
    """Mixed precision of the sharded parameters on CUDA (fp32 on CPU)."""
    reference: bool = False
    """Reproduce the published recipe's execution for comparison: eager PyTorch, no fused kernels,
    no compile, fp16 autocast with a grad scaler on CUDA, DDP, a host sync every step for logging."""

    def __post_init__(self):
        _choice(self.activation_checkpointing, "parallel.activation_checkpointing", ("off", "full", "selective"))
        _choice(self.param_dtype, "parallel.param_dtype", ("bf16", "fp32"))


SAMPLERS = ("sde", "euler", "heun")


@dataclass
class SampleConfig:
    """How images are drawn from a model: each preset carries the sampler its paper evaluates with.

    ``reglue generate``, ``reglue sample`` and the run's sample grids use it unless flags override.
    Guidance is ``uncond + cfg_scale (cond - uncond)`` (1 = none) at times t in
    ``guidance_interval`` (t = 1 is noise), on the first ``guide_channels`` channels (None = all;
    4 = the VAE latents only); the [CLS] token uses ``cls_cfg_scale`` (None = cfg_scale,
    0 = conditional only).
    """

    sampler: str = "sde"
    """sde (Euler-Maruyama, as published), euler or heun (probability-flow ODE)."""
    steps: int = 250
    cfg_scale: float = 1.0
    cls_cfg_scale: Optional[float] = None
    guidance_interval: Tuple[float, float] = (0.0, 1.0)
    guide_channels: Optional[int] = None

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

    def sampler_options(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`reglue.diffusion.samplers.sample` for these settings."""
        return {"sampler": self.sampler, "num_steps": self.steps, "cfg_scale": self.cfg_scale,
                "cls_cfg_scale": self.cls_cfg_scale, "guidance_interval": self.guidance_interval,
                "guide_channels": self.guide_channels}


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
    resume: str = "auto"
    """auto (latest checkpoint in the run dir if any), none, or a checkpoint path."""
    tensorboard: bool = True
    """Also log to TensorBoard (``<run>/tb``) when the tensorboard package is installed."""
    wandb_project: Optional[str] = None
    """Also log to Weights & Biases under this project (needs the wandb package)."""
    max_nonfinite_steps: int = 10
    """Abort after this many consecutive steps with a non-finite loss or gradient norm."""
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
        if self.method.use_align:
            grid = latent // sizes["patch_size"]
            enc_grid = (self.data.image_size * 224 // 256) // 14
            _require(grid == enc_grid, "model.patch_size",
                     f"alignment needs the SiT token grid ({grid}x{grid}) to equal the DINOv2 patch grid ({enc_grid}x{enc_grid}); use patch size 2")

    @property
    def in_channels(self) -> int:
        return 4 + (self.method.semantic_channels if self.method.semantic != "none" else 0)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = typing.get_type_hints(cls)[f.name]
            values = dict(d.get(f.name, {}))
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"{f.name}: unknown fields {sorted(bad)}")
            sections[f.name] = section_cls(**values)
        return cls(**sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
        if section not in d or not name:
            raise ConfigError(f"{key}: expected section.field with section in {sorted(d)}")
        section_hints = typing.get_type_hints(hints[section])
        if name not in section_hints:
            raise ConfigError(f"{key}: unknown field; {section} has {sorted(section_hints)}")
        d[section][name] = _coerce(value, section_hints[name], key) if isinstance(value, str) else value
    return Config.from_dict(d)
