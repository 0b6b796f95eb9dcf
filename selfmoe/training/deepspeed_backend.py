"""The `--deepspeed` path of the shared loop: DeepSpeed's engine does backward, reduction and step.

Same data order, loss, logging, routing metrics and lr schedule (Megatron's OptimizerParamScheduler
on the engine's param groups) as the Megatron-Core path; what changes is who owns the gradients.
Pipeline parallelism, and expert parallelism under ZeRO-3, are refused by argument validation.
Checkpoints are DeepSpeed's own (`<save>/iter_XXXXXXX/` + DeepSpeed's `latest` file), so
DeepSpeed's tools (zero_to_fp32, ds_to_universal) work on them; our state rides in client_state.
"""

from __future__ import annotations

import math
import os
import zipfile

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from selfmoe import deepspeed_utils
from selfmoe.config import config_fingerprint
from selfmoe.training import checkpointing
from selfmoe.training.errors import InputError, reraise_as


def check_config(args) -> dict:
    """The resolved DeepSpeed config, validated by DeepSpeed itself against this run's flags, before
    any model is built (parallel state must be initialised). Errors name --deepspeed-config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    path = args.deepspeed_config
    with reraise_as("--deepspeed-config", path):
        cfg = deepspeed_utils.load_config(path)
        if not isinstance(cfg, dict):
            raise ValueError(f"a DeepSpeed config is a JSON object, not a {type(cfg).__name__}")
        for section in ("zero_optimization", "bf16", "fp16", "optimizer"):
            if not isinstance(cfg.get(section, {}), dict):
                raise ValueError(f"\"{section}\" must be a JSON object")
        cfg = deepspeed_utils.resolve_auto(cfg, args.micro_batch_size, get_num_microbatches(), args.bf16,
                                           args.clip_grad)
        stage = cfg.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):  # DeepSpeed's own check comes only once the engine is built
            raise ValueError(f"zero_optimization.stage is {stage!r}; DeepSpeed has stages 0, 1, 2 and 3")
        parsed = DeepSpeedConfig(cfg, mpu=deepspeed_utils.MegatronMPU())
    if parsed.gradient_accumulation_steps != get_num_microbatches():
        raise InputError("--deepspeed-config", path, f"gradient_accumulation_steps {parsed.gradient_accumulation_steps} "
                         f"but --global-batch-size needs {get_num_microbatches()}; use \"auto\"")
    if parsed.train_micro_batch_size_per_gpu != args.micro_batch_size:
        raise InputError("--deepspeed-config", path, f"train_micro_batch_size_per_gpu "
                         f"{parsed.train_micro_batch_size_per_gpu} but --micro-batch-size is {args.micro_batch_size}; "
                         f"use \"auto\"")
    return cfg


def build(args, config, model_provider):
    """(engine, optimizer): the whole model (PP=1) wrapped by deepspeed.initialize."""
    model = model_provider(config, pre_process=True, post_process=True, vp_stage=None)

    cfg = deepspeed_utils.load_config(args.deepspeed_config)
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")

    def make_optimizer(groups):
        if offload and args.optimizer == "adam" and torch.cuda.is_available():
            # what DeepSpeed wants for optimizer offload (a ~45 s C++ build on first use); on a
            # CPU-only machine the states are on the CPU anyway and torch's AdamW is used
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                    weight_decay=args.weight_decay, adamw_mode=True)
        if args.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay)
        return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                 weight_decay=args.weight_decay)

    engine, optimizer = deepspeed_utils.initialize(
        model, args.deepspeed_config, weight_decay=args.weight_decay, optimizer=make_optimizer,
        micro_batch_size=args.micro_batch_size, grad_accum=get_num_microbatches(), bf16=args.bf16,
        clip_grad=args.clip_grad)
    if engine.gradient_accumulation_steps() != get_num_microbatches():
        raise ValueError(f"--deepspeed-config {args.deepspeed_config}: gradient_accumulation_steps "
                         f"{engine.gradient_accumulation_steps()} but --global-batch-size needs "
                         f"{get_num_microbatches()}; use \"auto\"")
    if engine.train_micro_batch_size_per_gpu() != args.micro_batch_size:
        raise ValueError(f"--deepspeed-config {args.deepspeed_config}: train_micro_batch_size_per_gpu "
                         f"{engine.train_micro_batch_size_per_gpu()} but --micro-batch-size is "
                         f"{args.micro_batch_size}; use \"auto\"")
    return engine, optimizer


def finalize_like_megatron(module, config) -> None:
    """What megatron-core's finalize_model_grads does after the backward besides the gradient
    reductions DeepSpeed owns: the aux-loss-free expert-bias update from the step's routed-token
    counts, and the reset of the per-step MoE counters. (Per-token loss: both paths average per
    micro-batch; the sequence-parallel layernorm grads are summed by `sum_sequence_parallel_grads`
    hooks; the embedding grads need a reduction only under pipeline parallelism, refused here.)"""
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    if config.moe_router_enable_expert_bias:
        _update_router_expert_bias([module], config)
    reset_model_temporary_tensors(config, [module])


def sum_sequence_parallel_grads(module) -> None:
    """Megatron sums the gradients of parameters replicated across tensor-parallel ranks but fed
    by a sequence shard (layernorms under --sequence-parallel) over the TP group in
    finalize_model_grads; DeepSpeed does not know them. A gradient hook does the same sum before
    DeepSpeed's own reduction sees the gradient. Idempotent."""
    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() == 1 or getattr(module, "_sp_grad_hooks", False):
        return
    for p in module.parameters():
        if p.requires_grad and getattr(p, "sequence_parallel", False):
            p.register_hook(lambda g: _all_reduced(g, group))
    module._sp_grad_hooks = True


