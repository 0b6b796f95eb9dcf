"""pretrain_gpt.py --deepspeed on 2 gloo ranks: the shipped ZeRO-2 and ZeRO-2/3 offload configs (and
ZeRO-2 with EP=2) follow the Megatron-Core path's losses, and a DeepSpeed checkpoint resumes onto
the uninterrupted curve, on 2 ranks and, through DeepSpeed's universal checkpoint, on 1.

Tolerance 1e-5 (relative): both paths use torch AdamW, the same clipping, lr schedule and data
order; only the order of float32 gradient reductions differs.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--train-iters", "6", "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-iters", "0", "--disable-bias-linear", "--num-experts", "4", "--moe-router-type", "routing-free",
         "--routing-free-rank", "8", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
         "--hidden-dropout", "0", "--attention-dropout", "0",
         # a large, fast-moving λ (a buffer): a resume that lost it would show in the losses
         "--routing-free-lambda0", "0.05", "--routing-free-eta", "0.5"]


def torchrun(tmp_path, name, *extra, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    tb = tmp_path / f"tb_{name}"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                        "pretrain_gpt.py", *FLAGS, "--tensorboard-dir", str(tb), *extra],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars("lm loss")}, p.stdout


@pytest.mark.slow
def test_zero_stages_follow_megatron_path_and_resume(tmp_path):
    ref, _ = torchrun(tmp_path, "megatron")
    assert sorted(ref) == list(range(1, 7))
    # the shipped configs; plain ZeRO-1/3 are covered at engine level in tests/test_deepspeed_utils.py
    for name, stage in (("zero2", 2), ("zero2_offload", 2), ("zero3_offload", 3)):
        got, out = torchrun(tmp_path, name, "--deepspeed", "--deepspeed-config",
                            os.path.join(REPO, "examples", "deepspeed", f"{name}.json"))
        assert f"DeepSpeed ZeRO stage {stage}" in out
        assert got == pytest.approx(ref, rel=1e-5), name
    # EP=2 under ZeRO-2 (each rank holds half the experts) follows the Megatron-Core path at EP=2.
    # Not the EP=1 curve: Megatron seeds expert init per EP rank, so EP=2 starts from other expert
    # weights; EP=2 == EP=1 from the same weights is tests/test_deepspeed_utils.py's job.
    ep2 = ["--expert-model-parallel-size", "2"]
    ref_ep2, _ = torchrun(tmp_path, "megatron-ep2", *ep2)
    got, out = torchrun(tmp_path, "zero2-ep2", *ep2, "--deepspeed", "--deepspeed-config",
                        os.path.join(REPO, "examples", "deepspeed", "zero2.json"))
    assert "DeepSpeed ZeRO stage 2" in out
    assert got == pytest.approx(ref_ep2, rel=1e-5)
    # stop after iteration 3 (saving), resume to 6: the same losses as the uninterrupted ZeRO-2 run
    ds = ["--deepspeed", "--deepspeed-config", os.path.join(REPO, "examples", "deepspeed", "zero2.json"),
          "--save", str(tmp_path / "ck"), "--save-interval", "3"]
    first, _ = torchrun(tmp_path, "part1", *ds, "--exit-interval", "3")
    assert sorted(first) == [1, 2, 3]
    second, out = torchrun(tmp_path, "part2", *ds, "--load", str(tmp_path / "ck"))
    assert "loaded checkpoint" in out and sorted(second) == [4, 5, 6]
    assert {**first, **second} == pytest.approx(ref, rel=1e-5)
    # another world size: DeepSpeed's universal checkpoint (README commands), resumed by 1 process
    ck3 = tmp_path / "ck" / "iter_0000003"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ck3),
                    "--output_folder", f"{ck3}_universal", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    cfg = json.load(open(os.path.join(REPO, "examples", "deepspeed", "zero2.json")))
    cfg["checkpoint"] = {"load_universal": True}
    (tmp_path / "universal.json").write_text(json.dumps(cfg))
    one, out = torchrun(tmp_path, "universal", "--deepspeed", "--deepspeed-config", str(tmp_path / "universal.json"),
                        "--load", str(tmp_path / "ck"), nproc=1)
    assert "data-parallel 1" in out and sorted(one) == [4, 5, 6]
    assert one == pytest.approx({i: ref[i] for i in (4, 5, 6)}, rel=1e-5)


@pytest.mark.slow
def test_deepspeed_flag_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n "oops"}\n')
    cases = {
        ("--deepspeed",): "error: --deepspeed needs --deepspeed-config <file.json> (see examples/deepspeed/)",
        ("--deepspeed", "--deepspeed_config", str(bad)): f"error: --deepspeed-config {bad}: line 2: ",
        ("--deepspeed", "--deepspeed-config", str(tmp_path / "none.json")):
            f"error: --deepspeed-config {tmp_path / 'none.json'}: no such file",
        ("--deepspeed", "--deepspeed-config", os.path.join(REPO, "examples", "deepspeed", "zero3.json"),
         "--expert-model-parallel-size", "2"): "error: --deepspeed-config " + os.path.join(
             REPO, "examples", "deepspeed", "zero3.json") + ": ZeRO stage 3 with --expert-model-parallel-size > 1",
    }
    for extra, want in cases.items():
        p = subprocess.run([sys.executable, "pretrain_gpt.py", *FLAGS, *extra], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(want), (extra, p.stderr[-1500:])


def test_resume_with_another_expert_layout_is_refused(tmp_path):
    """Each EP rank's experts sit in their own file: a DeepSpeed checkpoint saved at EP=2 cannot
    feed an EP=1 run, and says so before any model is built."""
    import torch

    from helpers import tiny_config
    from selfmoe.config import config_fingerprint
    from selfmoe.training import deepspeed_backend
    from selfmoe.training.checkpointing import CheckpointError

    config = tiny_config("self")
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "latest").write_text("iter_0000003")
    torch.save({"config": config_fingerprint(config), "expert_model_parallel_size": 2},
               tmp_path / "iter_0000003" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="saved with --expert-model-parallel-size 2, this run has 1"):
        deepspeed_backend.check_resume_compatible(str(tmp_path), config)
    deepspeed_backend.check_resume_compatible(str(tmp_path), tiny_config("self", expert_model_parallel_size=2))
