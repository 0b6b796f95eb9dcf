"""Multi-latent attention, multi-token prediction and RoPE scaling reached through the command
line, each against an independent reference: a hand count of the architecture's parameters,
PyTorch's own attention, a cross entropy computed here from the MTP head's logits, and the
published frequency formulas (Llama 3.x RoPE scaling; YaRN, Peng et al. 2023, with DeepSeek-V2's
attention-scale rule)."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfmoe.models import build_gpt_model
from selfmoe.routers import moe_layers
from selfmoe.training.arguments import args_to_config, build_parser, parse_args, validate_args, ArgumentError

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 60 "
        "--hidden-dropout 0 --attention-dropout 0 --normalization RMSNorm --swiglu --disable-bias-linear "
        "--position-embedding-type rope --untie-embeddings-and-output-weights").split()
MOE = ["--num-experts", "4", "--moe-ffn-hidden-size", "24"]
H, NH, V, S, FFN = 32, 4, 128, 16, 128  # V: 60 ids + eod, padded to 128; FFN: swiglu default for H=32 -> 64
MLA = dict(q=16, kv=8, qk=8, pe=4, v=8)


def mla_flags(q_lora=True, qk_layernorm=True, **kw):
    d = {**MLA, **kw}
    flags = ["--multi-latent-attention", "--kv-lora-rank", str(d["kv"]), "--qk-head-dim", str(d["qk"]),
             "--qk-pos-emb-head-dim", str(d["pe"]), "--v-head-dim", str(d["v"])]
    return flags + (["--q-lora-rank", str(d["q"])] if q_lora else []) + (["--qk-layernorm"] if qk_layernorm else [])


def build(extra, seed=0):
    args = parse_args(BASE + list(extra))
    config = args_to_config(args)
    torch.manual_seed(seed)
    return build_gpt_model(config), config, args


def nparams(module):
    return sum(p.numel() for p in module.parameters())


def mla_attention_params(q_lora=True, qk_layernorm=True):
    """DeepSeek-V2/V3 multi-latent attention: queries through a rank-q bottleneck (or one projection),
    keys/values through a rank-kv latent plus a shared RoPE key, per-head up-projections."""
    q, kv, qk, pe, v = MLA["q"], MLA["kv"], MLA["qk"], MLA["pe"], MLA["v"]
    query = (H * q + (q if qk_layernorm else 0) + q * NH * (qk + pe)) if q_lora else H * NH * (qk + pe)
    key_value = H * (kv + pe) + (kv if qk_layernorm else 0) + kv * NH * (qk + v)
    return query + key_value + NH * v * H  # + output projection


def moe_mlp_params(router):
    E, F_ = 4, 24
    return H + (E * H if router == "learned" else 0) + E * (H * 2 * F_ + F_ * H)  # pre-MLP norm, router, experts


@pytest.mark.parametrize("q_lora,qk_layernorm", [(True, True), (False, False)], ids=["q-lora+norms", "plain"])
def test_mla_parameter_count_is_the_hand_count(mp, q_lora, qk_layernorm):
    model, c, _ = build(mla_flags(q_lora, qk_layernorm))
    assert type(c).__name__ == "SelfMoEMLAConfig" and c.rope_type == "yarn"  # Megatron-LM: MLA takes YaRN
    assert c.q_lora_rank == (MLA["q"] if q_lora else None) and c.kv_lora_rank == MLA["kv"]
    dense_mlp = H + H * 2 * 64 + 64 * H
    per_layer = H + mla_attention_params(q_lora, qk_layernorm) + dense_mlp
    assert nparams(model) == 2 * per_layer + V * H + V * H + H


@pytest.mark.parametrize("router", ["learned", "self"])
def test_mla_with_moe_routers_trains(mp, router):
    model, c, _ = build(mla_flags() + MOE + ["--moe-router-type", router])
    assert nparams(model) == 2 * (H + mla_attention_params() + moe_mlp_params(router)) + 2 * V * H + H
    ids = torch.randint(0, 60, (2, S))
    model(ids, torch.arange(S)[None].expand(2, S), None, labels=ids).mean().backward()
    assert moe_layers(model)[0].experts.local_experts[0].linear_fc1.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].self_attention.linear_kv_down_proj.weight.grad.abs().sum() > 0


def test_mla_core_attention_equals_torch_sdpa(mp):
    """MLA's query/key heads (qk + pe = 12) are wider than its value heads (8): the local core
    attention selfmoe uses for it gives PyTorch's causal attention with MLA's softmax scale."""
    model, c, _ = build(mla_flags())
    core = model.decoder.layers[0].self_attention.core_attention
    q, k, v = torch.randn(S, 2, NH, 12), torch.randn(S, 2, NH, 12), torch.randn(S, 2, NH, 8)
    out = core(q, k, v, None)
    ref = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                         is_causal=True, scale=core.softmax_scale)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3).reshape(S, 2, NH * 8), rtol=1e-5, atol=1e-5)


def test_megatron_core_local_attention_cannot_take_mla_head_widths():
    """Why selfmoe swaps the core attention (drop mcore_compat.MLADotProductAttention when this fails)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    with pytest.raises(TypeError, match="k_channels"):
        DotProductAttention(args_to_config(parse_args(BASE)), 1, None, "self", k_channels=12, v_channels=8)


