"""Command-line flags derived from the installed megatron-core's TransformerConfig.

Megatron-LM builds its model, MoE and parallelism flags from TransformerConfig's fields; this
module does the same for the fields arguments.py does not spell by hand, so a field added in a
new megatron-core release is a new flag here without code:

- name: `--field-name` (Megatron-LM's spelling where it differs: FLAG_NAMES); a bool field that
  defaults to True becomes `--no-field-name` / `--disable-field-name`;
- type, choices and default: from the field's annotation and default;
- help: the field's docstring in megatron-core's source;
- domain: numeric fields get an allowed range (DOMAINS, else a rule from the field's name and
  type), checked before any model is built (`check_domains`).

A derived field is passed to the config (and so honoured by megatron-core) unless NEEDS says it
needs something this run lacks (CUDA, the TransformerEngine layer spec) or is not wired by this
project: then a non-default value is reset to the field's default and the flag is listed at start
up as ignored, with the reason. Fields that are not user settings (callables, dtypes, values
derived from other flags) get no flag (NOT_FLAGS).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import math
import os
import textwrap
import typing
from functools import lru_cache

# Fields with no command-line flag of their own.
NOT_FLAGS = {
    # callables, dtypes and context managers are set by the code, not the command line
    "timers", "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func",
    "_cpu_offloading_context", "init_method", "output_layer_init_method", "embedding_init_method",
    "activation_func", "params_dtype", "pipeline_dtype", "autocast_dtype", "enable_autocast", "quant_recipe",
    # derived from other flags (--swiglu, --num-layers-per-virtual-pipeline-stage, --bf16 ...)
    "gated_linear_unit", "virtual_pipeline_model_parallel_size",
    # set by the schedules / model builders, not by users (Megatron-LM has no flag for them either)
    "variable_seq_lengths", "batch_p2p_comm", "batch_p2p_sync", "deallocate_pipeline_outputs", "test_mode",
    "perform_initialization", "num_microbatches_with_partial_activation_checkpoints",
    "tp_comm_overlap_disable_qkv", "tp_comm_overlap_disable_fc1", "heterogeneous_block_specs",
    "hetereogenous_dist_checkpoint", "is_hybrid_model", "config_logger_dir", "inference_rng_tracker",
    "use_te_rng_tracker", "tp_comm_atomic_ag", "tp_comm_atomic_rs", "moe_router_topk_limited_devices",
    "moe_token_dropping", "softmax_scale", "barrier_with_L1_time", "use_kitchen", "memory_efficient_layer_norm",
    "fused_single_qkv_rope", "activation_func_fp8_input_store", "cuda_graph_use_single_mempool",
    "cuda_graph_retain_backward_graph", "disable_parameter_transpose_cache", "inference_sampling_seed",
    "use_inference_optimized_layers", "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "cpu_offloading", "cpu_offloading_activations", "cpu_offloading_weights", "cpu_offloading_double_buffering",
    # list-or-int expressions with a hand-written parser; --moe-layer-freq is the layer-spec helper's
    "moe_layer_freq", "window_size", "window_attn_skip_freq", "no_rope_freq", "linear_attention_freq",
    "pipeline_model_parallel_layout", "cp_comm_type", "cuda_graph_scope", "hierarchical_context_parallel_sizes",
    "mrope_section", "offload_modules",
    # Megatron-LM spells these by hand with another default (arguments.py, IGNORED_FLAGS)
    "gradient_accumulation_fusion", "overlap_p2p_comm", "attention_softmax_in_fp32", "masked_softmax_fusion",
    "persist_layer_norm", "bias_dropout_fusion", "apply_rope_fusion", "bias_activation_fusion",
}

# Megatron-LM's flag where it is not `--` + the field name with dashes.
FLAG_NAMES = {
    "num_moe_experts": "--num-experts", "layernorm_epsilon": "--norm-epsilon", "fp8": "--fp8-format",
    "fp8_param": "--fp8-param-gather", "fp4": "--fp4-format", "fp4_param": "--fp4-param-gather",
}

_TE = "a TransformerEngine feature not wired in selfmoe yet"
# Honoured where megatron-core's TransformerEngine layer spec is used (TE importable, CUDA present,
# --transformer-impl not local: selfmoe.models.gpt.layer_spec_backend); listed with its reason elsewhere.
TE_SPEC = "te"
_CUDA = "CUDA only"
_NOT_WIRED = "not wired in selfmoe yet"
_HYBRID = "Mamba/hybrid models only (selfmoe builds GPT and ViT)"
_INFERENCE = "inference only (selfmoe trains)"

# Why a derived field cannot take effect: "cuda" (honoured when CUDA is present), a reason string
# (never honoured here). Fields not listed are passed to the config on every device.
NEEDS = {
    **{f: _TE for f in (
        "fp8", "fp8_recipe", "fp8_param", "fp8_quantizer_factory", "fp8_margin", "fp8_interval",
        "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad", "fp8_dot_product_attention",
        "fp8_multi_head_attention", "tp_only_amax_red", "first_last_layers_bf16", "num_layers_at_start_in_bf16",
        "num_layers_at_end_in_bf16", "fp4", "fp4_recipe", "fp4_param", "fp4_quantizer_factory", "tp_comm_overlap",
        "tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad", "tp_comm_overlap_ag", "tp_comm_overlap_rs",
        "tp_comm_overlap_rs_dgrad", "tp_comm_split_ag", "tp_comm_split_rs", "tp_comm_bootstrap_backend",
        "moe_use_legacy_grouped_gemm",
        "use_te_activation_func", "delay_wgrad_compute", "transformer_impl", "softmax_type",
        "use_kitchen_attention", "kitchen_attention_backend", "fine_grained_activation_offloading",
        "min_offloaded_tensor_size", "moe_router_padding_for_quantization", "moe_router_padding_for_fp8",
        "symmetric_ar_type", "cross_entropy_fusion_impl", "qk_clip", "qk_clip_alpha", "qk_clip_threshold",
        "log_max_attention_logit", "cpu_offloading_num_layers", "experimental_attention_variant",
        "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk", "dsa_indexer_loss_coeff",
        "dsa_indexer_use_sparse_loss", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "hybrid_context_parallel", "max_seqlen_per_dp_cp_rank",
        "moe_latent_size",
    )},
    **{f: TE_SPEC for f in ("moe_grouped_gemm", "moe_permute_fusion", "moe_router_fusion", "attention_backend")},
    **{f: "needs DeepEP/HybridEP (CUDA) and --moe-token-dispatcher-type flex"
       for f in ("moe_enable_deepep", "moe_flex_dispatcher_backend", "moe_deepep_num_sms", "moe_hybridep_num_sms")},
    **{f: "CUDA graphs: CUDA only, not wired in selfmoe yet"
       for f in ("enable_cuda_graph", "cuda_graph_warmup_steps", "external_cuda_graph", "cuda_graph_impl")},
    "layernorm_zero_centered_gamma": "needs TransformerEngine or Apex norms (torch's LayerNorm/RMSNorm in the local "
                                     "spec have no zero-centred gamma)",
    "cross_entropy_loss_fusion": "cuda", "disable_bf16_reduced_precision_matmul": "cuda",
    "use_fused_weighted_squared_relu": "cuda", "async_tensor_model_parallel_allreduce": "cuda",
    "pipeline_model_parallel_comm_backend": "cuda", "use_ring_exchange_p2p": _NOT_WIRED,
    **{f: _NOT_WIRED for f in (
        "overlap_moe_expert_parallel_comm", "ep_overlap_early_attn_memory_release", "defer_embedding_wgrad_compute",
        "wgrad_deferral_limit", "overlap_p2p_comm_warmup_flush", "microbatch_group_size_per_vp_stage",
        "mtp_standalone", "account_for_embedding_in_pipeline_split",
        "account_for_loss_in_pipeline_split", "moe_per_layer_logging", "moe_enable_routing_replay",
        "moe_extended_tp", "batch_invariant_mode",
        "init_model_with_meta_device", "moe_apply_probs_on_input", "attention_output_gate",
    )},
    **{f: _HYBRID for f in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
                            "use_mamba_mem_eff_path")},
    **{f: _INFERENCE for f in ("flash_decode", "inference_fuse_tp_communication", "mlp_chunks_for_prefill",
                               "cache_mla_latents")},
}

# MLATransformerConfig's own fields take effect only with --multi-latent-attention (listed as
# ignored without it). Megatron-LM's defaults where they differ from the dataclass's (its
# _add_mla_args; --rope-type None lets the config class choose: yarn for MLA).
MLA_REASON = "needs --multi-latent-attention"
MLA_DEFAULTS = {"q_lora_rank": None, "kv_lora_rank": 32, "rotary_scaling_factor": 1.0, "rope_type": None}
MLA_CHOICES = {"rope_type": ("rope", "yarn")}

# Allowed ranges: dest -> (low, low inclusive, high, high inclusive); None = unbounded.
# Derived fields not listed get a rule from their name and type (see `domain`).
_POS, _NONNEG, _UNIT, _PROB = (0, False, None, False), (0, True, None, False), (0, True, 1, True), (0, False, 1, True)
DOMAINS = {
    # hand-written flags of arguments.py
    "lr": _NONNEG, "min_lr": _NONNEG, "weight_decay": _NONNEG, "clip_grad": _NONNEG, "adam_beta1": (0, True, 1, False),
    "adam_beta2": (0, True, 1, False), "adam_eps": _POS, "sgd_momentum": _UNIT, "init_method_std": _POS,
    "hidden_dropout": _UNIT, "attention_dropout": _UNIT, "norm_epsilon": _POS, "rotary_base": _POS,
    "rotary_percent": _PROB, "lr_warmup_fraction": _UNIT, "lr_warmup_init": _NONNEG, "lr_warmup_iters": _NONNEG,
    "lr_decay_iters": _POS, "loss_scale": _POS, "initial_loss_scale": _POS, "seed": _NONNEG,
    "distributed_timeout_minutes": _POS, "eval_iters": _NONNEG, "vocab_size": _POS, "context_parallel_size": _POS,
    "num_layers_per_virtual_pipeline_stage": _POS, "kv_channels": _POS, "max_position_embeddings": _POS,
    "moe_aux_loss_coeff": _NONNEG, "moe_z_loss_coeff": _NONNEG, "moe_expert_capacity_factor": _POS,
    "moe_router_bias_update_rate": _NONNEG, "moe_input_jitter_eps": _POS, "moe_router_topk_scaling_factor": _POS,
    "self_routing_temperature": _POS, "routing_free_rank": _POS, "routing_free_theta": _POS,
    "routing_free_density_target": _PROB, "routing_free_lambda0": _NONNEG, "routing_free_eta": _POS,
    "routing_free_mu": _UNIT, "tensorboard_log_interval": _POS, "train_samples": _POS, "lr_decay_samples": _POS,
    "lr_warmup_samples": _NONNEG, "lr_wsd_decay_iters": _POS, "lr_wsd_decay_samples": _POS,
    "exit_duration_in_mins": _POS,
    # pretrain_vit.py's flags (selfmoe/training/vit.py)
    "num_workers": _NONNEG, "img_h": _POS, "img_w": _POS, "smoothing": (0, True, 1, False), "mixup": _NONNEG,
    "cutmix": _NONNEG, "mixup_prob": _UNIT, "mixup_switch_prob": _UNIT, "drop_path": _UNIT, "color_jitter": _NONNEG,
    "reprob": _UNIT, "repeated_aug": _POS, "train_crop_scale": _PROB, "hflip": _UNIT, "crop_pct": _PROB,
    # derived fields whose name does not say it
    "glu_linear_offset": (None, False, None, False), "qk_clip_alpha": _PROB, "mtp_loss_scaling_factor": _NONNEG,
}
_INT_COUNT_WORDS = ("size", "num", "layers", "topk", "rank", "dim", "heads", "groups", "steps", "sms", "len",
                    "interval", "chunks", "limit", "kernel")
_FLOAT_POS_WORDS = ("epsilon", "eps", "std", "factor", "scale")
_FLOAT_NONNEG_WORDS = ("coeff", "rate", "threshold", "value", "offset")


@dataclasses.dataclass(frozen=True)
class DerivedFlag:
    field: str
    flags: tuple            # option strings, Megatron-LM's spelling first
    kwargs: dict            # add_argument keyword arguments (type/choices/action/default/help)
    default: object
    needs: str | None       # None (honoured), "cuda", or the reason it is ignored


def _config_classes():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig


def _mla_config_class():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig


@lru_cache(maxsize=None)
def mla_fields() -> tuple:
    """MLATransformerConfig's fields that TransformerConfig lacks (q/kv LoRA ranks, head dims, YaRN)."""
    base = {f.name for f in dataclasses.fields(_config_classes())}
    return tuple(f.name for f in dataclasses.fields(_mla_config_class()) if f.name not in base)


