"""Command-line arguments: Megatron-LM's flag names and semantics, plus selfmoe's router flags.

A Megatron-LM GPT/MoE launch script should run here with only its paths changed, so:
- flags keep Megatron-LM's names, defaults and derived values (ffn size, kv channels, global
  batch, padded vocab, split, blend);
- GPU-only performance flags are accepted and listed once as ignored, never rejected;
- every configuration error is found before any model is built and reported as one line,
  `error: ...` naming the flag, with exit code 2 (argparse's own convention).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# Flags of Megatron-LM launch scripts that have no effect here: accepted, and listed at start-up
# with the reason (config_flags.IGNORED_REASONS). name -> nargs (0: a switch, None: one value,
# "*": any number of values). TransformerConfig's own fields are derived (config_flags.py).
IGNORED_FLAGS = {
    "--use-mcore-models": 0, "--use-flash-attn": 0,
    "--overlap-param-gather": 0, "--align-param-gather": 0,
    "--overlap-param-gather-with-optimizer-step": 0,
    "--bias-gelu-fusion": 0, "--no-bias-gelu-fusion": 0, "--no-bias-swiglu-fusion": 0,
    "--no-bias-dropout-fusion": 0, "--no-rope-fusion": 0, "--no-persist-layer-norm": 0,
    "--attention-softmax-in-fp32": 0, "--no-masked-softmax-fusion": 0,
    "--distributed-backend": None,
    "--no-gradient-accumulation-fusion": 0, "--use-torch-fsdp2": 0, "--use-megatron-fsdp": 0,
    "--manual-gc": 0, "--manual-gc-interval": None, "--empty-unused-memory-level": None,
    "--async-save": 0, "--ckpt-fully-parallel-save": 0,
    "--ckpt-fully-parallel-load": 0, "--ckpt-assume-constant-structure": 0, "--use-dist-ckpt": 0,
    "--auto-detect-ckpt-format": 0,
    "--overlap-p2p-communication": 0, "--ddp-bucket-size": None, "--ddp-average-in-collective": 0,
    "--num-workers": None, "--dataloader-type": None,
    "--no-check-for-nan-in-loss-and-grad": 0,
    "--check-for-nan-in-loss-and-grad": 0, "--log-throughput": 0, "--log-timers-to-tensorboard": 0,
    "--log-validation-ppl-to-tensorboard": 0, "--log-memory-to-tensorboard": 0,
    "--log-num-zeros-in-grad": 0, "--log-params-norm": 0, "--log-world-size-to-tensorboard": 0,
    "--log-loss-scale-to-tensorboard": 0, "--timing-log-level": None, "--timing-log-option": None,
    "--wandb-project": None, "--wandb-exp-name": None, "--wandb-save-dir": None, "--wandb-entity": None,
    "--local-rank": None, "--local_rank": None,
    "--no-create-attention-mask-in-dataloader": 0, "--dist-ckpt-strictness": None, "--logging-level": None,
    "--enable-experimental": 0, "--data-parallel-sharding-strategy": None, "--fsdp-double-buffer": 0,
    "--use-nccl-ub": 0, "--megatron-fsdp-grad-comm-dtype": None, "--megatron-fsdp-main-grads-dtype": None,
}

ROUTER_TYPES = ("learned", "self", "random", "hash", "routing-free")
TOKENIZER_ALIASES = {"Llama2Tokenizer": "SentencePieceTokenizer", "GPTSentencePieceTokenizer": "SentencePieceTokenizer"}
LEGACY_DEFAULT_SPLIT = "969, 30, 1"  # what Megatron-LM uses when --data-path comes without --split

# `python pretrain_gpt.py` with no model flags: a small Self-Routing MoE GPT that trains on the
# bundled Shakespeare corpus in a few minutes on 2 CPU cores. Any flag given still wins.
DEMO_DEFAULTS = dict(
    num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128, max_position_embeddings=128,
    num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256, ffn_hidden_size=256, moe_router_type="self",
    micro_batch_size=8, train_iters=300, lr=2e-3, min_lr=2e-4,
    lr_decay_style="cosine", lr_warmup_fraction=0.1, weight_decay=0.1, adam_beta2=0.95,
    hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, init_method_std=0.02,
    log_interval=25, eval_interval=100, eval_iters=4, tokenizer_type="GPT2BPETokenizer",
)
# With --moe-router-type routing-free: the paper's lambda controller (lambda0 = 1e-10, eta = 0.02)
# needs ~1,000 steps before lambda matters; a few-hundred-step run needs a faster start and step to
# bring the density to its target (the same sign rule; the quadratic rule drifted below the target
# in 300 demo steps; README "Routing-Free MoE"). Also what tools/compare_routers.py runs use.
ROUTING_FREE_DEMO_DEFAULTS = dict(routing_free_lambda_rule="sign", routing_free_eta=0.1, routing_free_lambda0=1e-3)
DEMO_DEFAULTS.update(ROUTING_FREE_DEMO_DEFAULTS)


class ArgumentError(ValueError):
    """A bad flag or flag combination; str() is the one-line message (without `error: `)."""


class _IgnoredFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        ignored = getattr(namespace, "ignored_flags", None) or []
        if option_string not in ignored:
            ignored.append(option_string)
        namespace.ignored_flags = ignored


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line and exit with 2 like ours."""

    def error(self, message):
        fail(message)


