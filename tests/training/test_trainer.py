"""The shared training loop on real Megatron-Core: loss falls for every router, NaN steps are
skipped, a NaN streak stops the run, NaN weights are never saved, DP=2 equals gradient accumulation,
Megatron-Core's distributed optimizer equals the plain one and resumes, bf16/fp16 train on CPU.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import tb_scalars
from selfmoe.training import gpt
from selfmoe.training.arguments import args_to_config, parse_args
from selfmoe.training.trainer import TrainingDiverged, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "3", "--lr-decay-style", "cosine",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--disable-bias-linear", "--log-interval", "10"]
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]


@pytest.fixture(scope="module")
def data_flags():
    """The bundled Shakespeare corpus (GPT-2 tokens) when it can be built, else Megatron's mock data."""
    try:
        from selfmoe.data.corpus import ensure_demo_corpus

        ensure_demo_corpus(quiet=True)
        return []  # no data flag: the trainer uses the demo corpus
    except Exception:  # noqa: BLE001 - no corpus module, or no way to fetch the text
        return MOCK


def run(argv, forward_step=gpt.forward_step):
    args = parse_args(argv)
    return pretrain(args, args_to_config(args), gpt.model_provider, forward_step, gpt.datasets_provider), args


ROUTERS = {
    "dense": [],
    "learned": ["--num-experts", "4", "--moe-router-type", "learned", "--moe-aux-loss-coeff", "1e-2"],
    "self": ["--num-experts", "4", "--moe-router-type", "self"],
    "random": ["--num-experts", "4", "--moe-router-type", "random"],
    "hash": ["--num-experts", "4", "--moe-router-type", "hash"],
    "routing-free": ["--num-experts", "4", "--moe-router-type", "routing-free", "--routing-free-rank", "8"],
}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_loss_decreases(router, data_flags):
    out, args = run(TINY + data_flags + ROUTERS[router] + ["--train-iters", "20", "--eval-interval", "20",
                                                           "--eval-iters", "2"])
    losses = [out["losses"][i] for i in range(1, 21)]
    # Independent reference: a freshly initialised LM predicts ~uniformly over the padded vocabulary.
    assert losses[0] == pytest.approx(math.log(args.padded_vocab_size), abs=0.3)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert all(math.isfinite(x) for x in losses)
    val_iteration, val_loss = out["validation"][-1]
    assert val_iteration == 20 and val_loss < losses[0] - 1.0
    assert out["final_val_ppl"] == pytest.approx(math.exp(val_loss))
    if router == "dense":
        assert out["routing_entropy"] is None
    else:
        assert 0.0 < out["routing_entropy"] <= 1.0


def nan_forward_step(bad_steps):
    """gpt.forward_step whose loss is NaN on the given training steps (1 micro-batch per step)."""
    calls = {"n": 0}

    def forward_step(data_iterator, model):
        output, loss_func = gpt.forward_step(data_iterator, model)
        if not torch.is_grad_enabled():  # validation
            return output, loss_func
        calls["n"] += 1
        if calls["n"] not in bad_steps:
            return output, loss_func

        def nan_loss(output_tensor):
            loss, n, report = loss_func(output_tensor)
            return loss * float("nan"), n, {k: v * float("nan") for k, v in report.items()}

        return output, nan_loss

    return forward_step


def test_nan_step_is_skipped_and_reported(capsys):
    out, _ = run(TINY + MOCK + ["--num-experts", "4", "--train-iters", "8", "--eval-interval", "100",
                                "--eval-iters", "1"], forward_step=nan_forward_step({3}))
    assert out["skipped_iterations"] == 1
    assert sorted(out["losses"]) == [1, 2, 4, 5, 6, 7, 8]  # iteration 3 produced no loss, training went on
    assert all(math.isfinite(v) for v in out["losses"].values())
    assert out["losses"][8] < out["losses"][1]
    assert "iteration 3: lm loss is NaN/Inf; update skipped" in capsys.readouterr().out


def test_nan_streak_stops_the_run():
    with pytest.raises(TrainingDiverged, match=r"5 consecutive iterations .* iteration 6"):
        run(TINY + MOCK + ["--train-iters", "20", "--eval-iters", "0"], forward_step=nan_forward_step(set(range(2, 99))))


def test_nan_weights_are_never_saved(tmp_path):
    from selfmoe.training.checkpointing import TRACKER_FILE, CheckpointError, save_checkpoint
    from selfmoe.training.distributed import destroy_distributed, init_distributed, set_random_seed
    from selfmoe.training.trainer import build_model, build_optimizer

    args = parse_args(TINY + MOCK + ["--train-iters", "10"])
    config = args_to_config(args)
    init_distributed(args)
    try:
        set_random_seed(args.seed)
        model = build_model(args, config, gpt.model_provider)
        optimizer, scheduler = build_optimizer(args, model)
        with torch.no_grad():
            next(model[0].parameters()).view(-1)[0] = float("nan")
        with pytest.raises(CheckpointError, match="NaN"):
            save_checkpoint(str(tmp_path), 1, model, optimizer, scheduler, config, consumed_train_samples=0)
    finally:
        destroy_distributed()
    assert os.listdir(tmp_path) == []  # refused before anything was written
    assert not os.path.exists(tmp_path / TRACKER_FILE)


