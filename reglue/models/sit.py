"""SiT backbone for REGLUE, REG, ReDi, REPA and plain SiT.

One readable file: embedders, the adaLN-Zero block, the final layer and the model. Parameter
names and shapes equal the published REGLUE checkpoints, so their ``ema`` state dict loads with
``strict=True``.

Tokens: the latent (plus semantic channels) is patchified into T = (H/p)·(W/p) tokens; with a
[CLS] token (REG/REGLUE) one more token is prepended, so blocks see T + 1 tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import zlib
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from reglue.kernels import select_ops
from reglue.models.attention import Attention
from reglue.models.state import check_state_dict
from reglue.runtime import clean_name, seeded_generator

def param_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator for one parameter's initialisation, seeded by (seed, name)."""
    return seeded_generator(seed, zlib.crc32(name.encode()))


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a p×p stride-p convolution (``proj``)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Continuous t in [0, 1] -> (N, D): sinusoidal features (cos first, then sin) and an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row ``num_classes`` is the null label used for CFG and label dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, train: bool, force_drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``force_drop`` (N,) bool replaces the random draw (the trainer draws it per sample so
        that runs do not depend on world size); it is honoured in training mode only."""
        if train and self.dropout_prob > 0:
            if force_drop is None:
                force_drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(force_drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


GELU_APPROXIMATIONS = {"tanh": "tanh", "exact": "none"}
"""``model.mlp_gelu`` -> ``nn.GELU(approximate=...)``: ``tanh`` (the approximation SiT and the
published checkpoints use) or ``exact`` (erf)."""


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (names as timm's Mlp, which the checkpoints use); ``gelu``: a key of
    :data:`GELU_APPROXIMATIONS`."""

    def __init__(self, hidden_size: int, mlp_hidden: int, gelu: str = "tanh"):
        super().__init__()
        if gelu not in GELU_APPROXIMATIONS:
            raise ValueError(f"gelu must be one of {list(GELU_APPROXIMATIONS)}, got {gelu!r}")
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate=GELU_APPROXIMATIONS[gelu])
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block. The norm/modulate/gate/residual steps are the fused ops of
    ``reglue.kernels``; ``kernels`` ("eager", "triton" or the set of ops that run fused) picks, op
    by op, the Triton kernel or its eager reference (which is the published block's arithmetic)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        kernels="eager",
        attention_backend: str = "auto",
        mlp_gelu: str = "tanh",
    ):
        super().__init__()
        self.ops = select_ops(kernels)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, kernels=kernels, backend=attention_backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), mlp_gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D) tokens; c: (N, D) conditioning.

        x + g_msa·attn(LN(x)·(1 + s_msa) + b_msa), then the same with the MLP; the residual of
        the first half and the modulated LN of the second come out of one op."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        ops = self.ops
        h = ops.adaln_modulate(x, shift_msa, scale_msa, eps=1e-6)
        x, h = ops.gated_residual_adaln(x, self.attn(h), gate_msa, shift_mlp, scale_mlp, eps=1e-6)
        return ops.gated_residual(x, self.mlp(h), gate_mlp)


