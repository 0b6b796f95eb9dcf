"""Forward+backward time of each router, and of the whole MoE layer, vs Megatron's TopKRouter.

Same input, same process, median of repeats; prints ratios (ours / learned). Not a test: timings
on a shared 2-core machine are noisy, so only the ratios in one run are meaningful.

    .venv/bin/python bench/router_overhead.py            # both cases
    .venv/bin/python bench/router_overhead.py --case small
"""

import argparse
import os
import statistics
import sys
import time

# This VM pays ~10 us per page fault, and glibc returns every large block to the OS, so each fresh
# tensor costs more than the math on it. Keep freed memory in the process (as jemalloc/tcmalloc or
# a CUDA caching allocator would); glibc reads these only at start-up, hence the re-exec.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "MALLOC_TOP_PAD_": "1073741824"}
if __name__ == "__main__" and "--system-malloc" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")

import torch
import torch.distributed as dist

import selfmoe  # noqa: F401
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from selfmoe.config import make_config
from selfmoe.models import build_gpt_model, moe_layers
from selfmoe.routers import get_router_class

CASES = {
    "large": dict(T=8192, H=1024, E=64, k=2, ffn=256, repeats=5),
    "small": dict(T=1024, H=256, E=8, k=2, ffn=256, repeats=20),
}


def timeit(fns: dict, repeats: int) -> dict:
    """Median time of each fn; runs are interleaved so machine drift hits all of them alike."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def router_step(router, hidden, weights):
    def f():
        hidden.grad = None
        probs, _ = router(hidden)
        (probs * weights).sum().backward()
    return f


def layer_step(layer, hidden):
    def f():
        hidden.grad = None
        out, _ = layer(hidden)
        out.sum().backward()
    return f


def run_case(name, T, H, E, k, ffn, repeats):
    print(f"\n== {name}: T={T} H={H} E={E} k={k} (median of {repeats}, fwd+bwd)")
    hidden = torch.randn(T, 1, H, requires_grad=True)
    weights = torch.randn(T, E)
    cfgs = {r: make_config("gpt2", num_layers=1, hidden_size=H, num_attention_heads=8, num_moe_experts=E,
                           moe_router_topk=k, moe_ffn_hidden_size=ffn, vocab_size=128, seq_length=T,
                           moe_router_type=r, routing_free_rank=32)
            for r in ("learned", "self", "routing-free")}
    fns = {}
    for r, cfg in cfgs.items():
        router = get_router_class(r)(config=cfg)
        router.set_layer_number(1)
        fns[r] = router_step(router, hidden, weights)
    rf = fns.pop("routing-free")
    router_t = timeit(fns, repeats)  # the comparison the goal is about, interleaved
    # Routing-Free's [T, E, r] gate tensor is large; timed on its own so it does not disturb the pair.
    router_t.update(timeit({"routing-free": rf}, max(3, repeats // 2)))
    base = router_t["learned"]
    print(f"router  learned (TopKRouter) {base * 1e3:8.2f} ms   1.00x")
    for r in ("self", "routing-free"):
        print(f"router  {r:20s} {router_t[r] * 1e3:8.2f} ms   {router_t[r] / base:.2f}x")
    fns = {}
    for r in ("learned", "self"):
        torch.manual_seed(0)
        fns[r] = layer_step(moe_layers(build_gpt_model(cfgs[r]))[0], hidden)
    layer_t = timeit(fns, repeats)
    print(f"MoE layer learned              {layer_t['learned'] * 1e3:8.2f} ms   1.00x")
    print(f"MoE layer self                 {layer_t['self'] * 1e3:8.2f} ms   {layer_t['self'] / layer_t['learned']:.2f}x")
    return router_t["self"] / base, layer_t["self"] / layer_t["learned"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings")
    args = p.parse_args()
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in (CASES if args.case == "all" else [args.case]):
        r, l = run_case(name, **CASES[name])
        print(f"ratio self/learned: router {r:.2f}x (goal <= 0.5x), MoE layer {l:.2f}x (goal <= 1.0x)")


if __name__ == "__main__":
    main()
