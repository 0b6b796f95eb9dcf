"""Shared part of the parameter-free baselines (random, hash): no gate, a fixed k, uniform weights.

Their decisions are made for the whole sequence and then sliced to this rank's part under
sequence parallelism, so every tensor-parallel rank routes the same token the same way.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from selfmoe import mcore_compat


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
        """choices [T, k] expert ids -> (probs [T, E] with 1/k on the chosen, routing_map [T, E])."""
        T = choices.shape[0]
        routing_map = torch.zeros(T, self.num_experts, dtype=torch.bool, device=choices.device)
        routing_map.scatter_(1, choices, True)
        probs = routing_map.to(dtype) / self.topk
        return probs, routing_map
