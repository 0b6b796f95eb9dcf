"""Megatron-Core version differences, kept in one place.

0.16 (the newest release for Python 3.11) describes an MoE layer as
`ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`; 0.19 uses
`functools.partial(MoELayer, submodules=MoESubmodules(...))`, and passes routers extra
keyword arguments (`is_mtp_layer=`). Everything else in selfmoe uses the public API only.

Below those, the patches for megatron-core 0.16.1's own MoE faults (issue 9), which apply on GPU
as on CPU: statistics counted from the routed map (before capacity), the alltoall dispatcher with
a capacity above the token count, and expert grads under EP=1 with ETP != TP; and (issue 10)
the DistributedOptimizer's fully_reshardable checkpoint loaded into torch Adam.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect

import torch

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


# ---------------------------------------------------------------------------------------------
# Patches to megatron-core's own MoE faults. Each is named, pinned to the versions it was
# written against, applied once at import (any selfmoe router imports this module), and covered
# by a test that fails without it (tests/routers/test_moe_faults.py).

PATCHED_MCORE_VERSIONS = ("0.16.1",)
_patches: list[str] = []
_routing_router: contextvars.ContextVar = contextvars.ContextVar("selfmoe_routing_router", default=None)


def applied_patches() -> list[str]:
    return list(_patches)


def record_routing(router, routed_map, routing_map) -> None:
    """Keep what a router decided at its last forward for the statistics (selfmoe.metrics).

    routed_map [T, E] bool: the experts each token was routed to, before capacity dropping and
    padding; routing_map [T, E] bool: what the router returned (after dropping, padded slots
    included). The metrics hook pairs them by identity with the router's output.
    """
    router.last_routing = (routed_map.detach(), routing_map)


def _token_dropping_records_routed_map(original):
    """Wrap moe_utils.apply_router_token_dropping as the router module calls it: the routing map it
    receives (before capacity) is handed to the TopKRouter currently routing."""

    @functools.wraps(original)
    def apply_router_token_dropping(routing_probs, routing_map, *args, **kwargs):
        router = _routing_router.get()
        if router is not None:
            router._routed_map = routing_map
        return original(routing_probs, routing_map, *args, **kwargs)

    return apply_router_token_dropping


def _topk_routing_counts_routed_tokens(original):
    """megatron-core 0.16.1 fault: TopKRouter.routing feeds the routing map *after* capacity
    dropping and padding to the aux-loss-free expert-bias update (`local_tokens_per_expert`), so
    with --moe-pad-expert-input-to-capacity every expert counts exactly its capacity and the bias
    never moves, and dropped tokens vanish from the count. Patched: the count (and our routing
    statistics) use the map of the tokens actually routed, before dropping/padding, padding tokens
    excluded (0.16.1 also crashes there: its padding mask [T] does not broadcast against [T, E]).
    """

    @functools.wraps(original)
    def routing(self, logits, padding_mask=None):
        self._routed_map = None
        enable, self.enable_expert_bias = self.enable_expert_bias, False  # counted below instead
        token = _routing_router.set(self)
        try:
            probs, routing_map = original(self, logits, padding_mask=padding_mask)
        finally:
            _routing_router.reset(token)
            self.enable_expert_bias = enable
        routed = routing_map if self._routed_map is None else self._routed_map
        self._routed_map = None
        # [T, 1]: 0.16.1's own call passes [T], which cannot broadcast against [T, E] (a crash with
        # a padding mask and the expert bias together)
        self._apply_expert_bias(routed, padding_mask=None if padding_mask is None else padding_mask.reshape(-1, 1))
        record_routing(self, routed, routing_map)
        return probs, routing_map

    return routing


def _alltoall_capacity_at_most_tokens(original):
    """megatron-core 0.16.1 fault: with --moe-pad-expert-input-to-capacity and a capacity above
    the number of tokens (capacity factor > E/k), apply_router_token_dropping pads each expert to
    all T tokens while the alltoall dispatcher sizes its buffers for `capacity` rows per expert:
    a reshape error in the first step. Patched: the dispatcher's capacity is min(capacity, T),
    which is what the router's padded map holds (nothing can be dropped when capacity >= T)."""

    @functools.wraps(original)
    def preprocess(self, routing_map):
        out = original(self, routing_map)
        tokens = routing_map.size(0)
        if self.drop_and_pad and self.capacity > tokens:
            self.capacity = tokens
            self.num_out_tokens = tokens * self.num_experts
            self.num_global_tokens_per_local_expert.fill_(tokens)
            out = torch.full_like(out, tokens * self.tp_size * self.ep_size)
        return out

    return preprocess


