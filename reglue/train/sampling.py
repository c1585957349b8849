"""Sampling images from (EMA) weights of a run: build the model, run the sampler, decode."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from reglue.config import Config, SampleConfig
from reglue.diffusion.samplers import sample
from reglue.models import build_model


def sample_labels(config: Config, num: int) -> torch.Tensor:
    """Class labels of a run's samples: 0, 1, 2, ... cycling through the data's classes."""
    classes = config.data.synthetic_classes if config.data.path is None else config.model.num_classes
    return torch.arange(num) % classes


@torch.no_grad()
def sample_from_state(config: Config, state: Dict[str, torch.Tensor], vae, device: torch.device, num: int, seed: int,
                      settings: Optional[SampleConfig] = None) -> torch.Tensor:
    """uint8 (num, 3, H, W) images of the classes :func:`sample_labels`, drawn with
    ``settings`` (default: the run's ``sample`` section).

    The semantic channels and the [CLS] token are sampled jointly and discarded; only the VAE
    channels are decoded.
    """
    settings = settings or config.sample
    model = build_model(config, kernels="eager")
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    size = config.data.latent_size
    x = torch.randn((num, config.in_channels, size, size), generator=g, device=device)
    cls = torch.randn((num, model.cls_token_dim), generator=g, device=device) if model.cls_token_dim else None
    y = sample_labels(config, num).to(device)
    # bf16 autocast on GPU (the sampler keeps its state in fp64; only the network runs in bf16)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        latents, _ = sample(model, x, y, cls, generator=g, path=config.method.path, **settings.sampler_options())
    return vae.decode(latents[:, :4].float()).cpu()
