from types import SimpleNamespace

import pytest
import torch

from helpers import brute_force_moe, tiny_config
from megatron.core import dist_checkpointing, tensor_parallel
from selfmoe.models import build_gpt_model, moe_layers
from megatron.core.transformer.moe import moe_utils
from selfmoe.routers.routing_free import (RoutingFreeRouter, link_routers, next_lambda, routing_free_routers,
                                          set_theta, token_balance_gap, update_balance_coefficient)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("expert_type", ["aoe", "mlp"])
def test_zero_and_all_experts_in_one_batch(mp, dispatcher, expert_type):
    cfg = tiny_config("routing-free", moe_token_dispatcher_type=dispatcher, routing_free_expert_type=expert_type)
    layer = moe_layers(build_gpt_model(cfg))[0]
    hidden = torch.randn(6, 2, cfg.hidden_size)
    hidden[0, 0] = 0.0          # ||x A_i|| = 0 -> G = ReLU(-b) = 0 -> no expert fires
    hidden[1, 1] *= 1e3         # huge norm -> every expert fires
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(p=o[0], m=o[1]))
    out, _ = layer(hidden)
    k = seen["m"].sum(1).view(6, 2)
    assert k[0, 0] == 0 and k[1, 1] == cfg.num_moe_experts
    if dispatcher == "alltoall":  # permutation output sized by the routed pairs, not tokens x top-k
        assert layer.token_dispatcher.num_out_tokens == int(seen["m"].sum()) != 12 * cfg.moe_router_topk
    assert torch.count_nonzero(out[0, 0]) == 0
    torch.testing.assert_close(out, brute_force_moe(layer, hidden, seen["p"], seen["m"]), atol=1e-4, rtol=1e-4)


def test_gate_formula(mp):
    cfg = tiny_config("routing-free", routing_free_theta=0.7)
    r = RoutingFreeRouter(cfg)
    with torch.no_grad():
        r.gate_scale.copy_(torch.rand(4) + 0.5)
        r.gate_bias.copy_(torch.rand(4) * 0.3)
    x = torch.randn(9, 1, cfg.hidden_size)
    probs, rmap = r.eval()(x)
    for t in range(9):
        for i in range(4):
            g = max(0.0, float(r.gate_scale[i] * (x[t, 0] @ r.gate_proj[i]).norm() - r.gate_bias[i]))
            assert bool(rmap[t, i]) == (g >= 0.7)
            assert abs(float(probs[t, i]) - (g if g >= 0.7 else 0.0)) < 1e-5


def test_every_expert_fires_at_init(mp):
    for h, r in ((32, 8), (256, 32)):
        cfg = tiny_config("routing-free", hidden_size=h, routing_free_rank=r)
        x = torch.nn.functional.layer_norm(torch.randn(64, 1, h), (h,))
        _, rmap = RoutingFreeRouter(cfg)(x)
        assert rmap.float().mean() > 0.95


def reference_balance_loss(P, mu):
    """The authors' loss, written from routing-free-reference.md section 1 (not from our layer):
    P [tokens, L*E] = G * fired of every MoE layer side by side; mask = P > theta (no gradient)."""
    return lambda_theta_mask_loss(P, mu, P.detach() > 0)


def lambda_theta_mask_loss(P, mu, mask):
    m = mask.float()
    l_eb = (m.mean(0) * P.mean(0)).mean()          # over the L*E (layer, expert) columns
    l_tb = (m.mean(1) * P.mean(1)).mean()          # over tokens; a token's means span all layers
    return mu * l_eb + (1 - mu) * l_tb


def linked_routers(cfg, n_layers):
    rs = [RoutingFreeRouter(cfg) for _ in range(n_layers)]
    for i, r in enumerate(rs):
        r.set_layer_number(i + 1)
        with torch.no_grad():
            r.gate_scale.copy_(torch.rand(cfg.num_moe_experts) + 0.5)
            r.gate_bias.copy_(torch.rand(cfg.num_moe_experts) * 0.5)
    link_routers(rs, n_layers)
    return rs


def layer_inputs(x, n_layers):
    """Different (differentiable) inputs per layer from one leaf x [T, 1, H]."""
    return [x * (1.0 + 0.5 * l) + torch.sin(x) * l for l in range(n_layers)]