def _expert_grads_reduced_over_expert_dp(original):
    """megatron-core 0.16.1 fault: expert weights are flagged for the expert-data-parallel
    reduction (`allreduce=False`) only when expert_model_parallel_size > 1. With EP=1 and
    expert_tensor_parallel_size != tensor_model_parallel_size (e.g. TP=2+SP, ETP=1) the expert-DP
    group is not the DP group, yet DDP reduces the expert grads over the DP group: the TP ranks'
    replicas of an expert, fed different tokens, drift apart. Patched: in that layout every expert
    parameter of the layer is flagged, so DDP (and the grad-norm) use the expert groups."""

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        c = self.config
        etp = c.expert_tensor_parallel_size or c.tensor_model_parallel_size
        if c.expert_model_parallel_size == 1 and etp != c.tensor_model_parallel_size:
            for p in self.experts.parameters():
                p.allreduce = False

    return __init__


def _fully_reshardable_load_skips_adam_step(original):
    """megatron-core 0.16.1 fault: loading the DistributedOptimizer's `fully_reshardable` state into
    torch's Adam/AdamW (no TransformerEngine/Apex, e.g. on CPU) fails with KeyError 'step'.
    `load_parameter_state_from_fully_reshardable` leaves "step" out of the tensors it hands over
    (the step comes from the param groups), but `_set_main_param_and_optimizer_states` copies into
    every state key torch Adam holds, "step" included. Patched: the step already in place is
    handed back to it (a no-op copy); `selfmoe.training.checkpointing` restores the saved step."""

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])
        return original(self, model_param, tensors)

    return _set_main_param_and_optimizer_states


def apply_patches(version: str | None = None) -> list[str]:
    """Apply the megatron-core fault patches above (idempotent). On an untested megatron-core
    version they are skipped with a warning: they patch its internals by name."""
    if _patches:
        return applied_patches()
    import warnings

    import megatron.core
    from megatron.core.transformer.moe import router as mcore_router
    from megatron.core.transformer.moe import token_dispatcher

    version = version or getattr(megatron.core, "__version__", "unknown")
    if version not in PATCHED_MCORE_VERSIONS:
        warnings.warn(f"selfmoe.mcore_compat: megatron-core {version} is untested (tested: "
                      f"{', '.join(PATCHED_MCORE_VERSIONS)}); its MoE fault patches are not applied")
        return []
    mcore_router.apply_router_token_dropping = _token_dropping_records_routed_map(
        mcore_router.apply_router_token_dropping)
    mcore_router.TopKRouter.routing = _topk_routing_counts_routed_tokens(mcore_router.TopKRouter.routing)
    _patches.append("topk_routing_counts_routed_tokens")
    from megatron.core.transformer.moe.moe_layer import MoELayer

    MoELayer.__init__ = _expert_grads_reduced_over_expert_dp(MoELayer.__init__)
    _patches.append("expert_grads_reduced_over_expert_dp")
    disp = token_dispatcher.MoEAlltoAllTokenDispatcher
    disp.preprocess = _alltoall_capacity_at_most_tokens(disp.preprocess)
    _patches.append("alltoall_capacity_at_most_tokens")
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.HAVE_TE and not te_extension.HAVE_TE:
        # megatron-core 0.16.1 fault: without TransformerEngine, megatron.core.extensions.
        # transformer_engine still imports (its classes built on a MagicMock), so MLA's HAVE_TE is
        # True and MLASelfAttention.__init__ fails on isinstance(linear_proj, <MagicMock TELinear>).
        mla.HAVE_TE = False
        _patches.append("mla_have_te_without_te")
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer._set_main_param_and_optimizer_states = _fully_reshardable_load_skips_adam_step(
        DistributedOptimizer._set_main_param_and_optimizer_states)
    _patches.append("fully_reshardable_load_skips_adam_step")
    return applied_patches()



# ---------------------------------------------------------------------------------------------
# Multi-latent attention on megatron-core's local spec (no TransformerEngine).

def mla_local_core_attention():
    """The local core-attention class for MLASelfAttention. megatron-core 0.16.1 (and Megatron-LM
    main at d98e8a6) builds MLA's core attention with `k_channels=` and `v_channels=` (query/key
    and value head widths differ: qk_head_dim + qk_pos_emb_head_dim vs v_head_dim), which only
    TransformerEngine's attention accepts: `get_gpt_layer_local_spec(multi_latent_attention=True)`
    fails with "DotProductAttention.__init__() got an unexpected keyword argument 'k_channels'".
    This subclass takes both and sizes its output by v_channels; scores come from the tensors and
    MLA passes its own softmax scale. Selected by the model builder (a spec choice, not a patch)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


MLADotProductAttention = mla_local_core_attention()


apply_patches()
