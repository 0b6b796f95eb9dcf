"""Random routing: k experts drawn uniformly per token, fresh at every forward; 0 parameters.

The draw depends only on (seed, layer, forward count, token position), so it is reproducible
from the seed, identical on every tensor-parallel rank, and resumes exactly (the count is saved).
"""

from __future__ import annotations

import torch

from selfmoe.routers.base import FixedKRouter, router_option


class RandomRouter(FixedKRouter):
    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config, pg_collection, **kwargs)
        self.seed = int(router_option(config, "random_router_seed"))
        self.register_buffer("forward_count", torch.zeros(1, dtype=torch.long))

    def forward(self, input: torch.Tensor, padding_mask=None):
        s_local, b = input.shape[0], input.shape[1]
        s_full, offset = self.sequence_slice(s_local)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed * 1_000_003 + (self.layer_number or 0) * 7919 + int(self.forward_count))
        if self.training:
            self.forward_count += 1
        scores = torch.rand(s_full, b, self.num_experts, generator=gen)
        choices = scores[offset : offset + s_local].reshape(-1, self.num_experts).topk(self.topk, dim=-1).indices
        return self.route_from_choices(choices.to(input.device), torch.float32)