@lru_cache(maxsize=None)
def field_docs(cls) -> dict:
    """{field: docstring} for a dataclass and its dataclass bases (the string literal after each field)."""
    out = {}
    for c in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(c):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(c))).body[0].body
        except (OSError, TypeError, IndexError):
            continue
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                out[a.target.id] = " ".join(b.value.value.split())
    return out


def _type_kwargs(tp) -> dict | None:
    """argparse type/choices for a field annotation, or None when it has no one-token spelling."""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        rest = [a for a in targs if a is not type(None)]
        return _type_kwargs(rest[0]) if len(rest) == 1 else None
    if origin is typing.Literal:
        return {"type": type(targs[0]), "choices": targs}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": lambda s, e=tp: e[s], "choices": list(tp), "metavar": "{" + ",".join(m.name for m in tp) + "}"}
    if tp in (int, float, str, bool):
        return {"type": tp}
    if origin is list and len(targs) == 1 and targs[0] in (int, float, str):
        return {"type": targs[0], "nargs": "+"}
    return None


@lru_cache(maxsize=None)
def derived_flags() -> tuple:
    """Every TransformerConfig field that becomes a flag, in field order."""
    cls, mla = _config_classes(), _mla_config_class()
    docs = {**field_docs(mla), **field_docs(cls)}
    mla_only = set(mla_fields())
    out = []
    for f in list(dataclasses.fields(cls)) + [f for f in dataclasses.fields(mla) if f.name in mla_only]:
        if f.name in NOT_FLAGS or not f.init or f.name.startswith("_"):
            continue
        kw = _type_kwargs(f.type)
        if kw is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if f.name in mla_only:
            default = MLA_DEFAULTS.get(f.name, default)
            if f.name in MLA_CHOICES:
                kw["choices"] = MLA_CHOICES[f.name]
        name = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        owner = "MLATransformerConfig" if f.name in mla_only else "TransformerConfig"
        help_ = docs.get(f.name, "") + f" [{owner}.{f.name}]"
        if kw.get("type") is bool and "nargs" not in kw:
            if default:
                flags = (f"--no-{f.name.replace('_', '-')}", f"--disable-{f.name.replace('_', '-')}")
                kw = {"action": "store_false"}
            else:
                flags, kw = (name,), {"action": "store_true"}
        else:
            flags = (name,)
        kw.update(default=default, help=help_.replace("%", "%%"))
        needs = NEEDS.get(f.name, MLA_REASON if f.name in mla_only else None)
        out.append(DerivedFlag(f.name, flags, kw, default, needs))
    return tuple(out)


