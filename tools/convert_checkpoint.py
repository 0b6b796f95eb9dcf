"""Convert between selfmoe/Megatron-Core distributed checkpoints and a single safetensors file.

    # dist checkpoint (any parallel layout) -> one safetensors file of the 1-rank model
    python tools/convert_checkpoint.py to-safetensors --load checkpoints/run --output run.safetensors

    # safetensors -> a dist checkpoint that pretrain_gpt.py --load can start from (weights only;
    # the run then begins at iteration 0 of a fresh optimizer: pass --no-load-optim --no-load-rng)
    python tools/convert_checkpoint.py from-safetensors --input run.safetensors --save checkpoints/new

Both directions go through the real model: the checkpoint is resharded to one rank by
Megatron-Core's dist_checkpointing, so the file holds exactly the state_dict of the
world-size-1 GPTModel (router state such as Routing-Free's lambda included), and the model
config travels in the file's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG_KEY = "selfmoe_config"


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def config_from_fingerprint(fp: dict):
    """Rebuild a SelfMoEConfig from the fields a checkpoint stores (functions follow Megatron-LM's flags)."""
    import torch.nn.functional as F

    from selfmoe.config import SelfMoEConfig

    names = {f.name for f in dataclasses.fields(SelfMoEConfig) if f.init}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fp.items() if k in names}
    # one rank, no parallelism: the file is layout-free
    for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
              "expert_tensor_parallel_size", "context_parallel_size", "virtual_pipeline_model_parallel_size",
              "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
        kw.pop(k, None)
    kw["sequence_parallel"] = False
    kw["activation_func"] = F.silu if kw.get("gated_linear_unit") else F.gelu
    kw.pop("bf16", None), kw.pop("fp16", None)
    return SelfMoEConfig(**kw)


def init_one_rank():
    import torch.distributed as dist

    import selfmoe  # noqa: F401
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_checkpoint(path: str, iteration: int | None) -> str:
    from selfmoe.training.checkpointing import checkpoint_dir, read_latest_iteration

    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path  # already an iter_XXXXXXX directory
    it = iteration if iteration is not None else read_latest_iteration(path)
    if it is None:
        fail(f"--load {path}: no latest_checkpointed_iteration.txt and no --iteration")
    d = checkpoint_dir(path, it)
    if not os.path.isdir(d):
        fail(f"--load {path}: checkpoint directory {d} does not exist")
    return d


def to_safetensors(args):
    if not os.path.exists(args.load):
        fail(f"--load {args.load}: no such checkpoint directory")
    init_one_rank()
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from selfmoe.models import build_gpt_model

    ckpt = resolve_checkpoint(args.load, args.iteration)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    if "config" not in common:
        fail(f"{ckpt}: not a selfmoe checkpoint (no model config in it)")
    cfg = config_from_fingerprint(common["config"])
    model = build_gpt_model(cfg)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(state["model"], strict=True)
    tensors, seen = {}, {}
    for k, v in model.state_dict().items():
        if not hasattr(v, "data_ptr") or k.endswith("_extra_state"):
            continue
        if v.data_ptr() in seen:  # tied embeddings: stored once, like HF does
            continue
        seen[v.data_ptr()] = k
        tensors[k] = v.detach().contiguous().clone()
    meta = {CONFIG_KEY: json.dumps(common["config"]), "iteration": str(common.get("iteration", 0))}
    tmp = f"{args.output}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, args.output)
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.output}: {len(tensors)} tensors, {n:,} values, from {ckpt}")


def from_safetensors(args):
    if not os.path.isfile(args.input):
        fail(f"--input {args.input}: no such file")
    init_one_rank()
    import torch
    from megatron.core import dist_checkpointing
    from safetensors import safe_open

    from selfmoe.models import build_gpt_model
    from selfmoe.training.checkpointing import TRACKER_FILE, _write_atomically, checkpoint_dir

    with safe_open(args.input, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if CONFIG_KEY not in meta:
        fail(f"--input {args.input}: no '{CONFIG_KEY}' metadata (write it with to-safetensors)")
    fp = json.loads(meta[CONFIG_KEY])
    model = build_gpt_model(config_from_fingerprint(fp))
    sd = model.state_dict()
    missing = [k for k, v in sd.items() if torch.is_tensor(v) and k not in tensors and not k.endswith("_extra_state")
               and not any(v.data_ptr() == sd[t].data_ptr() for t in tensors if t in sd)]
    if missing:
        fail(f"--input {args.input}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(tensors, strict=False)
    final = checkpoint_dir(args.save, 0)
    if os.path.exists(final):
        fail(f"--save {args.save}: {final} already exists")
    tmp = os.path.join(args.save, f".tmp_convert_{os.getpid()}")
    os.makedirs(tmp)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0, "consumed_train_samples": 0,
                             "world_size": 1, "config": fp, "checkpoint_version": 1, "args": {}}, tmp)
    os.replace(tmp, final)
    _write_atomically(os.path.join(args.save, TRACKER_FILE), "0")
    print(f"wrote {final} (weights only): resume with --load {args.save} --no-load-optim --no-load-rng")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-safetensors", help="dist checkpoint -> one safetensors file")
    a.add_argument("--load", required=True, help="a --save directory or one iter_XXXXXXX directory in it")
    a.add_argument("--iteration", type=int, default=None, help="default: the latest")
    a.add_argument("--output", required=True)
    b = sub.add_parser("from-safetensors", help="safetensors file -> dist checkpoint (weights only)")
    b.add_argument("--input", required=True)
    b.add_argument("--save", required=True)
    args = p.parse_args(argv)
    (to_safetensors if args.cmd == "to-safetensors" else from_safetensors)(args)


if __name__ == "__main__":
    main()
