"""The trainer's sample grids: EMA weights -> uint8 images, by the evaluation layer's sampler
(:func:`reglue.evaluation.generate.sample_grid`; one implementation of model + noise + sampler +
decode for the trainer, ``reglue sample`` and ``reglue generate``)."""

from typing import TYPE_CHECKING

import torch

from reglue.evaluation.generate import label_classes, sample_grid as sample_from_state

if TYPE_CHECKING:
    from reglue.config import Config

__all__ = ["sample_from_state", "sample_labels"]


def sample_labels(config: "Config", num: int) -> torch.Tensor:
    """Class labels of a grid of ``num`` samples, as :func:`sample_from_state` draws them: 0, 1,
    2, ... cycling through the classes the run trained on."""
    return torch.arange(num) % label_classes(config)
