"""Loading and saving our dist checkpoints on one rank, and the output rules every command shares.

Rules (the project's bad-input contract): problems raise ConversionError with a one-line message
before anything is written; outputs are written under a temporary sibling name and renamed into
place at the end; an existing output path is never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import uuid


class ConversionError(ValueError):
    """A bad input; str() is the one-line message (the CLI prints `error: <message>`, exit 2)."""


# Parallel-layout fields: a converted model is layout-free (one rank), any layout loads it.
LAYOUT_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "expert_tensor_parallel_size", "context_parallel_size", "virtual_pipeline_model_parallel_size",
                 "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "sequence_parallel")


def config_from_fingerprint(fp: dict, **overrides):
    """Rebuild the one-rank fp32 SelfMoEConfig from a checkpoint's config fingerprint.

    Activation functions are not stored; they follow Megatron-LM's flags (--swiglu: SiLU, else GeLU).
    """
    import torch.nn.functional as F

    from selfmoe.config import config_class

    cls = config_class(bool(fp.get("multi_latent_attention")))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    # moe_layer_freq stays a list: Megatron-Core's TransformerBlock keys mixed dense/MoE layers apart
    # in checkpoints only for `isinstance(moe_layer_freq, list)` (a tuple fails to load)
    kw = {k: (tuple(v) if isinstance(v, list) and k != "moe_layer_freq" else v) for k, v in fp.items() if k in names}
    for k in LAYOUT_FIELDS + ("bf16", "fp16"):
        kw.pop(k, None)
    kw.update(overrides)
    kw["activation_func"] = F.silu if kw.get("gated_linear_unit") else F.gelu
    try:
        return cls(**kw)
    except (ValueError, AssertionError, TypeError) as e:
        raise ConversionError(f"invalid model config: {' '.join(str(e).split())}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_one_rank(seed: int = 0) -> None:
    """A world-size-1 gloo group and Megatron's parallel state (TP=PP=EP=1), if none exists."""
    import torch
    import torch.distributed as dist

    import selfmoe  # noqa: F401  (CPU compatibility layer)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from selfmoe.training.distributed import destroy_model_parallel, initialize_model_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "WORLD_SIZE" not in os.environ or "MASTER_PORT" not in os.environ:  # not under torchrun: a free port
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() != 1 \
            or ps.get_pipeline_model_parallel_world_size() != 1 or ps.get_expert_model_parallel_world_size() != 1:
        destroy_model_parallel()
        initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def resolve_checkpoint(path: str, iteration: int | None = None, flag: str = "--load") -> str:
    """A --save root (latest or given iteration) or one iter_XXXXXXX directory -> that directory."""
    from selfmoe.training.checkpointing import checkpoint_dir, read_latest_iteration

    if not os.path.isdir(path):
        raise ConversionError(f"{flag} {path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    it = iteration if iteration is not None else read_latest_iteration(path)
    if it is None:
        raise ConversionError(f"{flag} {path}: no latest_checkpointed_iteration.txt and no --iteration")
    d = checkpoint_dir(path, it)
    if not os.path.isfile(os.path.join(d, "metadata.json")):
        raise ConversionError(f"{flag} {path}: checkpoint directory {d} does not exist or is incomplete")
    return d


def read_checkpoint_config(ckpt: str, flag: str = "--load") -> dict:
    """The common (non-tensor) part of a checkpoint: config fingerprint, iteration, args."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign directory
        raise ConversionError(f"{flag} {ckpt}: not a readable dist checkpoint ({' '.join(str(e).split())[:200]})") \
            from None
    if not isinstance(common, dict) or "config" not in common:
        raise ConversionError(f"{flag} {ckpt}: not a selfmoe checkpoint (no model config in it)")
    return common


def load_model(path: str, iteration: int | None = None, flag: str = "--load", build=None, **overrides):
    """(model, config, common) of a dist checkpoint in any layout, as the one-rank fp32 model.

    `build(config, common)` builds the model (default: the GPT); `overrides` change inference-only
    config fields (e.g. routing_free_theta) before building.
    """
    from megatron.core import dist_checkpointing

    from selfmoe.models import build_gpt_model

    init_one_rank()
    ckpt = resolve_checkpoint(path, iteration, flag)
    common = read_checkpoint_config(ckpt, flag)
    cfg = config_from_fingerprint(common["config"], **overrides)
    model = build_gpt_model(cfg) if build is None else build(cfg, common)
    try:
        # interleaved-pipeline checkpoints ("model0", "model1") hold the same global tensor keys
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)["model"]
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - shape mismatches etc. come from deep inside
        raise ConversionError(f"{flag} {ckpt}: cannot load the model: {' '.join(str(e).split())[:300]}") from None
    model.eval()
    return model, cfg, common


def check_new_output(path: str, flag: str) -> None:
    if os.path.lexists(path):
        raise ConversionError(f"{flag} {path}: already exists (outputs are never overwritten; choose a new path)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConversionError(f"{flag} {path}: parent directory {parent} does not exist")


@contextlib.contextmanager
def atomic_output_dir(path: str, flag: str):
    """Yield a temporary sibling directory; renamed to `path` on success, removed on failure."""
    check_new_output(path, flag)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp_{os.path.basename(path)}_{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(path):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"{flag} {path}: appeared while converting; not overwriting it")
    os.replace(tmp, path)


def save_model(model, cfg, save: str, *, flag: str = "--save", extra: dict | None = None) -> str:
    """Write `model` as a weights-only dist checkpoint at iteration 0 under a new directory `save`.

    The layout is Megatron-LM's (`iter_0000000/` + latest file), so `pretrain_gpt.py --load save
    --finetune` (or --no-load-optim --no-load-rng) continues from it in any parallel layout.
    """
    from megatron.core import dist_checkpointing

    from selfmoe.config import config_fingerprint
    from selfmoe.training.checkpointing import CHECKPOINT_VERSION, TRACKER_FILE, checkpoint_dir

    with atomic_output_dir(save, flag) as tmp:
        it_dir = checkpoint_dir(tmp, 0)
        os.makedirs(it_dir)
        sd = {"model": model.sharded_state_dict(), "iteration": 0, "consumed_train_samples": 0, "world_size": 1,
              "config": config_fingerprint(cfg), "checkpoint_version": CHECKPOINT_VERSION, "args": extra or {}}
        dist_checkpointing.save(sd, it_dir)
        with open(os.path.join(tmp, TRACKER_FILE), "w") as f:
            f.write("0\n")
    return checkpoint_dir(save, 0)


def pretrain_flags(cfg) -> list[str]:
    """pretrain_gpt.py model flags that build exactly `cfg` (Megatron-LM names)."""
    f = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size, "--ffn-hidden-size", cfg.ffn_hidden_size,
         "--num-attention-heads", cfg.num_attention_heads, "--max-position-embeddings", cfg.max_position_embeddings,
         "--position-embedding-type", cfg.position_embedding_type, "--normalization", cfg.normalization,
         "--norm-epsilon", cfg.layernorm_epsilon]
    if cfg.kv_channels != cfg.hidden_size // cfg.num_attention_heads:
        f += ["--kv-channels", cfg.kv_channels]
    if cfg.num_query_groups not in (None, cfg.num_attention_heads):
        f += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups]
    if cfg.position_embedding_type == "rope":
        f += ["--rotary-base", cfg.rotary_base]
    if cfg.gated_linear_unit:
        f += ["--swiglu"]
    if cfg.untie_embeddings_and_output_weights:
        f += ["--untie-embeddings-and-output-weights"]
    if not cfg.add_bias_linear:
        f += ["--disable-bias-linear"]
    if cfg.num_moe_experts:
        f += ["--num-experts", cfg.num_moe_experts, "--moe-ffn-hidden-size", cfg.moe_ffn_hidden_size,
              "--moe-router-topk", cfg.moe_router_topk, "--moe-router-type", cfg.moe_router_type]
        if cfg.moe_router_type == "self":
            sub = cfg.self_routing_subspace
            f += ["--self-routing-subspace", sub if isinstance(sub, str) else ",".join(map(str, sub)),
                  "--self-routing-temperature", cfg.self_routing_temperature]
        if cfg.moe_router_type == "routing-free":
            f += ["--routing-free-rank", cfg.routing_free_rank, "--routing-free-expert-type",
                  cfg.routing_free_expert_type]
    return [str(x) for x in f]
