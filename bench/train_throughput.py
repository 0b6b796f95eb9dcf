"""Training throughput (tokens/s) and MFU of pretrain_gpt.py per router, and the ratio to learned.

Each router trains the same GPT-2-small-scale MoE (12 layers, hidden 768, 8 experts top-2, seq 1024,
the Self-Routing paper's size) on mock data for a few iterations under torchrun; the tokens/s of
the last log interval (past start-up and the first steps) is reported. Not a test.

    # one GPU, bf16 (the README numbers); --nproc 8 --ep 8 for a node
    .venv/bin/python bench/train_throughput.py --routers learned,self --bf16
    # a 2-core CPU box: toy size, only the ratio means anything
    .venv/bin/python bench/train_throughput.py --size toy --nproc 1

MFU = model FLOPs per second / peak. Model FLOPs per token (PaLM / Megatron-LM convention):
6 x (active parameters per token) + 12 x layers x hidden x seq (attention scores and values,
forward and backward). Peak: --peak-tflops, else the dense bf16 peak of a known GPU.
"""

import argparse
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "gpt2-small": dict(layers=12, hidden=768, heads=12, ffn=3072, seq=1024, experts=8, topk=2, micro=8, iters=30,
                       vocab=50257),
    "toy": dict(layers=2, hidden=64, heads=4, ffn=128, seq=64, experts=4, topk=2, micro=4, iters=12, vocab=512),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity
UNITS = {"": 1, "k": 1e3, "M": 1e6, "B": 1e9}


def peak_tflops(given):
    if given:
        return given
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    except ImportError:
        pass
    return None


def run(router, s, args):
    flags = ["--num-layers", s["layers"], "--hidden-size", s["hidden"], "--num-attention-heads", s["heads"],
             "--ffn-hidden-size", s["ffn"], "--moe-ffn-hidden-size", s["ffn"], "--seq-length", s["seq"],
             "--max-position-embeddings", s["seq"], "--micro-batch-size", s["micro"],
             "--global-batch-size", s["micro"] * args.nproc // args.tp, "--train-iters", s["iters"],
             "--log-interval", s["iters"] // 3, "--eval-iters", "0", "--lr", "3e-4", "--lr-warmup-iters", "1",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--disable-bias-linear",
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", s["vocab"],
             "--tensor-model-parallel-size", args.tp, "--expert-model-parallel-size", args.ep]
    if args.tp > 1:
        flags.append("--sequence-parallel")  # Megatron-Core: MoE with TP needs it
    if router != "dense":
        flags += ["--num-experts", s["experts"], "--moe-router-topk", s["topk"], "--moe-router-type", router,
                  "--moe-token-dispatcher-type", "alltoall"]
    if args.bf16:
        flags.append("--bf16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "pretrain_gpt.py", *map(str, flags)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {router}: pretrain_gpt.py failed:\n{p.stderr[-3000:]}")
    rates = [float(m.replace(",", "")) for m in re.findall(r"\| ([\d,]+) tok/s", p.stdout)]
    active = re.search(r"active per token ([\d.]+)([kMB]?)", p.stdout)
    return rates[-1], float(active.group(1)) * UNITS[active.group(2)], " ".join(cmd[3:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routers", default="learned,self")
    ap.add_argument("--size", choices=SIZES, default="gpt2-small")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="per device; default: known GPUs' dense bf16 peak")
    args = ap.parse_args()
    s = SIZES[args.size]
    peak = peak_tflops(args.peak_tflops)
    rows = []
    for router in args.routers.split(","):
        tps, active, cmd = run(router, s, args)
        flops_per_token = 6 * active + 12 * s["layers"] * s["hidden"] * s["seq"]
        mfu = tps * flops_per_token / (peak * 1e12 * args.nproc) if peak else None
        rows.append((router, tps, active, mfu))
        print(f"# {router}: {cmd}", flush=True)
    base = rows[0][1]
    print(f"\n{'router':<14}{'tokens/s':>12}{'active params':>15}{'MFU':>8}{'vs ' + rows[0][0]:>12}")
    for router, tps, active, mfu in rows:
        print(f"{router:<14}{tps:>12,.0f}{active / 1e6:>14.1f}M{(f'{mfu:.1%}' if mfu else '-'):>8}{tps / base:>11.2f}x")


if __name__ == "__main__":
    main()
