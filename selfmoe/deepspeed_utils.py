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
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
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


def initialize(model, ds_config, weight_decay: float | None = None, lr_scheduler=None):
    """Wrap `model` (one Megatron-Core model chunk, PP=1) in a DeepSpeed engine.

    Returns (engine, optimizer). The data-parallel size, micro batch and accumulation come from
    the DeepSpeed config, as DeepSpeed users expect; so does the weight decay unless given.
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
    cfg = load_config(ds_config)
    from selfmoe import cpu_compat

    if cpu_compat.is_applied():
        cpu_compat.configure_deepspeed_cpu()
    if weight_decay is None:
        weight_decay = cfg.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    register_expert_groups()
    mark_expert_params(model)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay), config=cfg,
        mpu=MegatronMPU(), lr_scheduler=lr_scheduler, dist_init_required=False,
    )
    return engine, optimizer
