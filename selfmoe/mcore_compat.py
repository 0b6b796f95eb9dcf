"""Megatron-Core version differences, kept in one place.

0.16 (the newest release for Python 3.11) describes an MoE layer as
`ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`; 0.19 uses
`functools.partial(MoELayer, submodules=MoESubmodules(...))`, and passes routers extra
keyword arguments (`is_mtp_layer=`). Everything else in selfmoe uses the public API only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec


def replace_moe_submodules(mlp_spec, *, router=None, experts=None, moe_layer_cls=None):
    """Return the layer's MoE spec with the router builder / experts spec / layer class swapped."""
    if isinstance(mlp_spec, functools.partial):  # megatron-core >= 0.19
        sub = mlp_spec.keywords["submodules"]
        sub = _replace(sub, router=router, experts=experts)
        kw = dict(mlp_spec.keywords, submodules=sub)
        return functools.partial(moe_layer_cls or mlp_spec.func, *mlp_spec.args, **kw)
    assert isinstance(mlp_spec, ModuleSpec), f"unexpected MoE spec type {type(mlp_spec)}"
    return dataclasses.replace(
        mlp_spec,
        module=moe_layer_cls or mlp_spec.module,
        submodules=_replace(mlp_spec.submodules, router=router, experts=experts),
    )


def _replace(sub, **changes):
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(sub, **changes)


def default_pg_collection(pg_collection):
    """Routers may be built outside an MoELayer (tests, benchmarks): use the global groups."""
    return pg_collection if pg_collection is not None else get_default_pg_collection()


def router_base_kwargs(base_cls, kwargs: dict) -> dict:
    """Forward only the keyword arguments the installed base router accepts (0.19 adds some)."""
    params = inspect.signature(base_cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}
