"""The --deepspeed path does what megatron-core's finalize_model_grads does after the backward.

Reference: the Megatron-Core path on the same flags and seed. After N steps with the
aux-loss-free expert bias (sigmoid scores), every buffer of the model (expert_bias, the
per-step token counters) and every loss equal the Megatron path's; before the fix the DeepSpeed
path left expert_bias at zero.
"""

import os

import pytest
import torch

from selfmoe.training import gpt
from selfmoe.training.arguments import args_to_config, parse_args
from selfmoe.training.trainer import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--num-layers", "2",
         "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--max-position-embeddings", "16",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
         "--lr-warmup-iters", "0", "--eval-iters", "0", "--num-experts", "4", "--moe-router-topk", "2",
         "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid", "--log-interval", "1"]


def train(extra):
    built = []

    def provider(*a, **k):
        built.append(gpt.model_provider(*a, **k))
        return built[-1]

    args = parse_args(FLAGS + extra)
    out = pretrain(args, args_to_config(args), provider, gpt.forward_step, gpt.datasets_provider)
    return out["losses"], {k: v.detach().clone() for k, v in built[0].named_buffers()}


def test_deepspeed_buffers_equal_megatron_path():
    losses, buffers = train([])
    ds_losses, ds_buffers = train(["--deepspeed", "--deepspeed-config",
                                   os.path.join(REPO, "examples", "deepspeed", "zero2.json")])
    bias = [k for k in buffers if k.endswith("expert_bias")]
    assert len(bias) == 2 and all(buffers[k].abs().max() > 0 for k in bias)  # it moved (±rate per step)
    assert ds_buffers.keys() == buffers.keys()
    for k in buffers:
        torch.testing.assert_close(ds_buffers[k], buffers[k], rtol=1e-5, atol=1e-6, msg=k)
    assert ds_losses == pytest.approx(losses, rel=1e-5)
