"""Analyze the routing of a trained MoE checkpoint: load heatmap, experts per token, agreement between
layers, top tokens per expert, a JSONL routing trace and, for Routing-Free, a θ sweep.

    # the run's own validation data (the demo corpus, its --data-path, or pretrain_vit.py's images)
    python tools/analyze_routing.py --load checkpoints/gpt-self-8e --output analysis/gpt-self-8e
    # other text: a Megatron indexed dataset prefix, or a .txt / .jsonl file (the run's tokenizer)
    python tools/analyze_routing.py --load checkpoints/run --data-path notes.jsonl --output analysis/run
    # Routing-Free: validation loss vs mean active experts for each θ
    python tools/analyze_routing.py --load checkpoints/gpt-routing-free-8e --theta-sweep 0.5,1,2 --output analysis/rf

Any parallel layout loads (dist_checkpointing reshards to one process). Bad input stops with one
`error: ...` line (exit 2) before the model is loaded; the output directory is written under a
temporary name and renamed at the end; an existing output is never overwritten. Definitions of
every measure: selfmoe/routing_analysis.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core's import-time notes on a machine without TransformerEngine/Apex (as pretrain_gpt.py)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning)


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line (no usage block), exit code 2 like every user error."""

    def error(self, message):
        fail(message)


def parser():
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a --save directory or one iter_XXXXXXX directory in it")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--output", required=True, help="a new directory for the results")
    p.add_argument("--data-path", default=None,
                   help="text: indexed dataset prefix, .txt or .jsonl; images: a root with val/<class>/* or a saved "
                        "dataset (default: the run's own validation data)")
    p.add_argument("--eval-iters", type=int, default=8, help="batches analyzed (Megatron-LM's name)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--seq-length", type=int, default=None, help="text only; default: the run's")
    p.add_argument("--trace-tokens", type=int, default=2048, help="tokens in trace.jsonl (one row per MoE layer)")
    p.add_argument("--top-tokens", type=int, default=10, help="keys listed per expert")
    p.add_argument("--min-token-count", type=int, default=5,
                   help="tokens seen fewer times are left out of the top-tokens table")
    p.add_argument("--theta-sweep", default=None, help="Routing-Free: comma-separated θ values, e.g. 0.5,1,2")
    for flag in ("--tokenizer-type", "--tokenizer-model", "--vocab-file", "--merge-file"):
        p.add_argument(flag, default=None, help="default: the run's")
    return p


def parse_thetas(text: str) -> list[float]:
    try:
        thetas = [float(t) for t in text.split(",")]
    except ValueError:
        thetas = []
    if not thetas or any(not (t >= 0 and t < float("inf")) for t in thetas):
        fail(f"--theta-sweep {text}: expected comma-separated finite numbers >= 0")
    return thetas


def run(args) -> str:
    import selfmoe  # noqa: F401  (CPU compatibility layer before megatron is used)
    from selfmoe import routing_analysis as ra
    from selfmoe.conversion.common import ConversionError, atomic_output_dir, check_new_output

    for name in ("eval_iters", "micro_batch_size", "seq_length", "top_tokens", "min_token_count"):
        v = getattr(args, name)
        if v is not None and v < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.trace_tokens < 0:
        fail(f"--trace-tokens must be >= 0, got {args.trace_tokens}")
    thetas = parse_thetas(args.theta_sweep) if args.theta_sweep is not None else None
    check_new_output(args.output, "--output")
    ckpt, common = ra.open_checkpoint(args.load, args.iteration)
    fp, run_args = common["config"], common.get("args") or {}
    if thetas and fp.get("moe_router_type") != "routing-free":
        raise ConversionError(f"--theta-sweep: --load holds a {fp.get('moe_router_type')}-router model; θ is "
                              f"Routing-Free's threshold")
    kind = ra.family(common)
    mbs = args.micro_batch_size or run_args.get("micro_batch_size") or 8
    if kind == "text":
        tok = ra.run_tokenizer(run_args, {"tokenizer_type": args.tokenizer_type, "tokenizer_model":
                                          args.tokenizer_model, "vocab_file": args.vocab_file,
                                          "merge_file": args.merge_file})
        source = ra.text_source(args.data_path, run_args)
        seq = args.seq_length or run_args.get("seq_length") or fp["max_position_embeddings"]
        if seq > fp["max_position_embeddings"]:
            raise ConversionError(f"--seq-length {seq} > the model's max_position_embeddings "
                                  f"{fp['max_position_embeddings']}")
        batches = ra.text_batches(source, tok, fp["vocab_size"], seq, mbs, args.eval_iters * mbs)
        num_keys, classes, where = fp["vocab_size"], None, source

        def key_name(v):
            return tok.decode([v]) if tok is not None else f"id {v}"
    else:
        if args.seq_length is not None:
            fail("--seq-length: an image's sequence is its patches; leave it out")
        batches, classes, where = ra.image_batches(run_args, args.data_path, mbs, args.eval_iters)
        num_keys, key_name = ra.vit_seq(run_args), ra.patch_name(run_args)
    model, cfg = ra.load_analysis_model(ckpt, None, common)
    start = time.time()

    def progress(done, total, tokens):
        rate = tokens / max(time.time() - start, 1e-9)
        eta = (time.time() - start) * (total - done) / done
        print(f"batch {done}/{total} | {rate:,.0f} tokens/s | ETA {eta:.0f}s", flush=True)

    a = ra.analyze(model, kind, batches, num_keys, num_classes=len(classes) if classes else None,
                   trace_tokens=args.trace_tokens, progress=progress)
    sweep = None
    if thetas:
        sweep = ra.theta_sweep(model, kind, batches, thetas, progress=lambda r: print(
            f"theta {r['theta']:g} | {r['loss']:.4f} | experts per token {r['experts_per_token']:.3f}", flush=True))
    info = {"checkpoint": ckpt, "iteration": common.get("iteration", 0), "router": cfg.moe_router_type,
            "family": kind, "data": where, "batches": len(batches),
            "tokens": sum(b.keys.numel() for b in batches),
            "sequences": sum(len(b.keys) for b in batches),
            "loss_name": "LM loss" if kind == "text" else "loss"}
    with atomic_output_dir(args.output, "--output") as tmp:
        text = ra.write_outputs(tmp, a, info, key_name, (lambda c: classes[c]) if classes else None, sweep,
                                top_n=args.top_tokens, min_count=args.min_token_count if kind == "text" else 1)
    print(text, end="")
    print(f"wrote {args.output}: {', '.join(sorted(os.listdir(args.output)))}")
    return text


def main(argv=None):
    args = parser().parse_args(argv)
    from selfmoe.conversion.common import ConversionError

    try:
        return run(args)
    except ConversionError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
