"""DeepSpeed ZeRO 1/2/3 around a Megatron-Core MoE GPT on 2 gloo ranks.

Reference: the same model and data trained by plain torch AdamW in one process on the global
batch. Tolerance 1e-5: the data-parallel mean of two half-batch losses equals the full-batch mean
up to float32 summation order. Both clip the gradient norm at 1.0, and the norm is above 1.0
at every step, so a wrong norm (e.g. experts counted once instead of per EP rank) would show.
With EP=2 every rank holds half the experts: DeepSpeed must partition and reduce them over the
expert-data-parallel group (selfmoe.deepspeed_utils.MegatronMoEEngine); without that the run fails.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp_

from conftest import free_port
from helpers import dp_step, lm_loss, tiny_config

STEPS, LR, EPS = 3, 1e-3, 1e-8


def batches(router, ep=1):
    g = torch.Generator().manual_seed(0)
    if router != "hash":
        return [torch.randint(0, 64, (4, 16), generator=g) for _ in range(STEPS + 2)]
    # EP=1: rank 0's half of each batch only uses experts {0, 1}, rank 1's only {2, 3}, so on each
    # rank two local experts get no token at all. EP=2: no token anywhere uses experts {2, 3}, which
    # live on rank 1 only. ZeRO's collectives still need their (zero) gradients.
    from selfmoe.routers.hash_router import hash_table

    cfg = tiny_config("hash")
    table = hash_table(cfg.vocab_size, cfg.num_moe_experts, cfg.moe_router_topk, cfg.hash_router_seed)
    low = torch.tensor([i for i in range(64) if set(table[i].tolist()) == {0, 1}])
    high = torch.tensor([i for i in range(64) if set(table[i].tolist()) == {2, 3}])
    assert len(low) and len(high)
    pick = lambda ids: ids[torch.randint(0, len(ids), (2, 16), generator=g)]
    return [torch.cat([pick(low), pick(low if ep == 2 else high)]) for _ in range(STEPS + 2)]


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "eps": EPS, "torch_adam": True, "weight_decay": 0.0}},
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}


def _worker(rank, port, out, router, ckpt_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import selfmoe  # noqa: F401
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from selfmoe import deepspeed_utils
    from selfmoe.models import build_gpt_model

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps.initialize_model_parallel(1, 1)
    res = {}
    data = batches(router)
    for stage in (0, 1, 2, 3):
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1)
        engine, _ = deepspeed_utils.initialize(build_gpt_model(tiny_config(router)), ds_config(stage))
        losses = []
        for i, ids in enumerate(data):
            if i == STEPS and stage == 2:
                engine.save_checkpoint(ckpt_dir, tag="step3")
                if rank == 0:
                    torch.save({k: v.detach().clone() for k, v in engine.module.named_parameters()},
                               os.path.join(ckpt_dir, "weights_step3.pt"))
            losses.append(dp_step(engine, ids, rank, 2))
        res[f"zero{stage}"] = losses
    # resume ZeRO-2 from the step-3 checkpoint: the last steps repeat exactly
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    torch.manual_seed(999)  # different init: everything must come from the checkpoint
    engine, _ = deepspeed_utils.initialize(build_gpt_model(tiny_config(router)), ds_config(2))
    engine.load_checkpoint(ckpt_dir, tag="step3")
    res["zero2_resumed"] = [dp_step(engine, ids, rank, 2) for ids in data[STEPS:]]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()


def _ep_worker(rank, port, out, router, tmp):
    """EP=2 (each rank holds half the experts) under DeepSpeed without ZeRO and with ZeRO 1/2,
    starting from the EP=1 model's weights (resharded by dist_checkpointing)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import selfmoe  # noqa: F401
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from selfmoe import deepspeed_utils
    from selfmoe.models import build_gpt_model

    dist.init_process_group("gloo", rank=rank, world_size=2)
    init = os.path.join(tmp, "init")
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    torch.manual_seed(1)
    ref = build_gpt_model(tiny_config(router))  # the same weights reference_losses starts from
    os.makedirs(init, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(ref.sharded_state_dict(), init)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=2)

    def engine_for(stage, seed=1):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        model = build_gpt_model(tiny_config(router, expert_model_parallel_size=2))
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), init))
        engine, _ = deepspeed_utils.initialize(model, ds_config(stage))
        return engine

    res, data = {}, batches(router, ep=2)
    ckpt = os.path.join(tmp, "ckpt")
    for stage in (0, 1, 2):
        engine = engine_for(stage)
        res["engine"] = type(engine).__name__
        losses = []
        for i, ids in enumerate(data):
            if i == STEPS and stage == 2:
                engine.save_checkpoint(ckpt, tag="step3")
            losses.append(dp_step(engine, ids, rank, 2))
        res[f"zero{stage}"] = losses
    engine = engine_for(2, seed=999)
    for p in engine.module.parameters():  # everything must come from the checkpoint
        p.data.normal_()
    engine.load_checkpoint(ckpt, tag="step3")
    res["zero2_resumed"] = [dp_step(engine, ids, rank, 2) for ids in data[STEPS:]]
    res["files"] = sorted(os.listdir(os.path.join(ckpt, "step3")))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()


def reference_losses(router, ep=1):
    """One process, plain torch AdamW, the whole global batch: no DeepSpeed involved."""
    from selfmoe.models import build_gpt_model
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1)
    torch.manual_seed(1)
    model = build_gpt_model(tiny_config(router))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    losses = []
    for ids in batches(router, ep):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("router", ["self", "routing-free", "hash"])
def test_zero_stages_match_plain_training_and_resume_exactly(mp, tmp_path, router):
    ref = reference_losses(router)
    out = tmp_path / "res.json"
    mp_.spawn(_worker, args=(free_port(), str(out), router, str(tmp_path / "ckpt")), nprocs=2, join=True)
    res = json.loads(out.read_text())
    for stage in range(4):
        assert res[f"zero{stage}"] == pytest.approx(ref, abs=1e-5), stage
    assert res["zero2_resumed"] == res["zero2"][STEPS:]  # bit-exact resume
    # DeepSpeed's zero_to_fp32 path gives back exactly the weights the engine held
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="step3")
    held = torch.load(tmp_path / "ckpt" / "weights_step3.pt")
    assert set(held) <= set(fp32)
    for k in held:
        assert torch.equal(fp32[k], held[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("router", ["self", "routing-free", "hash"])
def test_ep2_under_zero_matches_ep1_and_resumes_exactly(mp, tmp_path, router):
    """EP=2 + ZeRO-0/1/2 (experts partitioned and reduced over the expert-data-parallel group) trains
    like one process holding every expert, clipping included. hash: rank 1's two experts get no
    token at all."""
    ref = reference_losses(router, ep=2)
    out = tmp_path / "res.json"
    mp_.spawn(_ep_worker, args=(free_port(), str(out), router, str(tmp_path)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert res["engine"] == "MegatronMoEEngine"
    for stage in (0, 1, 2):
        assert res[f"zero{stage}"] == pytest.approx(ref, abs=1e-5), stage
    assert res["zero2_resumed"] == res["zero2"][STEPS:]  # bit-exact resume, experts included
    assert {"expp_rank_0_mp_rank_00_megatron_experts.pt", "expp_rank_1_mp_rank_00_megatron_experts.pt",
            "mp_rank_00_model_states.pt"} <= set(res["files"])
