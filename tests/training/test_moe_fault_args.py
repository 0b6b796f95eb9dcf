"""Issue 9 at the command line: top-1 for routers without a softmax; ETP != TP (refused under --deepspeed)."""

import pytest

from selfmoe.training.arguments import ArgumentError, args_to_config, build_parser, parse_args, validate_args

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 500 "
        "--num-experts 4 --disable-bias-linear").split()


@pytest.mark.parametrize("router", ["hash", "random", "routing-free"])
def test_top1_without_softmax_is_accepted(router):
    args = parse_args(BASE + ["--moe-router-type", router, "--moe-router-topk", "1"])
    assert args_to_config(args).moe_router_topk == 1


def validated(argv, world_size=1):
    args = build_parser().parse_args(BASE + argv)
    args.demo, args.ignored_flags, args.notes = False, [], []
    validate_args(args, world_size)
    return args


def test_top1_learned_still_needs_pre_softmax():
    with pytest.raises(ArgumentError, match="pre-softmax"):
        args_to_config(validated(["--moe-router-type", "learned", "--moe-router-topk", "1"]))


@pytest.mark.parametrize("tp,etp", [(2, 1), (1, 2)])
def test_expert_tensor_parallel_size_other_than_tp(tmp_path, tp, etp):
    """Megatron-Core path: accepted (mcore_compat reduces expert grads over the expert-DP group;
    tests/distributed/test_expert_tensor_parallel.py); --deepspeed: refused in one line."""
    layout = ["--tensor-model-parallel-size", str(tp), "--sequence-parallel", "--expert-tensor-parallel-size", str(etp)]
    assert validated(layout, world_size=2).expert_tensor_parallel_size == etp
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ArgumentError) as e:
        validated(layout + ["--deepspeed", "--deepspeed-config", str(cfg)], world_size=2)
    msg = str(e.value)
    assert "--expert-tensor-parallel-size" in msg and "--deepspeed" in msg and "\n" not in msg


@pytest.mark.parametrize("extra,flag", [
    (["--moe-router-type", "routing-free", "--moe-expert-capacity-factor", "1.0"], "--moe-expert-capacity-factor"),
    (["--moe-pad-expert-input-to-capacity"], "--moe-pad-expert-input-to-capacity"),
])
def test_capacity_flags_that_would_be_dropped_are_refused(extra, flag):
    with pytest.raises(ArgumentError) as e:
        validated(extra)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)