def add_config_flags(parser: argparse.ArgumentParser) -> list:
    """Add the derived flags not already defined by hand; returns the DerivedFlags added."""
    taken = set(parser._option_string_actions)
    dests = {a.dest for a in parser._actions}
    docs = field_docs(_config_classes())
    field_of = {flag: f for f, flag in FLAG_NAMES.items()}
    for action in parser._actions:  # hand-written flags of config fields: help from the field's doc too
        field = field_of.get(action.option_strings[0] if action.option_strings else "", action.dest)
        if action.help is None and field in docs:
            action.help = docs[field].replace("%", "%%") + f" [TransformerConfig.{field}]"
    group = parser.add_argument_group("transformer configuration (derived from megatron-core's TransformerConfig)")
    added = []
    for d in derived_flags():
        if d.field in dests or any(s in taken for s in d.flags):
            continue
        group.add_argument(*d.flags, dest=d.field, **d.kwargs)
        added.append(d)
    parser.set_defaults(_derived_fields=tuple(d.field for d in added))
    return added


def derived_in(args) -> list:
    """The DerivedFlags this parser added (their values live on args under the field name)."""
    fields = set(getattr(args, "_derived_fields", ()))
    return [d for d in derived_flags() if d.field in fields]


def te_spec_reason(args, cuda_available: bool | None = None) -> str | None:
    """None when the run uses megatron-core's TransformerEngine layer spec, else why not."""
    from selfmoe.models import gpt

    if getattr(args, "local_spec_reason", None):  # a model family that builds the local spec only (ViT)
        return args.local_spec_reason
    impl = getattr(args, "transformer_impl", None) or "transformer_engine"  # Megatron-LM's default
    return gpt.layer_spec_backend(argparse.Namespace(transformer_impl=impl), cuda_available)[1]


