"""Process group, Megatron-Core parallel state and seeding: everything a rank sets up before the model."""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)

_owns_process_group = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend() -> str:
    """NCCL for Megatron's CUDA collectives and gloo for the few small CPU-side reductions of ours
    (metrics, λ's density, loss reports) on GPUs; gloo alone on CPU."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


_megatron_groups: set = set()  # process groups created by initialize_model_parallel below


def _live_groups() -> set:
    return set(dist.distributed_c10d._world.pg_map)


def initialize_model_parallel(*args, **kwargs) -> None:
    """Megatron-Core's initialize_model_parallel, remembering the process groups it creates.

    megatron-core's destroy_model_parallel only drops its references; torch keeps every subgroup
    (a gloo group: two threads) alive until it is destroyed, so a process that initialises again
    and again under a long-lived world group (tests, in-process tools) piles them up -- 10,000
    threads after a few hundred tests, and a machine at load 1,000. destroy_model_parallel below
    destroys them.
    """
    before = _live_groups()
    parallel_state.initialize_model_parallel(*args, **kwargs)
    _megatron_groups.update(_live_groups() - before)


def destroy_model_parallel() -> None:
    """Megatron-Core's destroy_model_parallel, then the process groups it had created."""
    parallel_state.destroy_model_parallel()
    for group in _megatron_groups:
        if group in _live_groups():  # destroying one group can take others with it
            dist.destroy_process_group(group)
    _megatron_groups.clear()


def init_distributed(args, timeout_minutes: int = 10) -> None:
    """torchrun's env:// group if launched by it (MASTER_ADDR/PORT from the launcher), else a
    world-size-1 gloo group on a free local port; then Megatron's groups and micro-batch calculator.
    An already initialised process group (e.g. a test fixture's) is used as is.
    """
    global _owns_process_group
    # DeepSpeed reads LOCAL_RANK; torchrun sets it, a plain `python pretrain_gpt.py` does not
    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():  # Megatron-LM: one GPU per local rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend(), timeout=timeout)  # env://, as torchrun sets it up
        else:  # alone: nobody to meet, so any free local port will do (a stale MASTER_PORT could not)
            dist.init_process_group(backend(), init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
        _owns_process_group = True
    if dist.get_world_size() != args.world_size:
        raise RuntimeError(f"world size {dist.get_world_size()} differs from the validated {args.world_size}")
    # Leftovers of an earlier run in this process (tests) would make Megatron refuse to re-initialise.
    destroy_model_parallel()
    destroy_num_microbatches_calculator()
    _clear_moe_state()
    initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    init_num_microbatches_calculator(dist.get_rank(), getattr(args, "rampup_batch_size", None),
                                     args.global_batch_size, args.micro_batch_size,
                                     parallel_state.get_data_parallel_world_size())


def set_random_seed(seed: int) -> None:
    """The same seed on every rank (DP replicas must start identical); Megatron's tracker on top.

    model_parallel_cuda_manual_seed gives tensor-parallel shards and experts their own streams,
    which the CPU compatibility layer keeps as CPU generator states.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Undo init_distributed, so a process (a test) can train again with other sizes."""
    global _owns_process_group
    _clear_moe_state()
    destroy_num_microbatches_calculator()
    destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _owns_process_group = False


def _clear_moe_state():
    """Megatron-Core's process-wide MoE state: the aux-loss tracker (it holds a run's process
    groups) and the aux-loss gradient scale (its shape is fixed by whoever set it first)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def is_last_rank() -> bool:
    """Megatron-LM logs from the last rank: it holds the loss (last pipeline stage)."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(*a, **kw) -> None:
    if is_last_rank():
        print(*a, **kw, flush=True)


def all_ranks_agree(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (a MAX all-reduce over the world)."""
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
