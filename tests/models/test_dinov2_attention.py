"""The frozen DINOv2 runs its attention through reglue.models.attention (FA3/FA2 on a GPU) with
timm's own weights: same state-dict keys, same outputs as timm's attention."""

import timm
import torch

from reglue.models import attention as attention_module
from reglue.models.attention import Attention
from reglue.models.encoders import DINOv2Encoder, tiny_dinov2


def _timm_twin(encoder: DINOv2Encoder):
    """The same ViT with timm's own attention modules and the encoder's weights."""
    twin = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0,
                             embed_dim=32, depth=4, num_heads=2)
    twin.load_state_dict(encoder.model.state_dict())
    return twin


def test_dinov2_attention_is_ours_with_timm_weights_and_outputs(monkeypatch):
    encoder = tiny_dinov2()
    twin = _timm_twin(encoder)
    assert all(isinstance(block.attn, Attention) for block in encoder.model.blocks)
    assert encoder.model.state_dict().keys() == twin.state_dict().keys()
    assert all(type(block.attn).__module__.startswith("timm") for block in twin.blocks)

    calls = []
    sdpa = attention_module._IMPLS["sdpa"]
    monkeypatch.setitem(attention_module._IMPLS, "sdpa", lambda q, k, v: calls.append(q.shape) or sdpa(q, k, v))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = encoder(images)
    assert len(calls) == 4  # one dispatch per block
    with torch.no_grad():
        final, intermediates = twin.forward_intermediates(encoder.preprocess(images), indices=list(encoder.layers),
                                                          norm=True, output_fmt="NCHW")
    torch.testing.assert_close(out.features, torch.cat(intermediates, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls, final[:, 0], atol=1e-5, rtol=1e-5)
