"""pretrain_vit.py on 2 gloo ranks gives the 1-rank losses: EP=2 (experts split, data parallel 2),
TP=2 + sequence parallel (patch tokens split; hash routing must use the global patch position),
PP=2. Same weights in every layout: a 1-rank checkpoint, resharded on load by dist_checkpointing;
same images and augmentations: both are functions of the sample position."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def run(argv, nproc=1):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(nproc)]
    p = subprocess.run([*launcher, "pretrain_vit.py", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def tb_losses(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars("loss")}


def reference(router, tmp_path_factory):
    if router not in _cache:
        d = tmp_path_factory.mktemp(f"vit-ref-{router}")
        run(BASE + ROUTERS[router] + ["--train-iters", "1", "--save", str(d / "ckpt")])
        run(BASE + ROUTERS[router] + ["--train-iters", "3", "--finetune", "--load", str(d / "ckpt"),
                                      "--tensorboard-dir", str(d / "tb")])
        _cache[router] = d / "ckpt", tb_losses(d / "tb")
    return _cache[router]


@pytest.mark.parametrize("router,layout", CASES)
def test_vit_layout_matches_one_rank(router, layout, tmp_path, tmp_path_factory):
    ckpt, ref = reference(router, tmp_path_factory)
    run(BASE + ROUTERS[router] + LAYOUTS[layout] + ["--train-iters", "3", "--finetune", "--load", str(ckpt),
                                                    "--tensorboard-dir", str(tmp_path / "tb")], nproc=2)
    got = tb_losses(tmp_path / "tb")
    assert sorted(got) == [1, 2, 3]
    for i in (1, 2, 3):
        assert abs(got[i] - ref[i]) < 1e-5, (i, got, ref)