def fail(message: str):
    """Print `error: message` (once, from rank 0) and exit with argparse's usage-error code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def build_parser(extra_args_provider=None) -> argparse.ArgumentParser:
    p = _Parser(description="selfmoe pretraining (Megatron-LM flags)", allow_abbrev=False)

    g = p.add_argument_group("network size")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int, help="default 4*hidden (swiglu: 2/3 of that, multiple of 64)")
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--kv-channels", type=int, help="default hidden/heads")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"),
                   default="learned_absolute", help="none: no position information outside attention (MLA keeps "
                                                    "its own rotary embedding)")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="legacy: same as rope")
    g.add_argument("--no-position-embedding", dest="add_position_embedding", action="store_false")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x RoPE frequency scaling (megatron-core's RotaryEmbedding(rope_scaling=True))")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="with --use-rope-scaling (Llama 3.x: 8)")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("regularization and optimizer")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--init-method-std", type=float, default=0.02)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--global-batch-size", type=int, help="default micro * data-parallel size")
    g.add_argument("--rampup-batch-size", nargs=3, metavar=("START", "INCREMENT", "RAMPUP_SAMPLES"),
                   help="with --train-samples: the global batch grows from START by INCREMENT to "
                        "--global-batch-size over RAMPUP_SAMPLES samples (megatron-core's calculator)")
    g.add_argument("--train-iters", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--train-samples", type=int, help="sample-based schedule: --train-iters = this / global batch")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
                   default="linear")
    g.add_argument("--lr-decay-samples", type=int, help="with --train-samples; default --train-samples")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    g.add_argument("--lr-wsd-decay-style", choices=("exponential", "linear", "cosine", "minus_sqrt"),
                   default="exponential", help="WSD: the shape of the final decay")
    g.add_argument("--lr-wsd-decay-iters", type=int, help="WSD: iterations of the final decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, help="WSD with --train-samples: samples of the final decay")
    g.add_argument("--exit-duration-in-mins", type=float, help="stop (after saving, with --save) after this long")
    g.add_argument("--lr-decay-iters", type=int, help="default --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true")

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float)
    g.add_argument("--initial-loss-scale", type=float, default=2**32)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, help="default --tensor-model-parallel-size")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="Megatron-Core DDP: all-reduce (or reduce-scatter) each gradient bucket during the last "
                        "micro-batch's backward pass")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Megatron-Core's DistributedOptimizer: optimizer state sharded over data-parallel ranks")

    g = p.add_argument_group("DeepSpeed (ZeRO optimizer sharding)")
    g.add_argument("--deepspeed", action="store_true", help="wrap the model in DeepSpeed's engine")
    g.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config",
                   help="DeepSpeed JSON config (see examples/deepspeed/); 'auto' values come from these flags")

    g = p.add_argument_group("validation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--exit-interval", type=int, help="stop (after saving, with --save) when iteration %% N == 0")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; iteration restarts at 0")
    g.add_argument("--ckpt-format", default="torch_dist", help="torch_dist (the one format selfmoe writes)")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer's state by parameter (Megatron's fully_reshardable), "
                        "so it resumes on any TP/PP/EP/DP layout; default dp_reshardable: another DP size only")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load: exit (code 2) instead of training from scratch when there is no checkpoint")
    g.add_argument("--run-name", help="names ./runs/<name> and ./checkpoints/<name> in the demo")

    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", help='"prefix" or "w1 prefix1 w2 prefix2 ..."')
    g.add_argument("--train-data-path", nargs="*")
    g.add_argument("--valid-data-path", nargs="*")
    g.add_argument("--test-data-path", nargs="*")
    g.add_argument("--split", help='train,valid,test weights, e.g. "969,30,1"')
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-cache-path")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--tokenizer-type")
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids 0..N-1 (+ eod)")

    g = p.add_argument_group("mixture of experts (Megatron-Core)")
    g.add_argument("--num-experts", type=int, help="none: dense baseline")
    g.add_argument("--moe-ffn-hidden-size", type=int, help="default --ffn-hidden-size")
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-router-load-balancing-type", nargs="+",
                   choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"), default=["aux_loss"],
                   help="one or several (each with its own --moe-aux-loss-coeff)")
    g.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=[0.0])
    g.add_argument("--moe-z-loss-coeff", type=float)
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-score-function", choices=("softmax", "sigmoid"), default="softmax")
    g.add_argument("--moe-router-pre-softmax", action="store_true")
    g.add_argument("--moe-router-topk-scaling-factor", type=float)
    g.add_argument("--moe-router-dtype", choices=("fp32", "fp64"))
    g.add_argument("--moe-token-dispatcher-type", choices=("allgather", "alltoall", "flex"), default="allgather")
    g.add_argument("--moe-expert-capacity-factor", type=float)
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-token-drop-policy", choices=("probs", "position"), default="probs")
    g.add_argument("--moe-input-jitter-eps", type=float)
    g.add_argument("--moe-layer-freq", default="1")

    g = p.add_argument_group("routers (selfmoe)")
    # Default: Megatron's learned router, so a Megatron-LM MoE script means the same model here;
    # the demo (no model flags) defaults to Self-Routing.
    g.add_argument("--moe-router-type", choices=ROUTER_TYPES, default="learned")
    g.add_argument("--self-routing-subspace", default="last", help="last | first | comma-separated channel ids")
    g.add_argument("--self-routing-temperature", type=float, default=1.0)
    g.add_argument("--routing-free-rank", type=int, default=32)
    g.add_argument("--routing-free-theta", type=float, default=1.0)
    g.add_argument("--routing-free-density-target", type=float, default=0.25)
    g.add_argument("--routing-free-lambda0", type=float, default=1e-10)
    g.add_argument("--routing-free-eta", type=float, default=0.02)
    g.add_argument("--routing-free-mu", type=float, default=0.5)
    g.add_argument("--routing-free-expert-type", choices=("aoe", "mlp"), default="aoe")
    g.add_argument("--routing-free-lambda-rule", choices=("sign", "quadratic"), default="sign")
    g.add_argument("--routing-free-lambda-update", choices=("step", "micro-batch"), default="step")
    g.add_argument("--routing-free-scale-init", type=float, help="gate scale s_i at init (default: G ~ 2 theta)")
    g.add_argument("--routing-free-bias-init", type=float, default=1e-6)
    g.add_argument("--routing-free-preset", choices=("reference",),
                   help="the authors' 120M recipe's Routing-Free settings as defaults (explicit flags win)")

    g = p.add_argument_group("network size")
    g.add_argument("--use-legacy-models", action="store_true", help="refused: selfmoe builds Megatron-Core models")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"))
    g.add_argument("--recompute-activations", action="store_true", help="as --recompute-granularity selective")

    if extra_args_provider is not None:  # first: a script's own flag (e.g. --num-workers) replaces an ignored one
        p = extra_args_provider(p) or p
    g = p.add_argument_group("accepted for launch-script compatibility, no effect (reasons at start-up)")
    for flag, nargs in IGNORED_FLAGS.items():
        if flag in p._option_string_actions:
            continue
        kw = {"nargs": 0} if nargs == 0 else ({"nargs": nargs} if nargs else {})
        g.add_argument(flag, action=_IgnoredFlag, dest=f"_ignored_{flag.strip('-').replace('-', '_')}",
                       help=argparse.SUPPRESS, **kw)

    from selfmoe.training.config_flags import add_config_flags

    add_config_flags(p)  # TransformerConfig's other fields, as Megatron-LM derives them
    p.set_defaults(_flag_actions=tuple(p._actions))  # for the domain checks
    return p


def parse_args(argv=None, defaults: dict | None = None, extra_args_provider=None, world_size: int | None = None,
               demo_defaults: dict | None = None, prepare_args=None, validate_data=None):
    """Parse and validate; on a bad configuration print one `error:` line and exit with 2.

    `demo_defaults` become the defaults (explicit flags still win) when no model is described
    (no --num-layers); `defaults` fill values left unset, like Megatron-LM's args_defaults.
    A model family other than GPT passes `prepare_args(args)` (derives values before validation,
    e.g. the ViT's sequence length) and `validate_data(args)` (replaces the corpus/tokenizer checks).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(extra_args_provider)
    demo = demo_defaults is not None and not any(a == "--num-layers" or a.startswith("--num-layers=") for a in argv)
    if demo:
        parser.set_defaults(**demo_defaults)
    preset = parser.parse_known_args(argv)[0].routing_free_preset
    if preset:
        from selfmoe.config import ROUTING_FREE_PRESETS

        parser.set_defaults(**ROUTING_FREE_PRESETS[preset])
    args = parser.parse_args(argv)
    if preset == "reference" and args.num_layers and not any(a.split("=")[0] == "--moe-layer-freq" for a in argv):
        args.moe_layer_freq = f"([0]+[1]*{args.num_layers - 1})"  # the reference's first layer is dense
    if demo and any(a.split("=")[0] in ("--lr-warmup-iters", "--lr-warmup-samples") for a in argv):
        args.lr_warmup_fraction = None  # an explicit warmup replaces the demo's warmup fraction
    if demo and any(a.split("=")[0] == "--train-samples" for a in argv):
        args.train_iters = None  # a sample-based schedule replaces the demo's iteration count
    args.demo = demo
    args.ignored_flags = getattr(args, "ignored_flags", None) or []
    args.notes = []  # adjustments validation made, printed once at start
    if demo and args.moe_router_type == "routing-free" and not preset:
        demo_rf = {k: v for k, v in ROUTING_FREE_DEMO_DEFAULTS.items() if getattr(args, k) == v}
        if demo_rf:
            args.notes.append("demo: routing-free lambda controller " + ", ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in demo_rf.items()) +
                " (the paper's lambda0 1e-10 / eta 0.02 / sign rule act only after ~1,000 steps)")
    for k, v in (defaults or {}).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    try:
        if prepare_args is not None:
            prepare_args(args)
        validate_args(args, world_size, validate_data)
    except ArgumentError as e:
        fail(str(e))
    _note_other_routers_flags(args, argv)
    return args


def _note_other_routers_flags(args, argv) -> None:
    """List a router's own flags given on the command line for another router (or the dense model)
    as ignored: they shape only that router, so the run would otherwise drop them silently."""
    from selfmoe.config import ROUTER_TYPES, router_of_flag
    from selfmoe.training.config_flags import note_ignored

    router = args.moe_router_type if args.num_experts else None
    given = [f for f in dict.fromkeys(a.split("=")[0] for a in argv if a.startswith("--"))
             if router_of_flag(f) and f != "--routing-free-preset"]  # the preset sets the router itself
    for flag in sorted(given, key=lambda f: ROUTER_TYPES.index(router_of_flag(f))):  # grouped by router
        owner = router_of_flag(flag)
        if router != owner:
            what = f"--moe-router-type {router}" if router else "the dense model (no --num-experts)"
            note_ignored(args, flag, f"only --moe-router-type {owner} reads it; this run uses {what}")


# ---------------------------------------------------------------------------------------------
# derived values, with Megatron-LM's semantics

def padded_vocab_size(orig_vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Pad the vocabulary so the embedding splits evenly over TP ranks (Megatron-LM's rule)."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(orig_vocab_size / multiple) * multiple)


def parse_blend(tokens):
    """Megatron blend syntax -> (prefixes, weights or None) via megatron-core's own parser."""
    from megatron.core.datasets.utils import get_blend_from_list

    return get_blend_from_list(list(tokens)) if tokens else None


def parse_split(split: str) -> list[float]:
    """"969,30,1" -> normalized [train, valid, test] weights (megatron-core's parser, after a strict
    check: 1-3 comma-separated finite numbers >= 0 with a positive sum, else ValueError)."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    parts = [x.strip() for x in str(split).split(",")]
    values = [float(x) for x in parts]  # ValueError on "a" or ""
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ValueError(split)
    return parse_and_normalize_split(split)


def train_valid_test_num_samples(args) -> list[int]:
    """Samples each split must provide (Megatron-LM: eval runs at every interval plus once at the end)."""
    train = args.train_iters * args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    return [train, evals * args.global_batch_size, args.eval_iters * args.global_batch_size]


def _world_size(world_size):
    return int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------
# validation: all errors before any model is built

def _require(args, *names):
    for n in names:
        if getattr(args, n) is None:
            raise ArgumentError(f"--{n.replace('_', '-')} is required")


def _positive(args, *names):
    for n in names:
        v = getattr(args, n)
        if v is not None and v <= 0:
            raise ArgumentError(f"--{n.replace('_', '-')} must be > 0, got {v}")


def _validate_optimizer_sharding(args) -> None:
    if args.deepspeed and args.overlap_grad_reduce:
        from selfmoe.training.config_flags import note_ignored

        note_ignored(args, "--overlap-grad-reduce", "with --deepspeed the DeepSpeed engine reduces gradients "
                                                    "(its JSON's zero_optimization.overlap_comm)")
        args.overlap_grad_reduce = False
    if args.deepspeed_config and not args.deepspeed:
        raise ArgumentError("--deepspeed-config given without --deepspeed")
    if not args.deepspeed:
        return
    if not args.deepspeed_config:
        raise ArgumentError("--deepspeed needs --deepspeed-config <file.json> (see examples/deepspeed/)")
    if not os.path.isfile(args.deepspeed_config):
        raise ArgumentError(f"--deepspeed-config {args.deepspeed_config}: no such file")
    try:
        with open(args.deepspeed_config) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"--deepspeed-config {args.deepspeed_config}: line {e.lineno}: {e.msg}") from None
    if args.use_distributed_optimizer:
        raise ArgumentError("--use-distributed-optimizer and --deepspeed both shard the optimizer; pick one")
    if args.pipeline_model_parallel_size > 1:
        raise ArgumentError("--deepspeed with --pipeline-model-parallel-size > 1 is not supported; use Megatron-Core's "
                            "pipeline schedules without --deepspeed")
    if args.expert_model_parallel_size > 1:
        stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds, dict) else 0
        if str(stage) == "3":
            raise ArgumentError(f"--deepspeed-config {args.deepspeed_config}: ZeRO stage 3 with "
                                "--expert-model-parallel-size > 1 is not supported (DeepSpeed shards experts under "
                                "stage 3 only for its AutoEP layers); use stage 1 or 2")
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if args.num_experts and etp != args.tensor_model_parallel_size:
        raise ArgumentError("--deepspeed with --num-experts needs --expert-tensor-parallel-size equal to "
                            "--tensor-model-parallel-size (DeepSpeed reduces expert grads over its own groups)")


def validate_args(args, world_size: int | None = None, validate_data=None) -> None:
    """Check flags and fill derived values in place (Megatron-LM's validate_args, our subset)."""
    args.world_size = ws = _world_size(world_size)
    if not hasattr(args, "notes"):
        args.notes = []
    if not hasattr(args, "ignored_flags") or args.ignored_flags is None:
        args.ignored_flags = []
    from selfmoe.training import config_flags

    if args.num_experts == 0:  # --num-experts 0: the dense model (turns off a demo's or preset's experts)
        args.num_experts = None
    config_flags.validate_megatron_flags(args, ArgumentError)
    _validate_optimizer_sharding(args)
    if args.dist_ckpt_optim_fully_reshardable and not args.use_distributed_optimizer:
        config_flags.note_ignored(args, "--dist-ckpt-optim-fully-reshardable", "already so: without "
                                  "--use-distributed-optimizer the optimizer state is saved by parameter")
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "lr")
    if args.train_iters is None and args.train_samples is None:
        raise ArgumentError("--train-iters (or --train-samples) is required")
    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
              "global_batch_size", "train_iters", "eval_interval", "log_interval", "save_interval", "exit_interval",
              "tensorboard_log_interval", "num_experts", "moe_router_topk", "tensor_model_parallel_size",
              "pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
              "make_vocab_size_divisible_by", "num_query_groups", "ffn_hidden_size", "moe_ffn_hidden_size")
    if args.eval_iters < 0:
        raise ArgumentError(f"--eval-iters must be >= 0, got {args.eval_iters}")

    # model shape
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if not args.add_position_embedding and args.position_embedding_type != "rope":
        raise ArgumentError("--no-position-embedding needs --position-embedding-type rope")
    _validate_attention_variants(args)
    if args.kv_channels is None:
        if args.hidden_size % args.num_attention_heads:
            raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by "
                                f"--num-attention-heads {args.num_attention_heads}")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.group_query_attention and args.num_attention_heads % args.num_query_groups:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                            f"--num-query-groups {args.num_query_groups}")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        raise ArgumentError(f"--max-position-embeddings {args.max_position_embeddings} is smaller than "
                            f"--seq-length {args.seq_length}")

    # parallelism
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if cp != 1:
        raise ArgumentError("--context-parallel-size > 1 needs TransformerEngine (GPU); not available on CPU")
    args.virtual_pipeline_model_parallel_size = None
    vls = args.num_layers_per_virtual_pipeline_stage
    if vls is not None:  # Megatron-LM: interleaved 1F1B with num_layers / (pp x vls) chunks per rank
        if pp == 1:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if args.num_layers % (pp * vls):
            raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size "
                                f"{pp} x --num-layers-per-virtual-pipeline-stage {vls}")
        if args.num_layers // (pp * vls) > 1:
            args.virtual_pipeline_model_parallel_size = args.num_layers // (pp * vls)
    if ws % (tp * pp):
        raise ArgumentError(f"world size {ws} is not divisible by --tensor-model-parallel-size {tp} x "
                            f"--pipeline-model-parallel-size {pp}")
    args.data_parallel_size = ws // (tp * pp)
    if args.num_layers % pp:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by "
                            f"--pipeline-model-parallel-size {pp}")
    if tp == 1:
        args.sequence_parallel = False  # Megatron-LM: SP means nothing without TP
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = tp

    # mixture of experts
    E, k, ep, etp = args.num_experts, args.moe_router_topk, args.expert_model_parallel_size, args.expert_tensor_parallel_size
    if E is None:
        if ep > 1:
            raise ArgumentError("--expert-model-parallel-size > 1 needs --num-experts")
    else:
        if args.moe_ffn_hidden_size is None:
            args.moe_ffn_hidden_size = args.ffn_hidden_size
        if args.moe_router_type != "routing-free" and k > E:
            raise ArgumentError(f"--moe-router-topk {k} exceeds --num-experts {E}")
        if args.moe_router_type == "self" and E > args.hidden_size:
            raise ArgumentError(f"--num-experts {E} exceeds --hidden-size {args.hidden_size}: self routing reads "
                                f"one hidden channel per expert (--moe-router-type self)")
        if E % ep:
            raise ArgumentError(f"--num-experts {E} is not divisible by --expert-model-parallel-size {ep}")
        if (ws // pp) % (ep * etp):
            raise ArgumentError(f"world size / pipeline size ({ws // pp}) is not divisible by "
                                f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp}")
        if tp > 1 and not args.sequence_parallel:
            raise ArgumentError("--tensor-model-parallel-size > 1 with --num-experts needs --sequence-parallel")
        if args.moe_router_type == "routing-free" and args.moe_expert_capacity_factor is not None:
            raise ArgumentError("--moe-expert-capacity-factor is not supported with --moe-router-type routing-free "
                                "(it fires 0..E experts per token; no capacity is applied)")
        if args.moe_pad_expert_input_to_capacity and args.moe_expert_capacity_factor is None:
            raise ArgumentError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        megatron_experts = not (args.moe_router_type == "routing-free" and args.routing_free_expert_type == "aoe")
        if args.add_bias_linear and megatron_experts:
            # megatron-core 0.16's local (non-TransformerEngine) expert MLP adds the bias in place onto
            # a custom autograd function's output, which torch refuses. MoE launch scripts usually
            # pass --disable-bias-linear; for those that don't, do it and say so.
            args.add_bias_linear = False
            args.notes.append("--num-experts without TransformerEngine: linear biases disabled, as with "
                              "--disable-bias-linear (megatron-core's local MoE experts cannot train with them)")
        if args.moe_token_dispatcher_type == "flex":  # megatron-core's flex dispatcher is DeepEP/HybridEP's
            from selfmoe.training.config_flags import note_ignored

            note_ignored(args, "--moe-token-dispatcher-type flex", "needs DeepEP or HybridEP (CUDA), not installed; "
                                                                   "the alltoall dispatcher is used (same routing)")
            args.moe_token_dispatcher_type = "alltoall"
        from selfmoe.models.moe_spec import parse_moe_layer_freq

        try:  # Megatron-LM: N (every N-th layer is MoE) or a list expression such as "([0]+[1]*23)"
            pattern = parse_moe_layer_freq(args.moe_layer_freq, args.num_layers)
        except ValueError as e:
            raise ArgumentError(f"--moe-layer-freq {e}") from None
        text = str(args.moe_layer_freq).strip()
        args.moe_layer_freq = int(text) if text.lstrip("+").isdigit() else pattern
        args.self_routing_subspace = _parse_subspace(args.self_routing_subspace)

    # batch sizes
    mbs, dp = args.micro_batch_size, args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    if args.global_batch_size % (mbs * dp):
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                            f"--micro-batch-size {mbs} x data-parallel size {dp}")
    nmb = args.global_batch_size // (mbs * dp)
    if args.virtual_pipeline_model_parallel_size and nmb % args.pipeline_model_parallel_size:
        raise ArgumentError(f"the interleaved pipeline needs the micro-batches per step ({nmb} = --global-batch-size / "
                            f"(--micro-batch-size x data-parallel size)) to be a multiple of "
                            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}")
    _validate_rampup(args)
    _validate_sample_schedule(args)

    # learning rate schedule
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise ArgumentError("give only one of --lr-warmup-fraction and --lr-warmup-iters")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.train_samples is not None:  # the scheduler's steps are samples: give it those
        decay = args.lr_decay_samples if args.lr_decay_samples is not None else args.train_samples
        warmup = args.lr_warmup_fraction * decay if args.lr_warmup_fraction is not None else args.lr_warmup_samples
        if warmup >= decay:
            raise ArgumentError(f"--lr-warmup-samples ({warmup:g}) must be smaller than --lr-decay-samples ({decay})")
        args.lr_decay_samples, args.lr_warmup_samples = decay, int(warmup)
    else:
        warmup = (args.lr_warmup_fraction * args.lr_decay_iters if args.lr_warmup_fraction is not None
                  else args.lr_warmup_iters)
        if warmup >= args.lr_decay_iters:
            raise ArgumentError(f"--lr-warmup-iters ({warmup:g}) must be smaller than --lr-decay-iters "
                                f"({args.lr_decay_iters})")
    if args.lr_decay_style == "WSD":
        wsd = args.lr_wsd_decay_samples if args.train_samples is not None else args.lr_wsd_decay_iters
        if wsd is None:
            raise ArgumentError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or, with --train-samples, "
                                "--lr-wsd-decay-samples)")

    # precision
    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16 are mutually exclusive")

    # checkpoints
    if args.load is not None and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise ArgumentError(f"--load {args.load} is not a directory")

    (validate_data or _validate_data)(args)
    args_to_config(args)  # the config's own checks (router options), still before any model exists


