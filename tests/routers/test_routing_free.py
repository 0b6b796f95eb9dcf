import pytest
import torch

from helpers import brute_force_moe, tiny_config
from megatron.core import dist_checkpointing
from selfmoe.models import build_gpt_model, moe_layers
from selfmoe.routers.routing_free import (RoutingFreeRouter, balance_losses, routing_free_routers, set_theta,
                                          update_balance_coefficient)


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


def reference_losses(f, G):
    """Straight from the paper's definitions (product of means), no normalisation tricks."""
    T, E = f.shape
    l_eb = sum(f[:, i].mean() * G[:, i].mean() for i in range(E)) / E
    l_tb = sum(f[t].mean() * G[t].mean() for t in range(T)) / T
    return l_eb, l_tb


def test_balance_losses_match_definitions():
    f = (torch.rand(20, 6) > 0.5).float()
    G = torch.rand(20, 6) * f
    l_eb, l_tb = balance_losses(f, G, 20, f.mean(0))
    r_eb, r_tb = reference_losses(f, G)
    torch.testing.assert_close(l_eb, r_eb)
    torch.testing.assert_close(l_tb, r_tb)


@pytest.mark.parametrize("mu", [1.0, 0.0, 0.5])
def test_mu_interpolates_expert_and_token_balance(mp, mu):
    """The aux-loss gradient (through Megatron's MoEAuxLossAutoScaler) is that of mu*L_EB+(1-mu)*L_TB."""
    cfg = tiny_config("routing-free", routing_free_mu=mu, routing_free_lambda0=1.0)
    r = RoutingFreeRouter(cfg)
    r.set_layer_number(1)
    x = torch.randn(12, 2, cfg.hidden_size)
    probs, _ = r(x)
    (probs * 0).sum().backward()  # only the attached balance loss produces gradients
    got = r.gate_proj.grad.clone()
    r.zero_grad()
    G = r.gates(x.reshape(-1, cfg.hidden_size))
    f = (G >= r.theta).float()
    l_eb, l_tb = reference_losses(f, G)
    want, = torch.autograd.grad(mu * l_eb + (1 - mu) * l_tb, r.gate_proj)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert got.abs().sum() > 0


def test_lambda_update_rule(mp):
    cfg = tiny_config("routing-free", routing_free_lambda0=0.5, routing_free_eta=0.1,
                      routing_free_density_target=0.25)
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
