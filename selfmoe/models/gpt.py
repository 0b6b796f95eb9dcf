"""The GPT builder: a Megatron-Core GPTModel whose MoE layers use the configured router.

Training scripts, tests and benchmarks all build GPT models here, so there is one code path.
"""

from __future__ import annotations

import dataclasses

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from selfmoe import mcore_compat
from selfmoe.config import SelfMoEConfig
from selfmoe.models.moe_spec import block_spec, moe_layer_pattern, prepare_moe, with_moe_router


def transformer_layer_spec(config: SelfMoEConfig, vp_stage: int | None = None):
    """Megatron-Core's GPT layer -- its TransformerEngine spec where TE and CUDA are there (grouped
    GEMM experts with --moe-grouped-gemm), else its local spec (`layer_spec_backend` says why) --
    with our router plugged into MoESubmodules; one spec per layer of this stage when
    --moe-layer-freq mixes dense and MoE layers. Multi-latent attention
    (config.multi_latent_attention) is megatron-core's MLASelfAttention."""
    return block_spec(config, lambda moe, i: _layer_spec(config, moe), vp_stage)


def te_importable() -> bool:
    """Whether TransformerEngine can be imported (the probe the spec choice and its tests use)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec_backend(config, cuda_available: bool | None = None) -> tuple[str, str | None]:
    """("transformer_engine", None) when megatron-core's TransformerEngine layer spec is used, else
    ("local", why): TE is used when it is importable, CUDA is present (`cuda_available`, default:
    torch's answer) and --transformer-impl is not local (Megatron-LM's default impl is transformer_engine)."""
    import torch

    if getattr(config, "transformer_impl", "transformer_engine") == "local":
        return "local", "--transformer-impl local"
    if not te_importable():
        return "local", "TransformerEngine is not installed"
    if not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        return "local", "no CUDA device (TransformerEngine's modules need one)"
    return "transformer_engine", None


def layer_spec_plan(config: SelfMoEConfig, moe: bool) -> tuple:
    """(megatron-core spec function, its keyword arguments) for one decoder layer."""
    common = dict(num_experts=config.num_moe_experts if moe else None, qk_layernorm=config.qk_layernorm,
                  multi_latent_attention=config.multi_latent_attention, qk_l2_norm=config.qk_l2_norm)
    if layer_spec_backend(config)[0] == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec, dict(common, moe_grouped_gemm=config.moe_grouped_gemm)
    return get_gpt_layer_local_spec, dict(common, moe_grouped_gemm=False, normalization=config.normalization)


def _layer_spec(config: SelfMoEConfig, moe: bool) -> ModuleSpec:
    build, kwargs = layer_spec_plan(config, moe)
    spec = build(**kwargs)
    core = spec.submodules.self_attention.submodules.core_attention
    if config.multi_latent_attention and core is DotProductAttention:  # local: cannot take MLA's head widths
        attn = spec.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(
            attn.submodules, core_attention=mcore_compat.MLADotProductAttention))
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))
    return with_moe_router(spec, config) if moe else spec


def mtp_block_spec(config: SelfMoEConfig, vp_stage: int | None = None):
    """Megatron-Core's multi-token prediction block (DeepSeek-V3's MTP, config.mtp_num_layers
    depths), each depth's transformer layer built like the decoder's last layer (our router in it
    when that layer is MoE), as Megatron-LM's gpt_builders does; None without MTP or when this
    pipeline stage holds no MTP layer."""
    if not config.mtp_num_layers:
        return None
    last_is_moe = bool(moe_layer_pattern(config)[-1])
    te = layer_spec_backend(config)[0] == "transformer_engine"
    return get_gpt_mtp_block_spec(config, _layer_spec(config, last_is_moe), use_transformer_engine=te,
                                  vp_stage=vp_stage)


class SelfMoEGPTModel(GPTModel):
    """GPTModel that hands the token ids to routers that need them (hash routing)."""

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        for r in self._id_routers:
            r.set_token_ids(input_ids)
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            for r in self._id_routers:
                r.set_token_ids(None)

    @property
    def _id_routers(self):
        if not hasattr(self, "_id_routers_cache"):
            object.__setattr__(
                self, "_id_routers_cache", [m for m in self.modules() if getattr(m, "needs_token_ids", False)]
            )
        return self._id_routers_cache


def build_gpt_model(config: SelfMoEConfig, pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None) -> SelfMoEGPTModel:
    """Build the model for this rank's pipeline stage (all of it at pipeline size 1)."""
    if config.vocab_size <= 0 or config.max_position_embeddings <= 0:
        raise ValueError("config.vocab_size and config.max_position_embeddings must be set")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config.vocab_size % tp:
        raise ValueError(f"vocab_size ({config.vocab_size}) must be divisible by tensor parallel size ({tp}); pad it")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    kwargs = dict(
        config=config,
        transformer_layer_spec=transformer_layer_spec(config, vp_stage),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        rope_scaling=config.rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        mtp_block_spec=mtp_block_spec(config, vp_stage) if post_process else None,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    model = SelfMoEGPTModel(**kwargs)
    prepare_moe(model, config)
    return model

