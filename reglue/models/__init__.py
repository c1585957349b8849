"""Model construction from a run config."""

from __future__ import annotations


def build_model(config, kernels=None, attention: str | None = None):
    """The SiT of ``config`` (``reglue.config.Config``): input channels, [CLS] and projectors follow the method.

    ``kernels``: "eager", "triton" or the set of fused ops (a run passes the set it resolved for its
    device, ``reglue.train.parallelize.resolve_execution``); None takes ``model.kernels``, where
    "auto" builds eager (a model built outside a run, for sampling or export, has no device yet).
    """
    from reglue.models.sit import SiT

    if kernels is None:
        kernels = "eager" if config.model.kernels == "auto" else config.model.kernels

    sizes = config.model.sizes()
    method = config.method
    enc_dim = config.encoders.embed_dim
    return SiT(
        input_size=config.data.latent_size,
        in_channels=config.in_channels,
        mlp_ratio=config.model.mlp_ratio,
        class_dropout_prob=config.model.class_dropout_prob,
        num_classes=config.model.num_classes,
        z_dims=(enc_dim,) if method.use_align else (),
        encoder_depth=config.model.encoder_depth,
        projector_dim=config.model.projector_dim,
        cls_token_dim=enc_dim if method.use_cls else 0,
        qk_norm=config.model.qk_norm,
        mlp_gelu=config.model.mlp_gelu,
        kernels=kernels,
        attention=attention or config.model.attention,
        **sizes,
    )
