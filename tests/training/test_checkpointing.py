"""Checkpoints under kill -9: resuming continues the uninterrupted loss curve exactly, a kill inside
a save leaves the previous checkpoint loadable, a different model config is refused in one line,
a checkpoint loads into other parallel layouts (PP, TP+SP, EP) with the same losses, and resumes
there with its optimizer state (plain optimizer; distributed one saved fully_reshardable).

Each run is a real `python pretrain_gpt.py` process; per-iteration losses are read back from the
TensorBoard event files the runs write. Dropout stays on (0.1) so the RNG has to be restored too.
"""

import os
import signal
import subprocess
import sys

import pytest

from helpers import tb_scalars

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "2",
         "--lr-decay-style", "cosine", "--train-iters", "8", "--log-interval", "1", "--eval-interval", "4",
         "--eval-iters", "1", "--disable-bias-linear", "--num-experts", "4",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255"]
ROUTERS = {
    # lambda (a model buffer) must be restored: make it large and fast-moving so it matters
    "routing-free": ["--moe-router-type", "routing-free", "--routing-free-rank", "8", "--routing-free-lambda0", "0.05",
                     "--routing-free-eta", "0.5"],
    # the aux-loss-free expert bias is a buffer updated at every step
    "learned": ["--moe-router-type", "learned", "--moe-router-enable-expert-bias", "--moe-router-score-function",
                "sigmoid", "--moe-router-bias-update-rate", "0.05"],
    # the random router's draws follow its forward count, a buffer
    "random": ["--moe-router-type", "random"],
}


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    e.pop("SELFMOE_TEST_SLEEP_IN_SAVE", None)
    return e


