"""Hugging Face export/import: logits of transformers' model == ours, round trips bit-exact, bad input.

The reference is transformers itself (AutoModelForCausalLM.from_pretrained of the exported
folder, or a stock model built from a local config): an independent implementation of the same
architecture. Tolerance 1e-4 (fp32); measured differences are ~3e-7.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from helpers import tiny_config
from selfmoe.models import build_gpt_model
from selfmoe.training.checkpointing import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_checkpoint  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

EXPORTABLE = {  # name -> (router, style, overrides, transformers class)
    "mixtral-learned-gqa": ("learned", "mixtral", dict(num_query_groups=2, moe_aux_loss_coeff=1e-2,
                                                       moe_z_loss_coeff=1e-3), "MixtralForCausalLM"),
    "mixtral-self": ("self", "mixtral", dict(self_routing_subspace="first", self_routing_temperature=0.5),
                     "MixtralForCausalLM"),
    "llama-dense": ("learned", "mixtral", dict(num_moe_experts=None, moe_ffn_hidden_size=None, num_query_groups=2,
                                               rotary_base=500000), "LlamaForCausalLM"),
    "gpt2-dense": ("learned", "gpt2", dict(num_moe_experts=None, moe_ffn_hidden_size=None), "GPT2LMHeadModel"),
    "gpt2-dense-bias": ("learned", "gpt2", dict(num_moe_experts=None, moe_ffn_hidden_size=None, add_bias_linear=True,
                                                layernorm_epsilon=1e-6), "GPT2LMHeadModel"),
}


def logits_of(model):
    with torch.no_grad():
        return model(IDS, torch.arange(16)[None].expand(2, 16), None)


def hf_logits(path_or_model):
    m = path_or_model if isinstance(path_or_model, torch.nn.Module) else \
        transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    with torch.no_grad():
        return m.eval()(IDS).logits


def saved_model(tmp_path, router, style, **kw):
    """A model with non-trivial norms and biases, saved as a dist checkpoint; (model, cfg, root)."""
    cfg = tiny_config(router, style=style, **kw)
    model = build_gpt_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    root = str(tmp_path / "ck")
    save_checkpoint(root, 7, [model], None, None, cfg, consumed_train_samples=0)
    return model, cfg, root


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_logits_equal_transformers_and_round_trip(mp, tmp_path, capsys, name):
    router, style, kw, arch = EXPORTABLE[name]
    model, cfg, root = saved_model(tmp_path, router, style, **kw)
    out = tmp_path / "hf"
    convert_checkpoint.main(["export-hf", "--load", root, "--output", str(out), "--max-shard-size", "20KB"])
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    assert json.load(open(out / "config.json"))["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf).__name__ == arch
    diff = (hf_logits(hf) - logits_of(model)).abs().max().item()
    assert diff < 1e-4, diff

    # ... and back: the same config and bit-identical weights
    convert_checkpoint.main(["import-hf", "--input", str(out), "--save", str(tmp_path / "back")])
    assert "--finetune" in capsys.readouterr().out
    torch.manual_seed(99)
    fresh = build_gpt_model(cfg)
    info = load_checkpoint(str(tmp_path / "back"), [fresh], None, None, cfg, load_optim=False, load_rng=False)
    assert info["iteration"] == 0
    ref = model.state_dict()
    for k, v in fresh.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, ref[k]), k


def _stock(arch, tmp_path, **kw):
    """A stock transformers model from a local config (no hub), saved as a safetensors folder."""
    torch.manual_seed(0)
    if arch == "gpt2":
        c = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                    activation_function="gelu", bos_token_id=0, eos_token_id=0, **kw)
        m = transformers.GPT2LMHeadModel(c)
    else:
        base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6)
        base.update(kw)
        cls = {"mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
               "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
        m = cls[1](cls[0](**base))
    with torch.no_grad():  # norms away from 1, biases away from 0
        for n, p in m.named_parameters():
            if n.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path / f"stock-{arch}")
    m.save_pretrained(path)
    return m.eval(), path


@pytest.mark.parametrize("arch,kw", [("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
                                     ("llama", dict(attention_bias=True, mlp_bias=True)),
                                     ("mistral", dict(tie_word_embeddings=True)), ("gpt2", {})])
def test_import_logits_equal_transformers(mp, tmp_path, arch, kw):
    hf, path = _stock(arch, tmp_path, **kw)
    save = str(tmp_path / "ours")
    convert_checkpoint.main(["import-hf", "--input", path, "--save", save])
    from selfmoe.conversion.common import load_model

    ours, cfg, common = load_model(save)
    assert common["iteration"] == 0
    diff = (logits_of(ours) - hf_logits(hf)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("router", ["routing-free", "random", "hash"])
def test_no_stock_class_exports_ours_with_a_note(mp, tmp_path, capsys, router):
    model, cfg, root = saved_model(tmp_path, router, "mixtral")
    out = tmp_path / "out"
    convert_checkpoint.main(["export-hf", "--load", root, "--output", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"note: no stock transformers class expresses the {router} router")
    assert sorted(os.listdir(out)) == ["model.safetensors", "selfmoe_config.json"]
    convert_checkpoint.main(["from-safetensors", "--input", str(out / "model.safetensors"), "--save",
                             str(tmp_path / "back")])
    from selfmoe.conversion.common import load_model

    back, _, _ = load_model(str(tmp_path / "back"))
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, ref[k]), k


def test_export_writes_the_runs_gpt2_tokenizer(mp, tmp_path):
    cfg = tiny_config("self", style="mixtral", vocab_size=50304)
    model = build_gpt_model(cfg)
    root = str(tmp_path / "ck")
    save_checkpoint(root, 1, [model], None, None, cfg, consumed_train_samples=0,
                    args_dict={"tokenizer_type": "GPT2BPETokenizer"})
    out = tmp_path / "hf"
    convert_checkpoint.main(["export-hf", "--load", root, "--output", str(out)])
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    from selfmoe.data.tokenizers import GPT2BPETokenizer

    text = "Hello world, it's a tést"
    assert tok.encode(text) == GPT2BPETokenizer().encode(text)  # the run's ids
    assert json.load(open(out / "generation_config.json"))["eos_token_id"] == 50256


def run_cli(*argv):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, timeout=300, env=env)


def one_line_error(r, *fragments):
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for f in fragments:
        assert f in last, last
    return last


def test_bad_inputs_are_one_line_and_write_nothing(mp, tmp_path, capsys):
    # a config Mixtral cannot express: sigmoid scores with expert bias (checked in-process, it is cheap)
    _, _, root = saved_model(tmp_path, "learned", "mixtral", moe_router_score_function="sigmoid",
                             moe_router_enable_expert_bias=True)
    # unknown architecture, GPT-2 with the tanh GeLU, a missing shard, an existing output
    os.makedirs(tmp_path / "bert")
    json.dump({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, open(tmp_path / "bert" / "config.json", "w"))
    hf, mixtral = _stock("mixtral", tmp_path, num_local_experts=4)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    gone = sorted(set(index["weight_map"].values()))[0]
    os.remove(tmp_path / "sharded" / gone)
    c = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)  # gelu_new default
    transformers.GPT2LMHeadModel(c).save_pretrained(str(tmp_path / "gpt2new"))
    os.makedirs(tmp_path / "taken")

    cases = [
        (["export-hf", "--load", root, "--output", str(tmp_path / "y")], ["MixtralForCausalLM",
                                                                           "moe_router_score_function 'sigmoid'",
                                                                           "moe_router_enable_expert_bias"]),
        (["import-hf", "--input", str(tmp_path / "bert"), "--save", str(tmp_path / "y")], ["BertForMaskedLM",
                                                                                            "not supported"]),
        (["import-hf", "--input", str(tmp_path / "gpt2new"), "--save", str(tmp_path / "y")], ["gelu_new"]),
        (["import-hf", "--input", str(tmp_path / "sharded"), "--save", str(tmp_path / "y")], ["missing shard", gone]),
        (["import-hf", "--input", mixtral, "--save", str(tmp_path / "taken")], ["already exists"]),
        (["export-hf", "--load", str(tmp_path / "nope"), "--output", str(tmp_path / "y")], ["no such checkpoint"]),
    ]
    for i, (argv, fragments) in enumerate(cases):
        if i == 0:  # the real command line once: exit code 2 and one line on stderr
            one_line_error(run_cli(*argv), *fragments)
        else:
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                convert_checkpoint.main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
            assert all(f in err[0] for f in fragments), err[0]
        assert not (tmp_path / "y").exists()
        assert os.listdir(tmp_path / "taken") == []
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_checkpoint_of_another_model_config_is_refused(mp, tmp_path, capsys):
    """A safetensors file whose tensors do not fit its stated config."""
    from safetensors.torch import load_file, save_file

    model, cfg, root = saved_model(tmp_path, "learned", "gpt2")
    convert_checkpoint.main(["to-safetensors", "--load", root, "--output", str(tmp_path / "m.safetensors")])
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "m.safetensors"), "pt").metadata()
                      ["selfmoe_config"])
    meta["hidden_size"], meta["ffn_hidden_size"] = 64, 128
    save_file(load_file(str(tmp_path / "m.safetensors")), str(tmp_path / "bad.safetensors"),
              metadata={"selfmoe_config": json.dumps(meta)})
    with pytest.raises(SystemExit) as e:
        convert_checkpoint.main(["from-safetensors", "--input", str(tmp_path / "bad.safetensors"), "--save",
                                 str(tmp_path / "z")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --input") and "has shape" in err and "\n" not in err, err
    assert not (tmp_path / "z").exists()