class FinalLayer(nn.Module):
    """Final adaLN modulation, then ``linear`` for patch tokens and ``linear_cls`` for the [CLS] token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cls_token_dim: int = 0, kernels="eager"):
        super().__init__()
        self.ops = select_ops(kernels)
        self.has_cls = bool(cls_token_dim)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if self.has_cls:
            self.linear_cls = nn.Linear(hidden_size, cls_token_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        """x: (N, T[+1], D) -> (patch outputs (N, T, p·p·C), cls output (N, cls_dim) or None)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = self.ops.adaln_modulate(x, shift, scale, eps=1e-6)
        if self.has_cls:
            return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])
        return self.linear(x), None


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear -> SiLU -> Linear -> SiLU -> Linear (keys 0, 2, 4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


# --------------------------------------------------------------------------------------------
# Positional embedding
# --------------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, extra_tokens: int = 0) -> np.ndarray:
    """(extra_tokens + grid_size², embed_dim): 2-D sin-cos table (MAE/DiT layout), zero rows for extra tokens."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos positional embedding needs hidden size divisible by 4, got {embed_dim}")
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in MAE/DiT
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)
    if extra_tokens:
        pos_embed = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)
    return pos_embed


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class SiT(nn.Module):
    """SiT with REPA projectors and an optional REG [CLS] token.

    forward(x, t, y, cls_token=None) -> (out, zs, cls_out):
      x: (N, in_channels, H, W) noisy latents (+ semantic channels); t: (N,) in [0, 1];
      y: (N,) int64 labels, ``num_classes`` = null label; cls_token: (N, cls_token_dim) noisy [CLS]
      (required when the model has a [CLS] token); force_drop: optional (N,) bool label-dropout
      mask used in training mode instead of a random draw.
      out: (N, in_channels, H, W) velocity; zs: list of (N, T[+1], z_dim) projector outputs read
      after block ``encoder_depth``; cls_out: (N, cls_token_dim) or None.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: Sequence[int] = (768,),
        encoder_depth: int = 8,
        projector_dim: int = 2048,
        cls_token_dim: Optional[int] = 768,
        qk_norm: bool = False,
        kernels="eager",
        attention: str = "auto",
        mlp_gelu: str = "tanh",
    ):
        super().__init__()
        z_dims = tuple(z_dims or ())
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}] when projectors are used, got {encoder_depth}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.z_dims = z_dims
        self.encoder_depth = encoder_depth
        self.cls_token_dim = int(cls_token_dim or 0)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_extra = 1 if self.cls_token_dim else 0
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.x_embedder.num_patches + num_extra, hidden_size), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            [
                SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, kernels=kernels, attention_backend=attention,
                         mlp_gelu=mlp_gelu)
                for _ in range(depth)
            ]
        )
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, self.cls_token_dim, kernels=kernels)
        if self.cls_token_dim:
            self.cls_projectors2 = nn.Linear(self.cls_token_dim, hidden_size, bias=True)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    def init_tensor(self, name: str, shape, generator: torch.Generator) -> torch.Tensor:
        """Initial value of parameter ``name`` (SiT/DiT scheme: xavier linears, fixed sin-cos
        positions, N(0, 0.02) label table and timestep MLP, zero adaLN and output layers).

        A pure function of (name, shape, generator): the trainer materialises sharded models one
        parameter at a time with it, so every world size starts from identical weights.
        """
        out = torch.empty(shape)
        if name == "pos_embed":
            pos = get_2d_sincos_pos_embed(shape[-1], self.x_embedder.grid_size, int(bool(self.cls_token_dim)))
            return torch.from_numpy(pos).float().reshape(shape)
        zero_layers = ("adaLN_modulation.", "final_layer.linear.", "final_layer.linear_cls.")
        if name.endswith("bias") or any(z in name for z in zero_layers):
            return out.zero_()
        if name.endswith("norm.weight"):  # wg_norm, q_norm, k_norm
            return out.fill_(1.0)
        if name == "y_embedder.embedding_table.weight" or name.startswith("t_embedder.mlp."):
            return out.normal_(0.0, 0.02, generator=generator)
        if name == "x_embedder.proj.weight":
            nn.init.xavier_uniform_(out.view(shape[0], -1), generator=generator)
            return out
        if len(shape) == 2:
            return nn.init.xavier_uniform_(out, generator=generator)
        raise KeyError(f"no initialisation rule for parameter {name} {tuple(shape)}")

    @torch.no_grad()
    def initialize_weights(self, seed: int = 0) -> None:
        for name, param in self.named_parameters():
            param.copy_(self.init_tensor(name, param.shape, param_generator(seed, name)))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) with each patch laid out (p, q, c) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls_token: Optional[torch.Tensor],
              force_drop: Optional[torch.Tensor] = None):
        """Tokens (N, T[+1], D) with positions added, and the conditioning vector c (N, D)."""
        x = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype))
        if self.cls_token_dim:
            if cls_token is None:
                raise ValueError("this model has a [CLS] token (cls_token_dim > 0): pass cls_token=(N, cls_token_dim)")
            cls = self.wg_norm(self.cls_projectors2(cls_token.to(x.dtype)))
            x = torch.cat([cls.unsqueeze(1), x], dim=1)
        elif cls_token is not None:
            raise ValueError("cls_token was given but this model has no [CLS] token (cls_token_dim = 0)")
        x = x + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop)
        return x, c

    def project(self, x: torch.Tensor) -> list:
        """REPA projector outputs [(N, T[+1], z_dim)] of block ``encoder_depth``'s tokens."""
        return [proj(x) for proj in self.projectors]

    def head(self, x: torch.Tensor, c: torch.Tensor):
        """Final layer: velocity (N, C, H, W) and the [CLS] output (N, cls_dim) or None."""
        out, cls_out = self.final_layer(x, c)
        return self.unpatchify(out), cls_out

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls_token: Optional[torch.Tensor] = None,
                force_drop: Optional[torch.Tensor] = None):
        # embed / blocks / project / head are the regions the trainer compiles one by one
        x, c = self.embed(x, t, y, cls_token, force_drop)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.encoder_depth:
                zs = self.project(x)
        out, cls_out = self.head(x, c)
        return out, zs, cls_out


