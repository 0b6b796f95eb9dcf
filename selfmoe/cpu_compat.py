"""Run Megatron-Core on CPU (gloo) without CUDA: the one place where its CUDA-only spots are redirected.

Megatron-Core assumes a GPU in a handful of places (see shared/research/cpu-platform.md). Each
redirect below is named, small, and covered by a test in tests/test_cpu_compat.py that fails
without it. `apply()` is called automatically by `import selfmoe` when CUDA is absent, never
when it is present, and is idempotent. It is pinned to the megatron-core versions it was tested
on; set SELFMOE_ALLOW_UNTESTED_MCORE=1 to try another one.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.overrides import TorchFunctionMode

TESTED_MCORE_VERSIONS = ("0.16.1",)
ALLOW_UNTESTED_ENV = "SELFMOE_ALLOW_UNTESTED_MCORE"

_applied: list[str] = []  # names of the redirects applied, in order; empty = not applied
_mode: TorchFunctionMode | None = None


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return bool(_applied)


def applied_redirects() -> list[str]:
    return list(_applied)


def check_mcore_version(version: str | None = None) -> str:
    """Refuse an untested megatron-core: the redirects patch its internals by name."""
    if version is None:
        from megatron.core.package_info import __version__ as version
    if version not in TESTED_MCORE_VERSIONS and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise RuntimeError(
            f"selfmoe's CPU compatibility layer was tested with megatron-core "
            f"{', '.join(TESTED_MCORE_VERSIONS)}, not {version}; set {ALLOW_UNTESTED_ENV}=1 to try it anyway"
        )
    return version


# --------------------------------------------------------------------------------------------
# 3. hard-coded CUDA devices: `device="cuda"`, `device=torch.cuda.current_device()`, `.cuda()`.
# --------------------------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # an integer device index means a CUDA device to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device argument to CPU; the catch-all for megatron-core's hard-coded ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.record_stream:
            return None
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# 1. the CUDA RNG tracker: the tracked "CUDA" states become CPU generator states.
# --------------------------------------------------------------------------------------------
def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Same bookkeeping as Megatron's tracker; states are CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator()
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Megatron's fork warns when the CPU state changes inside it; here that is the point.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, harmless (lazy) without CUDA.
    mrandom.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------
# 2. torch.cuda.current_device() -> the CPU device. Megatron passes it as `device=` almost
#    everywhere, also inside autograd backward functions, where the function mode above is not
#    active (the autograd engine does not carry it over), so it must be a CPU device itself;
# 4. streams/events/synchronize used by the alltoall dispatcher -> no-op stand-ins.
# --------------------------------------------------------------------------------------------
class _NoopStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NoopEvent()

    def __eq__(self, other):
        return isinstance(other, _NoopStream)

    def __hash__(self):
        return 0


class _NoopEvent(_NoopStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True


_NOOP_STREAM = _NoopStream()


def _patch_torch_cuda():
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopEvent
    torch.cuda.current_stream = lambda *a, **k: _NOOP_STREAM
    torch.cuda.default_stream = lambda *a, **k: _NOOP_STREAM
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# 5. clip_grad_by_total_norm_fp32 asserts CUDA grads and uses a CUDA overflow buffer.
# --------------------------------------------------------------------------------------------
def _patch_clip_grads():
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


# --------------------------------------------------------------------------------------------
# 6. alltoall split sizes: only CUDA tensors become numpy; gloo rejects tensor split sizes.
# --------------------------------------------------------------------------------------------
def _patch_split_sizes():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=False)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --------------------------------------------------------------------------------------------
# 7. TP>1 with MoE needs sequence parallelism, which the torch norm wrapper refuses without apex:
#    build the torch norm and mark its params sequence_parallel so their grads are all-reduced.
# --------------------------------------------------------------------------------------------
def _patch_sp_norm():
    import dataclasses

    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        norm = original_new(
            cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, *args, **kwargs
        )
        for p in norm.parameters():
            setattr(p, "sequence_parallel", True)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


# --------------------------------------------------------------------------------------------
# 8. megatron-core 0.16 without TransformerEngine never defines the fused_* / te_general_gemm
#    names that router gating reads -> NameError. Define them as None (= use the torch path).
# --------------------------------------------------------------------------------------------
_TE_NAMES = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)


def _patch_missing_te_names():
    from megatron.core.transformer.moe import moe_utils

    for name in _TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


# --------------------------------------------------------------------------------------------
# 9. uneven sequence-parallel collectives (alltoall dispatcher with expert TP > 1): gloo's
#    all_gather needs equal sizes and it has no list reduce_scatter. Pad-and-gather / all-reduce
#    and slice give the same numbers.
# --------------------------------------------------------------------------------------------
def _patch_uneven_collectives():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return gather(input_, group, output_split_sizes, use_global_buffer)
        width = max(output_split_sizes)
        padded = input_.new_zeros((width, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((width * group.size(), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * width : r * width + n] for r, n in enumerate(output_split_sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


# --------------------------------------------------------------------------------------------
# 9. optimizer tensor types: megatron-core's distributed and float16 optimizers sort parameters
#    by `param.type()` against 'torch.cuda.FloatTensor' / '...HalfTensor' / '...BFloat16Tensor'
#    and raise on anything else. While their constructors run, CPU tensors answer with the CUDA
#    name of the same dtype.
# --------------------------------------------------------------------------------------------
class _CudaTypeNameMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _patch_optimizer_tensor_types():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, __init=init, **kwargs):
            with _CudaTypeNameMode():
                __init(self, *args, **kwargs)

        cls.__init__ = __init__


# --------------------------------------------------------------------------------------------
# 10. activation recomputation (--recompute-granularity full): CheckpointFunction.backward reruns
#     the layer's forward inside autograd's backward thread, where the device mode (3.) is not
#     active, so megatron-core's hard-coded `device="cuda"` (e.g. the default causal mask) fails.
#     The backward runs under the same mode.
# --------------------------------------------------------------------------------------------
def _patch_recompute_backward():
    from megatron.core.tensor_parallel.random import CheckpointFunction

    backward = CheckpointFunction.backward

    @functools.wraps(backward)
    def wrapped(ctx, *args):
        with CudaToCpuMode():
            return backward(ctx, *args)

    CheckpointFunction.backward = staticmethod(wrapped)


# --------------------------------------------------------------------------------------------
# 0. torch's CUDA wheels (the 2.14.1 pin) log "No CUDA runtime is found, using CUDA_HOME=..." on
#    stderr when torch.utils.cpp_extension is imported (by megatron-core and DeepSpeed) on a machine
#    with a CUDA toolkit but no GPU. It is noise on CPU and breaks every tool's one-line error
#    contract, so that one logger is limited to errors (only when CUDA is absent).
# --------------------------------------------------------------------------------------------
def _patch_cuda_home_probe_log():
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


_REDIRECTS = (
    ("cuda_home_probe_log", _patch_cuda_home_probe_log),
    ("rng_tracker", _patch_rng_tracker),
    ("torch_cuda", _patch_torch_cuda),
    ("clip_grads", _patch_clip_grads),
    ("alltoall_split_sizes", _patch_split_sizes),
    ("sp_norm", _patch_sp_norm),
    ("missing_te_names", _patch_missing_te_names),
    ("uneven_sp_collectives", _patch_uneven_collectives),
    ("optimizer_tensor_types", _patch_optimizer_tensor_types),
    ("recompute_backward", _patch_recompute_backward),
)


def configure_deepspeed_cpu() -> None:
    """DeepSpeed on CPU: skip JIT-building its shared-memory all-reduce op (~50 s of g++ per fresh
    machine); collectives then go through gloo, with the same numbers."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


REDIRECT_NAMES = tuple(name for name, _ in _REDIRECTS) + ("cuda_device_mode",)
DISABLE_ENV = "SELFMOE_CPU_COMPAT"  # "0": `import selfmoe` does not apply the layer


def apply(force: bool = False, skip: tuple = ()) -> bool:
    """Apply every redirect once. Returns True if applied now or before; False on a CUDA machine.

    `skip` leaves named redirects out (to see what breaks without one; tests use it).
    """
    global _mode
    if _applied:
        return True
    if not (force or cuda_absent()):
        return False
    unknown = set(skip) - set(REDIRECT_NAMES)
    if unknown:
        raise ValueError(f"unknown redirect(s) {sorted(unknown)}; known: {REDIRECT_NAMES}")
    for name, patch in _REDIRECTS:
        if name == "rng_tracker":  # the first that patches megatron-core; the log redirect goes before
            check_mcore_version()  # (importing megatron-core already imports torch.utils.cpp_extension)
        if name not in skip:
            patch()
            _applied.append(name)
    if "cuda_device_mode" not in skip:
        _mode = CudaToCpuMode()
        _mode.__enter__()  # stays on for the life of the process (this thread: the training loop's)
        _applied.append("cuda_device_mode")
    return True
