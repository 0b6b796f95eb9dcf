"""The one training loop, shared by every model (pretrain_gpt.py now, pretrain_vit.py later).

A script hands in three things, as with Megatron-LM's `pretrain()`:
- `model_provider(config, pre_process, post_process, vp_stage)` -> this stage's model;
- `datasets_provider(args, [train, valid, test] sample counts)` -> map-style datasets;
- `forward_step(data_iterator, model)` -> (output, loss_func); loss_func returns
  (loss sum, token count, {loss_name: [sum, count], ...}) as Megatron-LM's pretrain_gpt does
  (loss_name "lm loss" for GPT; the ViT adds "top-1"/"top-5" [hits, images], reported at validation).
A dataset with a `micro_batches(micro_batch_size, dp_rank, dp_size, consumed_samples, wrap)`
method supplies its own iterator (images: decoding in DataLoader workers); others are read with
MicroBatchIterator.

Everything else is Megatron-Core's own machinery: parallel_state, DDP, get_megatron_optimizer,
OptimizerParamScheduler, get_forward_backward_func (so pipeline parallelism works) and
finalize_model_grads. The loop adds what a research run needs on top: NaN/Inf steps are skipped
and counted (several in a row stop the run, NaN weights are never saved), Routing-Free's
balance coefficient is stepped after each update, routing metrics are logged, and checkpoints
resume onto the identical loss curve.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe import moe_utils

from selfmoe.metrics import RoutingStats, parameter_counts
from selfmoe.models.moe_spec import num_moe_layers
from selfmoe.training import checkpointing
from selfmoe.training.arguments import train_valid_test_num_samples
from selfmoe.training.data import MicroBatchIterator
from selfmoe.training.distributed import (
    all_ranks_agree,
    destroy_distributed,
    init_distributed,
    set_random_seed,
)
from selfmoe.training.logging_utils import TrainingLogger

MAX_CONSECUTIVE_NONFINITE = 5  # this many NaN/Inf iterations in a row stop the run


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/Inf for MAX_CONSECUTIVE_NONFINITE iterations."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    nonfinite_streak: int = 0
    last_saved: int | None = None
    last_checkpoint: str | None = None
    good_checkpoint: str | None = None  # the last one saved outside a NaN/Inf streak
    losses: dict = field(default_factory=dict)  # iteration -> lm loss (this process's run)


# ---------------------------------------------------------------------------------------------
# components

def build_model(args, config, model_provider) -> list:
    """This rank's model chunk(s) (several with the interleaved pipeline), wrapped for bf16/fp16 and
    in Megatron-Core's DDP."""
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        model = model_provider(config, pre_process=None, post_process=None, vp_stage=vp_stage)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())  # buffers too (λ, counters), as Megatron-LM does
        if args.bf16 or args.fp16:
            model = Float16Module(config, model)
        ddp_config = DistributedDataParallelConfig(
            # Megatron-LM: bf16 accumulates and all-reduces grads in fp32
            grad_reduce_in_fp32=args.bf16 or getattr(args, "accumulate_allreduce_grads_in_fp32", False),
            overlap_grad_reduce=bool(getattr(args, "overlap_grad_reduce", False)),
            use_distributed_optimizer=args.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        # Megatron-LM: only the first chunk's grads are bucketed
        chunks.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                              disable_bucketing=bool(vp_stage)))
    return chunks


def chunk_iterators(model, make_iterator):
    """The data iterator(s) get_forward_backward_func wants: one per model chunk when interleaved
    (each chunk reads every micro-batch: tokens on the first stage, labels on the last, token ids
    for hash routing everywhere), else one."""
    return [make_iterator() for _ in model] if len(model) > 1 else make_iterator()


def build_optimizer(args, model):
    """get_megatron_optimizer + the iteration-based OptimizerParamScheduler of Megatron-LM (steps in samples)."""
    opt_config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    return optimizer, build_scheduler(args, optimizer)


def build_scheduler(args, optimizer):
    """Megatron-LM's iteration-based OptimizerParamScheduler (steps counted in samples)."""
    gbs = args.global_batch_size
    decay_steps = args.lr_decay_iters * gbs
    if args.lr_warmup_fraction is not None:
        warmup_steps = args.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = args.lr_warmup_iters * gbs
    wsd_steps = (getattr(args, "lr_wsd_decay_iters", None) or 0) * gbs or None
    if getattr(args, "train_samples", None) is not None:  # Megatron-LM's sample-based schedule
        decay_steps, warmup_steps, wsd_steps = args.lr_decay_samples, args.lr_warmup_samples, args.lr_wsd_decay_samples
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=wsd_steps, lr_wsd_decay_style=getattr(args, "lr_wsd_decay_style", None),
    )
    return scheduler


