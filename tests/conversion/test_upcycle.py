"""Upcycling dense -> MoE (step-0 output equality where the math allows) and router swaps."""

import os
import sys

import pytest
import torch

from helpers import tiny_config
from selfmoe.conversion.common import load_model
from selfmoe.models import build_gpt_model, moe_layers
from selfmoe.training.checkpointing import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_checkpoint  # noqa: E402

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def logits_of(model):
    with torch.no_grad():
        return model(IDS, torch.arange(16)[None].expand(2, 16), None)


def dense_checkpoint(tmp_path, style):
    cfg = tiny_config(style=style, num_moe_experts=None, moe_ffn_hidden_size=None)
    model = build_gpt_model(cfg).eval()
    root = str(tmp_path / f"dense-{style}")
    save_checkpoint(root, 3, [model], None, None, cfg, consumed_train_samples=0)
    return model, root


@pytest.mark.parametrize("style", ["mixtral", "gpt2"])
def test_upcycled_moe_equals_dense_at_step0(mp, tmp_path, capsys, style):
    dense, root = dense_checkpoint(tmp_path, style)
    ref = logits_of(dense)
    for router in ["learned", "self", "random", "hash", "routing-free"]:
        save = str(tmp_path / f"moe-{router}")
        convert_checkpoint.main(["upcycle", "--load", root, "--save", save, "--num-experts", "4",
                                 "--moe-router-topk", "2", "--moe-router-type", router])  # routing-free: mlp experts
        said = capsys.readouterr().out
        moe, cfg, _ = load_model(save)
        assert cfg.num_moe_experts == 4 and cfg.moe_router_type == router and len(moe_layers(moe)) == 2
        layer = moe_layers(moe)[0]
        w = dense.state_dict()["decoder.layers.0.mlp.linear_fc1.weight"]
        for e in range(4):  # every expert is the dense FFN
            assert torch.equal(layer.experts.local_experts[e].linear_fc1.weight, w)
        diff = (logits_of(moe) - ref).abs().max().item()
        if router == "routing-free":  # unnormalised gates over 0..E experts: not the dense output
            assert "does NOT equal the dense model" in said
            assert diff > 1e-3
        else:
            assert "equals the dense model at step 0" in said, said
            assert diff < 1e-5, (router, diff)
        if router == "self":
            assert "self routing reads hidden channels 28..31" in said


def test_upcycle_refusals(mp, tmp_path, capsys):
    _, root = dense_checkpoint(tmp_path, "mixtral")
    cases = [
        (["upcycle", "--load", root, "--save", str(tmp_path / "x"), "--num-experts", "4", "--moe-router-type",
          "routing-free", "--routing-free-expert-type", "aoe"], "routing-free-expert-type mlp"),
        (["upcycle", "--load", root, "--save", str(tmp_path / "x"), "--num-experts", "64", "--moe-router-type",
          "self"], "hidden_size"),
    ]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as e:
            convert_checkpoint.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and fragment in err, err
        assert not (tmp_path / "x").exists()
    convert_checkpoint.main(["upcycle", "--load", root, "--save", str(tmp_path / "moe"), "--num-experts", "4",
                             "--moe-router-type", "learned"])
    with pytest.raises(SystemExit):  # an MoE is not upcycled again
        convert_checkpoint.main(["upcycle", "--load", str(tmp_path / "moe"), "--save", str(tmp_path / "x"),
                                 "--num-experts", "4", "--moe-router-type", "self"])
    assert "takes a dense checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("router", ["self", "routing-free"])
def test_swap_router_keeps_the_experts(mp, tmp_path, router):
    cfg = tiny_config("learned", style="mixtral")
    model = build_gpt_model(cfg).eval()
    root = str(tmp_path / "learned")
    save_checkpoint(root, 3, [model], None, None, cfg, consumed_train_samples=0)
    extra = ["--routing-free-expert-type", "mlp"] if router == "routing-free" else []
    convert_checkpoint.main(["swap-router", "--load", root, "--save", str(tmp_path / "new"), "--moe-router-type",
                             router, *extra])
    new, new_cfg, _ = load_model(str(tmp_path / "new"))
    assert new_cfg.moe_router_type == router
    old = model.state_dict()
    kept = {k: v for k, v in new.state_dict().items() if torch.is_tensor(v) and ".router." not in k}
    assert kept and all(torch.equal(v, old[k]) for k, v in kept.items())
    assert not any(".router." in k for k in new.state_dict()) if router == "self" else True
    assert torch.isfinite(logits_of(new)).all()
