"""The ViT forward equals a plain-torch reference computed from its raw weights; --moe-layer-freq."""

import pytest
import torch
import torch.nn.functional as F

from helpers import expert_fn, tiny_config
from selfmoe.models import build_gpt_model, build_vit_model, moe_layers
from selfmoe.models.moe_spec import parse_moe_layer_freq


def vit_config(router="self", **kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=40, moe_ffn_hidden_size=24,
                max_position_embeddings=5, vocab_size=0, moe_router_type=router, hash_router_by="position")
    base.update(kw)
    return tiny_config(router, **base)


def reference_forward(model, images, pool):
    """Patch conv, [class token], position embeddings, pre-norm layers with unmasked attention and
    the MoE as sum_e probs * expert_e (Self-Routing: softmax over the top-k of the last E channels),
    final norm, pooling, head -- from the raw weights, with plain torch."""
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.kv_channels
    x = F.conv2d(images, model.conv1.weight, model.conv1.bias, stride=model.patch_dim).flatten(2).transpose(1, 2)
    if pool == "cls":
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1)
    x = x + model.position_embeddings
    b, s, H = x.shape
    ln = lambda t, m: F.layer_norm(t, (H,), m.weight, m.bias, cfg.layernorm_epsilon)  # noqa: E731
    for layer in model.decoder.layers:
        att = layer.self_attention
        qkv = ln(x, layer.input_layernorm) @ att.linear_qkv.weight.t()
        if att.linear_qkv.bias is not None:
            qkv = qkv + att.linear_qkv.bias
        q, k, v = qkv.view(b, s, heads, 3 * d).split(d, dim=-1)  # Megatron: [q k v] per head
        a = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5, -1)  # no mask: bidirectional
        o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, s, heads * d) @ att.linear_proj.weight.t()
        x = x + o + (att.linear_proj.bias if att.linear_proj.bias is not None else 0)
        h = ln(x, layer.pre_mlp_layernorm).reshape(b * s, H)
        if hasattr(layer.mlp, "router"):
            E, topk = cfg.num_moe_experts, cfg.moe_router_topk
            top = h[:, H - E:].topk(topk, dim=-1)
            probs = torch.zeros(b * s, E).scatter(1, top.indices, torch.softmax(top.values, -1))
            out = sum(probs[:, e:e + 1] * expert_fn(layer.mlp, e)(h) for e in range(E))
        else:
            out = cfg.activation_func(h @ layer.mlp.linear_fc1.weight.t()) @ layer.mlp.linear_fc2.weight.t()
        x = x + out.view(b, s, H)
    x = ln(x, model.decoder.final_layernorm)
    x = x[:, 0] if pool == "cls" else x.mean(1)
    return x @ model.head.weight.t() + model.head.bias


@pytest.mark.parametrize("pool,experts,freq", [("cls", 4, 2), ("mean", None, 1)])
def test_vit_forward_equals_plain_torch_reference(mp, pool, experts, freq):
    seq = 4 + (pool == "cls")
    moe = dict(num_moe_experts=experts, moe_layer_freq=freq) if experts else dict(num_moe_experts=None,
                                                                                 moe_ffn_hidden_size=None)
    cfg = vit_config(max_position_embeddings=seq, **moe)
    model = build_vit_model(cfg, img_h=8, img_w=8, patch_dim=4, num_channels=2, num_classes=7, pool=pool)
    assert len(moe_layers(model)) == (1 if experts else 0)  # freq 2 of 2 layers: layer 1 MoE, layer 2 dense
    images = torch.randn(3, 2, 8, 8)
    out = model(images)
    assert out.shape == (3, 7)
    torch.testing.assert_close(out, reference_forward(model, images, pool), atol=1e-5, rtol=1e-5)
    # bidirectional: the class token's output depends on the last patch
    images2 = images.clone()
    images2[:, :, 4:, 4:] += 1.0
    assert not torch.allclose(model(images2)[:, 0], out[:, 0])


@pytest.mark.parametrize("router", ["learned", "random", "hash", "routing-free"])
def test_every_router_builds_and_routes_patches(mp, router):
    cfg = vit_config(router=router, num_moe_experts=4)
    model = build_vit_model(cfg, img_h=8, img_w=8, patch_dim=4, num_channels=1, num_classes=3)
    seen = []
    h = moe_layers(model)[0].router.register_forward_hook(lambda m, i, o: seen.append(o[1]))
    out = model(torch.randn(2, 1, 8, 8))
    h.remove()
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert seen[0].shape == (5 * 2, 4)
    if router == "hash":  # by patch position: both images route each position alike
        rm = seen[0].view(5, 2, 4)
        assert torch.equal(rm[:, 0], rm[:, 1])


def test_parse_moe_layer_freq():
    assert parse_moe_layer_freq(1, 3) == [1, 1, 1]
    assert parse_moe_layer_freq("2", 5) == [1, 0, 1, 0, 1]
    assert parse_moe_layer_freq("([0]+[1]*3)", 4) == [0, 1, 1, 1]
    assert parse_moe_layer_freq("[1,0]*2", 4) == [1, 0, 1, 0]
    for bad in ("0", "[1,0]", "[2,1,1,1]", "__import__('os')", "[1,0"):
        with pytest.raises(ValueError):
            parse_moe_layer_freq(bad, 4)


def test_gpt_follows_moe_layer_freq(mp):
    cfg = tiny_config("self", num_layers=4, moe_layer_freq=[0, 1, 0, 1])
    model = build_gpt_model(cfg)
    kinds = [hasattr(layer.mlp, "router") for layer in model.decoder.layers]
    assert kinds == [False, True, False, True]
    assert [r.layer_number for r in (m.router for m in moe_layers(model))] == [2, 4]
