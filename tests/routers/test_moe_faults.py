"""MoE faults replayed from public bug reports (issue 9), each against an independent reference.

Statistics count the tokens actually routed (hand-computed top-k), before capacity dropping and
padding, padding tokens excluded; a capacity above the token count trains like no capacity at all;
top-1 is accepted for routers without a softmax; routers work with a plain TransformerConfig.
"""

import pytest
import torch

from helpers import tiny_config
from selfmoe.metrics import RoutingStats
from selfmoe.models import build_gpt_model, moe_layers

E, K = 4, 2


def hand_routed(router_type, layer, hidden, ids):
    """[T, E] bool: the top-k experts of every token, computed from the raw weights/table."""
    x = hidden.reshape(-1, hidden.shape[-1]).float()
    if router_type == "hash":
        choices = layer.router.table[ids.t().reshape(-1)]
    else:
        logits = x[:, -E:] if router_type == "self" else x @ layer.router.weight.float().t()
        choices = logits.topk(K, dim=-1).indices
    return torch.zeros(x.shape[0], E, dtype=torch.bool).scatter_(1, choices, True)


def run_with_stats(cfg, ids, padding_mask=None):
    model = build_gpt_model(cfg)
    stats = RoutingStats(model, cfg.num_layers, E)
    layer = moe_layers(model)[0]
    seen = {}
    h = layer.router.register_forward_pre_hook(lambda m, a: seen.update(hidden=a[0].detach()))
    model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None, padding_mask=padding_mask)
    h.remove()
    return model, layer, stats, seen["hidden"]


@pytest.mark.parametrize("router", ["learned", "self", "hash"])
def test_statistics_count_routed_tokens_not_padded_slots(mp, router):
    # capacity 0.5: every expert holds ceil(T*k/E*0.5) = 8 of T=32 tokens' pairs; padded to it.
    cfg = tiny_config(router, moe_expert_capacity_factor=0.5, moe_pad_expert_input_to_capacity=True,
                      moe_router_enable_expert_bias=router != "hash", moe_router_score_function="sigmoid"
                      if router != "hash" else "softmax")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 10:] = True  # 6 padding tokens: routed like any other, counted by no statistic
    model, layer, stats, hidden = run_with_stats(cfg, ids, padding)
    routed = hand_routed(router, layer, hidden, ids)
    valid = ~padding.t().reshape(-1, 1)
    expected = (routed & valid).sum(0).double()
    capacity = 8
    assert not torch.equal(expected, torch.full((E,), float(capacity), dtype=torch.float64))
    assert torch.equal(stats.counts[0], expected)
    # a dropped pair is one routed over the capacity (probs policy): max(0, load - capacity) per expert,
    # of all tokens' pairs; of those, the padding tokens' are not counted
    assert stats.dropped[0].sum() <= (routed.sum(0) - capacity).clamp(min=0).sum()
    assert stats.dropped[0].sum() > 0
    dropped = int(stats.dropped[0].sum())
    m = stats.reduce()
    assert m["layers"][1]["dropped"] == dropped
    assert m["layers"][1]["experts_per_token"] == pytest.approx(K)  # routed k, padded slots excluded
    f = expected / expected.sum()
    entropy = float(-(f[f > 0] * f[f > 0].log()).sum() / torch.log(torch.tensor(float(E))))
    assert m["layers"][1]["normalized_entropy"] == pytest.approx(entropy)
    if router != "hash":  # the aux-loss-free bias update counts the same routed, non-padding tokens
        assert torch.equal(layer.router.local_tokens_per_expert.double(), expected)


def test_dropped_pairs_are_counted_by_hand(mp):
    """No padding mask: dropped pairs per expert == max(0, routed load - capacity) exactly."""
    cfg = tiny_config("self", moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    model, layer, stats, hidden = run_with_stats(cfg, ids)
    routed = hand_routed("self", layer, hidden, ids)
    assert torch.equal(stats.dropped[0], (routed.sum(0) - 8).clamp(min=0).double())
    m = stats.reduce()
    assert m["layers"][1]["dropped_fraction"] == pytest.approx(float((routed.sum(0) - 8).clamp(min=0).sum() / 64))


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("router", ["learned", "hash"])
def test_capacity_above_tokens_equals_no_capacity(mp, router, dispatcher):
    """Capacity factor 2.5 > E/k: nothing can be dropped; the loss and gradients equal no capacity."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    out = []
    for kw in ({}, dict(moe_expert_capacity_factor=2.5, moe_pad_expert_input_to_capacity=True)):
        torch.manual_seed(0)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        model = build_gpt_model(tiny_config(router, moe_token_dispatcher_type=dispatcher, **kw))
        loss = model(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).mean()
        loss.backward()
        out.append((loss.detach(), model.embedding.word_embeddings.weight.grad.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("router", ["hash", "random", "routing-free"])
def test_top1_is_accepted_without_softmax(mp, router):
    cfg = tiny_config(router, moe_router_topk=1)
    assert cfg.moe_router_topk == 1 and cfg.moe_router_pre_softmax is False


@pytest.mark.parametrize("router", ["learned", "self"])
def test_top1_softmax_check_still_applies(router):
    with pytest.raises(ValueError, match="pre-softmax"):
        tiny_config(router, moe_router_topk=1)


def user_model(router_name, config):
    """What a Megatron-Core user writes (the README's "Using it from Python"): their own local
    layer spec, our router class plugged in."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from selfmoe import mcore_compat
    from selfmoe.routers import get_router_class

    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    spec.submodules.mlp = mcore_compat.replace_moe_submodules(spec.submodules.mlp, router=get_router_class(router_name))
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16)


def plain_config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=E,
                             moe_router_topk=K, moe_ffn_hidden_size=48, ffn_hidden_size=64, add_bias_linear=False,
                             **kw)


