"""The CPU compatibility layer: each redirect makes one CUDA-only spot work, and it fails without it.

Every spot is exercised twice: here, with the layer applied (must work), and in a fresh process
where the layer is applied *except* that one redirect (must fail).
"""

import os
import subprocess
import sys

import pytest
import torch

import selfmoe  # noqa: F401
from selfmoe import cpu_compat


def spot_cuda_home_probe_log():
    skip = [n for n in cpu_compat.REDIRECT_NAMES if n not in cpu_compat.applied_redirects()]
    code = (f"from selfmoe import cpu_compat; cpu_compat.apply(skip={skip!r}); "
            "import torch.utils.cpp_extension")
    env = dict(os.environ, SELFMOE_CPU_COMPAT="0", CUDA_HOME=os.path.dirname(__file__))  # any existing dir
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "No CUDA runtime" not in r.stderr, r.stderr[-2000:]


def spot_rng_tracker():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked state advanced and was kept
    states = tracker.get_states()
    tensor_parallel.model_parallel_cuda_manual_seed(7, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)  # reseeding reproduces
    assert set(states) >= {"model-parallel-rng", "expert-parallel-rng"}


def spot_torch_cuda():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher  # noqa: F401

    idx = torch.cuda.current_device()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert torch.empty(1, device=idx).device.type == "cpu"


def spot_cuda_device_mode():
    t = torch.zeros(2, device="cuda") + torch.ones(2, device=torch.cuda.current_device())
    assert t.device.type == "cpu" and torch.tensor([1.0]).cuda().device.type == "cpu"


def spot_clip_grads():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))


def spot_alltoall_split_sizes():
    import numpy as np
    from megatron.core.transformer.moe import token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 1]  # what gloo's all_to_all accepts


def spot_sp_norm():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from selfmoe.config import make_config

    cfg = make_config("gpt2", num_layers=1, hidden_size=8, num_attention_heads=2)
    cfg.sequence_parallel = True
    norm = WrappedTorchNorm(cfg, 8)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def spot_missing_te_names():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x, w = torch.randn(5, 8), torch.randn(3, 8)
    torch.testing.assert_close(router_gating_linear(x, w, None, torch.float32), x @ w.t())


def spot_optimizer_tensor_types():
    from helpers import tiny_config
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from selfmoe.models import build_gpt_model

    cfg = tiny_config("self")
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  build_gpt_model(cfg))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp])
    assert {type(o).__name__ for o in opt.chained_optimizers} == {"DistributedOptimizer"}
    before = [p.detach().clone() for p in ddp.parameters()]
    ids = torch.randint(0, 64, (2, 16))
    ddp(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).mean().backward()
    ddp.finish_grad_sync()
    assert opt.step()[0]
    assert all(not torch.equal(a, p) for a, p in zip(before, ddp.parameters()))


def spot_recompute_backward():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.utils import get_default_causal_mask

    def layer(x):  # a recomputed function with one of megatron-core's hard-coded CUDA devices
        return (x * get_default_causal_mask(3).float()).sum()

    x = torch.ones(3, 3, requires_grad=True)
    tensor_parallel.checkpoint(layer, False, x).backward()
    assert torch.equal(x.grad, torch.triu(torch.ones(3, 3), diagonal=1))


def _uneven_worker(rank, port, skip, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from selfmoe import cpu_compat as cc

    cc.apply(skip=tuple(skip))
    from megatron.core.tensor_parallel import mappings

    dist.init_process_group("gloo", rank=rank, world_size=2)
    sizes = [3, 5]
    x = torch.full((sizes[rank], 2), float(rank + 1), requires_grad=True)
    try:
        y = mappings.gather_from_sequence_parallel_region(x, group=dist.group.WORLD, output_split_sizes=sizes)
        ok = torch.equal(y.detach(), torch.cat([torch.full((3, 2), 1.0), torch.full((5, 2), 2.0)]))
        (y * torch.arange(8.0)[:, None]).sum().backward()  # backward = uneven reduce-scatter
        want = torch.arange(8.0)[:3] if rank == 0 else torch.arange(8.0)[3:]
        ok = ok and torch.equal(x.grad, 2 * want[:, None].expand(-1, 2))
    except Exception as e:  # noqa: BLE001
        ok = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"{rank}"), "w") as f:
        f.write(str(ok))


def spot_uneven_sp_collectives():
    import tempfile

    import torch.multiprocessing as tmp_mp
    from conftest import free_port

    skip = [n for n in cpu_compat.REDIRECT_NAMES if n not in cpu_compat.applied_redirects()]
    with tempfile.TemporaryDirectory() as d:
        tmp_mp.spawn(_uneven_worker, args=(free_port(), skip, d), nprocs=2, join=True)
        results = [open(os.path.join(d, str(r))).read() for r in range(2)]
    assert results == ["True", "True"], results


SPOTS = {name[len("spot_"):]: fn for name, fn in globals().items() if name.startswith("spot_")}


def test_every_redirect_has_a_spot():
    assert set(SPOTS) == set(cpu_compat.REDIRECT_NAMES)


@pytest.mark.parametrize("name", sorted(SPOTS))
def test_spot_works_with_layer(mp, name):
    SPOTS[name]()


@pytest.mark.parametrize("name", sorted(SPOTS))
def test_spot_fails_without_its_redirect(name):
    env = dict(os.environ, SELFMOE_CPU_COMPAT="0")
    r = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, f"{name} did not fail without its redirect:\n{r.stdout}\n{r.stderr[-2000:]}"


def test_applied_once_and_idempotent():
    assert cpu_compat.is_applied() and cpu_compat.applied_redirects() == list(cpu_compat.REDIRECT_NAMES)
    assert cpu_compat.apply() is True
    assert cpu_compat.applied_redirects() == list(cpu_compat.REDIRECT_NAMES)


def test_not_applied_when_cuda_present():
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "import selfmoe\nfrom selfmoe import cpu_compat\n"
            "assert not cpu_compat.is_applied(); assert cpu_compat.apply() is False; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_untested_megatron_version_is_refused(monkeypatch):
    monkeypatch.delenv(cpu_compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"tested with megatron-core 0\.16\.1, not 0\.99\.0; set SELFMOE_ALLOW"):
        cpu_compat.check_mcore_version("0.99.0")
    monkeypatch.setenv(cpu_compat.ALLOW_UNTESTED_ENV, "1")
    assert cpu_compat.check_mcore_version("0.99.0") == "0.99.0"


if __name__ == "__main__":  # one spot, with every redirect but its own; exit 3 = it failed
    spot = sys.argv[1]
    cpu_compat.apply(skip=(spot,))
    from conftest import ensure_world1
    from megatron.core import parallel_state

    ensure_world1()
    parallel_state.initialize_model_parallel(1, 1)
    try:
        SPOTS[spot]()
    except Exception as e:  # noqa: BLE001
        print(f"{spot} failed without its redirect: {type(e).__name__}: {e}")
        sys.exit(3)
    sys.exit(0)