def resolve_needs(args, cuda_available: bool | None = None) -> None:
    """Reset derived fields that cannot take effect here to their default; record flag -> reason."""
    te_reason = te_spec_reason(args, cuda_available)
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    mla = bool(getattr(args, "multi_latent_attention", False))
    for d in derived_in(args):
        value = getattr(args, d.field)
        if d.needs is None or value == d.default or (d.needs == "cuda" and cuda_available) or \
                (d.needs == MLA_REASON and mla) or (d.needs == TE_SPEC and te_reason is None):
            continue
        reason = "CUDA only" if d.needs == "cuda" else d.needs
        if d.needs == TE_SPEC:
            reason = f"needs megatron-core's TransformerEngine layer spec; the local spec is used ({te_reason})"
        note_ignored(args, d.flags[0], reason)
        setattr(args, d.field, d.default)


def note_ignored(args, flag: str, reason: str) -> None:
    """List `flag` as ignored with `reason` (printed once at start-up)."""
    if not isinstance(getattr(args, "ignored_flags", None), list):
        args.ignored_flags = []
    if flag not in args.ignored_flags:
        args.ignored_flags.append(flag)
    reasons = getattr(args, "ignored_reasons", None)
    if not isinstance(reasons, dict):
        reasons = args.ignored_reasons = {}
    reasons[flag] = reason


