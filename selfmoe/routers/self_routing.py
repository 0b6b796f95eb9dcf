"""Self-Routing: the expert logits are a fixed E-channel subspace of the MoE input; no router weights.

Everything after the logits (score function, top-k, aux loss, expert bias, capacity) is
Megatron-Core's TopKRouter.routing, reused as is.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

from selfmoe import mcore_compat
from selfmoe.routers.base import router_option


def subspace_indices(spec, num_experts: int, hidden_size: int) -> list[int]:
    if spec == "last":
        return list(range(hidden_size - num_experts, hidden_size))
    if spec == "first":
        return list(range(num_experts))
    return [int(i) for i in spec]


class SelfRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(
            config=config,
            pg_collection=mcore_compat.default_pg_collection(pg_collection),
            **mcore_compat.router_base_kwargs(TopKRouter, kwargs),
        )
        # Router.__init__ always allocates a gate; Self-Routing has none (not even an unused one).
        del self.weight
        if getattr(self, "bias", None) is not None:
            del self.bias
        self.bias = None
        E, H = config.num_moe_experts, config.hidden_size
        if E > H:
            raise ValueError(f"self routing needs num_moe_experts ({E}) <= hidden_size ({H})")
        ids = subspace_indices(router_option(config, "self_routing_subspace"), E, H)
        self._contiguous = ids == list(range(ids[0], ids[0] + E))
        self._start = ids[0]
        self.register_buffer("subspace", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.temperature = float(router_option(config, "self_routing_temperature"))

    def reset_parameters(self):
        pass  # nothing to initialise (called by Router.__init__ before the gate is removed)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        if self._contiguous:
            logits = input[..., self._start : self._start + self.num_experts]
        else:
            logits = input.index_select(-1, self.subspace.to(input.device))
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        logits = logits.to(dtype)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits
