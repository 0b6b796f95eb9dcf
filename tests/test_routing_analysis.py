"""tools/analyze_routing.py against independent references: RoutingStats on the same batches, a
brute-force count over the trace, the routers' own outputs, 1 rank vs a resharded (EP=2) checkpoint,
and the θ sweep against the plain analysis."""

import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from helpers import tiny_config
from selfmoe.conversion.common import init_one_rank, load_model
from selfmoe.metrics import RoutingStats
from selfmoe.models import build_gpt_model, moe_layers
from selfmoe.training.checkpointing import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import analyze_routing  # noqa: E402

SEQ, MBS, ITERS, VOCAB = 16, 4, 3, 64


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny 3-layer checkpoints (learned, routing-free with one dense layer, dense) and a corpus."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("analysis")
    init_one_rank(seed=7)
    out = {}
    for name, kw in {"learned": dict(router="learned"),
                     "rf": dict(router="routing-free", moe_layer_freq=[0, 1, 1]),
                     "dense": dict(num_moe_experts=None, moe_ffn_hidden_size=None)}.items():
        cfg = tiny_config(style="gpt2" if name == "dense" else "mixtral", num_layers=3, **kw)
        model = build_gpt_model(cfg).eval()
        save_checkpoint(str(root / name), 3, [model], None, None, cfg, consumed_train_samples=0,
                        args_dict={"micro_batch_size": MBS, "seq_length": SEQ, "tokenizer_type": "NullTokenizer",
                                   "vocab_size": VOCAB - 1})  # ids 0..62, EOD 63
        out[name] = str(root / name)
    prefix = str(root / "corpus")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    # a skewed token distribution, so that some tokens repeat often enough for the top-tokens table
    docs = [np.minimum(rng.geometric(0.08, 50), VOCAB - 1) for _ in range(6)]
    for d in docs:
        b.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    b.finalize(prefix + ".idx")
    out["data"] = prefix
    out["tokens"] = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    out["root"] = root
    return out


def run_tool(ckpts, name, out, *extra):
    args = ["--load", ckpts[name], "--data-path", ckpts["data"], "--output", str(out), "--eval-iters", str(ITERS),
            "--trace-tokens", "100000", "--min-token-count", "1", *extra]
    analyze_routing.main(args)
    with open(os.path.join(out, "routing.json")) as f:
        return json.load(f)


def reference_batches(tokens):
    """The analysis' batches, built here from the corpus: its last ITERS*MBS*SEQ+1 tokens."""
    t = tokens[-(ITERS * MBS * SEQ + 1):]
    x, y = t[:-1].view(-1, SEQ), t[1:].view(-1, SEQ)
    return [(x[i:i + MBS], y[i:i + MBS]) for i in range(0, len(x), MBS)]


@pytest.fixture(scope="module")
def learned_run(ckpts):
    out = ckpts["root"] / "out-learned"
    return run_tool(ckpts, "learned", out), out


