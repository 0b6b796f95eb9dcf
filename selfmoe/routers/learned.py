"""The learned baseline: Megatron-Core's TopKRouter, untouched.

The subclass only lets `pg_collection` default to the global groups (our registry's contract);
aux loss, z-loss, expert bias, capacity and everything else are Megatron's.
"""

from megatron.core.transformer.moe.router import TopKRouter

from selfmoe import mcore_compat


class LearnedRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(
            config=config,
            pg_collection=mcore_compat.default_pg_collection(pg_collection),
            **mcore_compat.router_base_kwargs(TopKRouter, kwargs),
        )
