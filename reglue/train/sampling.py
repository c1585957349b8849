"""The trainer's sample grids: EMA weights -> uint8 images, by the evaluation layer's sampler
(:func:`reglue.evaluation.generate.sample_grid`; one implementation of model + noise + sampler +
decode for the trainer, ``reglue sample`` and ``reglue generate``)."""

from reglue.evaluation.generate import sample_grid as sample_from_state

__all__ = ["sample_from_state"]
