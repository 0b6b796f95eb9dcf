"""Megatron-LM's sample-based schedule, WSD, and the time-based exit, against hand-computed values."""

import types

import pytest

from selfmoe.training.arguments import ArgumentError, build_parser, parse_args, validate_args
from selfmoe.training.trainer import build_scheduler

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--global-batch-size 4 --lr 1.0 --min-lr 0.1 --mock-data --tokenizer-type NullTokenizer "
        "--vocab-size 60").split()


def lrs(extra, steps):
    """The learning rate after each of `steps` optimizer steps (the scheduler counts samples)."""
    args = parse_args(BASE + extra)
    opt = types.SimpleNamespace(param_groups=[{"lr": 0.0, "weight_decay": 0.0}])
    sched = build_scheduler(args, opt)
    out = []
    for _ in range(steps):
        sched.step(increment=args.global_batch_size)
        out.append(opt.param_groups[0]["lr"])
    return args, out


def error_of(extra):
    args = build_parser().parse_args(BASE + extra)
    args.demo, args.ignored_flags, args.notes = False, [], []
    with pytest.raises(ArgumentError) as e:
        validate_args(args, 1)
    return str(e.value)


def test_sample_based_schedule_equals_the_iteration_based_one():
    args, by_samples = lrs(["--train-samples", "40", "--lr-decay-samples", "32", "--lr-warmup-samples", "8",
                            "--lr-decay-style", "cosine"], 10)
    assert args.train_iters == 10  # 40 samples / global batch 4
    _, by_iters = lrs(["--train-iters", "10", "--lr-decay-iters", "8", "--lr-warmup-iters", "2",
                       "--lr-decay-style", "cosine"], 10)
    assert by_samples == pytest.approx(by_iters)
    assert by_samples[0] == pytest.approx(0.5)  # warmup: 4 of 8 samples -> half of --lr
    assert by_samples[7:] == pytest.approx([0.1] * 3)  # decayed to --min-lr after 32 samples


def test_wsd_holds_then_decays_over_the_last_iterations():
    _, lr = lrs(["--train-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
                 "--lr-wsd-decay-iters", "4"], 10)
    # stable at --lr for iterations 1..6, then linear from 1.0 to 0.1 over the last 4 (hand formula)
    assert lr[:6] == pytest.approx([1.0] * 6)
    assert lr[6:] == pytest.approx([1.0 - 0.9 * k / 4 for k in (1, 2, 3, 4)])


