"""Offline resharding to another TP/PP/EP layout, DeepSpeed -> dist checkpoint, and a θ sweep.

Resharding is Megatron-Core's: every rank of the target layout builds its part of the model,
`dist_checkpointing.load` reads the pieces it needs from the source (any layout) and
`dist_checkpointing.save` writes them as that layout's shards. The command launches the ranks
itself (torch.distributed.run, gloo), so no training job is involved. What is written is the
model (weights and router state) at iteration 0; optimizer states are not resharded (a
DistributedOptimizer's dp_reshardable state only loads into its own layout, see checkpointing.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

from selfmoe.conversion.common import (ConversionError, check_new_output, config_from_fingerprint,
                                       read_checkpoint_config, resolve_checkpoint)

WORKER_ENV = "SELFMOE_RESHARD_WORKER"


def probe_tokens(vocab_size: int, seq: int, batch: int = 2) -> torch.Tensor:
    """A fixed token batch [batch, seq] (the same in every process) for loss probes."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def _layout(args) -> dict:
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    return dict(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                ep=args.expert_model_parallel_size, etp=etp)


def world_size_for(lay: dict) -> int:
    """The smallest world that holds the layout: pp * lcm(tp, ep * etp) (Megatron-Core's rank grid)."""
    return lay["pp"] * math.lcm(lay["tp"], lay["ep"] * lay["etp"])


def check_layout(fp: dict, lay: dict) -> None:
    bad = []
    if fp["num_layers"] % lay["pp"]:
        bad.append(f"--pipeline-model-parallel-size {lay['pp']} does not divide num_layers {fp['num_layers']}")
    if fp["num_attention_heads"] % lay["tp"] or (fp.get("num_query_groups") or fp["num_attention_heads"]) % lay["tp"]:
        bad.append(f"--tensor-model-parallel-size {lay['tp']} does not divide the attention heads / query groups")
    if fp["vocab_size"] % lay["tp"]:
        bad.append(f"--tensor-model-parallel-size {lay['tp']} does not divide vocab_size {fp['vocab_size']}")
    E = fp.get("num_moe_experts")
    if lay["ep"] > 1 and not E:
        bad.append("--expert-model-parallel-size > 1 for a dense model")
    if E and E % lay["ep"]:
        bad.append(f"--expert-model-parallel-size {lay['ep']} does not divide num_moe_experts {E}")
    if bad:
        raise ConversionError("; ".join(bad))


def main(args) -> None:
    """The `reshard` command: checks, then runs `worker` on every rank of the target layout."""
    if os.environ.get(WORKER_ENV) == "1":
        return worker(args)
    ckpt = resolve_checkpoint(args.load, args.iteration)
    from selfmoe.conversion.common import init_one_rank

    init_one_rank()
    fp = read_checkpoint_config(ckpt)["config"]
    lay = _layout(args)
    check_layout(fp, lay)
    check_new_output(args.save, "--save")
    n = world_size_for(lay)
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                        "convert_checkpoint.py")
    argv = ["reshard", "--load", ckpt, "--save", args.save,
            "--tensor-model-parallel-size", str(lay["tp"]), "--pipeline-model-parallel-size", str(lay["pp"]),
            "--expert-model-parallel-size", str(lay["ep"]), "--expert-tensor-parallel-size", str(lay["etp"])]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                             "MASTER_ADDR")}
    env[WORKER_ENV] = "1"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                        tool, *argv], env=env, capture_output=True, text=True)
    out = [ln for ln in p.stdout.splitlines() if ln.startswith(("wrote", "probe"))]
    print("\n".join(out))
    if p.returncode != 0:
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        raise ConversionError(err[0][len("error: "):] if err else
                              f"the {n} resharding ranks failed: {' '.join(p.stderr.split())[-400:]}")