def config_kwargs(args) -> dict:
    """{field: value} of the derived fields, for the config (MLATransformerConfig's own fields only
    with --multi-latent-attention; a None --rope-type leaves the config class's default)."""
    mla = bool(getattr(args, "multi_latent_attention", False))
    out = {}
    for d in derived_in(args):
        if d.field in mla_fields() and not mla or d.field == "rope_type" and getattr(args, d.field) is None:
            continue
        out[d.field] = getattr(args, d.field)
    return out


# ------------------------------------------------------------------------------------------
# domains

def domain(dest: str, value_type=None):
    """(low, low inclusive, high, high inclusive) allowed for `dest`, or None."""
    if dest in DOMAINS:
        return DOMAINS[dest]
    words = dest.split("_")
    if dest.endswith("dropout"):
        return _UNIT
    if value_type is int:
        if dest.endswith("seed"):
            return _NONNEG
        if any(w in words for w in _INT_COUNT_WORDS) or dest.startswith("num_"):
            return _NONNEG if _field_default(dest) == 0 else _POS
    if value_type is float:
        if any(w in words for w in _FLOAT_POS_WORDS):
            return _POS
        if any(w in words for w in _FLOAT_NONNEG_WORDS):
            return _NONNEG
    return None


def _field_default(name):
    for d in derived_flags():
        if d.field == name:
            return d.default
    return None


