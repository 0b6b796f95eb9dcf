import math

import pytest
import torch

from helpers import tiny_config
from selfmoe.metrics import RoutingStats, parameter_counts, routing_metrics
from selfmoe.models import build_gpt_model


def test_hand_computed_metrics():
    # 4 experts; loads 6, 2, 0, 0 of 8 routed pairs; tokens use 2, 2, 2, 2 experts.
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0]])
    k_hist = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0]])
    m = routing_metrics(counts, k_hist)
    f = [0.75, 0.25, 0.0, 0.0]
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert m["normalized_entropy"] == pytest.approx(entropy)
    mean = 0.25
    std = math.sqrt(sum((x - mean) ** 2 for x in f) / 4)
    assert m["cv"] == pytest.approx(std / mean)
    assert m["max_overload"] == pytest.approx(3.0)
    assert m["dead_experts"] == 2
    assert m["experts_per_token"] == 2 and m["experts_per_token_p50"] == 2 and m["experts_per_token_p99"] == 2
    assert m["layers"][1]["load_fraction"] == f


def test_uniform_is_entropy_one_and_variable_k_quantiles():
    counts = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    # layer 1: 100 tokens, 50 with 0 experts, 49 with 1, 1 with 4 -> mean 0.53, p50 0, p99 1
    k_hist = torch.tensor([[50.0, 49.0, 0.0, 0.0, 1.0], [0.0] * 5])
    m = routing_metrics(counts, k_hist)
    assert list(m["layers"]) == [1]  # layer 2 saw no token (e.g. another pipeline stage)
    assert m["normalized_entropy"] == pytest.approx(1.0) and m["cv"] == 0 and m["max_overload"] == 1.0
    assert m["experts_per_token"] == pytest.approx(0.53)
    assert m["experts_per_token_p50"] == 0 and m["experts_per_token_p99"] == 1
    assert m["density"] == pytest.approx(0.53 / 4)


def test_stats_collected_from_model_forward(mp):
    cfg = tiny_config("hash")
    model = build_gpt_model(cfg)
    stats = RoutingStats(model, cfg.num_layers, cfg.num_moe_experts)
    ids = torch.randint(0, 64, (2, 16))
    model(ids, torch.arange(16)[None].expand(2, 16), None)
    table = model.decoder.layers[0].mlp.router.table
    expected = torch.bincount(table[ids.flatten()].flatten(), minlength=4).double()
    assert torch.equal(stats.counts[0], expected) and torch.equal(stats.counts[1], expected)
    m = stats.reduce()
    f = expected / expected.sum()
    assert m["max_overload"] == pytest.approx(float(4 * f.max()))
    assert stats.counts.sum() == 0  # reset after reduce


def test_parameter_counts(mp):
    cfg = tiny_config("learned")
    model = build_gpt_model(cfg)
    pc = parameter_counts(model, cfg)
    assert pc["total"] == sum(p.numel() for p in model.parameters())
    assert pc["router"] == cfg.num_layers * cfg.num_moe_experts * cfg.hidden_size
    expert = cfg.num_layers * cfg.num_moe_experts * 2 * cfg.hidden_size * cfg.moe_ffn_hidden_size
    assert pc["expert"] == expert and pc["active"] == pc["total"] - expert + expert * 2 // 4
    assert parameter_counts(build_gpt_model(tiny_config("self")), cfg)["router"] == 0
