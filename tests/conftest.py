"""Shared fixtures: a world-size-1 gloo process group and Megatron's parallel state."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

import selfmoe  # noqa: F401  (applies the CPU compatibility layer before megatron is used)
from megatron.core import tensor_parallel

from selfmoe.training.distributed import destroy_model_parallel, initialize_model_parallel
from selfmoe.training.trainer import reset_loss_trackers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_world1():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)


@pytest.fixture
def mp():
    """Model-parallel state for one rank; seeds Megatron's RNG tracker and torch."""
    ensure_world1()
    destroy_model_parallel()
    initialize_model_parallel(1, 1)
    reset_loss_trackers()  # sized by the last test's model: another shape would index past them
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    yield
    destroy_model_parallel()  # and its process groups: they would pile up over the session
