"""Flag parsing against Megatron-LM's semantics, and one-line configuration errors.

Expected values are worked out by hand from Megatron-LM's rules (or are published model sizes),
not read back from our code.
"""

import concurrent.futures
import math
import os
import subprocess
import sys

import pytest
import torch.nn.functional as F

from selfmoe.training.arguments import (
    ArgumentError,
    args_to_config,
    build_parser,
    parse_args,
    parse_blend,
    parse_split,
    validate_args,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 500").split()


def parse(extra, world_size=1):
    return parse_args(BASE + list(extra), world_size=world_size)


def raw_error(argv, world_size=1) -> str:
    args = build_parser().parse_args(argv)
    args.demo, args.ignored_flags, args.notes = False, [], []
    with pytest.raises(ArgumentError) as e:
        validate_args(args, world_size)
    return str(e.value)


def fake_dataset(tmp_path, name):
    prefix = str(tmp_path / name)
    for ext in (".bin", ".idx"):
        open(prefix + ext, "wb").close()
    return prefix


# ------------------------------------------------------------------------------- batch sizes

@pytest.mark.parametrize("world,tp,pp,mbs,gbs,expected_dp,expected_micro", [
    (1, 1, 1, 2, None, 1, 1),    # global defaults to micro * dp
    (1, 1, 1, 2, 16, 1, 8),      # gradient accumulation
    (4, 2, 1, 2, 16, 2, 4),      # dp = 4 / tp
    (8, 2, 2, 1, 32, 2, 16),     # dp = 8 / (tp * pp)
])
def test_micro_batches_follow_megatron(world, tp, pp, mbs, gbs, expected_dp, expected_micro):
    from megatron.core import num_microbatches_calculator as nmc

    extra = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--micro-batch-size", str(mbs)] + (["--global-batch-size", str(gbs)] if gbs else [])
    args = parse(extra, world_size=world)
    assert args.data_parallel_size == expected_dp
    assert args.global_batch_size == (gbs or mbs * expected_dp)
    nmc.init_num_microbatches_calculator(0, None, args.global_batch_size, args.micro_batch_size,
                                         args.data_parallel_size)
    try:
        assert nmc.get_num_microbatches() == expected_micro
    finally:
        nmc.destroy_num_microbatches_calculator()


# --------------------------------------------------------------------------- data arguments

def test_split_string():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("99,1") == pytest.approx([0.99, 0.01, 0.0])
    assert parse_split("1") == pytest.approx([1.0, 0.0, 0.0])


def test_data_path_without_split_gets_megatron_legacy_default(tmp_path):
    prefix = fake_dataset(tmp_path, "a")
    args = parse_args([a for a in BASE if a != "--mock-data"] + ["--data-path", prefix])
    assert args.split == "969, 30, 1"
    assert parse_split(args.split) == pytest.approx([0.969, 0.030, 0.001])


def test_blend_weights(tmp_path):
    a, b = fake_dataset(tmp_path, "a"), fake_dataset(tmp_path, "b")
    assert parse_blend([a]) == ([a], None)
    assert parse_blend(["0.3", a, "0.7", b]) == ([a, b], [0.3, 0.7])
    assert parse_blend([a, b]) == ([a, b], None)  # two prefixes, no weights
    args = parse_args([x for x in BASE if x != "--mock-data"] + ["--data-path", "30", a, "70", b, "--split", "98,2,0"])
    assert parse_blend(args.data_path) == ([a, b], [30.0, 70.0])


# ------------------------------------------------------------------------ model arguments

@pytest.mark.parametrize("tokenizer,tp,divisible,expected", [
    (["--tokenizer-type", "GPT2BPETokenizer"], 1, 128, 50304),  # 50257 -> next multiple of 128
    (["--tokenizer-type", "GPT2BPETokenizer"], 2, 128, 50432),  # multiple of 128 * 2 = 256
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "500"], 1, 128, 512),  # 500 ids + eod = 501
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "500"], 1, 1, 501),
])
def test_padded_vocab(tokenizer, tp, divisible, expected):
    extra = tokenizer + ["--make-vocab-size-divisible-by", str(divisible), "--tensor-model-parallel-size", str(tp)]
    args = parse_args(BASE + extra, world_size=tp)  # the later --tokenizer-type wins, as in argparse
    assert args.padded_vocab_size == expected
    assert args_to_config(args).vocab_size == expected


