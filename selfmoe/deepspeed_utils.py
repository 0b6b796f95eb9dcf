"""DeepSpeed ZeRO around a Megatron-Core model: tell DeepSpeed the parallel layout and the experts.

DeepSpeed needs (1) an `mpu` object for model-parallel-aware grad norms and the data-parallel
group, which `megatron.core.parallel_state` does not expose under DeepSpeed's names, and (2) the
expert parameters flagged as MoE parameters (`allreduce=False`, `group_name`) in their own
optimizer groups, with the matching expert-data-parallel groups registered, or ZeRO reduces
expert gradients over the wrong ranks when EP>1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import torch
from megatron.core import parallel_state as ps

from selfmoe.routers import moe_layers


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
    cfg = resolve_auto(load_config(ds_config), micro_batch_size, grad_accum, bf16, clip_grad)
    ep = ps.get_expert_model_parallel_world_size()
    if ep > 1 and int(cfg.get("zero_optimization", {}).get("stage", 0)) == 3:
        # DeepSpeed partitions experts under stage 3 only for its own AutoEP layers
        raise ValueError("--deepspeed ZeRO stage 3 with --expert-model-parallel-size > 1 is not supported "
                         "(DeepSpeed shards experts under stage 3 only for its AutoEP layers); use stage 1 or 2")
    if ep > 1 and ps.get_expert_tensor_parallel_world_size() != ps.get_tensor_model_parallel_world_size():
        raise ValueError("--deepspeed with --expert-model-parallel-size > 1 needs --expert-tensor-parallel-size "
                         "equal to --tensor-model-parallel-size")
    from selfmoe import cpu_compat

    if cpu_compat.is_applied():
        cpu_compat.configure_deepspeed_cpu()
        # optimizer offload on a CPU-only machine: the optimizer runs on the CPU anyway, so a torch
        # optimizer is accepted (DeepSpeed otherwise insists on DeepSpeedCPUAdam, a GPU->CPU accelerator)
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    if weight_decay is None:
        weight_decay = cfg.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    register_expert_groups()
    mark_expert_params(model)
    prepare_universal_checkpoint(model)
    groups = param_groups(model, weight_decay)
    client_opt = None
    if "optimizer" not in cfg:
        if optimizer is None:
            raise ValueError("DeepSpeed config has no \"optimizer\" section and no optimizer was given")
        client_opt = optimizer(groups)
    with _engine_class(megatron_moe_engine_class() if ep > 1 else None):
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=client_opt, config=cfg,
            mpu=MegatronMPU(), lr_scheduler=lr_scheduler, dist_init_required=False,
        )
    return engine, optimizer


def _no_extra_state():
    return torch.empty(0)


def prepare_universal_checkpoint(model) -> None:
    """Make the engine's checkpoints convertible by deepspeed.checkpoint.ds_to_universal.

    1. ds_to_universal refuses a checkpoint without `universal_checkpoint_info`, which DeepSpeed
       reads off the module at save time. The bare version key means "no tensor-parallel merge
       rules": right for TP=1 and EP=1 only, so other layouts stay unconvertible (refused by
       ds_to_universal) rather than merged wrongly.
    2. Megatron-Core's parallel linears save `<name>._extra_state: None`, and ds_to_universal calls
       `.float()` on every saved module value. An empty tensor converts; Megatron's set_extra_state
       ignores the value, so checkpoints load as before.
    """
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    for m in model.modules():
        if type(m).get_extra_state is not torch.nn.Module.get_extra_state and m.get_extra_state() is None:
            m.get_extra_state = _no_extra_state
    if ps.get_tensor_model_parallel_world_size() == 1 and ps.get_expert_model_parallel_world_size() == 1:
        setattr(model, UNIVERSAL_CHECKPOINT_INFO,
                {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


@contextlib.contextmanager
def _engine_class(cls):
    """Have deepspeed.initialize build `cls` (a DeepSpeedEngine subclass) instead of DeepSpeedEngine.

    deepspeed.initialize takes no engine class; it looks `DeepSpeedEngine` up in the deepspeed
    package namespace, so that name is swapped for the call and restored after.
    """
    import deepspeed

    if cls is None:
        yield
        return
    orig = deepspeed.DeepSpeedEngine
    deepspeed.DeepSpeedEngine = cls
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine = orig


def _expert_prefixes(module) -> list[str]:
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    return [f"{n}.experts." if n else "experts." for n, m in module.named_modules() if isinstance(m, BaseMoELayer)]


@functools.cache
def megatron_moe_engine_class():
    """The class is built on first use: it subclasses DeepSpeedEngine, and importing deepspeed is slow."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class MegatronMoEEngine(DeepSpeedEngine):
        """DeepSpeedEngine that treats Megatron-Core MoELayer experts as DeepSpeed MoE experts (EP>1).

        DeepSpeed switches its expert handling (ZeRO partitions and reductions over the
        expert-data-parallel group, per-EP-rank checkpoint files) on only when it finds its own
        `deepspeed.moe.layer.MoE` modules. The parameter-level part needs no help: the expert
        parameters carry `allreduce=False` and `group_name` (mark_expert_params) and the groups are
        registered (register_expert_groups). What this class adds: the switch, and checkpoint files
        for Megatron's expert modules, one per (EP rank, expert-TP rank), written by expert-DP rank 0.
        """

        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            layers = moe_layers(self.module)
            self.has_moe_layers = bool(layers)
            self.num_experts = [layer.config.num_moe_experts for layer in layers]

        def _megatron_experts_path(self, save_dir, tag):
            ep, etp = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
            return os.path.join(save_dir, str(tag), f"expp_rank_{ep}_mp_rank_{etp:02d}_megatron_experts.pt")

        def _get_non_moe_state_dict(self, full_state_dict):
            prefixes = tuple(_expert_prefixes(self.module))
            return {k: v for k, v in full_state_dict.items() if not k.startswith(prefixes)}

        def _save_moe_checkpoint(self, save_dir, tag, client_state={}, exclude_frozen_parameters=False):
            if ps.get_expert_data_parallel_rank() == 0:
                prefixes = tuple(_expert_prefixes(self.module))
                experts = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.module.state_dict().items()
                           if k.startswith(prefixes)}
                experts["_layout"] = {"ep_size": ps.get_expert_model_parallel_world_size(),
                                      "etp_size": ps.get_expert_tensor_parallel_world_size()}
                self.checkpoint_engine.save(experts, self._megatron_experts_path(save_dir, tag))
            super()._save_moe_checkpoint(save_dir, tag, client_state=client_state,
                                         exclude_frozen_parameters=exclude_frozen_parameters)

        def _load_checkpoint(self, load_dir, tag, *args, **kwargs):
            self._megatron_experts_load = self._megatron_experts_path(load_dir, tag)
            try:
                return super()._load_checkpoint(load_dir, tag, *args, **kwargs)
            finally:
                self._megatron_experts_load = None

        def load_module_state_dict(self, checkpoint, *args, **kwargs):
            path = getattr(self, "_megatron_experts_load", None)
            if path is not None:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path}: no expert states for this rank (was the checkpoint saved "
                                            "with the same --expert-model-parallel-size?)")
                experts = torch.load(path, map_location="cpu", weights_only=False)
                layout = experts.pop("_layout")
                want = {"ep_size": ps.get_expert_model_parallel_world_size(),
                        "etp_size": ps.get_expert_tensor_parallel_world_size()}
                if layout != want:
                    raise ValueError(f"{path}: saved with expert layout {layout}, this run has {want}")
                checkpoint["module"].update(experts)
            return super().load_module_state_dict(checkpoint, *args, **kwargs)

    return MegatronMoEEngine

