"""Offline resharding (2 gloo ranks, launched by the tool) keeps the model; a TP=2/EP=2 source
exports to transformers with the same logits; the Routing-Free θ sweep; DeepSpeed -> dist."""

import os
import sys

import numpy as np
import pytest
import torch

from helpers import lm_loss, tiny_config
from selfmoe.conversion.common import load_model
from selfmoe.conversion.reshard import probe_tokens
from selfmoe.models import build_gpt_model
from selfmoe.training.checkpointing import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_checkpoint  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("layout,router,style", [
    (["--tensor-model-parallel-size", "2"], "self", "mixtral"),  # Self-Routing -> Mixtral from a TP=2 source
    (["--expert-model-parallel-size", "2"], "learned", "mixtral"),
    (["--pipeline-model-parallel-size", "2"], None, "gpt2"),  # dense GPT-2 from a PP=2 source
], ids=["tp2-self", "ep2-learned", "pp2-gpt2"])
def test_reshard_keeps_model_and_exports_from_the_new_layout(mp, tmp_path, capsys, monkeypatch, layout, router, style):
    import transformers

    monkeypatch.delenv("MASTER_PORT", raising=False)
    dense = dict(num_moe_experts=None, moe_ffn_hidden_size=None) if router is None else {}
    cfg = tiny_config(router or "learned", style=style, num_query_groups=2 if style == "mixtral" else None, **dense)
    model = build_gpt_model(cfg).eval()
    root = str(tmp_path / "one")
    save_checkpoint(root, 5, [model], None, None, cfg, consumed_train_samples=0)
    ids = probe_tokens(cfg.vocab_size, 16)
    with torch.no_grad():
        ref = lm_loss(model, ids).item()
    convert_checkpoint.main(["reshard", "--load", root, "--save", str(tmp_path / "two"), *layout])
    out = capsys.readouterr().out
    assert "wrote" in out, out
    if "--pipeline-model-parallel-size" not in layout:  # the loss under the new layout
        probe = float(out.split("probe loss under the new layout: ")[1].split()[0])
        assert abs(probe - ref) < 1e-5, (probe, ref)
    back, _, _ = load_model(str(tmp_path / "two"))  # saved by 2 ranks, read by one
    for k, v in model.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(back.state_dict()[k], v), k
    convert_checkpoint.main(["export-hf", "--load", str(tmp_path / "two"), "--output", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids, torch.arange(16)[None].expand(2, 16), None)).abs().max().item()
    assert diff < 1e-4


def test_reshard_refuses_impossible_layout(mp, tmp_path, capsys):
    cfg = tiny_config("learned", style="mixtral")
    model = build_gpt_model(cfg)
    save_checkpoint(str(tmp_path / "one"), 1, [model], None, None, cfg, consumed_train_samples=0)
    with pytest.raises(SystemExit):
        convert_checkpoint.main(["reshard", "--load", str(tmp_path / "one"), "--save", str(tmp_path / "x"),
                                 "--expert-model-parallel-size", "3"])
    err = capsys.readouterr().err.strip()
    assert err == "error: --expert-model-parallel-size 3 does not divide num_moe_experts 4", err
    assert not (tmp_path / "x").exists()


def test_theta_sweep(mp, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from selfmoe.routers.routing_free import set_theta

    cfg = tiny_config("routing-free", style="mixtral")
    model = build_gpt_model(cfg).eval()
    root = str(tmp_path / "rf")
    save_checkpoint(root, 1, [model], None, None, cfg, consumed_train_samples=0)
    prefix = str(tmp_path / "val")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 64, 40) for _ in range(6)]
    for d in docs:
        b.add_document(torch.from_numpy(d.astype(np.int64)), [40])
    b.finalize(prefix + ".idx")
    tokens = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    convert_checkpoint.main(["theta-sweep", "--load", root, "--data-path", prefix, "--thetas", "0,1,1e9",
                             "--eval-tokens", "128", "--seq-length", "16"])
    rows = [ln.split() for ln in capsys.readouterr().out.strip().splitlines()[1:]]
    epts = [float(r[3]) for r in rows]
    assert epts[0] == 4.0 and epts[2] == 0.0  # θ=0: every expert fires; θ huge: none
    # independent reference for θ=1: the model's own loss on the last 129 tokens
    x = tokens[-129:]
    set_theta(model, 1.0)
    with torch.no_grad():
        loss = model(x[:-1].view(8, 16), torch.arange(16)[None].expand(8, 16), None, labels=x[1:].view(8, 16)).mean()
    assert abs(float(rows[1][1]) - loss.item()) < 1e-4


@pytest.mark.parametrize("stage", [2, 3])
def test_from_deepspeed(mp, tmp_path, capsys, monkeypatch, stage):
    from megatron.core import tensor_parallel

    from selfmoe import deepspeed_utils
    from selfmoe.config import config_fingerprint

    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = tiny_config("learned", style="mixtral")
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    engine, _ = deepspeed_utils.initialize(build_gpt_model(cfg), {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage}})
    ids = probe_tokens(64, 16)
    engine.backward(lm_loss(engine, ids))
    engine.step()  # the saved weights are not the initial ones
    engine.eval()
    with torch.no_grad():
        ref = lm_loss(engine, ids).item()
    engine.save_checkpoint(str(tmp_path / "ds"), tag="iter_0000001",
                           client_state={"config": config_fingerprint(cfg), "iteration": 1})
    convert_checkpoint.main(["from-deepspeed", "--load", str(tmp_path / "ds"), "--save", str(tmp_path / "dist")])
    assert "wrote" in capsys.readouterr().out
    model, _, common = load_model(str(tmp_path / "dist"))
    assert common["iteration"] == 0
    with torch.no_grad():
        assert abs(lm_loss(model, ids).item() - ref) < 1e-6
