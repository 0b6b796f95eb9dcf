"""TP=2 + SP with --expert-tensor-parallel-size 1 on 2 gloo ranks trains with the 1-rank losses.

Each TP rank holds a full replica of every expert and feeds it its own sequence shard, so the
replicas stay equal only if expert grads are reduced over the expert-data-parallel group (both
ranks). megatron-core 0.16.1 reduces them over the data-parallel group (size 1 here): the losses
left the 1-rank curve from step 2 (mcore_compat.expert_grads_reduced_over_expert_dp fixes it).
Megatron's experts (learned router) and Routing-Free's AoE experts.
"""

import pytest

from helpers import tb_scalars
from test_training_layouts import BASE, ROUTERS, run_gpt

pytestmark = pytest.mark.slow
CASES = {"learned": ["--moe-router-type", "learned"], "routing-free": ROUTERS["routing-free"]}


@pytest.mark.parametrize("router", list(CASES))
def test_etp1_under_tp2_matches_one_rank(router, tmp_path):
    flags = BASE + CASES[router]
    run_gpt(flags + ["--train-iters", "1", "--save", str(tmp_path / "ckpt")])
    run_gpt(flags + ["--train-iters", "4", "--finetune", "--load", str(tmp_path / "ckpt"),
                 "--tensorboard-dir", str(tmp_path / "tb1")])
    run_gpt(flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1",
                 "--train-iters", "4", "--finetune", "--load", str(tmp_path / "ckpt"),
                 "--tensorboard-dir", str(tmp_path / "tb2")], nproc=2)
    ref, got = tb_scalars(tmp_path / "tb1", "lm loss"), tb_scalars(tmp_path / "tb2", "lm loss")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    assert got == pytest.approx(ref, rel=1e-5)
