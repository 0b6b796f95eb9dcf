"""DeepSpeed universal checkpoints: ZeRO-1/2 saved by 2 gloo ranks, resumed by 1 process.

A Self-Routing MoE GPT trains 2 steps under ZeRO-1 and ZeRO-2 with data parallel 2 (EP=TP=PP=1),
saves a DeepSpeed checkpoint, and keeps training 2 more steps (the reference). DeepSpeed's own
`ds_to_universal` converts each checkpoint; a fresh single-process run (DP=1, a different init
seed, micro batch 4 = the same global batch of 4) loads it with `"checkpoint": {"load_universal":
true}` and takes the same 2 steps.

Checked:
- exact (torch.equal): the loaded parameters and fp32 master weights equal the saved fp32 weights,
  and Adam's exp_avg / exp_avg_sq equal the saved ones, parameter by parameter. The conversion
  only slices and concatenates fp32 tensors, so no rounding is allowed.
- step count, lr and client state come back.
- within 1e-5: the next two losses and the weights after the next step match the 2-rank run. The
  2-rank run averages two half-batch gradients while the 1-rank run backpropagates the whole batch
  at once, so the gradients agree only up to float32 summation order (~1e-7 relative); Adam turns
  that into weight differences far below 1e-5 (its steps are ~lr = 1e-3 in size). Dropping or
  scrambling the moments or the step count moves the weights by ~1e-4..1e-3, which 1e-5 catches.

The model needs two things before DeepSpeed can convert its checkpoint;
selfmoe.deepspeed_utils.initialize does them (prepare_universal_checkpoint).
"""

import argparse
import os

import pytest
import torch
import torch.multiprocessing as mp_

from conftest import free_port
from helpers import dp_step, tiny_config

STAGES = (1, 2)
BEFORE, AFTER = 2, 2  # steps before the checkpoint, steps compared after it
GLOBAL_BATCH, LR, EPS = 4, 1e-3, 1e-8
TOL = 1e-5


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (GLOBAL_BATCH, 16), generator=g) for _ in range(BEFORE + AFTER)]


def ds_config(stage, micro, universal=False):
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "eps": EPS, "torch_adam": True, "weight_decay": 0.0}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def _worker(rank, world, port, root, out):
    """world 2: train, save, keep training. world 1: load the universal checkpoint, keep training."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import selfmoe  # noqa: F401
    from deepspeed.utils import safe_get_full_fp32_param
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from selfmoe import deepspeed_utils
    from selfmoe.models import build_gpt_model

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(1, 1)
    micro = GLOBAL_BATCH // world
    data = batches()

    def full_adam_state(engine, key):
        """Adam's `key` per parameter, gathered from the flat per-rank tensors the optimizer steps.

        Not deepspeed.utils.safe_get_full_optimizer_state: under ZeRO-1/2 it raises for every
        parameter group after the first (stage_1_and_2.py links the state fragments of all groups
        right after group 0's first step, before the others have any state).
        """
        zero, names = engine.optimizer, {id(p): k for k, p in engine.module.named_parameters()}
        out = {}
        for i, group in enumerate(zero.bit16_groups):
            flat = zero.optimizer.state[zero.single_partition_of_fp32_groups[i]][key]
            for p in group:
                full = torch.zeros(p.numel(), dtype=flat.dtype)
                m = p._hp_mapping  # this rank's fragment of p: where it sits in p and in the partition
                if m is not None:
                    full.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(
                        flat.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel))
                dist.all_reduce(full, group=p._dp_group)  # other ranks add zeros: exact
                out[names[id(p)]] = full.view_as(p)
        return out

    def snapshot(engine):
        """Full (gathered) weights, fp32 masters and Adam moments; collective on every rank."""
        named = list(engine.module.named_parameters())
        state = {"module": {k: p.detach().clone() for k, p in named}}
        state["fp32"] = {k: safe_get_full_fp32_param(p).clone() for k, p in named}
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = full_adam_state(engine, key)
        opt = engine.optimizer.optimizer  # the torch AdamW inside ZeRO
        state["adam_steps"] = sorted({int(s["step"]) for s in opt.state.values()})
        state["lr"] = [g["lr"] for g in opt.param_groups]
        state["global_steps"] = engine.global_steps
        return state

    res = {}
    for stage in STAGES:
        ckpt = os.path.join(root, f"zero{stage}")
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1 if world == 2 else 999)  # resumed run: everything must come from the checkpoint
        model = build_gpt_model(tiny_config("self"))  # deepspeed_utils.initialize readies it
        engine, _ = deepspeed_utils.initialize(model, ds_config(stage, micro, universal=world == 1))
        r = {}
        if world == 2:
            for ids in data[:BEFORE]:
                dp_step(engine, ids, rank, world)
            engine.save_checkpoint(ckpt, tag=f"step{BEFORE}", client_state={"iteration": BEFORE})
        else:
            path, client = engine.load_checkpoint(ckpt)  # tag from `latest_universal`
            r["load_path"], r["iteration"] = path, client.get("iteration")
        r["at_ckpt"] = snapshot(engine)
        r["losses"] = [dp_step(engine, data[BEFORE], rank, world)]
        r["weights_after_1"] = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
        r["losses"] += [dp_step(engine, ids, rank, world) for ids in data[BEFORE + 1:]]
        res[stage] = r
    if rank == 0:
        torch.save(res, out)
    dist.barrier()


def convert(ckpt_root, tag):
    """DeepSpeed's ds_to_universal, as `python -m deepspeed.checkpoint.ds_to_universal` runs it."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=os.path.join(ckpt_root, tag),
                              output_folder=os.path.join(ckpt_root, f"{tag}_universal"),
                              num_extract_workers=1, num_merge_workers=1,  # no process pools in a test
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)
    return args.output_folder