def _validate_attention_variants(args) -> None:
    """Multi-latent attention, multi-token prediction and RoPE scaling: Megatron-LM's refusals,
    and the flags that mean nothing without their companion listed as ignored."""
    from selfmoe.training.config_flags import note_ignored

    if args.multi_latent_attention:
        if args.group_query_attention:
            raise ArgumentError("--multi-latent-attention and --group-query-attention are mutually exclusive "
                                "(MLA compresses keys and values itself)")
        if getattr(args, "qk_l2_norm", False):
            raise ArgumentError("--qk-l2-norm is not supported with --multi-latent-attention (megatron-core)")
    rope = args.position_embedding_type == "rope" and not args.multi_latent_attention
    if args.use_rope_scaling and not rope:
        note_ignored(args, "--use-rope-scaling", "needs --position-embedding-type rope without "
                                                 "--multi-latent-attention (MLA scales its RoPE with YaRN: "
                                                 "--rotary-scaling-factor)")
        args.use_rope_scaling = False
    if args.rope_scaling_factor != 8.0 and not args.use_rope_scaling:
        note_ignored(args, "--rope-scaling-factor", "needs --use-rope-scaling")
        args.rope_scaling_factor = 8.0
    if args.mtp_num_layers:
        if args.pipeline_model_parallel_size > 1:
            raise ArgumentError("--mtp-num-layers with --pipeline-model-parallel-size > 1 is not supported in "
                                "selfmoe yet (the MTP block and its embedding copy on the last stage are untested)")
    elif args.mtp_loss_scaling_factor != 0.1:
        note_ignored(args, "--mtp-loss-scaling-factor", "needs --mtp-num-layers")


