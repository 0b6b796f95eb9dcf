"""tools/convert_checkpoint.py: dist checkpoint -> safetensors -> dist checkpoint gives the same model."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_config
from selfmoe.models import build_gpt_model
from selfmoe.routers.routing_free import routing_free_routers
from selfmoe.training.checkpointing import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_checkpoint  # noqa: E402


def loss_of(model):
    ids = torch.arange(32).reshape(2, 16) % 64
    return model(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).detach()


@pytest.mark.parametrize("router,style", [("routing-free", "gpt2"), ("learned", "mixtral")])
def test_round_trip(mp, tmp_path, router, style):
    cfg = tiny_config(router, style=style)
    model = build_gpt_model(cfg)
    for r in routing_free_routers(model):
        r.balance_coeff.fill_(0.02)
    save_checkpoint(str(tmp_path / "ck"), 5, [model], None, None, cfg, consumed_train_samples=40)
    out = tmp_path / "m.safetensors"
    convert_checkpoint.main(["to-safetensors", "--load", str(tmp_path / "ck"), "--output", str(out)])
    with safe_open(str(out), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in model.state_dict().items():
        if k in stored:
            assert torch.equal(stored[k], v), k
    params = dict(model.named_parameters())
    assert set(params) <= set(stored) | {"output_layer.weight"}

    convert_checkpoint.main(["from-safetensors", "--input", str(out), "--save", str(tmp_path / "ck2")])
    torch.manual_seed(77)
    fresh = build_gpt_model(cfg)
    info = load_checkpoint(str(tmp_path / "ck2"), [fresh], None, None, cfg, load_optim=False, load_rng=False)
    assert info["iteration"] == 0
    for k, v in model.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(fresh.state_dict()[k], v), k
    torch.testing.assert_close(loss_of(fresh), loss_of(model), rtol=0, atol=0)


def test_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-safetensors",
                        "--load", str(tmp_path / "nope"), "--output", str(tmp_path / "x.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: --load {tmp_path / 'nope'}: no such checkpoint directory"
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("argv, expect", [
    (["export-hf", "--load", "x", "--output", "y", "--dtype", "bf16"],
     "error: argument --dtype: invalid choice: 'bf16' (choose from 'float32', 'bfloat16', 'float16')"),
    (["export-hf", "--load", "x"], "error: the following arguments are required: --output"),
    (["expor-hf"], "error: argument cmd: invalid choice: 'expor-hf'"),
])
def test_flag_errors_are_one_line_without_usage(capsys, argv, expect):
    """argparse's own errors, in the subcommands too, follow the one-line contract: no usage block."""
    with pytest.raises(SystemExit) as e:
        convert_checkpoint.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(expect), err


def test_another_routers_options_are_listed_as_ignored(capsys):
    """upcycle / swap-router: an option of a router other than --moe-router-type is said to be ignored
    (it was dropped silently); the chosen router's own options are passed on."""
    args = convert_checkpoint.parser().parse_args(
        ["upcycle", "--load", "x", "--save", "y", "--num-experts", "4", "--moe-router-type", "self",
         "--routing-free-theta", "3", "--self-routing-temperature", "2"])
    opts = convert_checkpoint._router_options(args)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["ignored: --routing-free-theta (only --moe-router-type routing-free reads it; "
                   "this is --moe-router-type self)"]
    assert opts["self_routing_temperature"] == 2.0