@pytest.mark.parametrize("router", ["learned", "self", "random", "routing-free"])
def test_routers_work_with_a_plain_transformer_config(mp, router):
    model = user_model(router, plain_config())
    layer = moe_layers(model)[0]
    seen = {}
    layer.router.register_forward_hook(lambda m, a, o: seen.update(map=o[1]))
    ids = torch.randint(0, 64, (2, 16))
    loss = model(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).mean()
    loss.backward()
    assert torch.isfinite(loss)
    if router == "routing-free":  # documented defaults: theta 1, a gate scale at which every expert fires at init
        assert layer.router.theta == 1.0 and bool(seen["map"].all())
    else:
        assert (seen["map"].sum(1) == K).all()
    if router == "self":  # the documented default subspace: the last E hidden channels
        assert layer.router.subspace.tolist() == list(range(32 - E, 32))


def test_hash_router_with_plain_config_says_what_it_needs(mp):
    with pytest.raises(ValueError, match=r"hash routing by token needs config.vocab_size"):
        user_model("hash", plain_config())


# Routing-Free has no top-k counts or aux loss of Megatron's; its padding invariance (balance loss,
# its gradients and the density that drives lambda) is tested in tests/routers/test_routing_free.py.
@pytest.mark.parametrize("router", ["learned", "self", "random", "hash"])
def test_padding_tokens_change_no_statistic(mp, router):
    """Reference: the same batch with other ids at the padding positions. Every count (metrics,
    expert-bias counter) and the aux loss are the same, and they count the valid tokens only."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    cfg = tiny_config(router, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
                      moe_router_enable_expert_bias=router in ("learned", "self"),
                      moe_router_score_function="sigmoid" if router in ("learned", "self") else "softmax")
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[0, 12:] = padding[1, 5:] = True
    other = torch.where(padding, torch.randint(0, cfg.vocab_size, (2, 16), generator=g), ids)
    seen = []
    for batch in (ids, other):
        torch.manual_seed(0)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        model = build_gpt_model(cfg)
        stats = RoutingStats(model, cfg.num_layers, E)
        clear_aux_losses_tracker()
        model(batch, torch.arange(16)[None].expand(2, 16), None, labels=batch, padding_mask=padding).sum().backward()
        tracked = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        counters = [r.local_tokens_per_expert.clone() for r in
                    (layer.router for layer in moe_layers(model)) if getattr(r, "local_tokens_per_expert", None) is not None]
        seen.append((stats.counts.clone(), stats.k_hist.clone(), tracked, counters))
    (c0, k0, t0, b0), (c1, k1, t1, b1) = seen
    n_valid = int((~padding).sum())
    assert torch.equal(c0, c1) and torch.equal(k0, k1) and (k0.sum(1) == n_valid).all()
    assert (c0.sum(1) == K * n_valid).all()
    assert t0.keys() == t1.keys()
    for key in t0:
        torch.testing.assert_close(t0[key], t1[key])
    assert len(b0) == len(b1) and all(torch.equal(a, b) for a, b in zip(b0, b1))
    if router in ("learned", "self"):
        assert "load_balancing_loss" in t0 and all((b.sum() == K * n_valid) for b in b0)


def test_pretrain_forward_step_passes_the_padding_mask(mp):
    """selfmoe.training.gpt.forward_step: tokens whose loss is masked (a short sample's padding)
    reach the routers as padding; reference: counts of the valid tokens only."""
    from selfmoe.training import gpt

    cfg = tiny_config("hash")
    model = build_gpt_model(cfg)
    stats = RoutingStats(model, cfg.num_layers, E)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    loss_mask = torch.ones(2, 16)
    loss_mask[1, 9:] = 0
    batch = dict(tokens=ids, labels=ids, loss_mask=loss_mask, position_ids=torch.arange(16)[None].expand(2, 16))
    output, loss_func = gpt.forward_step(iter([batch]), model)
    valid = ids[loss_mask.bool()]
    expected = torch.bincount(layer_table(model)[valid].flatten(), minlength=E).double()
    assert torch.equal(stats.counts[0], expected)
    assert loss_func(output)[1] == 25


def layer_table(model):
    return moe_layers(model)[0].router.table