def test_validation_during_rampup_uses_the_full_global_batch(tmp_path):
    """As Megatron-LM's evaluate: each eval iteration is --global-batch-size samples whatever the
    ramp-up's current batch, so every evaluation sees the same batches. With lr 0 the weights stay
    put, so all 7 validation losses (batches 2, 2, 4, 6, 8, 8, 8 in training) equal the one of a run
    without ramp-up; before, the first ones used the current, smaller batch."""
    from helpers import tb_scalars
    from selfmoe.training import gpt
    from selfmoe.training.arguments import args_to_config
    from selfmoe.training.trainer import pretrain

    flags = BASE + ["--global-batch-size", "8", "--micro-batch-size", "1", "--lr", "0", "--min-lr", "0",
                    "--eval-iters", "1", "--eval-interval", "1", "--seq-length", "8", "--seed", "3"]
    ramp = parse_args(flags + ["--train-samples", "40", "--rampup-batch-size", "2", "2", "12",
                               "--tensorboard-dir", str(tmp_path / "ramp")])
    pretrain(ramp, args_to_config(ramp), gpt.model_provider, gpt.forward_step, gpt.datasets_provider)
    plain = parse_args(flags + ["--train-samples", "8", "--tensorboard-dir", str(tmp_path / "plain")])
    pretrain(plain, args_to_config(plain), gpt.model_provider, gpt.forward_step, gpt.datasets_provider)
    got, want = tb_scalars(tmp_path / "ramp", "lm loss validation"), tb_scalars(tmp_path / "plain", "lm loss validation")
    assert sorted(got) == list(range(1, 8)) and sorted(want) == [1]
    assert got == pytest.approx({i: want[1] for i in got}, rel=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--train-iters", "10", "--train-samples", "40"], "give only one of --train-iters and --train-samples"),
    (["--train-iters", "10", "--lr-warmup-samples", "4"], "--lr-warmup-samples needs --train-samples"),
    (["--train-samples", "40", "--lr-decay-iters", "4"], "--lr-decay-iters with --train-samples: give --lr-decay-samples"),
    (["--train-samples", "40", "--lr-warmup-iters", "2"], "--lr-warmup-iters with --train-samples: give "
                                                          "--lr-warmup-samples"),
    (["--train-samples", "3"], "--train-samples 3 is less than one global batch (4)"),
    (["--train-samples", "40", "--lr-warmup-samples", "40"], "--lr-warmup-samples (40) must be smaller than "
                                                             "--lr-decay-samples (40)"),
    (["--train-iters", "10", "--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    ([], "--train-iters (or --train-samples) is required"),
])
def test_schedule_errors_are_one_line(extra, message):
    assert error_of(extra).startswith(message)


def test_exit_duration_saves_and_stops(tmp_path, capsys):
    from selfmoe.training import gpt
    from selfmoe.training.arguments import args_to_config
    from selfmoe.training.trainer import pretrain

    args = parse_args(BASE + ["--train-iters", "5", "--exit-duration-in-mins", "1e-9", "--save", str(tmp_path),
                              "--eval-iters", "0", "--disable-bias-linear"])
    out = pretrain(args, args_to_config(args), gpt.model_provider, gpt.forward_step, gpt.datasets_provider)
    assert out["iteration"] == 1
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert "exiting at iteration 1 (--exit-duration-in-mins 1e-09)" in capsys.readouterr().out


def test_rampup_batch_size_follows_megatron_lms_schedule(tmp_path):
    """--rampup-batch-size 2 2 12 to a global batch of 8: (8 - 2) / 2 = 3 increments, one per 12 / 3 = 4
    consumed samples; the batch is 2 + 2 * floor(consumed / 4) while consumed <= 12, then 8. The
    trainer takes those batches (its lr scheduler counts the samples) and stops after 40 samples'
    worth of steps, as Megatron-LM's update_train_iters counts them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selfmoe.training import gpt
    from selfmoe.training.arguments import args_to_config
    from selfmoe.training.trainer import pretrain

    want, consumed = [], 0
    while consumed <= 12:  # ramp-up
        want.append(2 + 2 * (consumed // 4))
        consumed += want[-1]
    want += [8] * ((40 - consumed) // 8)
    assert want == [2, 2, 4, 6, 8, 8, 8]
    args = parse_args(BASE + ["--global-batch-size", "8", "--micro-batch-size", "1", "--train-samples", "40", "--rampup-batch-size", "2", "2",
                              "12", "--lr", "1e-3", "--min-lr", "0", "--eval-iters", "0", "--log-interval", "1",
                              "--seq-length", "8", "--tensorboard-dir", str(tmp_path)])
    assert args.train_iters == len(want)
    out = pretrain(args, args_to_config(args), gpt.model_provider, gpt.forward_step, gpt.datasets_provider)
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [int(e.value) for e in ea.Scalars("batch-size")] == want
    assert sorted(out["losses"]) == list(range(1, len(want) + 1))


@pytest.mark.parametrize("extra,message", [
    (["--train-iters", "10", "--rampup-batch-size", "2", "2", "8"], "--rampup-batch-size needs --train-samples"),
    (["--train-samples", "40", "--rampup-batch-size", "1", "2", "8"], "--rampup-batch-size 1 2 8: --global-batch-size 4 "
                                                                       "must be larger than the start and reached"),
    (["--train-samples", "40", "--rampup-batch-size", "2", "x", "8"], "--rampup-batch-size takes three integers"),
])
def test_rampup_batch_size_errors_are_one_line(extra, message):
    assert error_of(extra).startswith(message)
