"""Router registry: one file per router, all behind Megatron-Core's router contract.

A router class is built as `cls(config=..., pg_collection=..., **kwargs)`, has
`set_layer_number(n)` and `forward(hidden [s, b, H], padding_mask=None) -> (probs [T, E] float,
routing_map [T, E] bool)`, so it can be used as `MoESubmodules.router`.
"""

from __future__ import annotations

import importlib

# name -> (module, class, what it computes, source)
ROUTERS = {
    "learned": ("selfmoe.routers.learned", "LearnedRouter",
                "softmax(x W_r^T), top-k; aux/z-loss, expert bias, capacity", "Megatron-Core TopKRouter"),
    "self": ("selfmoe.routers.self_routing", "SelfRouter",
             "softmax(x[S]) over a fixed E-channel subspace S of x, top-k", "Mohamud et al. 2026, arXiv 2604.00421"),
    "random": ("selfmoe.routers.random_router", "RandomRouter",
               "uniform random k experts per token, fresh each step", "random-routing baseline"),
    "hash": ("selfmoe.routers.hash_router", "HashRouter",
             "fixed token id (or position) -> k experts table", "Roller et al. 2021 (Hash Layers)"),
    "routing-free": ("selfmoe.routers.routing_free", "RoutingFreeRouter",
                     "G_i = ReLU(s_i ||x A_i|| - b_i), expert fires when G_i >= theta (0..E per token)",
                     "Liu et al. 2026, arXiv 2604.00801"),
}


def available_routers() -> list[str]:
    return list(ROUTERS)


def get_router_class(name: str):
    """The Megatron-Core router class registered under `name`."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    module, cls, _, _ = ROUTERS[name]
    return getattr(importlib.import_module(module), cls)


def moe_layers(model) -> list:
    """Every Megatron-Core MoE layer of a model (or of a list of pipeline model chunks), in order."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in c.modules() if isinstance(m, BaseMoELayer)]


def routers(model) -> list:
    """The router of every MoE layer of a model, in layer order."""
    return [layer.router for layer in moe_layers(model)]