def rf_balance_loss(rs, xs, padding_mask=None):
    """Our layers' balance loss: value (Megatron's aux-loss tracker, each layer logs its share * L)
    and gradients (only the attached loss produces any: the outputs are multiplied by 0)."""
    moe_utils.get_moe_layer_wise_logging_tracker().pop("routing_free_balance_loss", None)
    out = sum((r(x, padding_mask)[0] * 0).sum() for r, x in zip(rs, xs))
    out.backward()
    vals = moe_utils.get_moe_layer_wise_logging_tracker()["routing_free_balance_loss"]["values"]
    return float(vals.sum()) / len(rs)


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("mu", [0.5, 0.2])
def test_balance_loss_matches_reference(mp, n_layers, mu):
    """Value and gradients (every gate parameter, the input) of the one loss over all layers."""
    cfg = tiny_config("routing-free", routing_free_mu=mu, routing_free_lambda0=0.7, num_layers=n_layers)
    rs = linked_routers(cfg, n_layers)
    x = torch.randn(24, 1, cfg.hidden_size)
    with torch.no_grad():
        G = torch.cat([r.gates(xi.reshape(24, -1)) for r, xi in zip(rs, layer_inputs(x, n_layers))], 1)
        theta = float(G.median())   # about half the pairs fire
    for r in rs:
        r.theta = theta
    x[0] = 0.0                      # G = ReLU(-b) = 0: fires nothing in any layer
    x[1] *= 8                       # fires every expert of every layer
    x.requires_grad_(True)
    params = [p for r in rs for p in (r.gate_proj, r.gate_scale, r.gate_bias)] + [x]
    value = rf_balance_loss(rs, layer_inputs(x, n_layers))
    got = [p.grad.clone() for p in params]

    G = torch.cat([r.gates(xi.reshape(24, -1)) for r, xi in zip(rs, layer_inputs(x, n_layers))], 1)
    P = G * (G >= theta)
    fired = (P > 0).sum(1)
    assert fired[0] == 0 and fired[1] == n_layers * cfg.num_moe_experts and 0 < fired.float().mean() < fired[1]
    want_value = reference_balance_loss(P, mu)
    want = torch.autograd.grad(0.7 * want_value, params)
    assert abs(value - float(want_value)) < 1e-6
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-6, (g - w).abs().max()
    assert all(g.abs().sum() > 0 for g in got)


def test_pipeline_stages_use_their_own_fire_fraction_and_the_gap_is_measured(mp):
    """Layers split over 2 stages (layer 1 | layers 2, 3): L_EB stays exact, L_TB's token fire
    fraction is each stage's own (documented approximation); token_balance_gap measures both."""
    cfg = tiny_config("routing-free", routing_free_lambda0=1.0, num_layers=3)
    rs = linked_routers(cfg, 3)
    link_routers(rs[:1], 3)
    link_routers(rs[1:], 3)
    x = torch.randn(24, 1, cfg.hidden_size)
    x[0] = 0.0
    rf_balance_loss(rs, layer_inputs(x, 3))
    got = [p.grad.clone() for r in rs for p in r.parameters()]
    exact, approx = token_balance_gap(rs)

    Gs = [r.gates(xi.reshape(24, -1)) for r, xi in zip(rs, layer_inputs(x, 3))]
    Ps = [g * (g >= r.theta) for g, r in zip(Gs, rs)]
    P = torch.cat(Ps, 1)
    m = [(p > 0).float() for p in Ps]
    l_eb = ((P > 0).float().mean(0) * P.mean(0)).mean()
    stage_tb = (m[0].mean(1) * Ps[0].sum(1) + torch.cat(m[1:], 1).mean(1) * torch.cat(Ps[1:], 1).sum(1)) / P.shape[1]
    want = torch.autograd.grad(0.5 * l_eb + 0.5 * stage_tb.mean(), [p for r in rs for p in r.parameters()])
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-6
    exact_tb = ((P > 0).float().mean(1) * P.mean(1)).mean()
    assert abs(exact - float(exact_tb)) < 1e-6 and abs(approx - float(stage_tb.mean())) < 1e-6
    assert abs(exact - approx) > 1e-4


