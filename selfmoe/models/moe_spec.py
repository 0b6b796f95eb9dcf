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


def parse_moe_layer_freq(freq, num_layers: int) -> list[int]:
    """Megatron-LM's --moe-layer-freq -> one 0/1 per layer (1 = MoE MLP).

    An int N (or its string) makes layers 0, N, 2N, ... MoE (1: every layer); a string holding a
    Python list expression such as "([0]+[1]*23)" or "[1,0]*6" spells the pattern out and must
    have `num_layers` entries of 0 or 1. Raises ValueError with the reason.
    """
    if isinstance(freq, str):
        text = freq.strip()
        if text.lstrip("+").isdigit():
            freq = int(text)
        else:
            if not set(text) <= set("[]()0123456789*+, "):
                raise ValueError(f"{freq!r} is neither an integer nor a list expression like ([0]+[1]*23)")
            try:
                freq = eval(text, {"__builtins__": {}}, {})  # digits, brackets, + and * only (checked above)
            except Exception:
                raise ValueError(f"{freq!r} is not a valid list expression") from None
    if isinstance(freq, int):
        if freq <= 0:
            raise ValueError(f"must be > 0, got {freq}")
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    pattern = list(freq) if isinstance(freq, (list, tuple)) else None
    if pattern is None or any(p not in (0, 1) for p in pattern):
        raise ValueError(f"{freq!r}: a pattern holds only 0 (dense) and 1 (MoE)")
    if len(pattern) != num_layers:
        raise ValueError(f"the pattern has {len(pattern)} entries but the model has {num_layers} layers")
    return [int(p) for p in pattern]


def moe_layer_pattern(config) -> list[int]:
    """0/1 per layer of the whole model (all 0 for a dense config), from config.moe_layer_freq."""
    if not config.num_moe_experts:
        return [0] * config.num_layers
    return parse_moe_layer_freq(config.moe_layer_freq, config.num_layers)


def num_moe_layers(config) -> int:
    """MoE layers of the whole model (all pipeline stages): the decoder's, plus the multi-token-
    prediction depths when they are MoE (an MTP layer is built like the decoder's last layer,
    `models.gpt.mtp_block_spec`; megatron-core's track_moe_metrics counts them as MoE layers)."""
    pattern = moe_layer_pattern(config)
    return sum(pattern) + (getattr(config, "mtp_num_layers", None) or 0) * pattern[-1]


def block_spec(config, layer_spec, vp_stage=None, per_layer: bool = False):
    """The layer spec(s) for a model whose MoE MLPs follow config.moe_layer_freq.

    `layer_spec(moe: bool, layer_index: int)` builds one Megatron-Core TransformerLayer spec. When
    every layer is alike (and not `per_layer`) this is that one spec (as before); otherwise a
    TransformerBlockSubmodules holding this pipeline stage's slice of the per-layer specs
    (Megatron-Core's offset rules, as in its get_gpt_decoder_block_spec).
    """
    pattern = moe_layer_pattern(config)
    if len(set(pattern)) <= 1 and not per_layer:
        return layer_spec(bool(pattern and pattern[0]), 0)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    local = [layer_spec(bool(pattern[i]), i) for i in range(offset, offset + n)]
    from megatron.core.transformer.identity_op import IdentityOp

    norm = local[0].submodules.input_layernorm
    if norm is IdentityOp:  # TransformerEngine spec: the layer's norm is fused into its QKV projection
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm  # the final norm megatron-core's get_gpt_decoder_block_spec gives a TE block
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=norm)