def test_ffn_and_kv_defaults():
    args = parse_args(["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32",
                       "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1",
                       "--swiglu", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "8"])
    assert args.ffn_hidden_size == 10880  # 2/3 * 4 * 4096 = 10922.7, rounded down to a multiple of 64
    assert args.kv_channels == 128
    assert parse([]).ffn_hidden_size == 256  # 4 * hidden


def test_args_to_config_maps_megatron_flags():
    args = parse(["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                  "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--group-query-attention",
                  "--num-query-groups", "2", "--num-experts", "8", "--moe-router-topk", "3", "--moe-router-type",
                  "learned", "--moe-aux-loss-coeff", "0.01", "--moe-ffn-hidden-size", "96", "--hidden-dropout", "0.0",
                  "--rotary-base", "500000", "--init-method-std", "0.01"])
    c = args_to_config(args)
    assert (c.gated_linear_unit, c.activation_func, c.normalization) == (True, F.silu, "RMSNorm")
    assert (c.position_embedding_type, c.rotary_base, c.untie_embeddings_and_output_weights) == ("rope", 500000, True)
    assert (c.add_bias_linear, c.num_query_groups, c.hidden_dropout, c.init_method_std) == (False, 2, 0.0, 0.01)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_router_type, c.moe_aux_loss_coeff) == (8, 3, "learned", 0.01)
    assert (c.moe_ffn_hidden_size, c.max_position_embeddings, c.vocab_size) == (96, 32, 512)


def test_no_experts_is_dense_and_router_flags_reach_config():
    assert args_to_config(parse([])).num_moe_experts is None
    c = args_to_config(parse(["--num-experts", "4", "--moe-router-type", "routing-free", "--routing-free-rank", "8",
                              "--routing-free-density-target", "0.5", "--routing-free-theta", "0.7"]))
    assert (c.moe_router_type, c.routing_free_rank, c.routing_free_density_target, c.routing_free_theta) == \
        ("routing-free", 8, 0.5, 0.7)
    c = args_to_config(parse(["--num-experts", "4", "--disable-bias-linear", "--moe-router-type", "self",
                              "--self-routing-subspace", "0,5,9,63"]))
    assert (c.moe_router_type, tuple(c.self_routing_subspace)) == ("self", (0, 5, 9, 63))
    # with model flags and no --moe-router-type: Megatron's learned router, as the script meant
    assert args_to_config(parse(["--num-experts", "4", "--disable-bias-linear"])).moe_router_type == "learned"


def test_moe_without_disable_bias_linear_drops_biases_with_a_note():
    args = parse(["--num-experts", "4"])  # megatron-core's local expert MLP cannot train with biases
    assert not args.add_bias_linear and not args_to_config(args).add_bias_linear
    assert any("--disable-bias-linear" in n for n in args.notes)
    dense = parse([])
    assert dense.add_bias_linear and dense.notes == []  # Megatron's default (biases on) where they work


def test_gpu_only_flags_are_accepted_and_listed_with_reasons():
    args = parse(["--use-flash-attn", "--transformer-impl", "transformer_engine", "--moe-grouped-gemm",
                  "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
                  "--overlap-grad-reduce", "--use-distributed-optimizer", "--no-masked-softmax-fusion",
                  "--distributed-backend", "nccl", "--bf16"])
    assert set(args.ignored_flags) == {"--use-flash-attn", "--transformer-impl transformer_engine",
                                       "--moe-grouped-gemm", "--no-masked-softmax-fusion", "--distributed-backend"}
    assert "TransformerEngine" in args.ignored_reasons["--moe-grouped-gemm"]
    assert "on CPU" not in " ".join(args.ignored_reasons.values())  # kind 7: nothing claims to be GPU-only
    # honoured on every device: recompute (megatron-core's), the distributed optimizer, mixed precision
    c = args_to_config(args)
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == ("full", "uniform", 1)
    assert args.use_distributed_optimizer and args.bf16 and args.overlap_grad_reduce
    assert "--use-distributed-optimizer" not in args.ignored_flags and "--bf16" not in args.ignored_flags


