import os, torch
import torch.multiprocessing as mp_
import test_universal_checkpoint as T
from conftest import free_port
from helpers import tiny_config

def _w(rank, world, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    import selfmoe  # noqa
    from megatron.core import parallel_state as ps, tensor_parallel
    from selfmoe import deepspeed_utils
    from selfmoe.model import build_gpt_model
    dist.init_process_group("gloo", rank=rank, world_size=world); ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1); torch.manual_seed(1)
    model = T.ready_for_universal(build_gpt_model(tiny_config("routing-free")))
    micro = 4 // world
    engine, _ = deepspeed_utils.initialize(model, T.ds_config(2, micro, universal=world == 1))
    ckpt = os.path.join(root, "z2")
    bufs = lambda: {k: b.item() for k, b in engine.module.named_buffers() if k.endswith("balance_coeff")}
    if world == 2:
        ids = T.batches()[0]
        loss = T.lm_loss(engine, ids[rank*2:(rank+1)*2]); engine.backward(loss); engine.step()
        for k, b in engine.module.named_buffers():
            if k.endswith("balance_coeff"): b.fill_(0.123)
        engine.save_checkpoint(ckpt, tag="s1")
        print("SAVED", bufs())
    else:
        print("BEFORE LOAD", bufs())
        path, _ = engine.load_checkpoint(ckpt)
        print("AFTER UNIVERSAL LOAD", bufs())
        saved = torch.load(path, map_location="cpu", weights_only=False)["module"]
        params = dict(engine.module.named_parameters())
        res = engine.module.load_state_dict({k: v for k, v in saved.items() if k not in params}, strict=False)
        print("AFTER BUFFER FIX", bufs(), "unexpected:", res.unexpected_keys)
    dist.barrier()

def test_buf(tmp_path):
    root = str(tmp_path)
    mp_.spawn(_w, args=(2, free_port(), root, None), nprocs=2, join=True)
    T.convert(os.path.join(root, "z2"), "s1")
    mp_.spawn(_w, args=(1, free_port(), root, None), nprocs=1, join=True)
