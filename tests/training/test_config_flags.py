"""Flags derived from megatron-core's TransformerConfig; no flag accepted and silently dropped;
every numeric flag checked against its domain before any model is built."""

import dataclasses
import enum
import glob
import os
import re

import pytest

from selfmoe.training import config_flags
from selfmoe.training.arguments import IGNORED_FLAGS, ArgumentError, args_to_config, build_parser, parse_args, validate_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 500").split()
MOE = ["--num-experts", "4", "--disable-bias-linear"]


def parse(extra):
    return parse_args(BASE + list(extra))


def error_of(extra) -> str:
    args = build_parser().parse_args(BASE + list(extra))
    args.demo, args.ignored_flags, args.notes = False, [], []
    with pytest.raises(ArgumentError) as e:
        validate_args(args, 1)
        args_to_config(args)
    return str(e.value)


# ------------------------------------------------------------------------------ derivation

def test_every_config_field_is_a_flag_or_named_as_not_one():
    from megatron.core.transformer.transformer_config import TransformerConfig

    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    hand_written = {"num_moe_experts": "num_experts", "layernorm_epsilon": "norm_epsilon"}
    for f in dataclasses.fields(TransformerConfig):
        if f.name in config_flags.NOT_FLAGS:
            continue
        assert hand_written.get(f.name, f.name) in dests, f"TransformerConfig.{f.name} has no flag"


def test_derived_flags_follow_megatron_lm_spelling_types_and_docs():
    parser = build_parser()
    by_flag = parser._option_string_actions
    assert by_flag["--moe-shared-expert-intermediate-size"].type is int
    assert by_flag["--moe-router-num-groups"].default is None
    assert by_flag["--recompute-granularity"].choices == ("full", "selective")
    assert by_flag["--fp8-format"].dest == "fp8"                  # Megatron-LM's name for TransformerConfig.fp8
    assert by_flag["--no-clone-scatter-output-in-embedding"].const is False  # default-True bools: --no-/--disable-
    assert by_flag["--disable-clone-scatter-output-in-embedding"].dest == "clone_scatter_output_in_embedding"
    assert "query and key" in by_flag["--qk-layernorm"].help      # hand-written, still a config field
    assert "shared expert" in by_flag["--moe-shared-expert-intermediate-size"].help.lower()  # from the field's doc


def test_a_new_megatron_core_field_is_a_new_flag_without_code(monkeypatch):
    from megatron.core.transformer.transformer_config import TransformerConfig

    @dataclasses.dataclass
    class NewerConfig(TransformerConfig):
        moe_router_new_knob: float = 0.5
        """A knob a later megatron-core adds."""

    monkeypatch.setattr(config_flags, "_config_classes", lambda: NewerConfig)
    config_flags.derived_flags.cache_clear()
    try:
        action = build_parser()._option_string_actions["--moe-router-new-knob"]
        assert (action.type, action.default) == (float, 0.5) and "later megatron-core" in action.help
    finally:
        config_flags.derived_flags.cache_clear()


# ------------------------------------------------------------- no flag silently dropped

