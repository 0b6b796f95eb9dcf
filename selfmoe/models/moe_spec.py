"""The part both model families share: our router (and Routing-Free's experts) swapped into a
Megatron-Core layer spec's MoE submodules, and the one-time wiring after the model is built."""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec

from selfmoe import mcore_compat
from selfmoe.routers import get_router_class, moe_layers


def with_moe_router(spec: ModuleSpec, config) -> ModuleSpec:
    """A Megatron-Core transformer-layer spec whose MoE MLP uses `config.moe_router_type`.

    Dense specs (no MoE MLP) and dense configs are returned unchanged.
    """
    if not config.num_moe_experts:
        return spec
    swap = dict(router=get_router_class(config.moe_router_type))
    if config.moe_router_type == "routing-free" and config.routing_free_expert_type == "aoe":
        from selfmoe.routers.routing_free import AoEExperts

        swap["experts"] = ModuleSpec(module=AoEExperts)
    mlp = mcore_compat.replace_moe_submodules(spec.submodules.mlp, **swap)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))


def prepare_moe(model, config) -> None:
    """Once after building a model (any family): wiring some routers need (Routing-Free's AoE)."""
    if config.num_moe_experts and config.moe_router_type == "routing-free" and moe_layers(model):
        from selfmoe.routers.routing_free import prepare_layers

        prepare_layers(model)