def read_tb_losses(logdir):
    return tb_scalars(logdir, "lm loss")


@pytest.mark.slow
def test_two_data_parallel_ranks_equal_gradient_accumulation(tmp_path):
    """DP=2 with one micro-batch each == one rank with two micro-batches (Megatron's sampler order)."""
    flags = TINY + MOCK + ["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "4",
                           "--train-iters", "6", "--eval-iters", "0"]
    single, _ = run(flags)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "pretrain_gpt.py", *flags, "--tensorboard-dir", str(tmp_path / "tb")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "data-parallel 2" in p.stdout
    two = read_tb_losses(tmp_path / "tb")
    assert sorted(two) == list(range(1, 7))
    for i in range(1, 7):
        assert two[i] == pytest.approx(single["losses"][i], rel=1e-5)


def torchrun2(flags, tmp_path, name):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "pretrain_gpt.py", *flags, "--tensorboard-dir", str(tmp_path / name)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return read_tb_losses(tmp_path / name), p.stdout


@pytest.mark.slow
def test_distributed_optimizer_equals_plain_and_resumes_on_another_dp_size(tmp_path):
    """--use-distributed-optimizer (state sharded over 2 DP ranks, on CPU via cpu_compat) follows the
    one-rank plain-optimizer curve (< 1e-5: only reduction order differs); its checkpoint resumes on
    one rank onto the same curve, which needs the Adam moments and step restored; without the flag
    the optimizer state is refused in one line."""
    flags = TINY + MOCK + ["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "4",
                           "--train-iters", "6", "--eval-iters", "0"]
    single, _ = run(flags)
    ck = ["--save", str(tmp_path / "ck"), "--save-interval", "3", "--use-distributed-optimizer"]
    two, out = torchrun2(flags + ck + ["--exit-interval", "3"], tmp_path, "do")
    assert "optimizer DistributedOptimizer (adam, fp32 model)" in out
    assert sorted(two) == [1, 2, 3]
    resumed, _ = run(flags + ["--load", str(tmp_path / "ck"), "--use-distributed-optimizer"])
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for i in range(1, 7):
        assert {**two, **resumed["losses"]}[i] == pytest.approx(single["losses"][i], rel=1e-5), i
    from selfmoe.training.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match="it was saved with --use-distributed-optimizer; pass --no-load-optim"):
        run(flags + ["--load", str(tmp_path / "ck")])


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_half_precision_trains_on_cpu(precision, capsys):
    """Megatron-Core's Float16Module + mixed-precision optimizer, as on GPU: the curve stays within
    half-precision rounding of fp32 (rel 1e-2) but is not the fp32 curve."""
    flags = TINY + MOCK + ["--num-experts", "4", "--global-batch-size", "4", "--train-iters", "4", "--eval-iters",
                           "0", "--initial-loss-scale", "1024"]
    ref, _ = run(flags)
    half, args = run(flags + [precision])
    assert f"{precision[2:]} model" in capsys.readouterr().out and not args.ignored_flags
    assert half["skipped_iterations"] == 0
    assert [half["losses"][i] for i in range(1, 5)] == pytest.approx([ref["losses"][i] for i in range(1, 5)], rel=1e-2)
    assert [half["losses"][i] for i in range(2, 5)] != [ref["losses"][i] for i in range(2, 5)]


def test_logged_aux_loss_is_the_mean_over_moe_layers_not_all_layers(mp):
    """With --moe-layer-freq 2 only layers 1 and 3 of 4 are MoE layers: the logged load-balancing
    loss is the mean of their two values (dense layers record nothing), per micro-batch."""
    from megatron.core.num_microbatches_calculator import (destroy_num_microbatches_calculator,
                                                           init_num_microbatches_calculator)
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    from selfmoe.config import make_config
    from selfmoe.training.trainer import moe_aux_losses

    cfg = make_config("gpt2", num_layers=4, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                      moe_router_topk=2, moe_layer_freq=2, vocab_size=64, seq_length=8)
    init_num_microbatches_calculator(0, None, 4, 2, 1)  # 2 micro-batches of 2
    try:
        for layer, value in ((1, 0.2), (3, 0.4)):
            for _ in range(2):  # one record per micro-batch
                save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(value), layer, cfg.num_layers)
        assert moe_aux_losses(cfg)["load_balancing_loss"] == pytest.approx(0.3)
    finally:
        destroy_num_microbatches_calculator()


def test_a_second_run_in_the_process_with_more_mtp_depths_trains(tmp_path):
    """megatron-core's MoE and MTP loss trackers are process-global and sized by the first model
    that writes them; `pretrain` empties them, so a second run with 2 MTP depths after one with 1
    (tests, notebooks) trains and logs both depths instead of indexing past the old entries."""
    from helpers import tb_scalars

    base = TINY + MOCK + ROUTERS["routing-free"] + ["--train-iters", "2", "--log-interval", "1", "--eval-iters", "0",
                                                    "--lr-warmup-iters", "0"]
    run(base + ["--mtp-num-layers", "1"])
    run(base + ["--mtp-num-layers", "2", "--tensorboard-dir", str(tmp_path)])
    for tag in ("mtp_1 loss", "mtp_2 loss", "routing_free_balance_loss"):
        assert sorted(tb_scalars(tmp_path, tag)) == [1, 2], tag