def test_megatron_mixtral_launch_script_parses(tmp_path):
    """examples/mixtral/train_mixtral_8x7b_distributed.sh of Megatron-LM, paths changed, on 32 ranks."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter([f"to be or not to be {i}" for i in range(100)]),
                                   model_prefix=str(tmp_path / "tok"), vocab_size=25, minloglevel=2)
    data, ckpt = fake_dataset(tmp_path, "mixtral_text_document"), str(tmp_path / "ckpt")
    script = f"""
        --use-mcore-models --disable-bias-linear --seq-length 4096 --max-position-embeddings 32768
        --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
        --init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm
        --position-embedding-type rope --swiglu --untie-embeddings-and-output-weights
        --group-query-attention --num-query-groups 8 --no-masked-softmax-fusion --no-position-embedding
        --rotary-base 1000000
        --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
        --moe-grouped-gemm --moe-token-dispatcher-type alltoall --overlap-param-gather --overlap-grad-reduce
        --tokenizer-type Llama2Tokenizer --tokenizer-model {tmp_path / 'tok.model'} --data-path {data}
        --split 99990,8,2
        --micro-batch-size 1 --global-batch-size 256 --lr 1e-4 --train-iters 500000 --lr-decay-iters 320000
        --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1 --lr-warmup-iters 500 --clip-grad 1.0 --bf16
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --expert-model-parallel-size 8
        --use-distributed-optimizer --sequence-parallel
        --log-interval 1 --save-interval 10000 --eval-interval 1000 --eval-iters 10 --save {ckpt} --load {ckpt}
        --tensorboard-dir {ckpt}/tensorboard --no-load-optim --no-load-rng
    """.split()
    args = parse_args(script, world_size=32)
    assert (args.data_parallel_size, args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)) == \
        (8, 32)
    assert args.padded_vocab_size == 128  # 25 pieces padded to a multiple of 128
    c = args_to_config(args)
    assert (c.num_query_groups, c.ffn_hidden_size, c.moe_ffn_hidden_size, c.rotary_base) == (8, 14336, 14336, 1000000)
    assert (c.pipeline_model_parallel_size, c.expert_model_parallel_size, c.sequence_parallel) == (4, 8, False)


def test_megatron_gpt3_launch_script_parses(tmp_path):
    """examples/gpt3/train_gpt3_175b_distributed.sh (no tokenizer type: vocab + merge file mean GPT-2 BPE)."""
    from selfmoe.data.tokenizers import bundled_gpt2_files

    vocab, merges = bundled_gpt2_files()
    data = fake_dataset(tmp_path, "gpt_text_document")
    script = f"""
        --num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048
        --max-position-embeddings 2048 --attention-backend auto
        --micro-batch-size 1 --global-batch-size 1536 --train-iters 500000 --weight-decay 0.1
        --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16 --lr 6.0e-5
        --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16
        --data-path {data} --vocab-file {vocab} --merge-file {merges} --split 949,50,1
        --log-interval 100 --save-interval 10000 --eval-interval 1000 --eval-iters 10
    """.split()
    args = parse_args(script, world_size=128)
    assert args.tokenizer_type == "GPT2BPETokenizer"
    assert args.padded_vocab_size == 51200  # 50257 padded to a multiple of 128 * 8
    assert args.num_experts is None and args.ffn_hidden_size == 4 * 12288
    assert parse(["--num-experts", "0"]).num_experts is None  # 0 = dense: turns a demo's experts off
    assert args_to_config(args).num_moe_experts is None


# --------------------------------------------------------------- in-process error messages

@pytest.mark.parametrize("extra,world,flag", [
    (["--num-experts", "128", "--hidden-size", "64", "--disable-bias-linear", "--moe-router-type", "self"], 1, "--num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "5", "--disable-bias-linear"], 1, "--moe-router-topk"),
    (["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size"),
    (["--num-experts", "3", "--moe-router-topk", "1", "--expert-model-parallel-size", "2",
      "--disable-bias-linear"], 2, "--expert-model-parallel-size"),
    (["--global-batch-size", "7"], 1, "--global-batch-size"),
    (["--min-lr", "1"], 1, "--min-lr"),
    (["--num-experts", "4", "--moe-router-type", "routing-free", "--routing-free-mu", "2"], 1, "--routing-free-mu"),
    (["--num-experts", "4", "--disable-bias-linear", "--moe-router-type", "self", "--self-routing-subspace", "1,2,3"], 1,
     "--self-routing-subspace"),
    (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters"),
])
def test_validation_errors_name_the_flag(extra, world, flag):
    msg = raw_error(BASE + extra, world)
    assert flag in msg and "\n" not in msg


# -------------------------------------------------------- subprocess: one line, exit code 2

CLI_ERRORS = {
    "self-routing-E>H": (["--num-experts", "256", "--moe-router-type", "self"], {}, "--num-experts"),
    "topk>E": (["--moe-router-topk", "9"], {}, "--moe-router-topk"),
    "world%tp": (["--tensor-model-parallel-size", "2"], {"WORLD_SIZE": "3"}, "--tensor-model-parallel-size"),
    "E%ep": (["--num-experts", "6", "--expert-model-parallel-size", "4"], {"WORLD_SIZE": "4"},
             "--expert-model-parallel-size"),
    "gbs%mbs*dp": (["--micro-batch-size", "3", "--global-batch-size", "8"], {}, "--global-batch-size"),
    "missing-data": (["--data-path", "/nonexistent/corpus_text_document"], {}, "--data-path"),
    "unknown-flag": (["--no-such-flag"], {}, "--no-such-flag"),
    "bad-router": (["--moe-router-type", "magic"], {}, "--moe-router-type"),
    # issue 10 kind 2: domains and lenient parsers, checked before anything is built
    "theta-0": (["--moe-router-type", "routing-free", "--routing-free-theta", "0"], {}, "--routing-free-theta"),
    "split-abc": (["--mock-data", "--split", "abc"], {}, "--split"),
}


@pytest.fixture(scope="module")
def cli_errors():
    """Run every bad command line at once (each pays the ~5 s import), collect (rc, stdout, stderr)."""
    def run(case):
        argv, env_extra, _ = CLI_ERRORS[case]
        env = dict(os.environ, **env_extra)
        env.pop("RANK", None)
        p = subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        return case, (p.returncode, p.stdout, p.stderr)

    with concurrent.futures.ThreadPoolExecutor(len(CLI_ERRORS)) as pool:
        return dict(pool.map(run, CLI_ERRORS))


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_error_is_one_line_before_any_model(cli_errors, case):
    rc, out, err = cli_errors[case]
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert CLI_ERRORS[case][2] in lines[0]
    assert out == ""  # nothing was built or trained (no parameter count, no iteration)


def test_demo_defaults_apply_only_without_a_model_description():
    from selfmoe.training.arguments import DEMO_DEFAULTS

    demo = parse_args([], demo_defaults=DEMO_DEFAULTS)
    assert demo.demo and (demo.num_layers, demo.hidden_size, demo.num_experts, demo.moe_router_topk) == (4, 128, 8, 2)
    assert demo.moe_router_type == "self" and demo.use_demo_corpus and demo.padded_vocab_size == 50304
    override = parse_args(["--moe-router-type", "learned", "--train-iters", "20"], demo_defaults=DEMO_DEFAULTS)
    assert (override.moe_router_type, override.train_iters, override.lr_warmup_fraction) == ("learned", 20, 0.1)
    explicit = parse_args(BASE, demo_defaults=DEMO_DEFAULTS)  # a model is described: Megatron defaults
    assert not explicit.demo and explicit.num_experts is None and explicit.hidden_dropout == 0.1
    assert math.isclose(explicit.adam_beta2, 0.999)


def test_routing_free_demo_uses_a_fast_lambda_controller_and_says_so():
    """Only the no-model-flags demo: eta 0.1, lambda0 1e-3 (a note lists them); a described model
    keeps the paper's controller; explicit flags and the preset win."""
    from selfmoe.training.arguments import DEMO_DEFAULTS

    def controller(a):
        return a.routing_free_lambda_rule, a.routing_free_eta, a.routing_free_lambda0

    demo = parse_args(["--moe-router-type", "routing-free"], demo_defaults=DEMO_DEFAULTS)
    assert controller(demo) == ("sign", 0.1, 1e-3)
    assert any(n.startswith("demo: routing-free lambda controller") and "--routing-free-eta 0.1" in n for n in demo.notes)
    flag = parse_args(["--moe-router-type", "routing-free", "--routing-free-eta", "0.05"], demo_defaults=DEMO_DEFAULTS)
    assert controller(flag) == ("sign", 0.05, 1e-3) and "--routing-free-eta" not in " ".join(flag.notes)
    preset = parse_args(["--moe-router-type", "routing-free", "--routing-free-preset", "reference"],
                        demo_defaults=DEMO_DEFAULTS)
    assert controller(preset) == ("quadratic", 0.2, 1e-5)
    explicit = parse_args(BASE + ["--num-experts", "4", "--moe-router-type", "routing-free"], demo_defaults=DEMO_DEFAULTS)
    assert controller(explicit) == ("sign", 0.02, 1e-10)
    assert not parse_args([], demo_defaults=DEMO_DEFAULTS).notes  # the self-routing demo: no note