def _validate_rampup(args) -> None:
    """--rampup-batch-size START INCREMENT SAMPLES, Megatron-LM's batch-size ramp-up (sample-based
    schedules only): every batch size on the way must split into whole micro-batches."""
    if args.rampup_batch_size is None:
        return
    if args.train_samples is None:
        raise ArgumentError("--rampup-batch-size needs --train-samples (a sample-based schedule; Megatron-LM "
                            "refuses it with --train-iters too)")
    if args.deepspeed:
        raise ArgumentError("--rampup-batch-size with --deepspeed: DeepSpeed's engine keeps one gradient "
                            "accumulation count; drop one of the two")
    try:
        start, inc, samples = (int(x) for x in args.rampup_batch_size)
    except ValueError:
        raise ArgumentError(f"--rampup-batch-size takes three integers (start batch size, increment, ramp-up "
                            f"samples), got {' '.join(args.rampup_batch_size)}") from None
    unit, gbs = args.micro_batch_size * args.data_parallel_size, args.global_batch_size
    if start <= 0 or inc <= 0 or samples < 0:
        raise ArgumentError(f"--rampup-batch-size {start} {inc} {samples}: start and increment must be > 0, "
                            f"ramp-up samples >= 0")
    if start >= gbs or (gbs - start) % inc:
        raise ArgumentError(f"--rampup-batch-size {start} {inc} {samples}: --global-batch-size {gbs} must be larger "
                            f"than the start and reached from it in whole increments")
    if start % unit or inc % unit:
        raise ArgumentError(f"--rampup-batch-size {start} {inc} {samples}: start and increment must be multiples of "
                            f"--micro-batch-size x data-parallel size ({unit})")
    args.rampup_batch_size = [start, inc, samples]


