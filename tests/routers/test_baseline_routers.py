import math

import pytest
import torch

from helpers import tiny_config
from selfmoe.models import build_gpt_model, routers
from selfmoe.routers.hash_router import HashRouter
from selfmoe.routers.random_router import RandomRouter


def test_random_same_seed_same_assignment(mp):
    cfg = tiny_config("random")
    a, b = RandomRouter(cfg), RandomRouter(cfg)
    for r in (a, b):
        r.set_layer_number(1)
    x = torch.randn(16, 2, cfg.hidden_size)
    maps_a = [a(x)[1] for _ in range(3)]
    maps_b = [b(x)[1] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(maps_a, maps_b))
    assert not torch.equal(maps_a[0], maps_a[1])  # fresh draw each step
    c = RandomRouter(tiny_config("random", random_router_seed=99))
    c.set_layer_number(1)
    assert not torch.equal(c(x)[1], maps_a[0])


def test_random_is_uniform(mp):
    """Chi-square test of expert loads and of the k-subsets, at a 1e-4 false-alarm level."""
    E, k = 8, 2
    cfg = tiny_config("random", num_moe_experts=E, moe_router_topk=k)
    r = RandomRouter(cfg)
    r.set_layer_number(1)
    _, rmap = r(torch.zeros(4000, 4, cfg.hidden_size))
    assert (rmap.sum(1) == k).all()
    counts = rmap.sum(0).double()
    expected = rmap.shape[0] * k / E
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 33.1  # chi2(7 dof) 99.99th percentile = 29.9; margin
    # pairs: all C(8,2)=28 subsets equally likely
    codes = (rmap.double() * (2 ** torch.arange(E, dtype=torch.float64))).sum(1)
    _, pair_counts = codes.unique(return_counts=True)
    assert pair_counts.numel() == math.comb(E, k)
    exp_p = rmap.shape[0] / math.comb(E, k)
    chi2p = ((pair_counts.double() - exp_p) ** 2 / exp_p).sum().item()
    assert chi2p < 61.0  # chi2(27 dof) 99.99th percentile ~ 61


def test_random_decision_counter_is_checkpointed(mp):
    cfg = tiny_config("random")
    r = RandomRouter(cfg)
    r.set_layer_number(1)
    x = torch.randn(8, 1, cfg.hidden_size)
    r(x)
    state = {k: v.clone() for k, v in r.state_dict().items()}
    expect = r(x)[1]
    r2 = RandomRouter(cfg)
    r2.set_layer_number(1)
    r2.load_state_dict(state)
    assert torch.equal(r2(x)[1], expect)


def test_hash_by_token_id_is_fixed(mp):
    cfg = tiny_config("hash")
    model = build_gpt_model(cfg)
    seen = []
    for r in routers(model):
        r.register_forward_hook(lambda m, i, o: seen.append(o[1]))
    ids = torch.randint(0, cfg.vocab_size, (3, 16))
    model(ids, torch.arange(16)[None].expand(3, 16), None)
    rmap = seen[0]  # [s*b, E] in Megatron's s-major order
    flat_ids = ids.t().reshape(-1)
    for t in range(flat_ids.numel()):
        # the same id always maps to the same experts, wherever it occurs
        same = (flat_ids == flat_ids[t]).nonzero().flatten()
        assert torch.equal(rmap[same], rmap[t].expand(len(same), -1))
    assert sum(p.numel() for r in routers(model) for p in r.parameters()) == 0


def test_hash_table_is_balanced_over_vocab(mp):
    cfg = tiny_config("hash", vocab_size=4096, num_moe_experts=8, moe_router_topk=1, moe_router_pre_softmax=True)
    r = HashRouter(cfg)
    load = torch.bincount(r.table.flatten(), minlength=8).double()
    assert ((load - 512).abs() < 5 * math.sqrt(512)).all()


def test_hash_by_position(mp):
    cfg = tiny_config("hash", hash_router_by="position")
    r = HashRouter(cfg)
    _, rmap = r(torch.randn(16, 2, cfg.hidden_size))
    rmap = rmap.view(16, 2, -1)
    assert torch.equal(rmap[:, 0], rmap[:, 1])  # same position, same experts, any sample
    assert torch.equal(rmap[:, 0], torch.zeros(16, 4, dtype=torch.bool).scatter_(1, r.table[:16], True))


def test_hash_without_ids_is_a_clear_error(mp):
    r = HashRouter(tiny_config("hash"))
    with pytest.raises(RuntimeError, match="no token ids for this forward; call router.set_token_ids"):
        r(torch.randn(4, 1, 32))