def test_balance_loss_three_layers_is_not_a_sum_of_per_layer_losses(mp):
    """Guards against the old form (one loss per layer, summed): it differs from the reference."""
    cfg = tiny_config("routing-free", routing_free_lambda0=1.0, num_layers=3)
    rs = linked_routers(cfg, 3)
    x = torch.randn(24, 1, cfg.hidden_size)
    value = rf_balance_loss(rs, layer_inputs(x, 3))
    with torch.no_grad():
        Ps = [r.gates(xi.reshape(24, -1)) for r, xi in zip(rs, layer_inputs(x, 3))]
        Ps = [g * (g >= r.theta) for g, r in zip(Ps, rs)]
    per_layer_sum = sum(float(reference_balance_loss(p, 0.5)) for p in Ps)
    assert abs(value - float(reference_balance_loss(torch.cat(Ps, 1), 0.5))) < 1e-6
    assert abs(value - per_layer_sum) > 1e-3


def test_mtp_depth_is_one_more_layer_of_the_one_balance_loss(mp):
    """A multi-token-prediction depth is built like the decoder's last layer; when that is MoE it
    is one more MoE layer of the one loss: L = 2 decoder + 1 MTP, its P columns beside the
    decoder's, token t's fire fraction over all three (as megatron-core counts MTP layers in its
    aux losses). Gradients of every parameter (lambda = 0.7 minus lambda = 0, same forward) equal
    the reference loss's through the whole model; before, its layer number (3) overflowed
    Megatron's 2-slot aux-loss tracker in the first backward."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from selfmoe.models.moe_spec import num_moe_layers

    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    cfg = tiny_config("routing-free", mtp_num_layers=1)
    model = build_gpt_model(cfg)
    rs = routing_free_routers(model)
    assert [r.layer_number for r in rs] == [1, 2, 3] and rs[0].chunk.num_layers == num_moe_layers(cfg) == 3
    ids = torch.randint(0, 64, (2, 16))
    pos = torch.arange(16)[None].expand(2, 16)
    captured = []
    for r in rs:
        r.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    model.train()
    model(ids, pos, None, labels=ids)
    theta = float(torch.cat(captured, 1).detach().median())  # every expert fires at init: about half now
    set_theta(model, theta)

    def run(lam):
        captured.clear()
        model.zero_grad()
        moe_utils.clear_aux_losses_tracker()
        for r in rs:
            r.balance_coeff.fill_(lam)
        model(ids, pos, None, labels=ids).mean().backward(retain_graph=True)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    base = run(0.0)
    P = torch.cat(captured, 1)
    assert 0.2 < float((P > 0).float().mean()) < 0.8
    want_value = reference_balance_loss(P, 0.5)
    names = [n for n in base]
    want = dict(zip(names, torch.autograd.grad(0.7 * want_value, [dict(model.named_parameters())[n] for n in names],
                                               allow_unused=True)))
    got = run(0.7)
    logged = moe_utils.get_moe_layer_wise_logging_tracker()["routing_free_balance_loss"]["values"]
    assert logged.shape == (3,) and abs(float(logged.sum()) / 3 - float(want_value.detach())) < 1e-6
    assert all(float(v) > 0 for v in logged)
    for n in names:
        diff = got[n] - base[n]
        ref = torch.zeros_like(diff) if want[n] is None else want[n]
        assert (diff - ref).abs().max() < 1e-6, (n, (diff - ref).abs().max())
    assert (got["mtp.layers.0.transformer_layer.mlp.router.gate_scale"]
            != base["mtp.layers.0.transformer_layer.mlp.router.gate_scale"]).any()


def test_padding_tokens_count_nowhere(mp):
    """Padding (Megatron's padding_mask, True = padding) changes neither loss, gradients nor
    density; the result equals the same batch without the padding tokens."""
    cfg = tiny_config("routing-free", routing_free_lambda0=1.0, num_layers=2)
    rs = linked_routers(cfg, 2)
    x = torch.randn(12, 2, cfg.hidden_size)
    pad = torch.zeros(12, 2, dtype=torch.bool)
    pad[9:, 0] = True
    pad[0, 1] = True

    def run(x, mask):
        for r in rs:
            r.zero_grad()
            r.fired_count.zero_()
            r.pair_count.zero_()
        value = rf_balance_loss(rs, layer_inputs(x, 2), mask)
        grads = [p.grad.clone() for r in rs for p in r.parameters()]
        return value, grads, [(float(r.fired_count), float(r.pair_count)) for r in rs]

    v1, g1, d1 = run(x, pad)
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), cfg.hidden_size) * 5
    v2, g2, d2 = run(x2, pad)
    v3, g3, d3 = run(x[~pad].reshape(-1, 1, cfg.hidden_size), None)
    assert d1 == d2 == d3 and d1[0][1] == (24 - 4) * cfg.num_moe_experts
    for v, g in ((v2, g2), (v3, g3)):
        assert abs(v - v1) < 1e-6
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(g1, g))


RHO_STAR, ETA = 0.25, 0.2
# rho -> factor on lambda, by hand: sign rule (1 + eta)^sign, quadratic (1 + eta (rho - rho*)^2)^sign
LAMBDA_SWEEP = [
    (0.0, 1 / 1.2, 1 / 1.0125),
    (0.125, 1 / 1.2, 1 / 1.003125),
    (0.25, 1.0, 1.0),
    (0.251, 1.2, 1.0000002),
    (0.5, 1.2, 1.0125),
    (1.0, 1.2, 1.1125),
]


@pytest.mark.parametrize("rho,sign_factor,quad_factor", LAMBDA_SWEEP)
def test_lambda_rules_by_hand(rho, sign_factor, quad_factor):
    for rule, factor in (("sign", sign_factor), ("quadratic", quad_factor)):
        cfg = SimpleNamespace(routing_free_density_target=RHO_STAR, routing_free_eta=ETA, routing_free_lambda_rule=rule)
        assert next_lambda(0.5, rho, cfg) == pytest.approx(0.5 * factor, rel=1e-12)
        assert next_lambda(0.95, 1.0, cfg) == 1.0 or factor * 0.95 < 1  # clamped at 1 from above
    cfg = SimpleNamespace(routing_free_density_target=RHO_STAR, routing_free_eta=ETA, routing_free_lambda_rule="quadratic")
    assert next_lambda(0.95, 1.0, cfg) == 1.0 and next_lambda(1.0, 0.0, cfg) == pytest.approx(1 / 1.0125)


def test_lambda_timing_step_vs_micro_batch(mp):
    """step: lambda moves only at the optimizer step, from the density of all micro-batches;
    micro-batch: after every training forward, from that micro-batch, and the forward's own loss
    still uses the lambda from before (the reference's order)."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    grads, lams = {}, {}
    for mode in ("step", "micro-batch"):
        cfg = tiny_config("routing-free", routing_free_lambda0=0.5, routing_free_eta=0.2,
                          routing_free_density_target=0.1, routing_free_lambda_update=mode,
                          routing_free_lambda_rule="quadratic")
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(0)
        model = build_gpt_model(cfg)
        rs = routing_free_routers(model)
        seen = []
        for r in rs:
            r.register_forward_hook(lambda m, i, o: seen.append(o[1].float().mean().item()))
        model(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).sum().backward()
        rho1 = sum(seen) / len(seen)
        lam_after_fwd = float(rs[0].balance_coeff)
        grads[mode] = rs[0].gate_proj.grad.clone()
        model(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).sum()
        lams[mode] = (lam_after_fwd, float(rs[0].balance_coeff), update_balance_coefficient(model), rho1)
    (s1, s2, (s_rho, s_lam), rho1) = lams["step"]
    assert s1 == s2 == 0.5 and s_rho == pytest.approx(rho1)
    assert s_lam == pytest.approx(0.5 * (1 + 0.2 * (rho1 - 0.1) ** 2))
    (m1, m2, (m_rho, m_lam), m_rho1) = lams["micro-batch"]
    assert m_rho1 == rho1  # same weights
    assert m1 == pytest.approx(0.5 * (1 + 0.2 * (rho1 - 0.1) ** 2)) and m2 == pytest.approx(m1 * (1 + 0.2 * (rho1 - 0.1) ** 2))
    assert m_lam == pytest.approx(m2)   # at the step: only averaged over the (one) rank
    torch.testing.assert_close(grads["step"], grads["micro-batch"], atol=0, rtol=0)  # same lambda in mb 1


def test_reference_preset_builds_the_reference_moe_shape(mp):
    """--routing-free-preset reference: one MoE layer has the parameters of the authors' 120M
    config's MoE layer (E=12 experts: A [512,16], B [16,128], W_up, W_down [512x128]; scale, bias)."""
    from selfmoe.training.arguments import args_to_config, parse_args

    args = parse_args(["--routing-free-preset", "reference", "--num-layers", "2", "--hidden-size", "512",
                       "--num-attention-heads", "8", "--seq-length", "32", "--max-position-embeddings", "32",
                       "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
                       "--lr", "5e-4", "--vocab-size", "128"])
    cfg = args_to_config(args)
    model = build_gpt_model(cfg)
    assert len(moe_layers(model)) == 1 and cfg.moe_layer_freq == [0, 1]  # the first layer is dense
    layer = moe_layers(model)[0]
    n = sum(p.numel() for p in layer.router.parameters()) + sum(p.numel() for p in layer.experts.parameters())
    H, r, F, E = 512, 16, 128, 12
    assert n == E * (H * r + r * F + H * F + F * H) + 2 * E == 1_695_768
    assert (cfg.routing_free_theta, cfg.routing_free_density_target, cfg.routing_free_eta, cfg.routing_free_mu,
            cfg.routing_free_lambda0, cfg.routing_free_lambda_rule, cfg.routing_free_lambda_update) == (
            0.2, 0.25, 0.2, 0.5, 1e-5, "quadratic", "micro-batch")
    assert float(layer.router.gate_scale[0]) == 1.0 and float(layer.router.gate_bias[0]) == pytest.approx(1e-6, rel=1e-6)
    assert layer.config.activation_func is torch.nn.functional.silu and cfg.init_method_std == 0.02


def test_lambda_update_rule(mp):
    cfg = tiny_config("routing-free", routing_free_lambda0=0.5, routing_free_eta=0.1,
                      routing_free_density_target=0.25)  # rule "sign"
    model = build_gpt_model(cfg)
    rs = routing_free_routers(model)

    def step(fired, pairs):
        for r in rs:
            r.fired_count.fill_(fired)
            r.pair_count.fill_(pairs)
        return update_balance_coefficient(model)

    rho, lam = step(5, 10)          # density 0.5 > 0.25: lambda grows by (1 + eta)
    assert rho == 0.5 and lam == pytest.approx(0.55)
    rho, lam = step(1, 10)          # 0.1 < 0.25: shrinks
    assert lam == pytest.approx(0.5)
    rho, lam = step(25, 100)        # on target: unchanged
    assert lam == pytest.approx(0.5)
    for _ in range(20):
        rho, lam = step(9, 10)
    assert lam == 1.0               # clamped at 1
    assert all(float(r.balance_coeff) == 1.0 for r in rs) and rs[0].fired_count == 0
    assert step(0, 0) == (None, 1.0)  # nothing routed: no update


def test_density_is_global_over_layers(mp):
    """Layer 1 fires everything, layer 2 nothing: global density 0.5, not a per-layer decision."""
    cfg = tiny_config("routing-free", routing_free_lambda0=0.5, routing_free_eta=0.1,
                      routing_free_density_target=0.4)
    model = build_gpt_model(cfg)
    r1, r2 = routing_free_routers(model)
    r1.fired_count.fill_(100); r1.pair_count.fill_(100)
    r2.fired_count.fill_(0); r2.pair_count.fill_(100)
    rho, lam = update_balance_coefficient(model)
    assert rho == 0.5 and lam == pytest.approx(0.55)


def test_training_forward_counts_density(mp):
    cfg = tiny_config("routing-free")
    model = build_gpt_model(cfg)
    ids = torch.randint(0, 64, (2, 16))
    seen = []
    for r in routing_free_routers(model):
        r.register_forward_hook(lambda m, i, o: seen.append(o[1]))
    model(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).sum().backward()
    rho, _ = update_balance_coefficient(model)
    assert rho == pytest.approx(torch.cat(seen).float().mean().item())


def test_lambda_survives_save_load(mp, tmp_path):
    cfg = tiny_config("routing-free")
    model = build_gpt_model(cfg)
    for r in routing_free_routers(model):
        r.balance_coeff.fill_(0.0123)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    fresh = build_gpt_model(cfg)
    assert float(routing_free_routers(fresh)[0].balance_coeff) == pytest.approx(1e-10)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    assert [float(r.balance_coeff) for r in routing_free_routers(fresh)] == [0.0123, 0.0123]
    # and the experts' weights came back too
    a, b = moe_layers(model)[0].experts.up_proj, moe_layers(fresh)[0].experts.up_proj
    assert torch.equal(a, b)


def test_lambda_stays_float64_under_bf16(mp):
    r = RoutingFreeRouter(tiny_config("routing-free"))
    r.balance_coeff.fill_(1.02 ** 7 * 1e-3)
    r.bfloat16()
    assert r.balance_coeff.dtype == torch.float64 and float(r.balance_coeff) == 1.02 ** 7 * 1e-3


def test_theta_is_an_inference_knob(mp):
    cfg = tiny_config("routing-free")
    model = build_gpt_model(cfg).eval()
    x = torch.randn(32, 1, cfg.hidden_size)
    r = routing_free_routers(model)[0]
    n_lo = r(x)[1].sum()
    set_theta(model, 2.5)
    n_hi = r(x)[1].sum()
    assert n_hi < n_lo


def _parallel_worker(rank, world, port, tmp):
    """Balance-loss gradients of every gate parameter (3 layers, lambda = 1, LM loss x 0) and the
    loss value under EP=2 and TP=2+SP, against the 1-rank model; both ranks feed the same batch."""
    import json
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def run(tp, ep, dispatcher):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        cfg = tiny_config("routing-free", num_layers=3, routing_free_lambda0=1.0, tensor_model_parallel_size=tp,
                          expert_model_parallel_size=ep, sequence_parallel=tp > 1, moe_token_dispatcher_type=dispatcher)
        model = build_gpt_model(cfg)
        ckpt = os.path.join(tmp, "ref")
        if tp == ep == 1:  # the 1-way model (each rank holds all of it) is the reference
            dist_checkpointing.save(model.sharded_state_dict(), ckpt)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
        moe_utils.get_moe_layer_wise_logging_tracker().pop("routing_free_balance_loss", None)
        (model(ids, torch.arange(16)[None].expand(3, 16), None, labels=ids).sum() * 0).backward()
        moe_utils.reduce_aux_losses_tracker_across_ranks(["routing_free_balance_loss"])
        value = float(moe_utils.get_moe_layer_wise_logging_tracker()["routing_free_balance_loss"]["values"].sum()) / 3
        grads = []
        for r in routing_free_routers(model):
            for p in (r.gate_proj, r.gate_scale, r.gate_bias):
                g = p.grad.clone()
                if tp > 1:  # sequence-parallel params: each TP rank holds its tokens' share
                    dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
                # as DDP does: the mean over data-parallel ranks (under EP, A_i's gradient through
                # the AoE expert i accrues on the rank that holds expert i)
                dist.all_reduce(g, group=ps.get_data_parallel_group())
                g /= ps.get_data_parallel_world_size()
                grads.append(g)
        return value, grads

    os.makedirs(os.path.join(tmp, "ref"), exist_ok=True)
    ref_value, ref_grads = run(1, 1, "allgather")
    out = {}
    for name, tp, ep, dispatcher in (("ep2-alltoall", 1, 2, "alltoall"), ("tp2-sp", 2, 1, "allgather")):
        value, grads = run(tp, ep, dispatcher)
        out[name] = [abs(value - ref_value), max(float((g - w).abs().max()) for g, w in zip(grads, ref_grads)),
                     max(float(w.abs().max()) for w in ref_grads)]
    ps.destroy_model_parallel()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_balance_loss_is_exact_under_ep2_and_tp2_sp(tmp_path):
    import json

    import torch.multiprocessing as mp_
    from conftest import free_port

    mp_.spawn(_parallel_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(res) == 2
        for name, (dv, dg, gmax) in res.items():
            assert dv < 1e-6 and dg < 1e-6 and gmax > 1e-3, (rank, name, dv, dg, gmax)
