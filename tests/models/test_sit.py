"""SiT: published-checkpoint parity (keys, shapes, layouts), registry shapes, loading."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from reglue.models.sit import SiT, SiT_models, TimestepEmbedder, get_2d_sincos_pos_embed, load_sit_checkpoint
from tests.conftest import assert_close


def expected_reglue_b2_keys(depth=12, d=768, in_ch=20, p=2, z=768, proj=2048, cls=768, classes=1000, tokens=256):
    """Keys and shapes of the published REGLUE SiT-B/2 `ema` state dict, written from the spec."""
    keys = {
        "pos_embed": (1, tokens + 1, d),
        "x_embedder.proj.weight": (d, in_ch, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "projectors.0.0.weight": (proj, d), "projectors.0.0.bias": (proj,),
        "projectors.0.2.weight": (proj, proj), "projectors.0.2.bias": (proj,),
        "projectors.0.4.weight": (z, proj), "projectors.0.4.bias": (z,),
        "final_layer.linear.weight": (p * p * in_ch, d), "final_layer.linear.bias": (p * p * in_ch,),
        "final_layer.linear_cls.weight": (cls, d), "final_layer.linear_cls.bias": (cls,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "cls_projectors2.weight": (d, cls), "cls_projectors2.bias": (d,),
        "wg_norm.weight": (d,), "wg_norm.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return keys


def reglue_b2(device="meta"):
    with torch.device(device):
        return SiT_models["SiT-B/2"](input_size=32, in_channels=20, z_dims=(768,), encoder_depth=4, cls_token_dim=768)


def test_state_dict_matches_published_reglue_b2():
    got = {k: tuple(v.shape) for k, v in reglue_b2().state_dict().items()}
    want = expected_reglue_b2_keys()
    assert sorted(set(want) - set(got)) == [], "missing"
    assert sorted(set(got) - set(want)) == [], "unexpected"
    assert {k: got[k] for k in want} == want


def small(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=6, hidden_size=32, depth=3, num_heads=4, num_classes=5,
                z_dims=(24,), encoder_depth=2, projector_dim=16, cls_token_dim=12)
    args.update(kw)
    return SiT(**args)


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("name", sorted(SiT_models))
@pytest.mark.parametrize("cls_dim", [768, 0])
def test_registry_forward_shapes(name, cls_dim):
    with torch.device("meta"):
        model = SiT_models[name](input_size=32, in_channels=20, z_dims=(768,), encoder_depth=4, cls_token_dim=cls_dim)
        x, t, y = torch.randn(2, 20, 32, 32), torch.rand(2), torch.zeros(2, dtype=torch.long)
        out, zs, cls_out = model(x, t, y, torch.randn(2, cls_dim) if cls_dim else None)
    patch = int(name.split("/")[1])
    tokens = (32 // patch) ** 2 + (1 if cls_dim else 0)
    assert out.shape == (2, 20, 32, 32)
    assert [tuple(z.shape) for z in zs] == [(2, tokens, 768)]
    assert (cls_out is None) == (cls_dim == 0)
    if cls_dim:
        assert cls_out.shape == (2, 768)
    depth, hidden, heads = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}[name[4:].split("/")[0]]
    assert len(model.blocks) == depth and model.pos_embed.shape[-1] == hidden and model.num_heads == heads


def test_published_checkpoint_loads_strict_and_reproduces_outputs(tmp_path):
    src = randomize(small())
    path = tmp_path / "ckpt.pt"
    # the published train.py layout, with its argparse.Namespace under "args"
    args = argparse.Namespace(model="SiT-B/2", enc_type="dinov2-vit-b", encoder_depth=4, cfg_prob=0.1)
    torch.save({"ema": src.state_dict(), "model": src.state_dict(), "opt": {}, "args": args, "steps": 10}, path)
    dst = load_sit_checkpoint(small(), path)
    x, t, y, c = torch.randn(2, 6, 8, 8), torch.rand(2), torch.tensor([1, 5]), torch.randn(2, 12)
    src.eval(), dst.eval()
    for a, b in zip(src(x, t, y, c)[::2], dst(x, t, y, c)[::2]):
        assert torch.equal(a, b)
    # DDP-style `module.` prefixes are stripped
    torch.save({"ema": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    load_sit_checkpoint(small(), path)


def test_checkpoint_mismatch_names_the_problem(tmp_path):
    state = small().state_dict()
    state["x_embedder.proj.weight"] = torch.zeros(32, 4, 2, 2)
    del state["wg_norm.bias"]
    with pytest.raises(ValueError) as err:
        load_sit_checkpoint(small(), {"ema": state})
    assert "missing keys: ['wg_norm.bias']" in str(err.value)
    assert "x_embedder.proj.weight: checkpoint (32, 4, 2, 2) vs model (32, 6, 2, 2)" in str(err.value)
    with pytest.raises(ValueError, match="reglue export"):
        load_sit_checkpoint(small(), tmp_path)
    with pytest.raises(KeyError, match="no 'ema' entry"):
        load_sit_checkpoint(small(), {"ema_weights": {"a": 1}})


def test_init_is_adaln_zero():
    model = small()
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
    out, _, cls_out = model(torch.randn(2, 6, 8, 8), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 12))
    assert torch.count_nonzero(out) == 0 and torch.count_nonzero(cls_out) == 0
    assert model.pos_embed.requires_grad is False


def test_pos_embed_cls_row_zero_and_sincos():
    model = small()
    pos = model.pos_embed[0]
    assert torch.count_nonzero(pos[0]) == 0
    table = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float()
    assert_close(pos[1:], table)
    # position (0, 0): sin part 0, cos part 1 in each half
    assert torch.equal(table[0], torch.tensor(([0.0] * 8 + [1.0] * 8) * 2))


def test_timestep_embedding_cos_first():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 0.5]), 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    assert_close(emb[1], torch.cat([torch.cos(0.5 * freqs), torch.sin(0.5 * freqs)]))


def test_attention_qkv_layout_is_3_heads_headdim():
    attn = randomize(small()).blocks[0].attn
    x = torch.randn(2, 7, 32)
    w, b = attn.qkv.weight, attn.qkv.bias
    heads, hd = 4, 8
    outs = []
    for h in range(heads):
        q = x @ w[h * hd:(h + 1) * hd].T + b[h * hd:(h + 1) * hd]
        k = x @ w[32 + h * hd:32 + (h + 1) * hd].T + b[32 + h * hd:32 + (h + 1) * hd]
        v = x @ w[64 + h * hd:64 + (h + 1) * hd].T + b[64 + h * hd:64 + (h + 1) * hd]
        outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v)
    want = attn.proj(torch.cat(outs, dim=-1))
    assert_close(attn(x), want, atol=1e-5)


def test_unpatchify_layout_and_cls_head_reads_token_zero():
    model = randomize(small())
    p, c = 2, 6
    x = torch.randn(1, 16, p * p * c)
    img = model.unpatchify(x)
    for (hh, ww, i, j, ch) in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 3), (3, 3, 1, 1, 5), (2, 1, 0, 1, 2)]:
        assert img[0, ch, hh * p + i, ww * p + j] == x[0, hh * 4 + ww, (i * p + j) * c + ch]
    tokens, cond = torch.randn(2, 17, 32), torch.randn(2, 32)
    out, cls_out = model.final_layer(tokens, cond)
    shift, scale = model.final_layer.adaLN_modulation(cond).chunk(2, dim=-1)
    h = F.layer_norm(tokens, (32,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert_close(cls_out, model.final_layer.linear_cls(h[:, 0]))
    assert_close(out, model.final_layer.linear(h[:, 1:]))


def test_projector_reads_block_encoder_depth_and_cls_token_is_prepended():
    model = randomize(small(encoder_depth=2)).eval()
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    x, t, y, c = torch.randn(2, 6, 8, 8), torch.rand(2), torch.tensor([0, 3]), torch.randn(2, 12)
    _, zs, _ = model(x, t, y, c)
    assert_close(zs[0], model.projectors[0](seen["h"]))
    tokens, _ = model.embed(x, t, y, c)
    cls = model.wg_norm(model.cls_projectors2(c))
    assert_close(tokens[:, 0], cls + model.pos_embed[0, 0])


def test_label_dropout_only_in_training():
    model = randomize(small(class_dropout_prob=0.5))
    y = torch.tensor([1, 2])
    drop = torch.tensor([True, False])
    model.train()
    emb = model.y_embedder(y, True, drop)
    assert torch.equal(emb[0], model.y_embedder.embedding_table.weight[5])
    assert torch.equal(emb[1], model.y_embedder.embedding_table.weight[2])
    model.eval()
    x, t, c = torch.randn(2, 6, 8, 8), torch.rand(2), torch.randn(2, 12)
    a = model(x, t, y, c, force_drop=drop)[0]
    b = model(x, t, y, c)[0]
    assert torch.equal(a, b)


def test_cls_token_errors_are_clear():
    with pytest.raises(ValueError, match="pass cls_token"):
        small()(torch.randn(1, 6, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        small(cls_token_dim=0)(torch.randn(1, 6, 8, 8), torch.rand(1), torch.tensor([0]), torch.randn(1, 12))


def test_init_is_independent_of_construction_order():
    a, b = small(), small()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_pos_embed_matches_the_mae_formula():
    """An independent statement of the MAE/DiT 2-D table: token (row i, column j) holds
    [sin(j w), cos(j w), sin(i w), cos(i w)] with w_m = 10000^(-4m/D), m < D/4; the [CLS] row is 0."""
    model = small()
    d, grid = model.pos_embed.shape[-1], model.x_embedder.grid_size
    w = torch.tensor([10000.0 ** (-4.0 * m / d) for m in range(d // 4)], dtype=torch.float64)
    rows = []
    for i in range(grid):
        for j in range(grid):
            rows.append(torch.cat([torch.sin(j * w), torch.cos(j * w), torch.sin(i * w), torch.cos(i * w)]))
    want = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.stack(rows)])
    torch.testing.assert_close(model.pos_embed[0].double(), want, rtol=0, atol=1e-6)


def test_mlp_gelu_is_tanh_for_the_published_models_and_exact_when_asked():
    """``model.mlp_gelu``: the published presets keep SiT's tanh GELU; ``exact`` is erf GELU (the
    tiny demo's: on the CPU about 3x cheaper), with the same parameters; a run's config.json from
    before the field reads as tanh, as it was trained."""
    import functools
    import json

    from reglue.config import Config, apply_overrides
    from reglue.models import build_model
    from reglue.presets import PRESETS, get_preset

    small = functools.partial(SiT, input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                              z_dims=(), cls_token_dim=0)
    x = torch.randn(2, 5, 16)
    tanh, exact = small().blocks[0].mlp, small(mlp_gelu="exact").blocks[0].mlp
    exact.load_state_dict(tanh.state_dict())
    h = tanh.fc1(x)
    assert_close(tanh(x), tanh.fc2(F.gelu(h, approximate="tanh")))
    assert_close(exact(x), exact.fc2(F.gelu(h)))
    assert not torch.allclose(tanh(x), exact(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"gelu must be one of \['tanh', 'exact'\], got 'erf'"):
        small(mlp_gelu="erf")

    assert all(get_preset(name).model.mlp_gelu == "tanh" for name in PRESETS if name != "tiny")
    tiny = get_preset("tiny")
    assert tiny.model.mlp_gelu == "exact" and build_model(tiny).blocks[0].mlp.act.approximate == "none"
    old = json.loads(tiny.to_json())
    del old["model"]["mlp_gelu"]
    assert Config.from_dict(old).model.mlp_gelu == "tanh"
    assert build_model(apply_overrides(tiny, {"model.mlp_gelu": "tanh"})).blocks[0].mlp.act.approximate == "tanh"