def assert_all_equal(got, want, what):
    assert set(got) == set(want), what
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.slow
def test_zero_checkpoint_from_2_ranks_resumes_on_1_via_universal(tmp_path):
    root = str(tmp_path / "ckpt")
    saved_out, resumed_out = tmp_path / "saved.pt", tmp_path / "resumed.pt"
    mp_.spawn(_worker, args=(2, free_port(), root, str(saved_out)), nprocs=2, join=True)
    for stage in STAGES:
        universal = convert(os.path.join(root, f"zero{stage}"), f"step{BEFORE}")
        assert open(os.path.join(root, f"zero{stage}", "latest_universal")).read() == os.path.basename(universal)
    mp_.spawn(_worker, args=(1, free_port(), root, str(resumed_out)), nprocs=1, join=True)
    saved, resumed = torch.load(saved_out), torch.load(resumed_out)

    for stage in STAGES:
        s, r = saved[stage], resumed[stage]
        a, b = s["at_ckpt"], r["at_ckpt"]
        assert os.path.basename(os.path.dirname(r["load_path"])) == f"step{BEFORE}_universal", stage
        assert r["iteration"] == BEFORE  # client state rides along
        # the saved fp32 weights (ZeRO-1/2 in fp32: the module holds the masters' values)
        assert_all_equal(a["fp32"], a["module"], f"zero{stage} saved masters vs module")
        assert_all_equal(b["module"], a["fp32"], f"zero{stage} loaded parameters")
        assert_all_equal(b["fp32"], a["fp32"], f"zero{stage} loaded fp32 masters")
        for key in ("exp_avg", "exp_avg_sq"):
            assert any(v.abs().sum() > 0 for v in a[key].values()), key
            assert_all_equal(b[key], a[key], f"zero{stage} loaded {key}")
        assert a["adam_steps"] == b["adam_steps"] == [BEFORE], stage
        assert a["global_steps"] == b["global_steps"] == BEFORE, stage
        assert a["lr"] == b["lr"], stage
        # training goes on as if nothing had happened
        assert r["losses"] == pytest.approx(s["losses"], abs=TOL), stage
        for k, w in s["weights_after_1"].items():
            assert torch.allclose(r["weights_after_1"][k], w, rtol=0, atol=TOL), (stage, k)