def test_mla_flags_without_mla_are_listed_and_mla_refuses_gqa():
    args = parse_args(BASE + ["--q-lora-rank", "16", "--rotary-scaling-factor", "40"])
    assert args.ignored_reasons["--q-lora-rank"] == "needs --multi-latent-attention"
    assert "--rotary-scaling-factor" in args.ignored_flags
    assert not hasattr(args_to_config(args), "q_lora_rank")
    bad = build_parser().parse_args(BASE + mla_flags() + ["--group-query-attention", "--num-query-groups", "2"])
    bad.demo, bad.ignored_flags, bad.notes = False, [], []
    with pytest.raises(ArgumentError, match="^--multi-latent-attention and --group-query-attention"):
        validate_args(bad, 1)


def test_yarn_frequencies_and_attention_scale_follow_the_formula(mp):
    """YaRN (Peng et al. 2023): frequencies below the beta_slow correction dimension are divided by
    the scaling factor, those above beta_fast kept, a linear ramp between; DeepSeek-V2's softmax scale
    (0.1 * mscale_all_dim * ln(s) + 1)^2 / sqrt(q head dim)."""
    s, base, orig, d = 40.0, 10000, 64, 16
    model, c, _ = build(mla_flags(pe=d) + ["--rotary-scaling-factor", str(s), "--mscale", "1.0",
                                           "--mscale-all-dim", "0.707", "--original-max-position-embeddings",
                                           str(orig)])
    attn = model.decoder.layers[0].self_attention
    emb, mscale = attn.rotary_pos_emb(S)
    got = emb[1, 0, 0, : d // 2]  # position 1: the inverse frequencies

    def correction_dim(rotations):
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction_dim(32)), 0), min(math.ceil(correction_dim(1)), d - 1)
    extrapolated = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    want = extrapolated / s * ramp + extrapolated * (1 - ramp)
    assert 0 < ramp.sum() < d // 2  # the test reaches all three regimes
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    m_all = 0.1 * 0.707 * math.log(s) + 1
    assert attn.softmax_scale == pytest.approx(m_all ** 2 / math.sqrt(MLA["qk"] + d))
    assert mscale == pytest.approx((0.1 * 1.0 * math.log(s) + 1) / m_all)


def test_llama3_rope_scaling_changes_the_frequencies_as_the_formula_says(mp):
    """--use-rope-scaling: wavelengths under 8192/4 kept, over 8192 divided by the factor, between:
    (1 - a) f / s + a f with a = (8192 / wavelength - 1) / (4 - 1) (Llama 3.1's rule)."""
    wide = ["--hidden-size", "64", "--rotary-base", "1000000"]  # head dim 16: 8 frequencies over all regimes
    plain, _, _ = build(wide)
    scaled, c, _ = build(wide + ["--use-rope-scaling", "--rope-scaling-factor", "4"])
    assert (c.rope_scaling, c.rope_scaling_factor) == (True, 4.0)
    f = plain.rotary_pos_emb.inv_freq.double()
    wavelength = 2 * math.pi / f
    a = (8192 / wavelength - 1) / 3
    want = torch.where(wavelength < 2048, f, torch.where(wavelength > 8192, f / 4, (1 - a) * f / 4 + a * f))
    assert (wavelength < 2048).any() and (wavelength > 8192).any() and ((wavelength > 2048) & (wavelength < 8192)).any()
    torch.testing.assert_close(scaled.rotary_pos_emb.inv_freq.double(), want, rtol=1e-6, atol=0)
    args = parse_args(BASE + ["--rope-scaling-factor", "4"])  # without --use-rope-scaling: listed
    assert args.ignored_reasons["--rope-scaling-factor"] == "needs --use-rope-scaling"


