import pytest
import torch

from helpers import tiny_config
from selfmoe.models import build_gpt_model
from selfmoe.routers.self_routing import SelfRouter


@pytest.mark.parametrize("subspace", ["last", "first", (3, 17, 5, 30)])
def test_picks_topk_of_designated_channels(mp, subspace):
    cfg = tiny_config("self", self_routing_subspace=subspace)
    r = SelfRouter(cfg)
    hidden = torch.randn(10, 2, cfg.hidden_size)
    probs, rmap = r(hidden)
    ids = {"last": list(range(28, 32)), "first": [0, 1, 2, 3]}.get(subspace, list(subspace))
    logits = hidden.reshape(-1, cfg.hidden_size)[:, ids]
    top = logits.topk(2, dim=-1)
    expected_map = torch.zeros_like(rmap).scatter_(1, top.indices, True)
    assert torch.equal(rmap, expected_map)
    # Megatron's default: softmax over the k selected logits.
    expected_probs = torch.zeros_like(probs).scatter_(1, top.indices, torch.softmax(top.values, -1))
    torch.testing.assert_close(probs, expected_probs)


def test_temperature_scales_logits(mp):
    cfg = tiny_config("self", self_routing_temperature=0.5)
    hidden = torch.randn(6, 1, cfg.hidden_size)
    probs, rmap = SelfRouter(cfg)(hidden)
    top = hidden.reshape(6, -1)[:, -4:].topk(2, dim=-1)
    torch.testing.assert_close(probs.gather(1, top.indices), torch.softmax(top.values / 0.5, -1))


def test_zero_router_parameters(mp):
    cfg = tiny_config("self")
    r = SelfRouter(cfg)
    assert list(r.parameters()) == [] and "weight" not in r.state_dict()
    learned = build_gpt_model(tiny_config("learned"))
    ours = build_gpt_model(cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(learned) - n(ours) == cfg.num_layers * cfg.num_moe_experts * cfg.hidden_size


def test_gradient_reaches_hidden_only_through_subspace(mp):
    cfg = tiny_config("self")
    hidden = torch.randn(5, 2, cfg.hidden_size, requires_grad=True)
    probs, _ = SelfRouter(cfg)(hidden)
    (probs * torch.randn_like(probs)).sum().backward()
    g = hidden.grad.reshape(-1, cfg.hidden_size)
    assert g[:, -4:].abs().sum() > 0
    assert torch.count_nonzero(g[:, :-4]) == 0


def test_more_experts_than_hidden_is_an_error():
    with pytest.raises(ValueError, match=r"num_moe_experts \(64\).*hidden_size is 32"):
        tiny_config("self", num_moe_experts=64)


def test_expert_bias_and_aux_loss_available(mp):
    cfg = tiny_config("self", moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                      moe_aux_loss_coeff=0.01)
    r = SelfRouter(cfg)
    r.set_layer_number(1)
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # expert 3 always chosen
    probs, rmap = r(torch.randn(7, 1, cfg.hidden_size))
    assert rmap[:, 3].all()
    assert r.local_tokens_per_expert.sum() == 7 * 2
