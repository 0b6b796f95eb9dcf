"""Shared part of the parameter-free baselines (random, hash): no gate, a fixed k, uniform weights.

Their decisions are made for the whole sequence and then sliced to this rank's part under
sequence parallelism, so every tensor-parallel rank routes the same token the same way.
Capacity (--moe-expert-capacity-factor, padding) is Megatron-Core's apply_router_token_dropping,
as for TopKRouter.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

from selfmoe import mcore_compat


def router_option(config, name: str):
    """config.<name>, or its documented default (selfmoe.config.SelfMoEConfig) when `config` is a
    plain Megatron-Core TransformerConfig without our router fields."""
    if hasattr(config, name):
        return getattr(config, name)
    from selfmoe.config import SelfMoEConfig

    field = SelfMoEConfig.__dataclass_fields__[name]
    if field.default is dataclasses.MISSING:
        raise AttributeError(f"config has no {name!r}; use selfmoe.config.SelfMoEConfig (or set config.{name})")
    return field.default


class FixedKRouter(MegatronModule):
    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config)
        pg_collection = mcore_compat.default_pg_collection(pg_collection)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.tp_group = pg_collection.tp
        self.layer_number = None

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def sequence_slice(self, s_local: int) -> tuple[int, int]:
        """(full sequence length, offset of this rank's tokens) under sequence parallelism."""
        if not self.config.sequence_parallel:
            return s_local, 0
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        return s_local * tp, s_local * rank

    def route_from_choices(self, choices: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """choices [T, k] expert ids -> (probs [T, E] with 1/k on the chosen, routing_map [T, E]).

        With a capacity factor, tokens over an expert's capacity are dropped (and the map padded
        to capacity if asked) by Megatron-Core's apply_router_token_dropping, as in TopKRouter.
        """
        T = choices.shape[0]
        routed = torch.zeros(T, self.num_experts, dtype=torch.bool, device=choices.device)
        routed.scatter_(1, choices, True)
        probs, routing_map = routed.to(dtype) / self.topk, routed
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routed, router_topk=self.topk, capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        mcore_compat.record_routing(self, routed, routing_map)
        return probs, routing_map
