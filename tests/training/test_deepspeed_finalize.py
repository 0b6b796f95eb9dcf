"""The --deepspeed path does what megatron-core's finalize_model_grads does after the backward.

Reference: the Megatron-Core path on the same flags and seed. After N steps with the
aux-loss-free expert bias (sigmoid scores), every buffer of the model (expert_bias, the
per-step token counters) and every loss equal the Megatron path's; before the fix the DeepSpeed
path left expert_bias at zero.
"""

import os

import pytest
import torch

from helpers import run_script, tb_scalars
from selfmoe.training import gpt
from selfmoe.training.arguments import args_to_config, parse_args
from selfmoe.training.trainer import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--num-layers", "2",
         "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--max-position-embeddings", "16",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
         "--lr-warmup-iters", "0", "--eval-iters", "0", "--num-experts", "4", "--moe-router-topk", "2",
         "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1"]
ROUTERS = {
    "learned": ["--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"],
    # a fast-moving λ (its update follows the step's density on both paths)
    "routing-free": ["--moe-router-type", "routing-free", "--routing-free-rank", "8", "--routing-free-lambda0", "0.05",
                     "--routing-free-eta", "0.5"],
}


def train(flags):
    built = []

    def provider(*a, **k):
        built.append(gpt.model_provider(*a, **k))
        return built[-1]

    args = parse_args(flags)
    out = pretrain(args, args_to_config(args), provider, gpt.forward_step, gpt.datasets_provider)
    return out["losses"], {k: v.detach().clone() for k, v in built[0].named_buffers()}


@pytest.mark.parametrize("router", ["learned", pytest.param("routing-free", marks=pytest.mark.slow)])
def test_deepspeed_buffers_equal_megatron_path(router):
    flags = BASE + ROUTERS[router]
    losses, buffers = train(flags)
    ds_losses, ds_buffers = train(flags + ["--deepspeed", "--deepspeed-config",
                                           os.path.join(REPO, "examples", "deepspeed", "zero2.json")])
    moving = [k for k in buffers if k.endswith("expert_bias" if router == "learned" else "balance_coeff")]
    start = 0.0 if router == "learned" else 0.05
    assert len(moving) == 2 and all((buffers[k] - start).abs().max() > 0 for k in moving)  # they moved
    assert ds_buffers.keys() == buffers.keys()
    for k in buffers:
        torch.testing.assert_close(ds_buffers[k], buffers[k], rtol=1e-5, atol=1e-6, msg=k)
    assert ds_losses == pytest.approx(losses, rel=1e-5)


@pytest.mark.slow
def test_deepspeed_tp2_sp_equals_megatron_path(tmp_path):
    """TP=2 + SP on 2 ranks: layernorm (and router) weights see only their rank's sequence shard,
    so their grads must be summed over TP, as finalize_model_grads does; else the ranks' copies
    drift and the losses leave the Megatron path's."""
    flags = BASE + ROUTERS["learned"] + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                         "--train-iters", "4", "--global-batch-size", "2"]
    run_script("pretrain_gpt.py", flags + ["--tensorboard-dir", str(tmp_path / "mc")], nproc=2)
    run_script("pretrain_gpt.py", flags + ["--tensorboard-dir", str(tmp_path / "ds"), "--deepspeed", "--deepspeed-config",
                 os.path.join(REPO, "examples", "deepspeed", "zero2.json")], nproc=2)
    ref, got = tb_scalars(tmp_path / "mc", "lm loss"), tb_scalars(tmp_path / "ds", "lm loss")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    assert got == pytest.approx(ref, rel=1e-5)