def _fmt(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe(dom) -> str:
    lo, lo_in, hi, hi_in = dom
    if hi is None:
        return f"must be {'>=' if lo_in else '>'} {_fmt(lo)}"
    if lo is None:
        return f"must be {'<=' if hi_in else '<'} {_fmt(hi)}"
    return f"must be in {'[' if lo_in else '('}{_fmt(lo)}, {_fmt(hi)}{']' if hi_in else ')'}"


def out_of_domain(value, dom) -> bool:
    lo, lo_in, hi, hi_in = dom
    if isinstance(value, float) and math.isnan(value):
        return True
    if lo is not None and (value < lo or (value == lo and not lo_in)):
        return True
    return hi is not None and (value > hi or (value == hi and not hi_in))


def check_domains(args, parser_actions, error) -> None:
    """Raise error("--flag must be ... (got v)") for the first numeric value outside its domain."""
    for action in parser_actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        vtype = action.type if action.type in (int, float) else None
        if vtype is None:
            continue
        dom = domain(action.dest, vtype)
        value = getattr(args, action.dest, None)
        if dom is None or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (int, float)) and out_of_domain(v, dom):
                raise error(f"{action.option_strings[0]} {describe(dom)} (got {_fmt(v)})")


# ------------------------------------------------------------------------------------------
# Megatron-LM flags outside TransformerConfig that have no effect here, and why (arguments.py's
# IGNORED_FLAGS). Each reason says what happens instead; "GPU" appears only where it is true.
_ALREADY_UNFUSED = "already so: megatron-core's local spec runs these ops unfused"
IGNORED_REASONS = {
    "--use-mcore-models": "always so: selfmoe builds Megatron-Core models",
    "--use-flash-attn": "needs flash-attn / TransformerEngine (CUDA); local attention is used",
    "--overlap-param-gather": "not wired in selfmoe yet: parameters are gathered after the optimizer step",
    "--align-param-gather": "not wired in selfmoe yet (goes with --overlap-param-gather)",
    "--overlap-param-gather-with-optimizer-step": "not wired in selfmoe yet (goes with --overlap-param-gather)",
    "--bias-gelu-fusion": "fused bias+GeLU kernel not used by the local spec (unfused, same numbers)",
    "--no-bias-gelu-fusion": _ALREADY_UNFUSED, "--no-bias-swiglu-fusion": _ALREADY_UNFUSED,
    "--no-bias-dropout-fusion": _ALREADY_UNFUSED, "--no-rope-fusion": _ALREADY_UNFUSED,
    "--no-persist-layer-norm": _ALREADY_UNFUSED, "--no-masked-softmax-fusion": _ALREADY_UNFUSED,
    "--no-gradient-accumulation-fusion": "already so: weight gradients are accumulated unfused",
    "--attention-softmax-in-fp32": "already so: attention softmax always runs in fp32 here",
    "--distributed-backend": "chosen by the device: nccl with CUDA, gloo without",
    "--use-torch-fsdp2": "not wired in selfmoe yet: Megatron-Core DDP is used "
                         "(--use-distributed-optimizer shards the optimizer state)",
    "--use-megatron-fsdp": "not wired in selfmoe yet: Megatron-Core DDP is used "
                           "(--use-distributed-optimizer shards the optimizer state)",
    "--manual-gc": "not wired in selfmoe yet: Python's automatic garbage collector runs",
    "--manual-gc-interval": "not wired in selfmoe yet (goes with --manual-gc)",
    "--empty-unused-memory-level": "not wired in selfmoe yet: the CUDA caching allocator is never emptied",
    "--async-save": "not wired in selfmoe yet: checkpoints are saved synchronously",
    "--ckpt-fully-parallel-save": "not wired in selfmoe yet: dist_checkpointing's default save strategy",
    "--ckpt-fully-parallel-load": "not wired in selfmoe yet: dist_checkpointing's default load strategy",
    "--ckpt-assume-constant-structure": "not wired in selfmoe yet (a save-speed hint)",
    "--use-dist-ckpt": "always so: checkpoints are torch_dist",
    "--auto-detect-ckpt-format": "only torch_dist (and, with --deepspeed, DeepSpeed's) checkpoints exist here",
    "--overlap-p2p-communication": "not wired in selfmoe yet: pipeline sends/receives are not overlapped",
    "--ddp-bucket-size": "not wired in selfmoe yet: Megatron-Core DDP's default bucket size",
    "--ddp-average-in-collective": "not wired in selfmoe yet: gradients are scaled before the all-reduce",
    "--num-workers": "data is read in the training process (no DataLoader workers)",
    "--dataloader-type": "always so: samples are read in order from the consumed-sample offset ('single')",
    "--no-check-for-nan-in-loss-and-grad": "NaN/Inf steps are always detected and skipped here",
    "--check-for-nan-in-loss-and-grad": "always so: NaN/Inf steps are detected and skipped",
    "--log-throughput": "always so: every progress line has tokens/s",
    **{f: "not logged by selfmoe yet" for f in (
        "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard",
        "--log-num-zeros-in-grad", "--log-params-norm", "--log-world-size-to-tensorboard",
        "--log-loss-scale-to-tensorboard", "--timing-log-level", "--timing-log-option")},
    **{f: "Weights & Biases is not wired in selfmoe (TensorBoard only)"
       for f in ("--wandb-project", "--wandb-exp-name", "--wandb-save-dir", "--wandb-entity")},
    "--local-rank": "torchrun's LOCAL_RANK is read instead", "--local_rank": "torchrun's LOCAL_RANK is read instead",
    "--no-create-attention-mask-in-dataloader": "already so: the data loader builds an attention mask only for "
                                                "--reset-attention-mask (causal attention comes from the layer spec)",
    "--dist-ckpt-strictness": "not wired in selfmoe yet: a checkpoint must match the model exactly (a missing or "
                              "unexpected key fails the load)",
    "--logging-level": "not wired in selfmoe yet: Python's default logging level",
    "--enable-experimental": "selfmoe uses no experimental megatron-core feature",
    **{f: "goes with --use-megatron-fsdp (not wired in selfmoe yet: Megatron-Core DDP is used)" for f in (
        "--data-parallel-sharding-strategy", "--fsdp-double-buffer", "--megatron-fsdp-grad-comm-dtype",
        "--megatron-fsdp-main-grads-dtype")},
    "--use-nccl-ub": "NCCL user buffers: CUDA only, not wired in selfmoe yet",
}