def rampup_iterations(args) -> int:
    """Optimizer steps of a sample-based run with batch-size ramp-up (Megatron-LM's rule): the
    ramp-up steps, each of the batch size megatron-core's calculator gives at that many consumed
    samples, then --train-samples' remainder in full batches (a partial last batch dropped)."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    start, inc, samples = args.rampup_batch_size
    calc = RampupBatchsizeNumMicroBatchesCalculator(args.global_batch_size, args.micro_batch_size,
                                                    args.data_parallel_size, False, -1, start, inc, samples)
    iterations = consumed = 0
    while consumed <= samples and consumed <= args.train_samples:
        calc.update(consumed, consistency_check=False)
        consumed += calc.get_current_global_batch_size()
        iterations += 1
    return iterations + max(0, args.train_samples - consumed) // args.global_batch_size


def _validate_sample_schedule(args) -> None:
    """Megatron-LM's two schedules: in iterations (--train-iters, --lr-*-iters) or in samples
    (--train-samples, --lr-*-samples), never mixed. Samples are what the scheduler counts anyway."""
    sample_flags = [f for f in ("lr_decay_samples", "lr_wsd_decay_samples") if getattr(args, f) is not None]
    sample_flags += ["lr_warmup_samples"] if args.lr_warmup_samples else []
    if args.train_samples is None:
        if sample_flags:
            raise ArgumentError(f"--{sample_flags[0].replace('_', '-')} needs --train-samples (a sample-based "
                                f"schedule); with --train-iters use --{sample_flags[0].replace('_samples', '_iters').replace('_', '-')}")
        return
    if args.train_iters is not None:
        raise ArgumentError("give only one of --train-iters and --train-samples")
    for f in ("lr_decay_iters", "lr_wsd_decay_iters"):
        if getattr(args, f) is not None:
            raise ArgumentError(f"--{f.replace('_', '-')} with --train-samples: give "
                                f"--{f.replace('_iters', '_samples').replace('_', '-')}")
    if args.lr_warmup_iters:
        raise ArgumentError("--lr-warmup-iters with --train-samples: give --lr-warmup-samples")
    args.train_iters = rampup_iterations(args) if args.rampup_batch_size else \
        args.train_samples // args.global_batch_size
    if args.train_iters < 1:
        raise ArgumentError(f"--train-samples {args.train_samples} is less than one global batch "
                            f"({args.global_batch_size})")


def _parse_subspace(spec):
    if isinstance(spec, (tuple, list)) or spec in ("last", "first"):
        return tuple(spec) if isinstance(spec, list) else spec
    try:
        return tuple(int(x) for x in str(spec).split(",") if x.strip())
    except ValueError:
        raise ArgumentError(f"--self-routing-subspace must be last, first or comma-separated ids, got {spec!r}")


def _validate_data(args):
    if args.tokenizer_type is None and args.vocab_file and args.merge_file:
        args.tokenizer_type = "GPT2BPETokenizer"  # what a vocab + merge file pair means
    args.tokenizer_type = TOKENIZER_ALIASES.get(args.tokenizer_type, args.tokenizer_type)
    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path]
    if args.mock_data and (args.data_path or any(per_split)):
        raise ArgumentError("--mock-data and --data-path are mutually exclusive")
    if args.data_path and any(per_split):
        raise ArgumentError("--data-path and --train/valid/test-data-path are mutually exclusive")
    args.use_demo_corpus = not (args.mock_data or args.data_path or any(per_split))
    if args.use_demo_corpus and args.tokenizer_type is None:
        args.tokenizer_type = "GPT2BPETokenizer"  # the demo corpus is GPT-2 tokenized
    if args.use_demo_corpus and args.tokenizer_type != "GPT2BPETokenizer":
        raise ArgumentError(f"--tokenizer-type {args.tokenizer_type}: the bundled demo corpus is GPT-2 "
                            f"tokenized; give --data-path (or --mock-data) for another tokenizer")
    if args.data_path and args.split is None:
        args.split = LEGACY_DEFAULT_SPLIT
    if args.split is not None:
        try:
            weights = parse_split(args.split)
            if weights is None or sum(weights) <= 0:
                raise ValueError
        except (AssertionError, ValueError, ZeroDivisionError):
            raise ArgumentError(f"--split {args.split!r} is not a comma-separated list of 1-3 non-negative numbers")
        if weights[0] <= 0:
            raise ArgumentError(f"--split {args.split!r} leaves no training data")
    for flag, tokens in (("--data-path", args.data_path), ("--train-data-path", args.train_data_path),
                         ("--valid-data-path", args.valid_data_path), ("--test-data-path", args.test_data_path)):
        if not tokens:
            continue
        if len(tokens) > 1 and _is_number(tokens[0]) and (
                len(tokens) % 2 or not all(_is_number(t) for t in tokens[::2])):
            raise ArgumentError(f"{flag}: a blend is 'weight prefix' pairs, got {len(tokens)} values "
                                f"({' '.join(tokens[:4])}{' ...' if len(tokens) > 4 else ''})")
        if len(tokens) % 2 == 0 and all(_is_number(t) for t in tokens[::2]):
            if any(float(w) < 0 for w in tokens[::2]):
                raise ArgumentError(f"{flag}: blend weights must be >= 0")
        prefixes, _ = parse_blend(tokens)
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ArgumentError(f"{flag}: missing data file {prefix + ext}")

    # tokenizer (built here so a bad file is a flag error, and the padded vocab is known)
    if args.mock_data and args.tokenizer_type is None:
        args.tokenizer_type = "NullTokenizer"
        if args.vocab_size is None:
            args.vocab_size = 4095 if args.demo else None
    if args.tokenizer_type is None:
        raise ArgumentError("--tokenizer-type is required with --data-path")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ArgumentError("--tokenizer-type NullTokenizer needs --vocab-size")
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file),
                       ("--tokenizer-model", args.tokenizer_model)):
        if path is not None and not os.path.exists(path):
            raise ArgumentError(f"{flag}: no such file {path}")
    tok = build_tokenizer_from_args(args)
    if args.vocab_size is not None and args.tokenizer_type != "NullTokenizer":
        from selfmoe.training.config_flags import note_ignored

        note_ignored(args, "--vocab-size", f"only NullTokenizer reads it; --tokenizer-type {args.tokenizer_type} "
                                           f"has {tok.vocab_size} ids")
    args.padded_vocab_size = padded_vocab_size(tok.vocab_size, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    if args.num_experts and args.moe_router_type == "hash" and args.padded_vocab_size <= 0:
        raise ArgumentError("--moe-router-type hash needs a tokenizer vocabulary")


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


_TOKENIZERS: dict = {}


def build_tokenizer_from_args(args):
    """The run's tokenizer (cached per argument set); a bad choice is an ArgumentError."""
    from selfmoe.data.tokenizers import TokenizerError, build_tokenizer

    key = (args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size)
    if key not in _TOKENIZERS:
        try:
            _TOKENIZERS[key] = build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                               vocab_file=args.vocab_file, merge_file=args.merge_file,
                                               vocab_size=args.vocab_size)
        except TokenizerError as e:
            raise ArgumentError(str(e)) from None
    return _TOKENIZERS[key]


