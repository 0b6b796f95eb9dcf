"""pretrain_gpt.py on 2 gloo ranks, per router whose state crosses ranks: the same losses as 1 rank.

Routing-Free's lambda follows the density all-reduced over every rank and MoE layer: under PP=2
each stage holds half the layers, under TP=2+SP each rank half the tokens, under EP=2 each rank
its own data; interleaved, each rank two chunks. With a fast-moving lambda (eta 0.5, lambda0 0.05) a wrong reduction group changes
the loss within a few steps. Hash routing needs the token ids on every pipeline stage and chunk.
Same weights in every layout: a 1-rank checkpoint, resharded on load by dist_checkpointing.
"""

import pytest

from helpers import run_script, tb_scalars

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
        "--log-interval", "1", "--disable-bias-linear", "--num-experts", "4", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--eval-iters", "0", "--lr-warmup-iters", "0", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]
ROUTERS = {
    "routing-free": ["--moe-router-type", "routing-free", "--routing-free-rank", "8", "--routing-free-lambda0", "0.05",
                     "--routing-free-eta", "0.5"],
    "hash": ["--moe-router-type", "hash"],
}
# Under PP the token-balance term L_TB is a per-stage approximation (README, Routing-Free MoE;
# its own test is in tests/routers/test_routing_free.py); L_EB alone (mu = 1) is exact on any layout.
ROUTERS["routing-free-mu1"] = ROUTERS["routing-free"] + ["--routing-free-mu", "1"]
LAYOUTS = {
    "pipeline-2": ["--pipeline-model-parallel-size", "2"],
    # interleaved 1F1B: each rank holds 2 chunks of 1 layer (layers 0+2 and 1+3)
    "pipeline-2-interleaved": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "tensor-2+sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "expert-2-alltoall": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
}
CASES = [("routing-free-mu1" if layout.startswith("pipeline") else "routing-free", layout) for layout in LAYOUTS] + [
    ("hash", "pipeline-2"), ("hash", "pipeline-2-interleaved")]
pytestmark = pytest.mark.slow
_cache: dict = {}


def run_gpt(argv, nproc=1):
    return run_script("pretrain_gpt.py", argv, nproc)


def reference(router, tmp_path_factory):
    """(checkpoint after 1 iteration, losses of 4 more iterations on 1 rank)."""
    if router not in _cache:
        d = tmp_path_factory.mktemp(f"ref-{router}")
        run_gpt(BASE + ROUTERS[router] + ["--train-iters", "1", "--save", str(d / "ckpt")])
        run_gpt(BASE + ROUTERS[router] + ["--train-iters", "4", "--finetune", "--load", str(d / "ckpt"),
                                          "--tensorboard-dir", str(d / "tb")])
        _cache[router] = d / "ckpt", tb_scalars(d / "tb", "lm loss")
    return _cache[router]


@pytest.mark.parametrize("router,layout", CASES)
def test_layout_matches_one_rank(router, layout, tmp_path, tmp_path_factory):
    ckpt, ref = reference(router, tmp_path_factory)
    run_gpt(BASE + ROUTERS[router] + LAYOUTS[layout] + ["--train-iters", "4", "--finetune", "--load", str(ckpt),
                                                        "--tensorboard-dir", str(tmp_path / "tb")], nproc=2)
    got = tb_scalars(tmp_path / "tb", "lm loss")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    assert got == pytest.approx(ref, rel=1e-5)
