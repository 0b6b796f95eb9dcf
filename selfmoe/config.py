"""The one config object: Megatron-Core's TransformerConfig plus the model- and router-level fields.

Megatron-Core splits model settings between TransformerConfig and GPTModel's constructor; keeping
both (and our router options) in one dataclass lets a run be described, saved in a checkpoint and
compared on resume as a single object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

ROUTER_TYPES = ("learned", "self", "random", "hash", "routing-free")
# Routers with no score function: Megatron-Core's softmax options do not apply to them.
NO_SOFTMAX_ROUTERS = ("random", "hash", "routing-free")


def router_of_flag(flag: str) -> str | None:
    """The router type whose own option `flag` is (`--self-routing-*`: self, `--routing-free-*`:
    routing-free), else None: such a flag does nothing for any other router or the dense model."""
    for prefix, router in (("--self-routing-", "self"), ("--routing-free-", "routing-free")):
        if flag.startswith(prefix):
            return router
    return None

# `--routing-free-preset NAME`: parser defaults (explicit flags win). "reference" = the authors'
# 120M recipe (RoutingFreeMoE@9cce561: pretrain.sh, 120M.config.json, init.py; see
# ../shared/research/routing-free-reference.md). lambda0 = 1e-5 is what its saved buffer carries.
ROUTING_FREE_PRESETS = {
    "reference": dict(
        moe_router_type="routing-free", num_experts=12, moe_ffn_hidden_size=128, routing_free_rank=16,
        routing_free_theta=0.2, routing_free_density_target=0.25, routing_free_eta=0.2,
        routing_free_lambda_rule="quadratic", routing_free_lambda_update="micro-batch", routing_free_mu=0.5,
        routing_free_lambda0=1e-5, routing_free_scale_init=1.0, routing_free_bias_init=1e-6,
        routing_free_expert_type="aoe", swiglu=True, init_method_std=0.02,
    ),
}


@dataclass
class SelfMoEConfig(TransformerConfig):
    # --- model level (GPTModel constructor arguments) ---
    vocab_size: int = 0
    max_position_embeddings: int = 0
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rope_scaling: bool = False  # Llama 3.x RoPE frequency scaling (GPTModel's rope_scaling)
    rope_scaling_factor: float = 8.0
    untie_embeddings_and_output_weights: bool = False
    model_style: str = "gpt2"  # "gpt2" | "mixtral", informational: set by make_config

    # --- router choice (None experts = dense baseline) ---
    moe_router_type: str = "learned"

    # Self-Routing: which hidden channels are the expert logits.
    self_routing_subspace: Union[str, tuple] = "last"  # "last" | "first" | tuple of channel ids
    self_routing_temperature: float = 1.0

    # Random / hash routing.
    random_router_seed: int = 1234
    hash_router_seed: int = 1234
    hash_router_by: str = "token"  # "token" (language) | "position" (vision)

    # Routing-Free MoE.
    routing_free_rank: int = 32
    routing_free_theta: float = 1.0
    routing_free_density_target: float = 0.25
    routing_free_lambda0: float = 1e-10
    routing_free_eta: float = 0.02
    routing_free_mu: float = 0.5
    routing_free_bias_init: float = 1e-6
    # Per-expert scale s_i on the gate norm. None: 2*theta / (init_method_std * sqrt(H*r)), so that
    # s_i*||x A_i|| ~ 2*theta at init for a unit-RMS x and every expert fires at the start
    # whatever the width (with s=1 a narrow model would start with no expert firing).
    routing_free_scale_init: Optional[float] = None
    routing_free_expert_type: str = "aoe"  # "aoe" (reuses the gate's A_i) | "mlp" (Megatron's)
    # lambda step: "sign" lambda*(1+eta)^sign(rho-rho*) | "quadratic" (the authors' code)
    # lambda*(1+eta*(rho-rho*)^2)^sign(rho-rho*); when: "step" (once per optimizer step, density
    # over the step and all ranks) | "micro-batch" (after every micro-batch, as the authors' code)
    routing_free_lambda_rule: str = "sign"
    routing_free_lambda_update: str = "step"

    def __post_init__(self):
        if self.moe_router_type in NO_SOFTMAX_ROUTERS and self.num_moe_experts and self.moe_router_topk == 1:
            # TransformerConfig refuses top-1 without moe_router_pre_softmax (a softmax over one
            # chosen logit has no gradient); these routers have no softmax, so it does not apply.
            saved, self.moe_router_pre_softmax = self.moe_router_pre_softmax, True
            try:
                super().__post_init__()
            finally:
                self.moe_router_pre_softmax = saved
        else:
            super().__post_init__()
        validate_router_options(self)


@dataclass
class SelfMoEMLAConfig(SelfMoEConfig, MLATransformerConfig):
    """SelfMoEConfig with Megatron-Core's multi-latent attention fields (MLATransformerConfig:
    q/kv LoRA ranks, head dims, RoPE/YaRN settings), as Megatron-LM switches its config class
    under --multi-latent-attention. Built by make_config when multi_latent_attention is set."""


def config_class(multi_latent_attention: bool = False):
    """The config dataclass for a model with (or without) multi-latent attention."""
    return SelfMoEMLAConfig if multi_latent_attention else SelfMoEConfig


def validate_router_options(c: SelfMoEConfig) -> None:
    """One-line errors naming the offending option, before any model is built."""
    if c.moe_router_type not in ROUTER_TYPES:
        raise ValueError(f"moe_router_type must be one of {ROUTER_TYPES}, got {c.moe_router_type!r}")
    E = c.num_moe_experts
    if E is None:
        return
    if c.moe_router_type != "routing-free" and c.moe_router_topk > E:
        raise ValueError(f"moe_router_topk ({c.moe_router_topk}) exceeds num_moe_experts ({E})")
    if c.moe_router_type == "self":
        if E > c.hidden_size:
            raise ValueError(
                f"self routing reads num_moe_experts ({E}) hidden channels but hidden_size is {c.hidden_size}"
            )
        sub = c.self_routing_subspace
        if isinstance(sub, str):
            if sub not in ("last", "first"):
                raise ValueError(f"self_routing_subspace must be 'last', 'first' or a list of ids, got {sub!r}")
        else:
            ids = list(sub)
            if len(ids) != E or len(set(ids)) != E or not all(0 <= i < c.hidden_size for i in ids):
                raise ValueError(
                    f"self_routing_subspace needs {E} distinct channel ids in [0, {c.hidden_size}), got {ids}"
                )
        if c.self_routing_temperature <= 0:
            raise ValueError("self_routing_temperature must be > 0")
    if c.moe_router_type == "hash" and c.hash_router_by not in ("token", "position"):
        raise ValueError(f"hash_router_by must be 'token' or 'position', got {c.hash_router_by!r}")
    if c.moe_router_type == "hash" and c.hash_router_by == "token" and c.vocab_size <= 0:
        raise ValueError("hash routing by token id needs vocab_size")
    if c.moe_router_type == "routing-free":
        if not 0.0 <= c.routing_free_mu <= 1.0:
            raise ValueError(f"routing_free_mu must be in [0, 1], got {c.routing_free_mu}")
        if not 0.0 < c.routing_free_density_target <= 1.0:
            raise ValueError(f"routing_free_density_target must be in (0, 1], got {c.routing_free_density_target}")
        if c.routing_free_rank <= 0:
            raise ValueError("routing_free_rank must be > 0")
        if c.routing_free_expert_type not in ("aoe", "mlp"):
            raise ValueError(f"routing_free_expert_type must be 'aoe' or 'mlp', got {c.routing_free_expert_type!r}")
        if c.routing_free_lambda_rule not in ("sign", "quadratic"):
            raise ValueError(f"routing_free_lambda_rule must be 'sign' or 'quadratic', got {c.routing_free_lambda_rule!r}")
        if c.routing_free_lambda_update not in ("step", "micro-batch"):
            raise ValueError("routing_free_lambda_update must be 'step' or 'micro-batch', "
                             f"got {c.routing_free_lambda_update!r}")
        if c.routing_free_lambda_update == "micro-batch" and c.pipeline_model_parallel_size > 1:
            raise ValueError("routing_free_lambda_update 'micro-batch' needs pipeline_model_parallel_size 1 "
                             "(a micro-batch's density spans all stages); use 'step'")


# GPT-2 style and Mixtral style presets: the fields that differ between the two families.
STYLES = {
    "gpt2": dict(
        normalization="LayerNorm",
        gated_linear_unit=False,
        activation_func=F.gelu,
        position_embedding_type="learned_absolute",
        untie_embeddings_and_output_weights=False,
    ),
    "mixtral": dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=True,
    ),
}


def make_config(style: str = "gpt2", **overrides) -> SelfMoEConfig:
    """A SelfMoEConfig for a model family; explicit keyword arguments win over the preset."""
    if style not in STYLES:
        raise ValueError(f"unknown model style {style!r}; choose from {sorted(STYLES)}")
    kwargs = dict(STYLES[style], model_style=style)
    kwargs.setdefault("add_bias_linear", False)
    kwargs.setdefault("hidden_dropout", 0.0)
    kwargs.setdefault("attention_dropout", 0.0)
    kwargs.update(overrides)
    if "ffn_hidden_size" not in kwargs and "hidden_size" in kwargs:
        kwargs["ffn_hidden_size"] = 4 * kwargs["hidden_size"]
    if kwargs.get("max_position_embeddings", 0) <= 0 and "seq_length" in kwargs:
        kwargs["max_position_embeddings"] = kwargs["seq_length"]
    kwargs.pop("seq_length", None)
    return config_class(kwargs.get("multi_latent_attention", False))(**kwargs)


def config_fingerprint(c: SelfMoEConfig) -> dict:
    """The fields that must match for a checkpoint to load into a model (see training resume)."""
    out = {}
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        if isinstance(v, (int, float, str, bool, type(None), tuple)):
            out[f.name] = v
    if isinstance(c.moe_layer_freq, list):  # a dense/MoE layer pattern: the checkpoint's layers depend on it
        out["moe_layer_freq"] = list(c.moe_layer_freq)
    return out
