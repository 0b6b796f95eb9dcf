"""DeepSpeed ZeRO around a Megatron-Core model: tell DeepSpeed the parallel layout and the experts.

DeepSpeed needs (1) an `mpu` object for model-parallel-aware grad norms and the data-parallel
group, which `megatron.core.parallel_state` does not expose under DeepSpeed's names, and (2) the
expert parameters flagged as MoE parameters (`allreduce=False`, `group_name`) in their own
optimizer groups, with the matching expert-data-parallel groups registered, or ZeRO reduces
expert gradients over the wrong ranks when EP>1.
"""

from __future__ import annotations

import json
import os

import torch
from megatron.core import parallel_state as ps

from selfmoe.model import moe_layers


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron.core.parallel_state."""

    def get_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_rank(self):
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self):
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()


def expert_group_name() -> str:
    return f"ep_size_{ps.get_expert_model_parallel_world_size()}"


def register_expert_groups() -> str:
    """Make DeepSpeed's group registry return Megatron's expert groups for our group name."""
    from deepspeed.utils import groups

    name = expert_group_name()
    groups._EXPERT_PARALLEL_GROUP[name] = ps.get_expert_model_parallel_group()
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = ps.get_expert_data_parallel_group()
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(
        ps.get_expert_model_parallel_group())
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(
        ps.get_expert_data_parallel_group())
    return name


def mark_expert_params(model) -> int:
    """Flag expert parameters for DeepSpeed (only when EP>1, as Megatron does). Returns the count."""
    if ps.get_expert_model_parallel_world_size() == 1:
        return 0
    name = expert_group_name()
    n = 0
    for layer in moe_layers(model):
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = name
            n += 1
    return n


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups (biases and norms get none, as in Megatron), experts split out."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    # wd_mult: Megatron's OptimizerParamScheduler sets weight_decay = wd * wd_mult per group
    groups = [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    if ps.get_expert_model_parallel_world_size() > 1:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def load_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    if not os.path.isfile(path_or_dict):
        raise FileNotFoundError(f"--deepspeed-config: no such file: {path_or_dict}")
    try:
        with open(path_or_dict) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed-config {path_or_dict}: line {e.lineno}: {e.msg}") from None


def resolve_auto(cfg: dict, micro_batch_size=None, grad_accum=None, bf16=None, clip_grad=None) -> dict:
    """Fill DeepSpeed config values written as "auto" (the HF convention) from the Megatron flags."""
    cfg = json.loads(json.dumps(cfg))
    fills = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum}
    for key, value in fills.items():
        if cfg.get(key) == "auto":
            if value is None:
                raise ValueError(f"DeepSpeed config: {key} is 'auto' but no value was given")
            cfg[key] = value
    if clip_grad is not None and cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = clip_grad
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]  # DeepSpeed derives it from micro batch x accumulation x DP
    for sec in ("bf16", "fp16"):
        if isinstance(cfg.get(sec), dict) and cfg[sec].get("enabled") == "auto":
            cfg[sec]["enabled"] = bool(bf16) if sec == "bf16" else False
    return cfg


def initialize(model, ds_config, weight_decay: float | None = None, lr_scheduler=None, optimizer=None,
               micro_batch_size=None, grad_accum=None, bf16=None, clip_grad=None):
    """Wrap `model` (one Megatron-Core model chunk, PP=1) in a DeepSpeed engine.

    Returns (engine, optimizer). The micro batch and accumulation come from the DeepSpeed config
    ("auto" = from the Megatron flags passed here). The optimizer is the config's "optimizer"
    section if there is one, else `optimizer(param_groups)` built by the caller from its flags.
    """
    import deepspeed

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("--deepspeed with --pipeline-model-parallel-size > 1 is not supported; "
                         "use Megatron-Core's pipeline schedules without --deepspeed")
    if ps.get_expert_model_parallel_world_size() > 1:
        # DeepSpeed only treats parameters as experts (groups, broadcast, checkpoint files) inside
        # its own deepspeed.moe.layer.MoE class; Megatron-Core's MoELayer is not one.
        raise ValueError("--deepspeed with --expert-model-parallel-size > 1 is not supported yet; "
                         "use EP=1 with ZeRO, or EP>1 without --deepspeed")
    cfg = resolve_auto(load_config(ds_config), micro_batch_size, grad_accum, bf16, clip_grad)
    from selfmoe import cpu_compat

    if cpu_compat.is_applied():
        cpu_compat.configure_deepspeed_cpu()
    if weight_decay is None:
        weight_decay = cfg.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    register_expert_groups()
    mark_expert_params(model)
    groups = param_groups(model, weight_decay)
    client_opt = None
    if "optimizer" not in cfg:
        if optimizer is None:
            raise ValueError("DeepSpeed config has no \"optimizer\" section and no optimizer was given")
        client_opt = optimizer(groups)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=client_opt, config=cfg,
        mpu=MegatronMPU(), lr_scheduler=lr_scheduler, dist_init_required=False,
    )
    return engine, optimizer