# flags that need companions (or a particular value) to mean anything
COMPANIONS = {
    "--moe-router-num-groups": MOE + ["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"],
    "--moe-router-group-topk": MOE + ["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"],
    "--recompute-method": ["--recompute-granularity", "full", "--recompute-method", "block",
                           "--recompute-num-layers", "1"],
    "--recompute-num-layers": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                               "--recompute-num-layers", "1"],
    "--recompute-modules": ["--recompute-granularity", "selective", "--recompute-modules", "mlp"],
    "--distribute-saved-activations": ["--distribute-saved-activations", "--recompute-granularity", "full",
                                       "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "--moe-shared-expert-gate": MOE + ["--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate"],
    "--moe-shared-expert-overlap": MOE + ["--moe-shared-expert-intermediate-size", "32", "--moe-token-dispatcher-type",
                                          "alltoall", "--moe-shared-expert-overlap"],
    "--num-query-groups": ["--group-query-attention", "--num-query-groups", "2"],
    "--moe-router-enable-expert-bias": MOE + ["--moe-router-enable-expert-bias", "--moe-router-score-function",
                                              "sigmoid"],
    "--moe-pad-expert-input-to-capacity": MOE + ["--moe-expert-capacity-factor", "1.0",
                                                 "--moe-pad-expert-input-to-capacity"],
    "--moe-token-drop-policy": MOE + ["--moe-expert-capacity-factor", "1.0", "--moe-token-drop-policy", "position"],
    "--sequence-parallel": None,  # means nothing at TP=1 (Megatron-LM clears it); covered by the TP tests
    "--context-parallel-size": None,  # refused on CPU in one line (test_arguments)
    "--use-legacy-models": None,  # refused (below)
    "--ckpt-format": ["--ckpt-format", "fsdp_dtensor"],
    "--exit-on-missing-checkpoint": ["--exit-on-missing-checkpoint"],  # no --load: listed
    "--deepspeed": None, "--deepspeed-config": None,  # test_deepspeed_training
    "--num-layers-per-virtual-pipeline-stage": None,  # needs PP > 1 (test_arguments)
    "--expert-model-parallel-size": None, "--tensor-model-parallel-size": None,
    "--pipeline-model-parallel-size": None, "--expert-tensor-parallel-size": None,  # world size 1 here
    "--moe-router-type": MOE + ["--moe-router-type", "self"],
    "--self-routing-subspace": MOE + ["--moe-router-type", "self", "--self-routing-subspace", "first"],
    "--recompute-granularity": ["--recompute-granularity", "selective"],
    "--moe-aux-loss-coeff": MOE + ["--moe-aux-loss-coeff", "0.01"],
    "--moe-router-load-balancing-type": MOE + ["--moe-router-load-balancing-type", "seq_aux_loss"],
    "--moe-router-pre-softmax": MOE + ["--moe-router-pre-softmax"],
    "--moe-expert-capacity-factor": MOE + ["--moe-expert-capacity-factor", "1.5"],
    "--moe-router-topk-scaling-factor": MOE + ["--moe-router-topk-scaling-factor", "2.0"],
    "--moe-token-dispatcher-type": MOE + ["--moe-token-dispatcher-type", "alltoall"],
    "--no-position-embedding": ["--position-embedding-type", "rope", "--no-position-embedding"],
    "--data-path": None, "--train-data-path": None, "--valid-data-path": None, "--test-data-path": None,
    "--split": None, "--mock-data": None,  # test_arguments (data arguments)
    "--tokenizer-type": None, "--tokenizer-model": None, "--vocab-file": None, "--merge-file": None,
    "--load": None, "--finetune": None, "--no-load-optim": None, "--no-load-rng": None,  # test_checkpointing
    "--use-checkpoint-opt_param-scheduler": None, "--override-opt_param-scheduler": None,
    "--rampup-batch-size": None,  # needs --train-samples and a batch schedule: test_schedule_flags
    "--train-samples": None, "--lr-decay-samples": None, "--lr-warmup-samples": None,  # test_schedule_flags
    "--lr-wsd-decay-samples": None,
    "--moe-layer-freq": None,  # the layer-spec helper's flag
    "--fp16": ["--fp16"], "--rotary-base": ["--position-embedding-type", "rope", "--rotary-base", "500"],
    "--rotary-percent": ["--position-embedding-type", "rope", "--rotary-percent", "0.5"],
    "--rotary-interleaved": ["--position-embedding-type", "rope", "--rotary-interleaved"],
    "--lr-warmup-fraction": ["--lr-warmup-fraction", "0.1"],
    "--lr-warmup-iters": ["--lr-warmup-iters", "2"],
    "--min-lr": ["--min-lr", "1e-5"],
    "--moe-router-bias-update-rate": MOE + ["--moe-router-enable-expert-bias", "--moe-router-score-function",
                                            "sigmoid", "--moe-router-bias-update-rate", "0.01"],
}
MOE_FLAG = re.compile(r"^--(moe-|self-routing-|routing-free-)")


