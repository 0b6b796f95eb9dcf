"""Every router through Megatron's MoELayer equals a brute-force sum over the chosen experts."""

import pytest
import torch

from helpers import brute_force_moe, tiny_config
from selfmoe.models import build_gpt_model, moe_layers
from selfmoe.routers import available_routers, get_router_class

ROUTERS = available_routers()


def capture_router(layer):
    seen = {}
    h = layer.router.register_forward_hook(lambda m, i, o: seen.update(probs=o[0], routing_map=o[1]))
    return seen, h


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("style", ["gpt2", "mixtral"])
def test_moe_layer_equals_brute_force(mp, router, dispatcher, style):
    cfg = tiny_config(router, style=style, moe_token_dispatcher_type=dispatcher)
    model = build_gpt_model(cfg)
    layer = moe_layers(model)[0]
    hidden = torch.randn(8, 3, cfg.hidden_size, requires_grad=True)
    if router == "hash":
        layer.router.set_token_ids(torch.randint(0, cfg.vocab_size, (3, 8)))
    seen, h = capture_router(layer)
    out, bias = layer(hidden)
    h.remove()
    assert bias is None
    ref = brute_force_moe(layer, hidden, seen["probs"], seen["routing_map"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The same gradients reach the input (through the experts and, where routing is learned, the probs).
    g_out, = torch.autograd.grad(out.square().sum(), hidden, retain_graph=True)
    g_ref, = torch.autograd.grad(ref.square().sum(), hidden)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-4)
    # The routing map has the router's contract: [T, E] bool, probs [T, E] float, zero off the map.
    rm, p = seen["routing_map"], seen["probs"]
    assert rm.dtype == torch.bool and rm.shape == (24, cfg.num_moe_experts) and p.is_floating_point()
    assert (p[~rm] == 0).all()
    if router != "routing-free":
        assert (rm.sum(1) == cfg.moe_router_topk).all()


@pytest.mark.parametrize("router", ROUTERS)
def test_registry_contract(mp, router):
    cls = get_router_class(router)
    cfg = tiny_config(router)
    r = cls(config=cfg, pg_collection=None)
    r.set_layer_number(1)
    assert r.layer_number == 1
    n = sum(p.numel() for p in r.parameters())
    expected = {"learned": cfg.num_moe_experts * cfg.hidden_size, "self": 0, "random": 0, "hash": 0,
                "routing-free": cfg.num_moe_experts * (cfg.hidden_size * cfg.routing_free_rank + 2)}
    assert n == expected[router]


def test_unknown_router_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown router 'topk'"):
        get_router_class("topk")