def worker(args) -> None:
    """One rank of the target layout: load its shards of the source, save them as this layout's."""
    import uuid

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps

    import selfmoe  # noqa: F401
    from selfmoe.config import config_fingerprint
    from selfmoe.models import build_gpt_model
    from selfmoe.training.checkpointing import CHECKPOINT_VERSION, TRACKER_FILE, checkpoint_dir

    lay = _layout(args)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ps.initialize_model_parallel(lay["tp"], lay["pp"], expert_model_parallel_size=lay["ep"],
                                 expert_tensor_parallel_size=lay["etp"])
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ckpt = args.load
    common = dist_checkpointing.load_common_state_dict(ckpt)
    cfg = config_from_fingerprint(common["config"], tensor_model_parallel_size=lay["tp"],
                                  pipeline_model_parallel_size=lay["pp"], expert_model_parallel_size=lay["ep"],
                                  expert_tensor_parallel_size=lay["etp"], pipeline_dtype=torch.float32)
    model = build_gpt_model(cfg)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)["model"]
    model.load_state_dict(state, strict=True)
    model.eval()
    if lay["pp"] == 1:  # the same probe batch as the one-rank model: the loss must not move
        ids = probe_tokens(cfg.vocab_size, min(16, cfg.max_position_embeddings))
        with torch.no_grad():
            loss = model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None, labels=ids).mean()
        if rank == 0:
            print(f"probe loss under the new layout: {loss.item():.8f}", flush=True)
    parent = os.path.dirname(os.path.abspath(args.save))
    tmp = [os.path.join(parent, f".tmp_{os.path.basename(args.save)}_{uuid.uuid4().hex[:8]}")]
    dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    if rank == 0:
        os.makedirs(checkpoint_dir(tmp, 0))
    dist.barrier()
    layout = dict(tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], etp=lay["etp"], world=dist.get_world_size())
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0, "consumed_train_samples": 0,
                             "world_size": dist.get_world_size(), "config": config_fingerprint(cfg),
                             "checkpoint_version": CHECKPOINT_VERSION, "args": common.get("args", {}),
                             "layout": layout}, checkpoint_dir(tmp, 0))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, TRACKER_FILE), "w") as f:
            f.write("0\n")
        if os.path.lexists(args.save):
            raise ConversionError(f"--save {args.save}: appeared while resharding; not overwriting it")
        os.replace(tmp, args.save)
        print(f"wrote {checkpoint_dir(args.save, 0)}: TP={lay['tp']} PP={lay['pp']} EP={lay['ep']} "
              f"ETP={lay['etp']} shards from {ckpt} (weights only)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def load_deepspeed(root: str, tag: str | None):
    """(one-rank model, config, checkpoint path) from a DeepSpeed --save directory (ZeRO 0-3)."""
    from selfmoe.conversion.common import init_one_rank
    from selfmoe.models import build_gpt_model

    if not os.path.isdir(root):
        raise ConversionError(f"--load {root}: no such DeepSpeed checkpoint directory")
    if tag is None:
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            raise ConversionError(f"--load {root}: no `latest` file and no --tag (not a DeepSpeed checkpoint?)")
        tag = open(latest).read().strip()
    path = os.path.join(root, tag)
    # ZeRO 0-2 write mp_rank_00_model_states.pt, ZeRO-3 zero_pp_rank_0_mp_rank_00_model_states.pt
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not found:
        raise ConversionError(f"--load {root}: {path} holds no {names[0]} (or {names[1]})")
    states = found[0]
    if any(n.startswith("expp_rank_") or n.startswith("layer_") for n in os.listdir(path)):
        raise ConversionError(f"--load {root}: expert-parallel DeepSpeed checkpoints (expp_rank_* files) are not "
                              f"supported; convert with ds_to_universal first")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    if "config" not in saved:
        raise ConversionError(f"{states}: no selfmoe model config in it (not saved by pretrain_gpt.py --deepspeed)")
    init_one_rank()
    cfg = config_from_fingerprint(saved["config"])
    model = build_gpt_model(cfg)
    module = saved["module"]
    params = dict(model.named_parameters())
    partitioned = any(k in module and module[k].shape != p.shape for k, p in params.items())
    if partitioned or not all(k in module for k in params):  # ZeRO-3: parameters live in the optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        fp32 = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        module = {**{k: v for k, v in module.items() if k not in params}, **fp32}
    missing, unexpected = model.load_state_dict(module, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{states}: does not match its own config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model.eval(), cfg, path


def theta_sweep(args) -> list[dict]:
    """Routing-Free θ at evaluation: loss, PPL and experts per token on the corpus' last tokens.

    Liu et al. 2026 (arXiv 2604.00801): raising θ fires fewer experts (less compute) at some loss.
    The measurement is selfmoe.routing_analysis.theta_sweep (also behind tools/analyze_routing.py).
    """
    from selfmoe import routing_analysis as ra
    from selfmoe.conversion.common import load_model

    try:
        thetas = [float(t) for t in args.thetas.split(",") if t.strip()]
    except ValueError:
        raise ConversionError(f"--thetas {args.thetas}: expected comma-separated numbers") from None
    if not thetas or any(t < 0 for t in thetas):
        raise ConversionError(f"--thetas {args.thetas}: expected one or more numbers >= 0")
    for ext in (".bin", ".idx"):
        if not os.path.isfile(args.data_path + ext):
            raise ConversionError(f"--data-path {args.data_path}: {args.data_path + ext} does not exist")
    model, cfg, _ = load_model(args.load, args.iteration)
    if cfg.moe_router_type != "routing-free":
        raise ConversionError(f"--load holds a {cfg.moe_router_type}-router model; θ is Routing-Free's threshold")
    seq = args.seq_length or cfg.max_position_embeddings
    batches = ra.text_batches(args.data_path, None, cfg.vocab_size, seq, args.micro_batch_size,
                              max(args.eval_tokens // seq, 1))
    rows = ra.theta_sweep(model, "text", batches, thetas)
    print(f"{'theta':>8} {'loss':>9} {'ppl':>10} {'experts/token':>14} {'density':>8}")
    for row in rows:
        row["ppl"] = math.exp(min(row["loss"], 50))
        print(f"{row['theta']:8.3g} {row['loss']:9.4f} {row['ppl']:10.2f} {row['experts_per_token']:14.3f} "
              f"{row['density']:8.3f}")
    return rows