# ---------------------------------------------------------------------------------------------
# args -> the one config object

def args_to_config(args):
    """The SelfMoEConfig these (validated) arguments describe; a config-level error is an ArgumentError."""
    import torch
    import torch.nn.functional as F

    from selfmoe.config import make_config

    params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    kw = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias or args.add_bias_linear,
        qk_layernorm=args.qk_layernorm,
        vocab_size=getattr(args, "padded_vocab_size", 0), max_position_embeddings=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent, rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor, untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        transformer_impl=args.transformer_impl or "transformer_engine",  # Megatron-LM's default; the spec
        # is TE's only where TE and CUDA are there (selfmoe.models.gpt.layer_spec_backend)
        moe_router_type=args.moe_router_type,
    )
    if args.num_experts:
        kw.update(
            num_moe_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_router_topk=args.moe_router_topk, moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=args.moe_router_bias_update_rate,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            moe_router_dtype=args.moe_router_dtype, moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_expert_capacity_factor=args.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
            moe_token_drop_policy=args.moe_token_drop_policy, moe_input_jitter_eps=args.moe_input_jitter_eps,
            self_routing_subspace=args.self_routing_subspace, self_routing_temperature=args.self_routing_temperature,
            routing_free_rank=args.routing_free_rank, routing_free_theta=args.routing_free_theta,
            routing_free_density_target=args.routing_free_density_target,
            routing_free_lambda0=args.routing_free_lambda0, routing_free_eta=args.routing_free_eta,
            routing_free_mu=args.routing_free_mu, routing_free_expert_type=args.routing_free_expert_type,
            routing_free_lambda_rule=args.routing_free_lambda_rule,
            routing_free_lambda_update=args.routing_free_lambda_update,
            routing_free_scale_init=args.routing_free_scale_init, routing_free_bias_init=args.routing_free_bias_init,
            random_router_seed=args.seed, hash_router_seed=args.seed, moe_layer_freq=args.moe_layer_freq,
            hash_router_by=getattr(args, "hash_router_by", "token"),
        )
    from selfmoe.training.config_flags import config_kwargs

    kw.update(config_kwargs(args))  # TransformerConfig's other fields (derived flags)
    style = "mixtral" if args.swiglu else "gpt2"
    try:
        return make_config(style, **kw)
    except (ValueError, AssertionError) as e:
        raise ArgumentError(_as_flags(" ".join(str(e).split()) or type(e).__name__, args)) from None


_CONFIG_TO_FLAG = {"num_moe_experts": "--num-experts", "layernorm_epsilon": "--norm-epsilon",
                   "gated_linear_unit": "--swiglu", "add_bias_linear": "--disable-bias-linear"}


def _as_flags(message: str, args) -> str:
    """Name config fields in an error the way the user typed them: routing_free_mu -> --routing-free-mu."""
    import re

    def flag(m):
        word = m.group(0)
        if word in _CONFIG_TO_FLAG:
            return _CONFIG_TO_FLAG[word]
        return "--" + word.replace("_", "-") if hasattr(args, word) else word

    return re.sub(r"\b[a-z]+(?:_[a-z0-9]+)+\b", flag, message)
