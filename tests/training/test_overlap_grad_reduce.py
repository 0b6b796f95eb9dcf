"""--overlap-grad-reduce on 2 gloo ranks: Megatron-Core's DDP starts each bucket's all-reduce
(reduce-scatter under --use-distributed-optimizer) during the last micro-batch's backward pass;
the weights after two optimizer steps equal the non-overlapped run's."""

import os

import pytest
import torch
import torch.multiprocessing as mp_

from conftest import free_port

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--global-batch-size 8 --train-iters 2 --lr 1e-2 --mock-data --tokenizer-type NullTokenizer "
        "--vocab-size 60 --hidden-dropout 0 --attention-dropout 0 --num-experts 4 --disable-bias-linear "
        "--moe-router-type self").split()
pytestmark = pytest.mark.slow


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from selfmoe.training import gpt
    from selfmoe.training.arguments import args_to_config, parse_args
    from selfmoe.training.distributed import destroy_distributed, init_distributed, set_random_seed
    from selfmoe.training.trainer import build_model, build_optimizer, train_step, wire_config

    results = {}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (2, 8, 16), generator=g)  # 2 steps x global batch 8
    for name, extra in (("ddp", []), ("ddp-overlap", ["--overlap-grad-reduce"]),
                        ("distopt", ["--use-distributed-optimizer"]),
                        ("distopt-overlap", ["--use-distributed-optimizer", "--overlap-grad-reduce"])):
        args = parse_args(BASE + extra, world_size=world)
        config = args_to_config(args)
        init_distributed(args)
        set_random_seed(args.seed)
        model = build_model(args, config, gpt.model_provider)
        assert model[0].ddp_config.overlap_grad_reduce == ("--overlap-grad-reduce" in extra)
        optimizer, scheduler = build_optimizer(args, model)
        wire_config(config, optimizer, model)
        losses = []
        for step in range(2):
            mine = ids[step, rank * 4:(rank + 1) * 4]  # this rank's 2 micro-batches of 2
            batches = iter([dict(tokens=mine[i:i + 2], labels=mine[i:i + 2], loss_mask=torch.ones(2, 16),
                                 position_ids=torch.arange(16)[None].expand(2, 16)) for i in (0, 2)])
            loss, _, skipped = train_step(gpt.forward_step, batches, model, optimizer, scheduler, args, config)
            assert not skipped
            losses.append(loss)
        results[name] = (losses, {n: p.detach().clone() for n, p in model[0].module.named_parameters()})
        config.no_sync_func = config.grad_sync_func = None
    destroy_distributed()
    if rank == 0:
        torch.save(results, out)


def test_overlapped_gradient_reduction_equals_the_plain_one(tmp_path):
    out = str(tmp_path / "results.pt")
    mp_.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    results = torch.load(out)
    for plain, overlap in (("ddp", "ddp-overlap"), ("distopt", "distopt-overlap")):
        (la, wa), (lb, wb) = results[plain], results[overlap]
        assert la == pytest.approx(lb, rel=1e-6) and la[1] != la[0]
        for n in wa:
            torch.testing.assert_close(wb[n], wa[n], rtol=1e-6, atol=1e-7, msg=f"{overlap}: {n}")
