"""Forward+backward time of a Routing-Free MoE layer vs the learned top-k layer at matched density.

Matched density: each Routing-Free expert's bias is set so that it fires for exactly k/E of the
tokens, the share of (token, expert) pairs a top-k router sends. Same input, same process, runs
interleaved, median of repeats; prints the ratio (routing-free / learned). By FLOPs the ratio is
about 1.1 (the gate's [T, E*r] projection and the AoE r x F factor). Not a test: timings on a
shared CPU are noisy; only ratios from one run mean anything.

    .venv/bin/python bench/routing_free_speed.py                 # T=4096 H=512 F=1024 E=8 k=2 r=32, GELU
    .venv/bin/python bench/routing_free_speed.py --clock cpu --threads 1   # steady on a shared machine
    .venv/bin/python bench/routing_free_speed.py --tokens 1024 --repeats 5
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from router_overhead import MALLOC_ENV, layer_step  # noqa: E402

if __name__ == "__main__" and "--system-malloc" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29534")

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from selfmoe.config import make_config  # noqa: E402
from selfmoe.models import build_gpt_model, moe_layers  # noqa: E402


def timeit(fns: dict, repeats: int, clock) -> dict:
    """Median time of each fn, runs interleaved so that machine drift hits all alike."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def match_density(router, x, k):
    """Bias b_i such that s_i ||x A_i|| - b_i >= theta for exactly k/E of the tokens of x."""
    E = router.num_experts
    score = router.gates(x) + router.gate_bias  # s_i ||x A_i|| (all positive here)
    q = torch.quantile(score, 1.0 - k / E, dim=0)
    router.gate_bias.copy_(q - router.theta + 1e-4)
    return float((router.gates(x) >= router.theta).float().mean())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (all threads), steadier than wall time on a shared machine")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 keeps CPU-time ratios steady on a busy machine")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    T, H, E, k = a.tokens, a.hidden, a.experts, a.topk
    hidden = torch.nn.functional.layer_norm(torch.randn(T, 1, H), (H,)).requires_grad_(True)
    layers = {}
    for r in ("learned", "routing-free"):
        cfg = make_config("gpt2", num_layers=1, hidden_size=H, num_attention_heads=8, num_moe_experts=E,
                          moe_router_topk=k, moe_ffn_hidden_size=a.ffn, vocab_size=128, seq_length=T,
                          moe_router_type=r, routing_free_rank=a.rank, routing_free_lambda0=1e-3)
        layers[r] = moe_layers(build_gpt_model(cfg))[0]
    rho = match_density(layers["routing-free"].router, hidden.detach().reshape(T, H), k)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; T={T} H={H} F={a.ffn} E={E} k={k} "
          f"r={a.rank}, GELU, {a.clock} clock; routing-free density {rho:.4f} (top-k: {k / E:.4f})")
    fns = {r: layer_step(layer, hidden) for r, layer in layers.items()}
    t = timeit(fns, a.repeats, time.perf_counter if a.clock == "wall" else time.process_time)
    print(f"MoE layer learned      {t['learned'] * 1e3:8.1f} ms   1.00x")
    print(f"MoE layer routing-free {t['routing-free'] * 1e3:8.1f} ms   {t['routing-free'] / t['learned']:.2f}x")
    # multiply-adds of the forward (backward scales alike): experts' FFN vs the gate's x A for all
    # experts, each expert's x A_e on its own tokens, and the AoE r x F factor
    pairs, F, r = T * k, a.ffn, a.rank
    ffn = pairs * 2 * H * F + T * H * E
    aoe = pairs * 2 * H * F + T * H * E * r + pairs * H * r + pairs * r * F
    print(f"by multiply-adds: {aoe / ffn:.3f}x")
    print(f"ratio routing-free/learned: {t['routing-free'] / t['learned']:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
