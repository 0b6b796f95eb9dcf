"""2 gloo ranks: EP=2 (both dispatchers) and TP=2 + sequence parallel reproduce the 1-way model.

The reference model is built data-parallel (each rank holds all of it), saved with Megatron-Core
dist_checkpointing and loaded into each parallel layout (Megatron's resharding), so every layout
starts from the same weights. Both ranks feed the same batch. Tolerance 1e-5: float32 sums in a
different order (expert permutation, split matmuls) differ in the last bits, not more.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp_

from conftest import free_port

ROUTERS = ["learned", "self", "random", "hash", "routing-free"]
LAYOUTS = [  # (name, tp, ep, dispatcher)
    ("ep2-allgather", 1, 2, "allgather"),
    ("ep2-alltoall", 1, 2, "alltoall"),
    ("tp2-sp", 2, 1, "allgather"),
    ("tp2-sp-alltoall", 2, 1, "alltoall"),
]


def _worker(rank, world, port, tmp, routers):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    import selfmoe  # noqa: F401
    from helpers import tiny_config
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from selfmoe.models import build_gpt_model, moe_layers

    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}

    def setup(tp, ep):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)

    def run(model):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (3, 16), generator=g)
        labels = torch.randint(0, 64, (3, 16), generator=g)
        loss = model(ids, torch.arange(16)[None].expand(3, 16), None, labels=labels)
        loss.sum().backward()
        layer = moe_layers(model)[0]
        expert_grads = {}
        for j, e in enumerate(layer.local_expert_indices):
            ex = layer.experts
            w = ex.up_proj[j] if hasattr(ex, "up_proj") else ex.local_experts[j].linear_fc1.weight
            gw = ex.up_proj.grad[j] if hasattr(ex, "up_proj") else w.grad
            expert_grads[e] = gw
        return loss.detach(), expert_grads

    for router in routers:
        ckpt = os.path.join(tmp, router)
        os.makedirs(ckpt, exist_ok=True)
        dist.barrier()
        setup(1, 1)
        ref_model = build_gpt_model(tiny_config(router))
        dist_checkpointing.save(ref_model.sharded_state_dict(), ckpt)
        ref_loss, ref_eg = run(ref_model)
        for name, tp, ep, dispatcher in LAYOUTS:
            setup(tp, ep)
            cfg = tiny_config(router, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                              sequence_parallel=tp > 1, moe_token_dispatcher_type=dispatcher)
            model = build_gpt_model(cfg)
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
            loss, eg = run(model)
            out = {"loss_diff": float((loss - ref_loss).abs().max()), "loss": float(loss.mean())}
            if tp == 1:
                # Expert e sees the tokens of both EP ranks (the same batch twice): twice the grad.
                out["expert_grad_diff"] = max(float((g / ep - ref_eg[e]).abs().max()) for e, g in eg.items())
                out["local_experts"] = sorted(eg)
            results[f"{router}/{name}"] = out
    ps.destroy_model_parallel()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ep2_and_tp2_match_single_rank(tmp_path):
    mp_.spawn(_worker, args=(2, free_port(), str(tmp_path), ROUTERS), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(results) == len(ROUTERS) * len(LAYOUTS)
        for key, r in results.items():
            assert r["loss_diff"] < 1e-5, (rank, key, r)
            if "expert_grad_diff" in r:
                assert r["expert_grad_diff"] < 1e-5, (rank, key, r)
                assert r["local_experts"] == [2 * rank, 2 * rank + 1], (rank, key, r)