def test_load_heatmap_equals_routing_stats(ckpts, learned_run):
    numbers, out = learned_run
    model, cfg, _ = load_model(ckpts["learned"])
    stats = RoutingStats(model, cfg.num_layers, cfg.num_moe_experts)
    total = 0.0
    with torch.no_grad():
        for x, y in reference_batches(ckpts["tokens"]):
            total += model(x, torch.arange(SEQ)[None].expand_as(x), None, labels=y).sum().item()
    stats.remove()
    assert numbers["layers"] == [1, 2, 3]
    assert torch.equal(torch.tensor(numbers["counts"], dtype=torch.float64), stats.counts)
    assert torch.equal(torch.tensor(numbers["k_hist"], dtype=torch.float64), stats.k_hist)
    frac = stats.counts / stats.counts.sum(1, keepdim=True)
    assert torch.allclose(torch.tensor(numbers["load_fraction"], dtype=torch.float64), frac)
    assert abs(numbers["loss"] - total / (ITERS * MBS * SEQ)) < 1e-5
    for png in ("load.png", "experts_per_token.png", "agreement.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
        assert os.path.getsize(out / png) > 2000, png
    assert (out / "summary.txt").read_text().startswith("routing analysis of ")


def read_trace(out):
    with open(os.path.join(out, "trace.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_trace_rows_equal_the_routers_outputs(ckpts, learned_run):
    _, out = learned_run
    trace = read_trace(out)
    assert len(trace) == ITERS * MBS * SEQ * 3  # every token, one row per MoE layer
    model, cfg, _ = load_model(ckpts["learned"])
    seen = {}

    def hook(router, args, outputs):  # the router's own output, flattened s-major as the MoE layer does
        seen[router.layer_number] = (outputs[0].detach().reshape(SEQ, MBS, -1), outputs[1].reshape(SEQ, MBS, -1))

    handles = [layer.router.register_forward_hook(hook) for layer in moe_layers(model)]
    rows = {(r["batch"], r["sequence"], r["position"], r["layer"]): r for r in trace}
    with torch.no_grad():
        for bi, (x, _) in enumerate(reference_batches(ckpts["tokens"])):
            model(x, torch.arange(SEQ)[None].expand_as(x), None)
            for (layer, (probs, rmap)) in seen.items():
                for seq in range(MBS):
                    for pos in range(SEQ):
                        r = rows[(bi, seq, pos, layer)]
                        assert r["token"] == int(x[seq, pos])
                        assert r["experts"] == rmap[pos, seq].nonzero().flatten().tolist()
                        assert len(r["experts"]) == cfg.moe_router_topk
                        assert np.allclose(r["weights"], probs[pos, seq, r["experts"]].tolist(), atol=1e-6)
    for h in handles:
        h.remove()


def test_top_tokens_equal_brute_force_count_over_trace(ckpts, learned_run):
    _, out = learned_run
    trace = read_trace(out)
    freq = Counter(r["token"] for r in trace if r["layer"] == 1)
    routed = Counter((r["layer"], e, r["token"]) for r in trace for e in r["experts"])
    with open(out / "top_tokens.json") as f:
        table = json.load(f)["by_key"]
    assert len(table) == 3 * 4
    for row in table:
        scores = {v: routed[(row["layer"], row["expert"], v)] / n for v, n in freq.items()
                  if routed[(row["layer"], row["expert"], v)]}
        want = sorted(scores, key=lambda v: (-scores[v], -routed[(row["layer"], row["expert"], v)], v))[:10]
        assert [t["key"] for t in row["top"]] == want
        for t in row["top"]:
            assert t["count"] == routed[(row["layer"], row["expert"], t["key"])]
            assert abs(t["score"] - scores[t["key"]]) < 1e-6
    agreement = json.loads((out / "routing.json").read_text())
    # the top-1 agreement from the trace: same top-1 expert in layers 1 and 3
    by_tok = {}
    for r in trace:
        w = r["weights"]
        by_tok.setdefault((r["batch"], r["sequence"], r["position"]), {})[r["layer"]] = \
            r["experts"][max(range(len(w)), key=lambda i: (w[i], -r["experts"][i]))]
    same = np.mean([t[1] == t[3] for t in by_tok.values()])
    assert abs(agreement["same_top1"][0][2] - same) < 1e-9
    c1, c3 = Counter(t[1] for t in by_tok.values()), Counter(t[3] for t in by_tok.values())
    chance = sum(c1[e] * c3[e] for e in range(4)) / len(by_tok) ** 2
    assert abs(agreement["same_top1_chance"][0][2] - chance) < 1e-9


def test_theta_sweep_is_monotone_and_matches_the_plain_analysis(ckpts, tmp_path):
    theta0 = 1.0  # the routers' θ (tiny_config's default)
    numbers = run_tool(ckpts, "rf", tmp_path / "rf", "--theta-sweep", f"0,0.5,{theta0},2,1e9")
    assert numbers["layers"] == [2, 3]  # layer 1 is dense
    summary = (tmp_path / "rf" / "summary.txt").read_text()
    k = np.array(numbers["k_hist"])
    for p, layer in enumerate((2, 3)):  # per-layer lines name the MoE layers' own numbers
        ept = (k[p] * np.arange(5)).sum() / k[p].sum()
        assert f"  layer {layer}: " in summary and f"experts/token {ept:.3f}" in summary.split(f"  layer {layer}: ")[1].splitlines()[0]
    assert "  layer 1: " not in summary
    sweep = numbers["theta_sweep"]
    ept = [r["experts_per_token"] for r in sweep]
    assert ept[0] == 4.0 and ept[-1] == 0.0
    assert all(a >= b for a, b in zip(ept, ept[1:])), ept
    at = sweep[2]
    assert at["theta"] == theta0
    assert abs(at["loss"] - numbers["loss"]) < 1e-6
    assert abs(at["experts_per_token"] - numbers["experts_per_token"]) < 1e-9
    assert os.path.getsize(tmp_path / "rf" / "theta_sweep.png") > 2000
    k = np.array(numbers["k_hist"])
    assert (k[:, 0] + k[:, -1] < k.sum(1)).all()  # a variable number of experts per token


@pytest.mark.parametrize("case", ["missing", "dense", "bad-theta", "theta-not-rf", "exists", "no-data"])
def test_bad_inputs_are_one_line(ckpts, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {"missing": ["--load", str(tmp_path / "nope"), "--data-path", ckpts["data"]],
            "dense": ["--load", ckpts["dense"], "--data-path", ckpts["data"]],
            "bad-theta": ["--load", ckpts["rf"], "--data-path", ckpts["data"], "--theta-sweep", "0.5,x"],
            "theta-not-rf": ["--load", ckpts["learned"], "--data-path", ckpts["data"], "--theta-sweep", "1"],
            "exists": ["--load", ckpts["learned"], "--data-path", ckpts["data"]],
            "no-data": ["--load", ckpts["learned"], "--data-path", str(tmp_path / "none")]}[case]
    if case == "exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        analyze_routing.main([*args, "--output", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    expect = {"missing": "no such checkpoint directory", "dense": "a dense model", "bad-theta": "--theta-sweep 0.5,x",
              "theta-not-rf": "learned-router model", "exists": "already exists", "no-data": "--data-path"}[case]
    assert expect in err, err
    if case == "exists":
        assert os.listdir(out) == ["mine.txt"]
    else:
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.slow
def test_resharded_checkpoint_gives_the_same_analysis(ckpts, tmp_path, learned_run, monkeypatch):
    """The 1-rank checkpoint saved again by 2 gloo ranks at EP=2 (the reshard tool launches them)."""
    import convert_checkpoint

    monkeypatch.delenv("MASTER_PORT", raising=False)
    convert_checkpoint.main(["reshard", "--load", ckpts["learned"], "--save", str(tmp_path / "ep2"),
                             "--expert-model-parallel-size", "2"])
    ckpts = {**ckpts, "ep2": str(tmp_path / "ep2")}
    numbers = run_tool(ckpts, "ep2", tmp_path / "out")
    one, _ = learned_run
    for key in ("counts", "k_hist", "same_top1", "nmi"):
        assert numbers[key] == one[key], key
    assert abs(numbers["loss"] - one["loss"]) < 1e-6
    assert (tmp_path / "out" / "trace.jsonl").read_text() == (learned_run[1] / "trace.jsonl").read_text()


def test_vit_checkpoint_patches_and_classes(tmp_path):
    """A pretrain_vit.py checkpoint on Fashion-MNIST: the heatmap equals RoutingStats on the same
    validation images, the per-class and per-position tables equal a brute-force count over the trace."""
    from selfmoe.data.images import fetch_fashion_mnist
    from selfmoe.models import build_vit_model
    from selfmoe.training.arguments import args_to_config, parse_args
    from selfmoe.training.trainer import _plain_args
    from selfmoe.training.vit import add_vision_args, prepare_vision_args, validate_vision_data

    try:
        fetch_fashion_mnist()
    except RuntimeError as e:  # no network and no cached package
        pytest.skip(str(e))
    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size",
                       "64", "--img-h", "28", "--img-w", "28", "--num-channels", "1", "--num-classes", "10",
                       "--patch-dim", "7", "--micro-batch-size", "8", "--disable-bias-linear", "--num-workers", "0",
                       "--num-experts", "4", "--moe-router-type", "self", "--crop-pct", "1", "--lr", "1e-3",
                       "--train-iters", "1"],
                      extra_args_provider=add_vision_args, prepare_args=prepare_vision_args,
                      validate_data=validate_vision_data)
    init_one_rank(seed=3)
    cfg = args_to_config(args)
    model = build_vit_model(cfg, 28, 28, 7, 1, 10).eval()
    save_checkpoint(str(tmp_path / "vit"), 2, [model], None, None, cfg, consumed_train_samples=0,
                    args_dict=_plain_args(args))
    analyze_routing.main(["--load", str(tmp_path / "vit"), "--output", str(tmp_path / "out"), "--eval-iters", "2",
                          "--trace-tokens", "1000"])
    numbers = json.loads((tmp_path / "out" / "routing.json").read_text())
    # independent: the first 16 validation images through the evaluation transform, RoutingStats hooks
    from selfmoe.data.images import ImageClassificationDataset, build_transforms, fashion_mnist

    valid = ImageClassificationDataset(fashion_mnist()[1], build_transforms(args, False), seed=args.seed, shuffle=False)
    batch = valid.collate(list(range(16)))
    loaded, _, _ = load_model(str(tmp_path / "vit"), build=lambda c, _: build_vit_model(c, 28, 28, 7, 1, 10))
    stats = RoutingStats(loaded, 2, 4)
    with torch.no_grad():
        logits = loaded(batch["images"])
    stats.remove()
    assert torch.equal(torch.tensor(numbers["counts"], dtype=torch.float64), stats.counts)
    assert abs(numbers["top1_accuracy"] - (logits.argmax(-1) == batch["labels"]).float().mean().item()) < 1e-9
    trace = read_trace(tmp_path / "out")
    assert len(trace) == 16 * 17 * 2 and {r["position"] for r in trace} == set(range(17))
    assert [r["class"] for r in trace if r["layer"] == 1 and r["position"] == 0] == batch["labels"].tolist()
    tables = json.loads((tmp_path / "out" / "top_tokens.json").read_text())
    for kind, field in (("by_class", "class"), ("by_key", "position")):
        freq = Counter(r[field] for r in trace if r["layer"] == 1)
        routed = Counter((r["layer"], e, r[field]) for r in trace for e in r["experts"])
        for row in tables[kind]:
            for t in row["top"]:
                assert t["count"] == routed[(row["layer"], row["expert"], t["key"])]
                assert abs(t["score"] - t["count"] / freq[t["key"]]) < 1e-6
    names = {t["name"] for row in tables["by_class"] for t in row["top"]}
    assert names <= {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"}, names
    # --data-path: an ImageFolder root (val/<class>/*), read with the run's evaluation transform
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    analyze_routing.main(["--load", str(tmp_path / "vit"), "--output", str(tmp_path / "out2"), "--data-path",
                          str(tmp_path / "imgs"), "--trace-tokens", "1000"])
    trace = read_trace(tmp_path / "out2")
    assert [r["class"] for r in trace if r["layer"] == 1 and r["position"] == 0] == [0, 0, 0, 1, 1, 1]
    names = {t["name"] for row in json.loads((tmp_path / "out2" / "top_tokens.json").read_text())["by_class"]
             for t in row["top"]}
    assert names == {"cat", "dog"}


def test_jsonl_text_through_the_runs_tokenizer(ckpts, tmp_path, capsys):
    docs = [[5, 6, 7] * 7, [1, 2] * 20, [9] * 30]
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(map(str, d))}) + "\n" for d in docs))
    analyze_routing.main(["--load", ckpts["learned"], "--data-path", str(path), "--output", str(tmp_path / "out"),
                          "--eval-iters", "1", "--micro-batch-size", "2"])
    ids = [t for d in docs for t in d + [VOCAB - 1]]  # documents joined by the tokenizer's EOD
    trace = [r for r in read_trace(tmp_path / "out") if r["layer"] == 1]
    assert [r["token"] for r in trace] == ids[:2 * SEQ]
    top = json.loads((tmp_path / "out" / "top_tokens.json").read_text())["by_key"]
    assert {t["name"] for row in top for t in row["top"]} <= {str(i) for i in ids}  # decoded by the tokenizer
    capsys.readouterr()
    path.write_text('{"text": "1 2"}\n{"text": oops}\n')
    with pytest.raises(SystemExit):
        analyze_routing.main(["--load", ckpts["learned"], "--data-path", str(path), "--output", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --data-path {path}:2") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("argv, expect", [
    (["--load", "x"], "error: the following arguments are required: --output"),
    (["--load", "x", "--output", "y", "--eval-iters", "two"], "error: argument --eval-iters: invalid int value: 'two'"),
])
def test_flag_errors_are_one_line_without_usage(capsys, argv, expect):
    """argparse's own errors (missing or mistyped flag) follow the one-line contract: no usage block."""
    with pytest.raises(SystemExit) as e:
        analyze_routing.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == expect
