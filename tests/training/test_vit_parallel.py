"""pretrain_vit.py on 2 gloo ranks gives the 1-rank losses: EP=2 (experts split, data parallel 2),
TP=2 + sequence parallel (patch tokens split; hash routing must use the global patch position),
PP=2. Same weights in every layout: a 1-rank checkpoint, resharded on load by dist_checkpointing;
same images and augmentations: both are functions of the sample position."""

import pytest

from helpers import run_script, tb_scalars

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--img-h", "28", "--img-w", "28", "--num-channels", "1", "--num-classes", "10", "--patch-dim", "7",
        "--vit-pool", "mean", "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
        "--lr-warmup-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--disable-bias-linear",
        "--log-interval", "1", "--eval-iters", "0", "--num-experts", "4", "--num-workers", "0", "--smoothing", "0.1"]
ROUTERS = {"self": ["--moe-router-type", "self"], "hash": ["--moe-router-type", "hash"]}
LAYOUTS = {
    "expert-2": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
    "tensor-2+sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pipeline-2": ["--pipeline-model-parallel-size", "2"],
}
CASES = [("self", "expert-2"), ("self", "tensor-2+sp"), ("hash", "tensor-2+sp"), ("self", "pipeline-2")]
pytestmark = pytest.mark.slow
_cache: dict = {}


def run_vit(argv, nproc=1):
    return run_script("pretrain_vit.py", argv, nproc, timeout=600)


def reference(router, tmp_path_factory):
    if router not in _cache:
        d = tmp_path_factory.mktemp(f"vit-ref-{router}")
        run_vit(BASE + ROUTERS[router] + ["--train-iters", "1", "--save", str(d / "ckpt")])
        run_vit(BASE + ROUTERS[router] + ["--train-iters", "3", "--finetune", "--load", str(d / "ckpt"),
                                          "--tensorboard-dir", str(d / "tb")])
        _cache[router] = d / "ckpt", tb_scalars(d / "tb", "loss")
    return _cache[router]


@pytest.mark.parametrize("router,layout", CASES)
def test_vit_layout_matches_one_rank(router, layout, tmp_path, tmp_path_factory):
    ckpt, ref = reference(router, tmp_path_factory)
    run_vit(BASE + ROUTERS[router] + LAYOUTS[layout] + ["--train-iters", "3", "--finetune", "--load", str(ckpt),
                                                        "--tensorboard-dir", str(tmp_path / "tb")], nproc=2)
    got = tb_scalars(tmp_path / "tb", "loss")
    assert sorted(got) == [1, 2, 3]
    for i in (1, 2, 3):
        assert abs(got[i] - ref[i]) < 1e-5, (i, got, ref)