def wire_config(config, optimizer, model=None) -> None:
    """The hooks get_forward_backward_func reads from the config (as Megatron-LM's training.py sets
    them). With --overlap-grad-reduce (model given, its DDP built with overlap_grad_reduce) the
    schedule runs all but the last micro-batch under DDP's no_sync and starts each bucket's
    reduction as its gradients are ready; finalize_model_grads waits for them."""
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = None  # grads are reduced once, in finalize_model_grads
    config.grad_sync_func = None
    if model is not None and isinstance(model[0], DistributedDataParallel) and model[0].ddp_config.overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        config.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync
    config.param_sync_func = None
    config.timers = None


def micro_batches(dataset, args, consumed_samples: int, wrap: bool = False):
    """This data-parallel rank's micro-batch iterator over `dataset` from `consumed_samples` on."""
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    make = getattr(dataset, "micro_batches", None) or partial(MicroBatchIterator, dataset)
    return make(args.micro_batch_size, dp_rank, dp_size, consumed_samples, wrap=wrap)


def reduce_losses(losses_reduced: list, key: str = "lm loss") -> tuple[float, float]:
    """(loss sum, token count) of one step over all micro-batches and data-parallel ranks, on every rank.

    Only the last pipeline stage has losses; it sums over its DP group, and the last rank (always
    on the last stage) broadcasts, so that every rank takes the same skip/stop decisions.
    """
    buf = torch.zeros(2, dtype=torch.float64)
    for d in losses_reduced:
        buf += d[key].detach().double().view(-1)[:2].cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dist.all_reduce(buf, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.broadcast(buf, src=dist.get_world_size() - 1)
    return float(buf[0]), float(buf[1])


def grads_finite(model) -> bool:
    """Whether every (reduced) gradient is finite, on all ranks (a sum is NaN/Inf if any element is)."""
    bad = False
    for chunk in model:
        for buf in chunk.buffers + chunk.expert_parallel_buffers:
            if not bool(torch.isfinite(buf.grad_data.sum())):
                bad = True
    return not all_ranks_agree(bad)


def reset_loss_trackers() -> None:
    """Empty megatron-core's process-global loss trackers (MoE aux losses, MTP losses).

    Each entry is sized by the first model that writes it (layers, MTP depths) and megatron-core
    only zeroes it after logging, so a second model in the same process with more layers or depths
    would index past its end (a test session, or `pretrain` called twice from Python)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    MTPLossLoggingHelper.tracker.clear()


def moe_aux_losses(config) -> dict:
    """Megatron-Core's MoE aux-loss tracker, averaged over MoE layers and micro-batches, then cleared."""
    if not config.num_moe_experts:
        return {}
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    names = sorted(tracker)
    if not names:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks(names)
    layers = num_moe_layers(config)  # not num_layers: dense layers (--moe-layer-freq) log nothing
    out = {n: float(tracker[n]["values"].float().sum()) / (layers * get_num_microbatches()) for n in names}
    moe_utils.clear_aux_losses_tracker()
    return out


def mtp_losses(config) -> dict:
    """Megatron-Core's multi-token prediction loss per depth ("mtp_1 loss", ...), averaged over
    micro-batches and data-parallel ranks as Megatron-LM logs it, then cleared. The MTP loss itself
    reaches the gradients through megatron-core's MTPLossAutoScaler (scaled by
    --mtp-loss-scaling-factor / depths); the reported lm loss stays the next-token loss."""
    if not getattr(config, "mtp_num_layers", None):
        return {}
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "values" not in tracker:
        return {}
    MTPLossLoggingHelper.reduce_loss_in_tracker()
    out = {f"mtp_{i + 1} loss": float(v) / get_num_microbatches() for i, v in enumerate(tracker["values"])}
    MTPLossLoggingHelper.clean_loss_in_tracker()
    return out


# ---------------------------------------------------------------------------------------------
# steps

def train_step(forward_step, data_iterator, model, optimizer, scheduler, args, config, loss_name="lm loss"):
    """One optimizer step. Returns (loss or None, grad norm or None, skipped)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=model,
        num_microbatches=get_num_microbatches(), seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        decoder_seq_length=args.seq_length, forward_only=False,
    )
    loss_sum, ntokens = reduce_losses(losses, loss_name)
    loss = loss_sum / max(ntokens, 1.0)
    # Megatron-LM skips the update on a NaN/Inf loss or gradient rather than poisoning the weights.
    # Under fp16 the optimizer's dynamic loss scaler owns the gradient check (it must see the
    # overflow to lower the scale).
    if not math.isfinite(loss) or (not args.fp16 and not grads_finite(model)):
        return (loss if math.isfinite(loss) else float("nan")), None, True
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=get_current_global_batch_size())  # --global-batch-size, or the ramp-up's
    if config.num_moe_experts and config.moe_router_type == "routing-free":
        from selfmoe.routers.routing_free import update_balance_coefficient

        update_balance_coefficient(model)  # collective: every rank, once per optimizer step
    grad_norm = float(grad_norm) if grad_norm is not None else None
    return loss, grad_norm, not update_successful


@torch.no_grad()
def evaluate(forward_step, dataset, model, args, loss_name="lm loss", metrics: dict | None = None) -> float:
    """Mean loss over the first eval_iters global batches of `dataset` (the same batches every time,
    each of --global-batch-size samples).

    `metrics`, if given, names further keys of the loss function's report (e.g. top-1) and receives
    their means (every pipeline stage takes part in the reductions, so the names come from the caller).
    """
    it = chunk_iterators(model, lambda: micro_batches(dataset, args, 0, wrap=True))
    # the full --global-batch-size per eval iteration, also during --rampup-batch-size (as
    # Megatron-LM's evaluate): the same batches at every evaluation, comparable along the curve
    num_microbatches = args.global_batch_size // (args.micro_batch_size * parallel_state.get_data_parallel_world_size())
    for chunk in model:
        chunk.eval()
    total, count = 0.0, 0.0
    extra: dict = {}
    deepspeed_engine = hasattr(model[0], "zero_optimization_stage")  # PP=1: plain micro-batch loop
    for _ in range(args.eval_iters):
        if deepspeed_engine:
            losses = []
            for _ in range(num_microbatches):
                output, loss_func = forward_step(it, model[0])
                losses.append(loss_func(output)[2])
        else:
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=it, model=model,
                num_microbatches=num_microbatches, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, decoder_seq_length=args.seq_length, forward_only=True,
            )
        s, n = reduce_losses(losses, loss_name)
        total, count = total + s, count + n
        for key in metrics or {}:
            ks, kn = reduce_losses(losses, key)
            extra[key] = (extra.get(key, (0.0, 0.0))[0] + ks, extra.get(key, (0.0, 0.0))[1] + kn)
    for chunk in model:
        chunk.train()
    moe_utils.clear_aux_losses_tracker()
    if metrics is not None:
        metrics.update({k: s / max(n, 1.0) for k, (s, n) in extra.items()})
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------
# the loop

def pretrain(args, config, model_provider, forward_step, datasets_provider, loss_name: str = "lm loss",
             throughput_unit: str = "tokens", eval_metrics: tuple = ()) -> dict:
    """Train as the arguments say; returns a summary dict (losses per iteration, final metrics).

    throughput_unit: "tokens" (seq_length per sample, GPT) or "images" (one per sample).
    eval_metrics: further report keys averaged at validation (the ViT's "top-1", "top-5").

    Sets up and tears down the process group and Megatron's parallel state, so it can be called
    again in the same process (tests).
    """
    init_distributed(args, timeout_minutes=args.distributed_timeout_minutes)
    reset_loss_trackers()
    try:
        return _pretrain(args, config, model_provider, forward_step, datasets_provider, loss_name, throughput_unit,
                         eval_metrics)
    finally:
        destroy_distributed()


def _pretrain(args, config, model_provider, forward_step, datasets_provider, loss_name, throughput_unit,
              eval_metrics) -> dict:
    set_random_seed(args.seed)
    per_sample = args.seq_length if throughput_unit == "tokens" else 1
    logger = TrainingLogger(args, tokens_per_iteration=args.global_batch_size * per_sample, loss_name=loss_name,
                            unit=throughput_unit)
    reasons = getattr(args, "ignored_reasons", {})
    for flag in args.ignored_flags:
        logger.print(f"ignored: {flag} ({reasons.get(flag, 'no effect in selfmoe')})")
    for note in getattr(args, "notes", []):
        logger.print(f"note: {note}")
    logger.print(f"world size {args.world_size} | data-parallel {args.data_parallel_size} | tensor-parallel "
                 f"{args.tensor_model_parallel_size} | pipeline-parallel {args.pipeline_model_parallel_size} | "
                 f"expert-parallel {args.expert_model_parallel_size} | micro-batches per step {get_num_microbatches()}"
                 + (f" | interleaved: {args.virtual_pipeline_model_parallel_size} model chunks per rank"
                    if args.virtual_pipeline_model_parallel_size else ""))

    ds = None
    if args.deepspeed:
        from selfmoe.training import deepspeed_backend as ds
    # every file the user gave is checked before the model is built (errors: one line, exit 2)
    checkpointing.check_checkpoint_folders(args.load, args.save, bool(args.deepspeed))
    if ds:
        ds.check_config(args)
    if args.load:
        if ds:
            ds.check_resume_compatible(args.load, config, args=args)
        else:
            if getattr(args, "padded_vocab_size", None) and getattr(args, "tokenizer_type", None):
                from selfmoe.training.arguments import build_tokenizer_from_args

                adopted = checkpointing.adopt_checkpoint_vocab(args.load, config,
                                                               build_tokenizer_from_args(args).vocab_size)
                if adopted:
                    logger.print(f"note: padded vocabulary size {adopted} (was {args.padded_vocab_size}) kept from "
                                 f"the checkpoint: it covers the tokenizer and splits over this tensor-parallel size")
                    args.padded_vocab_size = adopted
            checkpointing.check_resume_compatible(
                args.load, config, load_optim=not args.no_load_optim and not args.finetune,
                use_distributed_optimizer=args.use_distributed_optimizer, args=args)
    if ds:
        engine, optimizer = ds.build(args, config, model_provider)
        model, scheduler = [engine], build_scheduler(args, optimizer)
        logger.print(f"DeepSpeed ZeRO stage {engine.zero_optimization_stage()} ({args.deepspeed_config})")
    else:
        model = build_model(args, config, model_provider)
        optimizer, scheduler = build_optimizer(args, model)
        wire_config(config, optimizer, model)
        kinds = sorted({type(o).__name__ for o in checkpointing.chained_optimizers(optimizer)})
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        logger.print(f"optimizer {'+'.join(kinds)} ({args.optimizer}, {precision} model)")
    E = config.num_moe_experts
    logger.print_parameter_counts(parameter_counts(model, config), config.moe_router_type if E else None)

    state = TrainState()
    if args.load:
        if ds:
            loaded = ds.load(args.load, model[0], scheduler, config, load_optim=not args.no_load_optim,
                             load_rng=not args.no_load_rng)
        else:
            loaded = checkpointing.load_checkpoint(args.load, model, optimizer, scheduler, config,
                                                   load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
                                                   finetune=args.finetune)
        if loaded is None:
            logger.print(f"no checkpoint in {args.load}: training from scratch")
        else:
            state.iteration, state.consumed_train_samples = loaded["iteration"], loaded["consumed_train_samples"]
            same_dir = args.save and os.path.realpath(args.save) == os.path.realpath(args.load)
            state.last_saved = state.iteration if same_dir and not args.finetune else None  # already on disk
            logger.print(f"loaded checkpoint {loaded['path']} (iteration {state.iteration}, "
                         f"{state.consumed_train_samples} samples consumed)")
            state.good_checkpoint = loaded["path"]
            if state.iteration >= args.train_iters:
                logger.print(f"note: the checkpoint is at iteration {state.iteration}, --train-iters is "
                             f"{args.train_iters}: nothing to train (raise --train-iters to continue)")
            if not loaded.get("loaded_rng", True) and not args.no_load_rng and not args.finetune:
                logger.print("note: the checkpoint was saved with another world size; RNG states start fresh")

    train_ds, valid_ds, _ = datasets_provider(args, train_valid_test_num_samples(args))
    train_iter = chunk_iterators(model, lambda: micro_batches(train_ds, args, state.consumed_train_samples))
    routing = RoutingStats(model, config.num_layers + (config.mtp_num_layers or 0), E) if E else None  # + MTP depths

    def run_validation():
        if valid_ds is not None and args.eval_iters > 0:
            if routing:
                routing.enabled = False
            metrics = dict.fromkeys(eval_metrics)
            loss = evaluate(forward_step, valid_ds, model, args, loss_name, metrics)
            logger.validation_result(state.iteration, loss, metrics=metrics)
            if routing:
                routing.enabled = True

    def save():  # Megatron-LM order: train step, log, validate, then save
        t0 = time.time()
        if ds:
            state.last_checkpoint = ds.save(args.save, state.iteration, model[0], scheduler, config,
                                            state.consumed_train_samples, args_dict=_plain_args(args))
        else:
            state.last_checkpoint = checkpointing.save_checkpoint(
                args.save, state.iteration, model, optimizer, scheduler, config,
                consumed_train_samples=state.consumed_train_samples, args_dict=_plain_args(args),
                fully_reshardable=args.dist_ckpt_optim_fully_reshardable)
        state.last_saved = state.iteration
        if state.nonfinite_streak == 0:
            state.good_checkpoint = state.last_checkpoint
        logger.print(f"saved checkpoint {state.last_checkpoint} ({time.time() - t0:.1f}s)")

    logger.start(state.iteration)
    start_time = time.time()
    for chunk in model:
        chunk.train()
    while state.iteration < args.train_iters:
        t0 = time.time()
        update_num_microbatches(state.consumed_train_samples, consistency_check=True)  # --rampup-batch-size
        if ds:
            loss, grad_norm, skipped = ds.train_step(forward_step, train_iter, model[0], scheduler, args, config)
        else:
            loss, grad_norm, skipped = train_step(forward_step, train_iter, model, optimizer, scheduler, args, config,
                                                  loss_name)
        step_seconds = time.time() - t0
        state.iteration += 1
        state.consumed_train_samples += get_current_global_batch_size()
        if getattr(args, "rampup_batch_size", None):
            logger.scalar("batch-size", get_current_global_batch_size(), state.iteration)
        aux = {**moe_aux_losses(config), **mtp_losses(config)}
        if skipped:
            state.skipped_iterations += 1
        nonfinite = loss is None or not math.isfinite(loss)
        state.nonfinite_streak = state.nonfinite_streak + 1 if nonfinite else 0
        if nonfinite:
            logger.print(f"iteration {state.iteration}: {loss_name} is NaN/Inf; update skipped "
                         f"({state.nonfinite_streak} in a row)")
        else:
            state.losses[state.iteration] = loss
        lr = optimizer.param_groups[0]["lr"]
        logger.iteration(state.iteration, None if nonfinite else loss, lr, grad_norm, skipped, aux, step_seconds)
        if state.nonfinite_streak >= MAX_CONSECUTIVE_NONFINITE:
            logger.close()
            raise TrainingDiverged(
                f"{state.nonfinite_streak} consecutive iterations with a NaN/Inf loss (last at iteration "
                f"{state.iteration}); stopping without saving" +
                (f"; last checkpoint before the streak: {state.good_checkpoint}" if state.good_checkpoint else ""))
        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            logger.interval(state.iteration, lr, routing.reduce() if routing else None)
        if args.eval_interval and state.iteration % args.eval_interval == 0:
            run_validation()
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save()
        exit_flag = None
        if args.exit_interval and state.iteration % args.exit_interval == 0:
            exit_flag = f"--exit-interval {args.exit_interval}"
        elif getattr(args, "exit_duration_in_mins", None) and all_ranks_agree(
                (time.time() - start_time) / 60 > args.exit_duration_in_mins):
            exit_flag = f"--exit-duration-in-mins {args.exit_duration_in_mins:g}"
        if exit_flag:
            if args.save and state.last_saved != state.iteration:
                save()
            logger.print(f"exiting at iteration {state.iteration} ({exit_flag})")
            break

    finished = state.iteration >= args.train_iters
    if finished and valid_ds is not None and args.eval_iters > 0 and (
            not logger.validation or logger.validation[-1][0] != state.iteration):
        run_validation()
    if finished and args.save and state.last_saved != state.iteration and state.iteration > 0:
        save()
    summary = logger.summary(state.iteration, state.last_checkpoint)
    logger.close()
    if routing:
        routing.remove()
    summary.update(losses=dict(state.losses), skipped_iterations=state.skipped_iterations,
                   validation=list(logger.validation), iteration=state.iteration)
    return summary


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, type(None))) or
            (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v))}
