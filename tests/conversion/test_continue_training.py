"""An imported (and an imported-then-upcycled) checkpoint continues in pretrain_gpt's trainer with
the flags import-hf prints (--finetune: weights only, iteration 0), and trains 3 steps cleanly.

The HF model's output layer is scaled up so its loss (~20) is far from a fresh model's (ln V = 4.2):
the first training loss shows the imported weights were the ones trained.
"""

import math
import os
import sys

import pytest
import torch
import transformers

from selfmoe.training import gpt
from selfmoe.training.arguments import args_to_config, parse_args
from selfmoe.training.trainer import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_checkpoint  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.mark.parametrize("upcycle", [False, True])
def test_import_then_train_three_steps(mp, tmp_path, capsys, upcycle):
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                 bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-6)
    hf = transformers.LlamaForCausalLM(c)
    with torch.no_grad():
        hf.lm_head.weight.mul_(300.0)
    hf.save_pretrained(str(tmp_path / "hf"))
    save = str(tmp_path / "imported")
    convert_checkpoint.main(["import-hf", "--input", str(tmp_path / "hf"), "--save", save])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("continue with: pretrain_gpt.py ")][0]
    flags = line.split("pretrain_gpt.py ", 1)[1].split()
    if upcycle:
        convert_checkpoint.main(["upcycle", "--load", save, "--save", str(tmp_path / "moe"), "--num-experts", "4",
                                 "--moe-router-topk", "2", "--moe-router-type", "self"])
        capsys.readouterr()
        save = str(tmp_path / "moe")
        flags[flags.index("--load") + 1] = save
        flags += ["--num-experts", "4", "--moe-ffn-hidden-size", "48", "--moe-router-topk", "2",
                  "--moe-router-type", "self"]
    argv = flags + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63", "--seq-length", "16",
                    "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-3", "--eval-iters", "0",
                    "--log-interval", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]
    args = parse_args(argv)
    out = pretrain(args, args_to_config(args), gpt.model_provider, gpt.forward_step, gpt.datasets_provider)
    losses = [out["losses"][i] for i in (1, 2, 3)]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[0] > 3 * math.log(64), losses  # the imported weights, not a fresh init
    assert losses[2] < losses[0], losses  # and they train