def _changed_argv(action, base_args):
    flag = action.option_strings[0]
    if flag in COMPANIONS:
        return COMPANIONS[flag]
    prefix = MOE if MOE_FLAG.match(flag) else []
    if action.nargs == 0:
        return prefix + [flag]
    if action.choices:
        default = action.default[0] if isinstance(action.default, list) else action.default
        names = [c.name if isinstance(c, enum.Enum) else c for c in action.choices]
        dname = default.name if isinstance(default, enum.Enum) else default
        return prefix + [flag, next(str(c) for c in names if c != dname)]
    default = getattr(base_args, action.dest, None)
    default = action.default if default is None else default
    default = default[0] if isinstance(default, list) else default
    if action.type is int:
        return prefix + [flag, str((default or 1) * 2)]
    if action.type is float:
        value = 0.5 if default in (None, 0, 1) else default / 2
        return prefix + [flag, repr(value)]
    return prefix + [flag, "x"]


def _read_somewhere(dest) -> bool:
    """Whether some code outside the parser reads args.<dest> (the proof for non-config flags)."""
    files = glob.glob(os.path.join(REPO, "selfmoe", "**", "*.py"), recursive=True) + \
        glob.glob(os.path.join(REPO, "pretrain_*.py"))
    pattern = re.compile(rf"args\.{dest}\b|getattr\(args, \"{dest}\"")
    return any(pattern.search(open(f).read()) for f in files)


def test_every_accepted_flag_is_honoured_or_listed_as_ignored():
    """Walk every flag of the parser: giving it (with a non-default value) either changes the config
    the model is built from, is read by the code that trains (data, schedule, logging,
    checkpoints), or lists the flag at start-up as ignored with its reason."""
    from selfmoe.config import config_fingerprint

    parser = build_parser()
    base_args = parse([])
    base = config_fingerprint(args_to_config(base_args))
    problems, walked = [], 0
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.option_strings[0] in COMPANIONS \
                and COMPANIONS[action.option_strings[0]] is None:
            continue
        flag, argv = action.option_strings[0], _changed_argv(action, base_args)
        walked += 1
        try:
            args = parse(argv)
        except SystemExit:
            problems.append(f"{flag}: {argv} refused")
            continue
        listed = any(f.split()[0] == flag for f in args.ignored_flags)
        reasons = getattr(args, "ignored_reasons", {})
        if listed:
            assert all(reasons.get(f) for f in args.ignored_flags), args.ignored_flags
            continue
        fp = config_fingerprint(args_to_config(args))
        moe_base = config_fingerprint(args_to_config(parse(MOE))) if argv[:len(MOE)] == MOE else base
        if fp != moe_base:
            continue
        if getattr(args, action.dest, None) != getattr(base_args, action.dest, None) and _read_somewhere(action.dest):
            continue
        problems.append(f"{flag}: accepted ({argv}) but neither honoured nor listed")
    assert walked > 250
    assert not problems, "\n".join(problems)


def test_every_ignored_flag_has_a_reason_that_is_not_a_cpu_excuse():
    for flag in IGNORED_FLAGS:
        assert config_flags.IGNORED_REASONS.get(flag), flag
    reasons = list(config_flags.IGNORED_REASONS.values()) + [d.needs for d in config_flags.derived_flags() if d.needs]
    assert not [r for r in reasons if "on CPU" in r]  # issue 10, kind 7


def test_exit_on_missing_checkpoint_exits(tmp_path):
    msg = error_of(["--load", str(tmp_path), "--exit-on-missing-checkpoint"])
    assert msg == f"--load {tmp_path}: no checkpoint there, and --exit-on-missing-checkpoint is set"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    args = parse(["--load", str(tmp_path), "--exit-on-missing-checkpoint"])  # a checkpoint is there: accepted
    assert "--exit-on-missing-checkpoint" not in args.ignored_flags