def test_interleaved_pipeline_flags():
    """Megatron-LM: num_layers / (pp x layers per virtual stage) chunks per rank; the interleaved
    schedule needs the micro-batches per step to be a multiple of pp."""
    vls = ["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage"]
    args = parse(vls + ["2", "--global-batch-size", "4"], world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2
    assert args_to_config(args).virtual_pipeline_model_parallel_size == 2
    assert parse(vls + ["4", "--global-batch-size", "4"], world_size=2).virtual_pipeline_model_parallel_size is None
    assert raw_error(BASE + ["--num-layers-per-virtual-pipeline-stage", "1"]) == \
        "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"
    assert raw_error(BASE + vls + ["3"], world_size=2) == ("--num-layers 8 is not divisible by "
                                                          "--pipeline-model-parallel-size 2 x "
                                                          "--num-layers-per-virtual-pipeline-stage 3")
    assert raw_error(BASE + vls + ["2", "--global-batch-size", "6"], world_size=2).startswith(
        "the interleaved pipeline needs the micro-batches per step (3 = --global-batch-size")


@pytest.mark.parametrize("extra, ignored", [
    (["--num-experts", "4", "--self-routing-subspace", "1,2", "--routing-free-theta", "2"],
     ["--self-routing-subspace", "--routing-free-theta"]),  # default router: learned
    (["--num-experts", "4", "--moe-router-type", "self", "--routing-free-rank=8", "--self-routing-subspace", "first"],
     ["--routing-free-rank"]),
    (["--num-experts", "4", "--moe-router-type", "routing-free", "--self-routing-temperature", "2",
      "--routing-free-theta", "2"], ["--self-routing-temperature"]),
    (["--routing-free-theta", "2", "--self-routing-temperature", "2"],  # dense
     ["--self-routing-temperature", "--routing-free-theta"]),
])
def test_another_routers_flags_are_listed_as_ignored(extra, ignored):
    """A router's own flag given for another router or the dense model is listed as ignored with a
    reason (it used to be dropped silently); the flags of the router in use are not listed."""
    args = parse(extra)
    listed = [f for f in args.ignored_flags if f.startswith(("--self-routing-", "--routing-free-"))]
    assert listed == ignored
    assert all("only --moe-router-type" in args.ignored_reasons[f] for f in listed)


def test_vocab_size_with_a_real_tokenizer_is_listed_as_ignored(tmp_path):
    """--vocab-size sizes only NullTokenizer; with GPT-2's BPE it changed nothing and was not said."""
    demo = str(tmp_path / "corpus_text_document")  # flag parsing checks only that the files exist
    for ext in (".bin", ".idx"):
        open(demo + ext, "wb").close()
    argv = [a for a in BASE if a not in ("--mock-data",)]
    argv = argv[:argv.index("--tokenizer-type")] + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "1000",
                                                     "--data-path", demo, "--split", "98,2,0"]
    args = parse_args(argv, world_size=1)
    assert args.padded_vocab_size == 50304  # GPT-2's 50,257 ids padded to 128: --vocab-size had no effect
    assert "--vocab-size" in args.ignored_flags and "GPT2BPETokenizer has 50257 ids" in args.ignored_reasons["--vocab-size"]
    assert "--vocab-size" not in parse([]).ignored_flags  # NullTokenizer reads it