def test_position_embedding_type_none_has_no_position_information(mp):
    learned, _, _ = build(["--position-embedding-type", "learned_absolute"])
    none, _, _ = build(["--position-embedding-type", "none"])
    assert nparams(learned) - nparams(none) == S * H  # the learned position table
    assert getattr(none, "rotary_pos_emb", None) is None and getattr(none.embedding, "position_embeddings", None) is None


# ------------------------------------------------------------------------------ multi-token prediction

def test_mtp_parameter_count_is_the_hand_count(mp):
    """One MTP depth (DeepSeek-V3): two RMSNorms on the embedding and the hidden state, a 2H -> H
    projection, a transformer layer like the decoder's last, a final RMSNorm; the output layer shared."""
    dense_layer = H + H * 3 * H + H * H + H + H * 2 * 64 + 64 * H  # norm, QKV, proj, norm, SwiGLU MLP
    mla_moe_layer = H + mla_attention_params() + moe_mlp_params("self")
    for extra, layer in (([], dense_layer), (mla_flags() + MOE + ["--moe-router-type", "self"], mla_moe_layer)):
        plain, _, _ = build(extra)
        mtp, c, _ = build(extra + ["--mtp-num-layers", "1"])
        assert c.mtp_num_layers == 1
        assert nparams(mtp) - nparams(plain) == nparams(mtp.mtp) == 2 * H + 2 * H * H + layer + H


def _mtp_setup(scale="0.5"):
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # what the schedule sets for one micro-batch
    MTPLossLoggingHelper.tracker.clear()
    model, c, _ = build(MOE + ["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", scale])
    captured = []
    # a copy: megatron-core's cross entropy works in place on the logits it is given
    model.output_layer.register_forward_hook(lambda m, i, o: captured.append(o[0].clone()))
    return model, c, captured, MTPLossLoggingHelper.tracker


def _hand_mtp_loss(mtp_logits, ids):
    """Depth 1 predicts token j+2 from position j (its labels are the labels shifted once more): mean
    cross entropy over the positions that have such a token."""
    logits = mtp_logits[:-1].transpose(0, 1).float()  # [b, s-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_mtp_loss_equals_the_cross_entropy_of_its_head_and_reaches_the_gradients(mp):
    model, c, captured, tracker = _mtp_setup("0.5")
    ids, pos = torch.randint(0, 60, (2, S)), torch.arange(S)[None].expand(2, S)
    model.train()
    lm = model(ids, pos, None, labels=ids)  # labels = ids: the main head predicts position j's label
    mtp_logits = captured[0]  # the MTP head's logits come first (megatron-core's _postprocess)
    hand = _hand_mtp_loss(mtp_logits, ids)
    torch.testing.assert_close(tracker["values"][0], hand.detach(), rtol=1e-5, atol=1e-6)
    lm.mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    c.mtp_loss_scaling_factor = 0.0  # reference: the same forward, the MTP term added by hand
    captured.clear()
    lm = model(ids, pos, None, labels=ids)
    (lm.mean() + 0.5 * _hand_mtp_loss(captured[0], ids)).backward()
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_mtp_with_scaling_zero_trains_like_no_mtp(mp):
    plain, _, _ = build(MOE)
    model, c, _, _ = _mtp_setup("0")
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    ids, pos = torch.randint(0, 60, (2, S)), torch.arange(S)[None].expand(2, S)
    a, b = plain(ids, pos, None, labels=ids), model(ids, pos, None, labels=ids)
    torch.testing.assert_close(a, b)
    a.mean().backward()
    b.mean().backward()
    theirs = dict(model.named_parameters())
    for n, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, theirs[n].grad, msg=n)


def test_mla_without_transformer_engine_needs_the_have_te_patch(mp, monkeypatch):
    """megatron-core 0.16.1 believes TransformerEngine is there when only its stand-in module is
    (mcore_compat's mla_have_te_without_te); without the patch MLA cannot be built."""
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer import multi_latent_attention

    from selfmoe.mcore_compat import applied_patches

    if te_extension.HAVE_TE:
        pytest.skip("TransformerEngine is installed: the fault does not arise")
    assert "mla_have_te_without_te" in applied_patches()
    monkeypatch.setattr(multi_latent_attention, "HAVE_TE", True)
    with pytest.raises(TypeError, match="isinstance"):
        build(mla_flags())