def test_cuda_only_fields_are_honoured_where_cuda_is():
    args = build_parser().parse_args(BASE + ["--cross-entropy-loss-fusion"])
    args.ignored_flags = []
    config_flags.resolve_needs(args, cuda_available=True)
    assert args.cross_entropy_loss_fusion and args.ignored_flags == []
    config_flags.resolve_needs(args, cuda_available=False)
    assert not args.cross_entropy_loss_fusion and args.ignored_reasons["--cross-entropy-loss-fusion"] == "CUDA only"


# --------------------------------------------------------------------------------- domains

DOMAIN_CASES = [
    (["--lr", "-1"], "--lr must be >= 0 (got -1)"),
    (["--min-lr", "-0.1"], "--min-lr must be >= 0 (got -0.1)"),
    (["--init-method-std", "-0.02"], "--init-method-std must be > 0 (got -0.02)"),
    (["--init-method-std", "0"], "--init-method-std must be > 0 (got 0)"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1] (got 1.5)"),
    (["--attention-dropout", "-0.1"], "--attention-dropout must be in [0, 1] (got -0.1)"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0 (got -1)"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0 (got -1)"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1) (got 1)"),
    (["--adam-beta2", "1.5"], "--adam-beta2 must be in [0, 1) (got 1.5)"),
    (["--adam-eps", "0"], "--adam-eps must be > 0 (got 0)"),
    (["--norm-epsilon", "-0.001"], "--norm-epsilon must be > 0 (got -0.001)"),
    (["--lr-warmup-fraction", "2"], "--lr-warmup-fraction must be in [0, 1] (got 2)"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters must be >= 0 (got -1)"),
    (["--rotary-percent", "0"], "--rotary-percent must be in (0, 1] (got 0)"),
    (["--seed", "-1"], "--seed must be >= 0 (got -1)"),
    (["--loss-scale", "0"], "--loss-scale must be > 0 (got 0)"),
    (["--eval-iters", "-1"], "--eval-iters must be >= 0 (got -1)"),
    (["--vocab-size", "0"], "--vocab-size must be > 0 (got 0)"),
    (["--routing-free-theta", "0"], "--routing-free-theta must be > 0 (got 0)"),
    (["--routing-free-theta", "-1"], "--routing-free-theta must be > 0 (got -1)"),
    (["--routing-free-eta", "-0.02"], "--routing-free-eta must be > 0 (got -0.02)"),
    (["--routing-free-lambda0", "-1"], "--routing-free-lambda0 must be >= 0 (got -1)"),
    (["--routing-free-mu", "1.5"], "--routing-free-mu must be in [0, 1] (got 1.5)"),
    (["--routing-free-density-target", "0"], "--routing-free-density-target must be in (0, 1] (got 0)"),
    (["--routing-free-rank", "0"], "--routing-free-rank must be > 0 (got 0)"),
    (["--self-routing-temperature", "0"], "--self-routing-temperature must be > 0 (got 0)"),
    (["--moe-expert-capacity-factor", "-1"], "--moe-expert-capacity-factor must be > 0 (got -1)"),
    (["--moe-aux-loss-coeff", "-0.01"], "--moe-aux-loss-coeff must be >= 0 (got -0.01)"),
    (["--moe-z-loss-coeff", "-1"], "--moe-z-loss-coeff must be >= 0 (got -1)"),
    (["--moe-input-jitter-eps", "0"], "--moe-input-jitter-eps must be > 0 (got 0)"),
    (["--moe-router-bias-update-rate", "-1"], "--moe-router-bias-update-rate must be >= 0 (got -1)"),
    (["--moe-router-topk-scaling-factor", "0"], "--moe-router-topk-scaling-factor must be > 0 (got 0)"),
    # derived from TransformerConfig: the domain comes from the field's name and type
    (["--moe-shared-expert-intermediate-size", "0"], "--moe-shared-expert-intermediate-size must be > 0 (got 0)"),
    (["--moe-router-num-groups", "-2"], "--moe-router-num-groups must be > 0 (got -2)"),
    (["--moe-router-group-topk", "0"], "--moe-router-group-topk must be > 0 (got 0)"),
    (["--recompute-num-layers", "0"], "--recompute-num-layers must be > 0 (got 0)"),
    (["--mtp-num-layers", "-1"], "--mtp-num-layers must be > 0 (got -1)"),
    (["--mtp-loss-scaling-factor", "-1"], "--mtp-loss-scaling-factor must be >= 0 (got -1)"),
    (["--embedding-init-method-std", "-1"], "--embedding-init-method-std must be > 0 (got -1)"),
    (["--moe-router-dtype", "fp16"], None),  # argparse's choices: checked by the subprocess table
    # NaN is outside every domain
    (["--lr", "nan"], "--lr must be >= 0 (got nan)"),
]


@pytest.mark.parametrize("extra,message", [c for c in DOMAIN_CASES if c[1]], ids=lambda x: " ".join(x)
                         if isinstance(x, list) else None)
def test_numeric_flags_outside_their_domain_are_one_line_errors(extra, message):
    assert error_of(MOE + extra) == message


@pytest.mark.parametrize("split", ["abc", "1,a,1", "", "1,2,3,4", "-1,1,1", "0,0,0", "inf,1,1"])
def test_bad_split_is_refused_before_megatron_parses_it(split):
    msg = error_of([f"--split={split}"])
    assert msg.startswith(f"--split {split!r}") and "\n" not in msg


def test_odd_length_blend_is_refused_in_one_line(tmp_path):
    prefix = str(tmp_path / "a")
    for ext in (".bin", ".idx"):
        open(prefix + ext, "wb").close()
    argv = [a for a in BASE if a != "--mock-data"]
    args = build_parser().parse_args(argv + ["--data-path", "0.3", prefix, "0.7"])
    args.demo, args.ignored_flags, args.notes = False, [], []
    with pytest.raises(ArgumentError) as e:
        validate_args(args, 1)
    assert str(e.value) == f"--data-path: a blend is 'weight prefix' pairs, got 3 values (0.3 {prefix} 0.7)"


def test_unwritable_checkpoint_format_is_refused_naming_what_we_write():
    assert error_of(["--ckpt-format", "torch"]) == "--ckpt-format torch: selfmoe writes and reads torch_dist only"
    args = parse(["--ckpt-format", "fsdp_dtensor"])  # Megatron FSDP's format: torch_dist instead, said so
    assert args.ckpt_format == "torch_dist" and "--ckpt-format fsdp_dtensor" in args.ignored_flags
    assert error_of(["--use-legacy-models"]).startswith("--use-legacy-models: selfmoe builds Megatron-Core models")


def test_several_load_balancing_types_each_with_a_coefficient():
    c = args_to_config(parse(MOE + ["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                                    "--moe-aux-loss-coeff", "0.01", "0.001"]))
    assert (c.moe_router_load_balancing_type, c.moe_aux_loss_coeff) == (["aux_loss", "seq_aux_loss"], [0.01, 0.001])
    assert error_of(MOE + ["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff",
                           "0.01", "0.1", "0.2"]).startswith("--moe-aux-loss-coeff: give one coefficient per")


@pytest.mark.slow
def test_every_honoured_config_flag_builds_and_trains_a_model(mp):
    """Each derived flag that is not listed as ignored must build a model megatron-core can run
    forward and backward on this device (a flag that crashes later is not honoured)."""
    import torch

    from selfmoe.models import build_gpt_model

    parser, base_args = build_parser(), parse([])
    derived = {d.field for d in config_flags.derived_flags()}
    failures = []
    for action in parser._actions:
        flag = action.option_strings[0] if action.option_strings else None
        if action.dest not in derived or flag in ("--bf16", "--fp16") or COMPANIONS.get(flag, ()) is None:
            continue  # half precision needs the trainer's Float16Module: test_trainer covers it
        args = parse(_changed_argv(action, base_args))
        if any(f.split()[0] == flag for f in args.ignored_flags):
            continue
        try:
            torch.manual_seed(0)
            model = build_gpt_model(args_to_config(args))
            ids = torch.randint(0, 400, (2, 32))
            model(ids, torch.arange(32)[None].expand(2, 32), None, labels=ids).mean().backward()
        except Exception as e:  # noqa: BLE001 - collected and reported together
            failures.append(f"{flag}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("router", ["random", "hash", "routing-free"])
def test_topk_router_options_are_listed_for_routers_without_scores(router):
    args = parse(MOE + ["--moe-router-type", router, "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
                        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"])
    assert {"--moe-aux-loss-coeff", "--moe-z-loss-coeff", "--moe-router-score-function",
            "--moe-router-enable-expert-bias"} <= set(args.ignored_flags)
    assert "has no learned expert scores" in args.ignored_reasons["--moe-aux-loss-coeff"]
    for scored in ("learned", "self"):  # TopKRouter subclasses: honoured
        assert not parse(MOE + ["--moe-router-type", scored, "--moe-aux-loss-coeff", "0.01"]).ignored_flags


VIT_BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --micro-batch-size 2 --train-iters 10 "
            "--lr 1e-3 --img-h 28 --img-w 28 --num-channels 1 --num-classes 10 --patch-dim 7").split()
VIT_VALUES = {"--vit-pool": ["--vit-pool", "mean"], "--auto-augment": ["--auto-augment", "rand-m9-mstd0.5-inc1"],
              "--repeated-aug": ["--repeated-aug", "3"], "--mixup": ["--mixup", "0.8"], "--cutmix": ["--cutmix", "1.0"],
              "--num-workers": ["--num-workers", "0"], "--patch-dim": ["--patch-dim", "4"],
              # the image geometry of the bundled demo data is fixed (Fashion-MNIST): other values need
              # --data-path images (tests/training/test_vit_training.py, tests/data/test_images.py)
              "--img-h": None, "--img-w": None, "--num-channels": None, "--num-classes": None}


def test_every_vision_flag_is_honoured_or_listed_as_ignored():
    """pretrain_vit.py's own flags (Megatron-LM's vision names and the DeiT recipe's) in the same
    walk: a non-default value is accepted and read by the code that trains, or listed as ignored."""
    from selfmoe.training.vit import add_vision_args, prepare_vision_args, validate_vision_data

    gpt_dests = {a.dest for a in build_parser()._actions}
    vision = [a for a in build_parser(add_vision_args)._actions if a.option_strings and a.dest not in gpt_dests]
    base = parse_args(VIT_BASE, extra_args_provider=add_vision_args, prepare_args=prepare_vision_args,
                      validate_data=validate_vision_data)
    problems = []
    for action in vision:
        flag = action.option_strings[0]
        if flag in VIT_VALUES and VIT_VALUES[flag] is None:
            continue
        argv = VIT_VALUES.get(flag) or _changed_argv(action, base)
        try:
            args = parse_args(VIT_BASE + argv, extra_args_provider=add_vision_args, prepare_args=prepare_vision_args,
                              validate_data=validate_vision_data)
        except SystemExit:
            problems.append(f"{flag}: {argv} refused")
            continue
        if any(f.split()[0] == flag for f in args.ignored_flags):
            continue
        if getattr(args, action.dest) == getattr(base, action.dest) or not _read_somewhere(action.dest):
            problems.append(f"{flag}: accepted ({argv}) but neither honoured nor listed")
    assert len(vision) >= 20 and not problems, "\n".join(problems)