# --------------------------------------------------------------------------------------------
# Registry and checkpoint loading
# --------------------------------------------------------------------------------------------

# depth, hidden size, heads per size (as in SiT/DiT)
SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _make(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def build(**kwargs) -> SiT:
        return SiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)

    return build


SiT_models = {
    f"SiT-{size}/{patch}": _make(depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in SIT_SIZES.items()
    for patch in (2, 4, 8)
}


def load_sit_checkpoint(model: SiT, path_or_state, key: str = "ema", strict: bool = True) -> SiT:
    """Load a published REGLUE/REG/REPA checkpoint (``{"ema": state_dict, ...}``) into ``model``.

    ``path_or_state`` is a file (torch.save, loaded with ``weights_only=True``; or .safetensors)
    or an already loaded dict. ``key`` picks the entry ("ema" or "model"), or the keys prefixed
    ``key.``; a bare state dict is accepted too. Errors name the missing/unexpected keys and mismatched shapes.
    """
    if isinstance(path_or_state, dict):
        ckpt = path_or_state
    elif os.path.isdir(path_or_state):
        raise ValueError(f"{path_or_state} is a directory: for a reglue training checkpoint use "
                         "`reglue export --checkpoint DIR --out FILE.safetensors` and load that file")
    elif str(path_or_state).endswith(".safetensors"):  # an export's checksum is verified (see reglue.integrity)
        from reglue.integrity import load_safetensors

        ckpt = load_safetensors(path_or_state, fix="export it again (`reglue export`)")[0]
    else:
        # The published train.py stores its argparse.Namespace under "args": allow exactly that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path_or_state, map_location="cpu", weights_only=True)
    if key in ckpt and isinstance(ckpt[key], dict):
        state = ckpt[key]
    elif any(k.startswith(f"{key}.") for k in ckpt):  # `reglue export --weights both`
        state = {k[len(key) + 1:]: v for k, v in ckpt.items() if k.startswith(f"{key}.")}
    elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise KeyError(f"checkpoint has no {key!r} entry (found {sorted(ckpt)[:10]})")
    state = {clean_name(k): v for k, v in state.items()}
    check_state_dict(model.state_dict(), state, "the model (check the --preset / model and method settings)", strict)
    model.load_state_dict(state, strict=strict)
    return model