# TransformerConfig fields whose values other than the default are honoured for some values only.
HONOURED_VALUES = {"attention_backend": {"auto", "local"}}

CKPT_FORMATS = ("torch_dist",)
TE_RECOMPUTE_MODULES = ("layernorm", "moe_act", "mla_up_proj")


def _te_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None
SCORED_ROUTERS = ("learned", "self")  # routers built on megatron-core's TopKRouter (its routing options apply)


def _value_name(v):
    return v.name if isinstance(v, enum.Enum) else v


def validate_megatron_flags(args, error) -> None:
    """The checks and Megatron-LM semantics of the derived and compatibility flags, before any model.

    `error` is the exception class raised with a one-line message naming the flag.
    """
    actions = getattr(args, "_flag_actions", None)
    if actions is None:
        from selfmoe.training.arguments import build_parser

        actions = build_parser()._actions
    check_domains(args, actions, error)
    for flag in list(args.ignored_flags):
        note_ignored(args, flag, IGNORED_REASONS.get(flag, "no effect in selfmoe"))

    if getattr(args, "use_legacy_models", False):
        raise error("--use-legacy-models: selfmoe builds Megatron-Core models only; drop the flag")
    fmt = getattr(args, "ckpt_format", "torch_dist")
    if fmt == "fsdp_dtensor":
        note_ignored(args, "--ckpt-format fsdp_dtensor", "needs Megatron FSDP (--use-megatron-fsdp, CUDA); "
                                                        "torch_dist is written instead")
        args.ckpt_format = "torch_dist"
    elif fmt not in CKPT_FORMATS:
        raise error(f"--ckpt-format {fmt}: selfmoe writes and reads {', '.join(CKPT_FORMATS)} only")
    te_reason = te_spec_reason(args)
    if getattr(args, "transformer_impl", None) == "transformer_engine" and te_reason:
        note_ignored(args, "--transformer-impl transformer_engine", f"megatron-core's local layer spec is used "
                                                                    f"({te_reason})")

    if getattr(args, "recompute_activations", False):
        args.recompute_granularity = "selective"  # Megatron-LM's meaning of the legacy switch
    if getattr(args, "exit_on_missing_checkpoint", False):
        if not args.load:
            note_ignored(args, "--exit-on-missing-checkpoint", "no --load given")
        elif not any(os.path.isfile(os.path.join(args.load, f))
                     for f in ("latest_checkpointed_iteration.txt", "latest")):
            raise error(f"--load {args.load}: no checkpoint there, and --exit-on-missing-checkpoint is set")

    # several load-balancing types, one coefficient each (megatron-core 0.16 takes lists)
    types, coeffs = list(args.moe_router_load_balancing_type), list(args.moe_aux_loss_coeff)
    if len(types) != len(coeffs) and not (len(types) == 1 or len(coeffs) == 1 and coeffs[0] == 0):
        raise error(f"--moe-aux-loss-coeff: give one coefficient per --moe-router-load-balancing-type "
                    f"({len(types)} types, {len(coeffs)} coefficients)")
    if len(types) > 1 and len(coeffs) == 1:
        coeffs = coeffs * len(types)
    args.moe_router_load_balancing_type = types[0] if len(types) == 1 else types
    args.moe_aux_loss_coeff = coeffs[0] if len(coeffs) == 1 else coeffs

    # megatron-core recomputes these modules with CheckpointWithoutOutput, which needs TransformerEngine
    modules = getattr(args, "recompute_modules", None)
    if modules and not _te_importable():
        for m in [m for m in modules if m in TE_RECOMPUTE_MODULES]:
            note_ignored(args, f"--recompute-modules {m}", "needs TransformerEngine (megatron-core recomputes it "
                                                           "with CheckpointWithoutOutput); not recomputed")
        args.recompute_modules = [m for m in modules if m not in TE_RECOMPUTE_MODULES] or None
    modules = getattr(args, "recompute_modules", None)
    if modules and "mlp" in modules and not getattr(args, "num_experts", None):
        import torch

        if not torch.cuda.is_available():
            note_ignored(args, "--recompute-modules mlp", "a dense model's MLP recompute was killed for memory on "
                                                          "CPU with megatron-core 0.16.1 (not yet diagnosed); "
                                                          "not recomputed")
            args.recompute_modules = [m for m in modules if m != "mlp"] or None

    if getattr(args, "calculate_per_token_loss", False) and getattr(args, "deepspeed", False):
        raise error("--calculate-per-token-loss with --deepspeed: DeepSpeed's engine averages the loss per "
                    "micro-batch; drop one of the two")

    # routers that draw experts without scores cannot limit the draw to the best groups
    if getattr(args, "num_experts", None) and args.moe_router_type not in SCORED_ROUTERS:
        scored_only = {  # TopKRouter's options: the flag, and whether it was given a non-default value
            "--moe-aux-loss-coeff": any(c != 0 for c in (coeffs if len(coeffs) > 1 else coeffs[:1])),
            "--moe-router-load-balancing-type": types != ["aux_loss"],
            "--moe-z-loss-coeff": args.moe_z_loss_coeff is not None,
            "--moe-router-enable-expert-bias": args.moe_router_enable_expert_bias,
            "--moe-router-score-function": args.moe_router_score_function != "softmax",
            "--moe-router-pre-softmax": args.moe_router_pre_softmax,
            "--moe-router-topk-scaling-factor": args.moe_router_topk_scaling_factor is not None,
            "--moe-input-jitter-eps": args.moe_input_jitter_eps is not None,
            "--moe-router-dtype": args.moe_router_dtype is not None,
            "--moe-router-force-load-balancing": getattr(args, "moe_router_force_load_balancing", False),
        }
        for flag, given in scored_only.items():
            if given:
                note_ignored(args, flag, f"--moe-router-type {args.moe_router_type} has no learned expert scores "
                                         f"(the option is megatron-core TopKRouter's: learned, self)")
    if getattr(args, "moe_router_num_groups", None) and getattr(args, "num_experts", None) and \
            args.moe_router_type not in SCORED_ROUTERS:
        raise error(f"--moe-router-num-groups: group-limited routing needs expert scores; --moe-router-type "
                    f"{args.moe_router_type} has none (use {' or '.join(SCORED_ROUTERS)})")

    for d in derived_in(args):
        if d.field in HONOURED_VALUES and _value_name(getattr(args, d.field)) in HONOURED_VALUES[d.field]:
            setattr(args, d.field, d.default)
    resolve_needs(args)