def train(argv, **env_extra):
    p = subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO, env=dict(env(), **env_extra),
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def train_and_kill(argv, marker, tmp_path, **env_extra):
    """Start a run, SIGKILL its whole process group once `marker` is printed; returns (rc, stdout)."""
    with open(tmp_path / "killed.stderr", "w") as err:
        p = subprocess.Popen([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO, env=dict(env(), **env_extra),
                             stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        lines = []
        for line in p.stdout:
            lines.append(line)
            if marker in line:
                os.killpg(p.pid, signal.SIGKILL)
                break
        p.stdout.close()
        rc = p.wait(timeout=60)
    return rc, "".join(lines)


def tb_losses(logdir):
    return tb_scalars(logdir, "lm loss")


_uninterrupted: dict = {}


def uninterrupted(router, tmp_path_factory):
    """Per-iteration losses of the same run without interruption (computed once per router)."""
    if router not in _uninterrupted:
        tb = tmp_path_factory.mktemp(f"full-{router}")
        rc, out, err = train(FLAGS + ROUTERS[router] + ["--tensorboard-dir", str(tb)])
        assert rc == 0, err[-3000:]
        _uninterrupted[router] = tb_losses(tb)
        assert sorted(_uninterrupted[router]) == list(range(1, 9))
    return _uninterrupted[router]


@pytest.mark.parametrize("router", ["routing-free", "learned"])
def test_kill9_then_resume_gives_identical_losses(router, tmp_path, tmp_path_factory):
    reference = uninterrupted(router, tmp_path_factory)
    ckpt = tmp_path / "ckpt"
    rc, out = train_and_kill(FLAGS + ROUTERS[router] + ["--save", str(ckpt), "--save-interval", "4"],
                             "iteration 6/8", tmp_path)
    assert rc == -signal.SIGKILL, out  # killed mid-run, not finished
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    rc, out, err = train(FLAGS + ROUTERS[router] + ["--load", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb")])
    assert rc == 0, err[-3000:]
    assert "iter_0000004 (iteration 4, 16 samples consumed)" in out
    resumed = tb_losses(tmp_path / "tb")
    assert sorted(resumed) == [5, 6, 7, 8]
    for i in (5, 6, 7, 8):
        assert resumed[i] == reference[i], f"iteration {i}: {resumed[i]!r} != {reference[i]!r}"


def test_kill_inside_save_keeps_previous_checkpoint(tmp_path, tmp_path_factory):
    reference = uninterrupted("random", tmp_path_factory)
    ckpt = tmp_path / "ckpt"
    rc, out = train_and_kill(FLAGS + ROUTERS["random"] + ["--save", str(ckpt), "--save-interval", "2"],
                             "[test hook] sleeping", tmp_path, SELFMOE_TEST_SLEEP_IN_SAVE="4:120")
    assert rc == -signal.SIGKILL, out
    assert "saved checkpoint" in out and "iter_0000002" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (ckpt / "iter_0000004").exists()
    assert any(n.startswith(".tmp_iter_0000004") for n in os.listdir(ckpt))  # the interrupted save
    rc, out, err = train(FLAGS + ROUTERS["random"] + ["--load", str(ckpt), "--save", str(ckpt), "--save-interval",
                                                      "100", "--tensorboard-dir", str(tmp_path / "tb")])
    assert rc == 0, err[-3000:]
    assert "iter_0000002 (iteration 2, 8 samples consumed)" in out
    resumed = tb_losses(tmp_path / "tb")
    assert sorted(resumed) == list(range(3, 9))
    for i in range(3, 9):
        assert resumed[i] == reference[i], f"iteration {i}: {resumed[i]!r} != {reference[i]!r}"
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000008", "latest_checkpointed_iteration.txt"]


@pytest.fixture(scope="module")
def one_step_checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("one-step") / "ckpt"
    rc, out, err = train(FLAGS + ["--train-iters", "1", "--lr-warmup-iters", "0", "--eval-iters", "0", "--save", str(ckpt)])
    assert rc == 0, err[-3000:]
    return ckpt


def test_resume_with_another_hidden_size_fails_in_one_line(one_step_checkpoint):
    rc, out, err = train(FLAGS + ["--load", str(one_step_checkpoint), "--hidden-size", "32"])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: cannot resume from") and "hidden_size=64 in the checkpoint but 32 now" in lines[0]
    assert "parameters:" not in out  # refused before the model was built


LAYOUTS = {
    "pipeline-2": ["--pipeline-model-parallel-size", "2"],
    "tensor-2+sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "expert-2-alltoall": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
}
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--train-iters", "4",
              "--lr-warmup-iters", "0", "--finetune"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_loads_into_other_parallel_layouts_with_same_losses(layout, one_step_checkpoint, tmp_path,
                                                                       tmp_path_factory):
    """Same weights, same data: 2 ranks split by PP, TP+SP or EP train exactly like 1 rank."""
    if "reference" not in _uninterrupted:
        tb = tmp_path_factory.mktemp("layout-reference")
        rc, out, err = train(FLAGS + NO_DROPOUT + ["--load", str(one_step_checkpoint), "--tensorboard-dir", str(tb)])
        assert rc == 0, err[-3000:]
        _uninterrupted["reference"] = tb_losses(tb)
    reference = _uninterrupted["reference"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "pretrain_gpt.py", *FLAGS, *NO_DROPOUT, *LAYOUTS[layout], "--load", str(one_step_checkpoint),
                        "--tensorboard-dir", str(tmp_path / "tb")], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = tb_losses(tmp_path / "tb")
    assert sorted(losses) == sorted(reference) == [1, 2, 3, 4]
    for i in reference:
        assert losses[i] == pytest.approx(reference[i], rel=1e-5)


# Resume WITH the optimizer state on another layout. --vocab-size 300 pads to 384 at TP=1 but 512
# at TP=2 (Megatron-LM pads to 128 x TP): the resumed run keeps the checkpoint's 384.
RESUME_FLAGS = FLAGS + ["--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--vocab-size",
                        "300"]
RESUME_LAYOUTS = {
    "tensor-2+sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pipeline-2": ["--pipeline-model-parallel-size", "2"],
}


@pytest.fixture(scope="module")
def reference_and_checkpoint_4(tmp_path_factory):
    """Losses 1..8 of one run at 1 rank, and its checkpoint of iteration 4 (named latest)."""
    root = tmp_path_factory.mktemp("resume-layouts")
    rc, out, err = train(RESUME_FLAGS + ["--save", str(root / "ck"), "--save-interval", "4", "--tensorboard-dir",
                                         str(root / "tb")])
    assert rc == 0, err[-3000:]
    (root / "ck" / "latest_checkpointed_iteration.txt").write_text("4\n")  # resume from the middle
    return tb_losses(root / "tb"), root / "ck"


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_resume_with_optimizer_on_another_layout_equals_uninterrupted_run(layout, reference_and_checkpoint_4,
                                                                          tmp_path):
    reference, ckpt = reference_and_checkpoint_4
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "pretrain_gpt.py", *RESUME_FLAGS, *RESUME_LAYOUTS[layout], "--load", str(ckpt),
                        "--tensorboard-dir", str(tmp_path / "tb")], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "iteration 4, 16 samples consumed" in p.stdout
    losses = tb_losses(tmp_path / "tb")
    assert sorted(losses) == [5, 6, 7, 8]
    for i in losses:
        assert losses[i] == pytest.approx(reference[i], rel=1e-5), i


def torchrun2(argv, script="pretrain_gpt.py"):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        script, *argv], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def assert_one_rank_resumes_iteration_6_onto(reference, ckpt, tmp_path):
    """1 rank resumes `ckpt` (iteration 6) with its optimizer state: losses 7 and 8 equal the
    uninterrupted run's."""
    rc, out, err = train(RESUME_FLAGS + ["--load", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb")])
    assert rc == 0, err[-3000:]
    assert "iteration 6, 24 samples consumed" in out
    losses = tb_losses(tmp_path / "tb")
    assert sorted(losses) == [7, 8]
    for i in losses:
        assert losses[i] == pytest.approx(reference[i], rel=1e-5), i


EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]


@pytest.fixture(scope="module")
def resumed_on_ep2(reference_and_checkpoint_4, tmp_path_factory):
    """The 1-rank checkpoint of iteration 4 resumed with its optimizer state on 2 ranks with EP=2,
    where Megatron splits the optimizer in two (dense + expert; one at EP=1); saves iteration 6."""
    _, ckpt = reference_and_checkpoint_4
    root = tmp_path_factory.mktemp("resume-ep2")
    out = torchrun2(RESUME_FLAGS + EP2 + ["--load", str(ckpt), "--save", str(root / "ck"), "--save-interval", "2",
                                          "--tensorboard-dir", str(root / "tb")])
    assert "iteration 4, 16 samples consumed" in out
    (root / "ck" / "latest_checkpointed_iteration.txt").write_text("6\n")
    return tb_losses(root / "tb"), root / "ck"


def test_resume_with_optimizer_from_one_rank_onto_expert_parallel_equals_uninterrupted_run(
        reference_and_checkpoint_4, resumed_on_ep2):
    reference, _ = reference_and_checkpoint_4
    losses, _ = resumed_on_ep2
    assert sorted(losses) == [5, 6, 7, 8]
    for i in losses:
        assert losses[i] == pytest.approx(reference[i], rel=1e-5), i


def test_resume_with_optimizer_from_expert_parallel_onto_one_rank_equals_uninterrupted_run(
        reference_and_checkpoint_4, resumed_on_ep2, tmp_path):
    reference, _ = reference_and_checkpoint_4
    _, ckpt = resumed_on_ep2
    assert_one_rank_resumes_iteration_6_onto(reference, ckpt, tmp_path)


LEGACY_SAVER = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
from selfmoe.training import checkpointing as c
_new, _save = c._optimizer_metadata, c.save_checkpoint


def legacy(opt, sharding=c.OPTIM_SHARDING):
    # what this project saved before the optimizer was keyed by parameter: Megatron's default
    # ChainedOptimizer keys, `chained_<i>.optimizer.state...` with EP>1 (dense 0, expert 1)
    return {{k: v for k, v in _new(opt, sharding).items() if k != "chained_optim_avoid_prefix"}}


def save_checkpoint(*args, **kwargs):  # loading stays as it is
    c._optimizer_metadata = legacy
    try:
        return _save(*args, **kwargs)
    finally:
        c._optimizer_metadata = _new


c.save_checkpoint = save_checkpoint
if __name__ == "__main__":
    sys.argv[0] = os.path.join({repo!r}, "pretrain_gpt.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_resume_from_a_checkpoint_with_chained_prefixed_optimizer_keys_equals_uninterrupted_run(
        reference_and_checkpoint_4, tmp_path):
    """Checkpoints written at EP>1 before the optimizer state was keyed by parameter hold it under
    `chained_<i>.` keys; loaded by mapping those keys, they resume like any other (here onto 1 rank)."""
    from torch.distributed.checkpoint import FileSystemReader

    reference, ckpt = reference_and_checkpoint_4
    saver = tmp_path / "legacy_pretrain_gpt.py"
    saver.write_text(LEGACY_SAVER.format(repo=REPO))
    torchrun2(RESUME_FLAGS + EP2 + ["--load", str(ckpt), "--save", str(tmp_path / "ck"), "--exit-interval", "6",
                                    "--save-interval", "2"], script=str(saver))
    keys = FileSystemReader(str(tmp_path / "ck" / "iter_0000006")).read_metadata().state_dict_metadata
    assert any(k.startswith("chained_1.optimizer.state.exp_avg.") for k in keys)
    assert not any(k.startswith("optimizer.state.") for k in keys)
    assert_one_rank_resumes_iteration_6_onto(reference, tmp_path / "ck", tmp_path)


# The distributed optimizer: its default dp_reshardable state holds buffer slices (another DP size
# only); --dist-ckpt-optim-fully-reshardable saves it by parameter, and then any layout resumes.
DIST_OPT = ["--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def fully_reshardable_checkpoint_4(tmp_path_factory):
    """A 1-rank distributed-optimizer run stopped after saving iteration 4 in fully_reshardable."""
    root = tmp_path_factory.mktemp("fully-reshardable")
    rc, out, err = train(RESUME_FLAGS + DIST_OPT + ["--dist-ckpt-optim-fully-reshardable", "--save", str(root / "ck"),
                                                    "--save-interval", "4", "--exit-interval", "4"])
    assert rc == 0, err[-3000:]
    return root / "ck"


@pytest.mark.parametrize("layout", ["tensor-2+sp", "expert-2"])
def test_distributed_optimizer_fully_reshardable_resumes_on_another_layout(layout, reference_and_checkpoint_4,
                                                                           fully_reshardable_checkpoint_4, tmp_path):
    """Needs mcore_compat's fully_reshardable_load_skips_adam_step (else KeyError 'step' in torch Adam);
    the reference is the plain optimizer's 1-rank run (the distributed one follows it < 1e-5)."""
    reference, _ = reference_and_checkpoint_4
    flags = {"tensor-2+sp": RESUME_LAYOUTS["tensor-2+sp"], "expert-2": EP2}[layout]
    out = torchrun2(RESUME_FLAGS + DIST_OPT + flags + ["--load", str(fully_reshardable_checkpoint_4),
                                                       "--tensorboard-dir", str(tmp_path / "tb")])
    assert "iteration 4, 16 samples consumed" in out and "DistributedOptimizer" in out
    losses = tb_losses(tmp_path / "tb")
    assert sorted(losses) == [5, 6, 7, 8]
    for i in losses:
        assert losses[i] == pytest.approx(reference[i], rel=1e-5), i


def test_distributed_optimizer_dp_reshardable_on_another_layout_is_refused_before_building(tmp_path):
    rc, out, err = train(RESUME_FLAGS + DIST_OPT + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save",
                                                    str(tmp_path / "ck")])
    assert rc == 0, err[-3000:]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "pretrain_gpt.py", *RESUME_FLAGS, *DIST_OPT, *RESUME_LAYOUTS["tensor-2+sp"], "--load",
                        str(tmp_path / "ck")], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-3000:]
    assert "its dp_reshardable state reshards over data parallelism only" in lines[0]
    # `in`, not endswith: the other rank's stderr may land on the same line
    assert "--dist-ckpt-optim-fully-reshardable" in lines[0] and "pass --no-load-optim" in lines[0]
    assert "parameters:" not in p.stdout  # refused before the model was built