def _all_reduced(grad, group):
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def train_step(forward_step, data_iterator, engine, scheduler, args, config):
    """One global batch: forward/backward per micro-batch, DeepSpeed steps at the boundary.

    Returns (loss, grad norm, skipped). DeepSpeed cannot un-take a step, so a NaN/Inf loss is
    reported (skipped=False, loss NaN) and the loop's consecutive-NaN rule stops the run.
    """
    nmb = get_num_microbatches()
    sum_sequence_parallel_grads(engine.module)
    # engine.backward divides the loss by the accumulation steps; aux losses get the same scale
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / nmb))
    if getattr(config, "mtp_num_layers", None):  # and so does the multi-token prediction loss
        from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0 / nmb))
    stats = torch.zeros(2, dtype=torch.float64)
    for _ in range(nmb):
        output, loss_func = forward_step(data_iterator, engine)
        loss_sum, num_tokens, report = loss_func(output)
        engine.backward(loss_sum / num_tokens.clamp(min=1))
        engine.step()
        stats += next(iter(report.values())).detach().double().view(-1)[:2].cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    loss = float(stats[0] / stats[1].clamp(min=1))
    scheduler.step(increment=args.global_batch_size)
    finalize_like_megatron(engine.module, config)
    if config.num_moe_experts and config.moe_router_type == "routing-free":
        from selfmoe.routers.routing_free import update_balance_coefficient

        update_balance_coefficient(engine.module)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    return (loss if math.isfinite(loss) else float("nan")), grad_norm, False


def tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save(root: str, iteration: int, engine, scheduler, config, consumed_train_samples: int,
         args_dict: dict | None = None) -> str:
    """DeepSpeed's own checkpoint; the client state carries what the Megatron path's common state
    does (config fingerprint, plain args for the model-shaping flags, data position)."""
    client = {"iteration": iteration, "consumed_train_samples": consumed_train_samples,
              "opt_param_scheduler": scheduler.state_dict(), "rng_state": checkpointing.rng_state(),
              "config": config_fingerprint(config), "world_size": dist.get_world_size(),
              "expert_model_parallel_size": config.expert_model_parallel_size, "args": args_dict or {}}
    engine.save_checkpoint(root, tag=tag(iteration), client_state=client)  # writes `latest` last
    return os.path.join(root, tag(iteration))


def check_resume_compatible(root: str, config, args=None) -> None:
    """Before the model is built: the checkpoint's model config (and, with `args`, the model-shaping
    flags that are not config fields, e.g. ViT's image geometry and head) must match this run's."""
    latest = os.path.join(root, "latest")
    if not os.path.isfile(latest):
        return
    path = os.path.join(root, open(latest).read().strip())
    states = os.path.join(path, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        raise checkpointing.CheckpointError(f"{latest} names {path}, which holds no mp_rank_00_model_states.pt")
    for name in sorted(os.listdir(path)):  # truncated files: torch's zip format has its index at the end
        if name.endswith(".pt"):
            with reraise_as("damaged DeepSpeed checkpoint file", os.path.join(path, name)):
                zipfile.ZipFile(os.path.join(path, name)).close()
    with reraise_as("cannot read DeepSpeed checkpoint", states):
        saved = torch.load(states, map_location="cpu", weights_only=False)
    if args is not None:
        checkpointing.check_args_compatible(saved.get("args") or {}, args, path)
    checkpointing.check_config_compatible(saved.get("config", {}), config, path)
    ep = saved.get("expert_model_parallel_size", 1)
    if ep != config.expert_model_parallel_size:
        # each EP rank's experts are in their own file; DeepSpeed has no resharding for them
        raise checkpointing.CheckpointError(
            f"cannot resume from {path}: saved with --expert-model-parallel-size {ep}, this run has "
            f"{config.expert_model_parallel_size}; a DeepSpeed checkpoint resumes with the same expert layout")


def load(root: str, engine, scheduler, config, *, load_optim: bool, load_rng: bool) -> dict | None:
    if not os.path.isfile(os.path.join(root, "latest")):
        return None
    with reraise_as("cannot load DeepSpeed checkpoint", root):
        path, client = engine.load_checkpoint(root, load_optimizer_states=load_optim, load_lr_scheduler_states=False,
                                              load_module_strict=True)
    if path is None:
        raise checkpointing.CheckpointError(f"DeepSpeed could not load a checkpoint from {root}")
    checkpointing.check_config_compatible(client.get("config", {}), config, path)
    if engine.load_universal_checkpoint():
        # a universal load restores parameters only; buffers (Routing-Free's λ, the random
        # router's counter, expert biases) come from the source checkpoint's module states
        saved = torch.load(path, map_location="cpu", weights_only=False)["module"]  # mp_rank_00_model_states.pt
        params = dict(engine.module.named_parameters())
        engine.module.load_state_dict({k: v for k, v in saved.items() if k not in params}, strict=False)
    if load_optim:
        checkpointing.load_scheduler_state(scheduler, client["opt_param_scheduler"], path)
    load_rng = load_rng and client.get("world_size") == dist.get_world_size()
    if load_rng:
        checkpointing.set_rng_state(client["rng_state"])  # rank 0's: DeepSpeed stores one client state
    return {"iteration": int(client["iteration"]), "consumed_train_samples": int(client["consumed_train_samples"]),
            "path": path, "loaded_optim": load_optim, "loaded_rng": load_rng}
