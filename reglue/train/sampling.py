"""Sampling images from (EMA) weights of a run: build the model, run the sampler, decode."""

from __future__ import annotations

from typing import Dict

import torch

from reglue.config import Config
from reglue.diffusion.samplers import sample
from reglue.models import build_model


@torch.no_grad()
def sample_from_state(config: Config, state: Dict[str, torch.Tensor], vae, device: torch.device, num: int, seed: int,
                      sampler: str = "sde", num_steps: int | None = None, cfg_scale: float | None = None) -> torch.Tensor:
    """uint8 (num, 3, H, W) images, class labels cycling through the classes.

    The semantic channels and the [CLS] token are sampled jointly and discarded; only the VAE
    channels are decoded.
    """
    tc = config.train
    model = build_model(config, kernels="eager")
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    size = config.data.latent_size
    x = torch.randn((num, config.in_channels, size, size), generator=g, device=device)
    cls = torch.randn((num, model.cls_token_dim), generator=g, device=device) if model.cls_token_dim else None
    classes = config.data.synthetic_classes if config.data.path is None else config.model.num_classes
    y = torch.arange(num, device=device) % classes
    # bf16 autocast on GPU (the sampler keeps its state in fp64; only the network runs in bf16)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        latents, _ = sample(
            model, x, y, cls, sampler=sampler, num_steps=num_steps or tc.sample_steps, generator=g,
            cfg_scale=tc.sample_cfg_scale if cfg_scale is None else cfg_scale,
            guidance_interval=tc.sample_guidance_interval, path=config.method.path,
        )
    return vae.decode(latents[:, :4].float()).cpu()
