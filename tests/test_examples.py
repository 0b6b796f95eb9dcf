"""The launch scripts in examples/ run as documented, at toy size, with 2 ranks on CPU."""

import os
import subprocess
import sys

import pytest

from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra_env", [("self-routing", {"EP": "2"}), ("routing-free", {"TP": "2"})])
def test_recipe_toy_run(tmp_path, recipe, extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env.update(SIZE="toy", GPUS_PER_NODE="2", RECIPE=recipe, PYTHON=sys.executable, SAVE_DIR=str(tmp_path / "ck"),
               TB_DIR=str(tmp_path / "tb"), MASTER_PORT=str(free_port()), TRAIN_ITERS="3", **extra_env)
    p = subprocess.run(["bash", "examples/gpt2_small_recipes.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert [line.split("|")[0].strip() for line in p.stdout.splitlines() if line.startswith("iteration ")] == \
        ["iteration 1/3", "iteration 2/3", "iteration 3/3"]
    ep, tp = extra_env.get("EP", "1"), extra_env.get("TP", "1")
    assert f"tensor-parallel {tp}" in p.stdout and f"expert-parallel {ep}" in p.stdout
    assert os.path.isfile(tmp_path / "ck" / "latest_checkpointed_iteration.txt")
