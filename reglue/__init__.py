"""reglue: fast, scalable trainer for REGLUE-style latent diffusion."""

__version__ = "0.1.0"
