"""Checkpoints with Megatron-Core's dist_checkpointing, in Megatron-LM's directory layout.

    <save>/iter_0000010/                     one checkpoint (torch_dist format, any parallel layout)
    <save>/latest_checkpointed_iteration.txt the iteration to resume from

What a checkpoint holds, and why it is enough to continue the exact same loss curve:
- the model's sharded state dict: weights plus persistent router state (Routing-Free lambda,
  TopKRouter expert_bias, the random router's forward count);
- the optimizer's sharded state dict (Adam moments and step) and the lr scheduler's state;
- every rank's RNG states (python, numpy, torch, the tensor-parallel tracker): dropout;
- the data position (consumed samples, iteration) and the model config fingerprint.

Saving is atomic: all ranks write into `<save>/.tmp_iter_XXXXXXX_<id>`, rank 0 renames it into place
and only then replaces the latest file (temp file + os.replace). A kill at any moment leaves the
previous checkpoint loadable and the latest file pointing at it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from selfmoe.config import config_fingerprint
from selfmoe.training.errors import InputError, reraise_as

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
# test hook: "ITER:SECONDS" sleeps inside the save of iteration ITER, after the shards are
# written and before the rename, so a test can kill the process there deterministically.
SLEEP_IN_SAVE_ENV = "SELFMOE_TEST_SLEEP_IN_SAVE"

# Model fields a checkpoint must agree on: Megatron's TransformerConfig fields that shape or
# define the network, plus every field SelfMoEConfig adds (model level and routers) except the
# knobs that only steer training or inference. Parallel sizes, dropout, precision, kernels and
# loss weights may change on resume (dist_checkpointing reshards across parallel layouts).
TRANSFORMER_MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma", "gated_linear_unit", "add_bias_linear",
    "add_qkv_bias", "qk_layernorm", "apply_residual_connection_post_layernorm", "multi_latent_attention",
    "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_score_function",
    "moe_router_pre_softmax", "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
    "moe_shared_expert_intermediate_size", "moe_layer_freq", "mtp_num_layers",
)
RESUMABLE_ROUTER_FIELDS = {
    "model_style", "routing_free_eta", "routing_free_lambda0", "routing_free_density_target", "routing_free_mu",
    "routing_free_theta", "routing_free_bias_init", "routing_free_scale_init", "routing_free_lambda_rule",
    "routing_free_lambda_update",
}


# Flags that shape a model but are no config fields (pretrain_vit.py's image geometry, channels,
# head and pooling): compared with the args the checkpoint was saved with, named as flags.
MODEL_SHAPE_ARGS = ("img_h", "img_w", "patch_dim", "num_channels", "num_classes", "vit_pool")


def model_fields() -> list[str]:
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    from selfmoe.config import SelfMoEConfig

    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    own = [f.name for f in dataclasses.fields(SelfMoEConfig) if f.name not in base]
    return list(TRANSFORMER_MODEL_FIELDS) + [f for f in own if f not in RESUMABLE_ROUTER_FIELDS]


class CheckpointError(InputError):
    """A checkpoint that cannot be used by this run; str() is one line for the user."""


# ---------------------------------------------------------------------------------------------
# which format a folder holds: a Megatron run never writes into a DeepSpeed folder, nor the reverse

FORMAT_NAMES = {"megatron": "Megatron-Core dist", "deepspeed": "DeepSpeed"}


def checkpoint_format(root: str | None) -> str | None:
    """"megatron", "deepspeed" or None (no folder, or no checkpoint in it).

    Megatron-LM's tracker file or an iter_* folder with dist_checkpointing's metadata.json means
    Megatron; DeepSpeed's `latest` file or an iter_* folder with its *_model_states.pt, DeepSpeed.
    """
    if not root or not os.path.isdir(root):
        return None
    names = set(os.listdir(root))
    if TRACKER_FILE in names:
        return "megatron"
    if "latest" in names:
        return "deepspeed"
    for name in sorted(names):
        path = os.path.join(root, name)
        if name.startswith("iter_") and os.path.isdir(path):
            inside = os.listdir(path)
            if "metadata.json" in inside or ".metadata" in inside:
                return "megatron"
            if any(n.endswith("_model_states.pt") or n.endswith("_optim_states.pt") for n in inside):
                return "deepspeed"
    return None


def check_checkpoint_folders(load: str | None, save: str | None, deepspeed: bool) -> None:
    """Refuse, before anything is built, a --load or --save folder of the other backend's format."""
    want = "deepspeed" if deepspeed else "megatron"
    for flag, root in (("--load", load), ("--save", save)):
        if root and os.path.exists(root) and not os.path.isdir(root):
            raise CheckpointError(flag, root, "not a directory (a checkpoint folder is)")
        found = checkpoint_format(root)
        if found is None or found == want:
            continue
        if flag == "--load":
            fix = ("pass --deepspeed --deepspeed-config <json> to resume it" if found == "deepspeed"
                   else "drop --deepspeed to resume it")
        else:
            fix = f"this run would write {FORMAT_NAMES[want]} checkpoints into it; choose another --save folder"
        raise CheckpointError(flag, root, f"holds {FORMAT_NAMES[found]} checkpoints; {fix}")


def check_checkpoint_files(path: str) -> None:
    """Every file of a dist checkpoint is there and as long as its index says (cheap: sizes only)."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError("incomplete checkpoint", os.path.join(path, name), "missing")
    with reraise_as("unreadable checkpoint metadata", os.path.join(path, "metadata.json")):
        with open(os.path.join(path, "metadata.json")) as f:
            if not isinstance(json.load(f), dict):
                raise ValueError("not a JSON object")
    with reraise_as("unreadable checkpoint index", os.path.join(path, ".metadata")):
        storage = FileSystemReader(path).read_metadata().storage_data
    need: dict = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise CheckpointError("incomplete checkpoint", file, "missing")
        have = os.path.getsize(file)
        if have < size:
            raise CheckpointError("truncated checkpoint", file, f"{have} bytes, the index needs {size}")


def load_common(path: str) -> dict:
    """The checkpoint's common (non-sharded) state; a damaged checkpoint is an InputError."""
    check_checkpoint_files(path)
    with reraise_as("cannot read checkpoint", os.path.join(path, "common.pt")):
        return dist_checkpointing.load_common_state_dict(path)


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> int | None:
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _unwrap(chunk):
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)  # DDP / Float16Module -> the GPTModel


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rng_state() -> dict:
    """This rank's RNG states as plain objects (checkpoints load with torch's weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "random": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["random"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# Megatron-LM's default format for the DistributedOptimizer's state: resumes with the same
# model-parallel layout (another DP size only). --dist-ckpt-optim-fully-reshardable saves Megatron's
# "fully_reshardable" instead: by parameter, any layout (loading it into torch Adam needs
# mcore_compat's fully_reshardable_load_skips_adam_step).
OPTIM_SHARDING = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
# where load_checkpoint asks for optimizer tensors keyed by parameter (regrouped afterwards)
_BY_KEY_OPTIM_REQUEST = "optimizer_tensors"


def _optimizer_metadata(optimizer, sharding: str = OPTIM_SHARDING) -> dict:
    """Megatron-LM's sharded-state-dict metadata: the plain optimizer's tensors are keyed by the
    parameter alone (`optimizer.state.exp_avg.<param key>`, no `chained_<i>.` prefix), so they
    reshard like the weights over any TP/PP/EP layout, whether EP>1 splits the optimizer in two
    (dense + expert) or EP=1 keeps one."""
    metadata = {"chained_optim_avoid_prefix": True}
    if _is_distributed(optimizer):
        metadata["distrib_optim_sharding_type"] = sharding
    return metadata


def _sharded_state_dict(model, optimizer=None, scheduler=None, *, is_loading=False, with_rng=True,
                        optim_sharding: str = OPTIM_SHARDING) -> dict:
    # Megatron-LM's keys: "model", or "model0", "model1", ... with the interleaved pipeline. The
    # tensors inside carry global layer numbers, so either form loads into the other.
    if len(model) == 1:
        sd = {"model": _unwrap(model[0]).sharded_state_dict()}
    else:
        sd = {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}
    if optimizer is not None:
        # Megatron-LM's metadata (read by ChainedOptimizer and DistributedOptimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(dict(sd), is_loading=is_loading,
                                                       metadata=_optimizer_metadata(optimizer, optim_sharding))
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        # One piece per rank: ranks of one data-parallel group may differ (e.g. after skipped steps).
        sd["rng_state"] = ShardedObject("rng_state", rng_state(), (_world(),), (_rank(),), replica_id=0)
    return sd


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, config, *, consumed_train_samples: int,
                    args_dict: dict | None = None, fully_reshardable: bool = False) -> str:
    """Save atomically (collective over all ranks); returns the checkpoint directory.

    fully_reshardable: the distributed optimizer's state in Megatron's fully_reshardable format
    (--dist-ckpt-optim-fully-reshardable); the plain optimizer's always is.
    """
    if not _params_finite(model):
        raise CheckpointError(f"refusing to save iteration {iteration}: the weights hold NaN/Inf")
    final = checkpoint_dir(root, iteration)
    # A fresh temp name per attempt: writer processes orphaned by a killed save can never touch it.
    tmp = [os.path.join(root, f".tmp_iter_{iteration:07d}_{uuid.uuid4().hex[:8]}")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of saves that were killed
            if name.startswith(".tmp_iter_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    rng_before = rng_state()
    distributed = _is_distributed(optimizer)
    sharding = FULLY_RESHARDABLE if fully_reshardable else OPTIM_SHARDING
    sd = _sharded_state_dict(model, optimizer, scheduler, optim_sharding=sharding)
    sd.update(iteration=iteration, consumed_train_samples=consumed_train_samples, world_size=_world(),
              config=config_fingerprint(config), checkpoint_version=CHECKPOINT_VERSION, args=args_dict or {},
              distributed_optimizer=distributed, optimizer_sharding=sharding if distributed else None,
              layout=_layout())
    dist_checkpointing.save(sd, tmp)
    _test_sleep_hook(iteration)
    _barrier()
    if _rank() == 0:
        _fsync_tree(tmp)  # the data is on disk before the rename that publishes it
        old = final + ".old"
        if os.path.exists(final):  # re-saving an iteration; loading falls back to .old in between
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        write_atomically(os.path.join(root, TRACKER_FILE), f"{iteration}\n")
    _barrier()
    # Whatever saving drew from the RNGs, the run goes on from the state that was saved, exactly
    # like a run resumed from this checkpoint.
    set_rng_state(rng_before)
    return final


def _test_sleep_hook(iteration: int):
    spec = os.environ.get(SLEEP_IN_SAVE_ENV)
    if spec:
        it, seconds = spec.split(":")
        if int(it) == iteration:
            print(f"[test hook] sleeping {seconds}s inside the save of iteration {iteration}", flush=True)
            time.sleep(float(seconds))


def _fsync_tree(root: str):
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_atomically(path: str, text: str) -> None:
    """`text` into `path` (its folder made if missing) through a synced temporary file and a
    rename, the folder synced after: a kill at any moment leaves the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def _params_finite(model) -> bool:
    ok = all(bool(torch.isfinite(p).all()) for chunk in model for p in chunk.parameters())
    t = torch.tensor([0.0 if ok else 1.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0


def check_config_compatible(saved: dict, config, where: str) -> None:
    """One-line CheckpointError naming every model field that differs from the checkpoint's."""
    now = config_fingerprint(config)
    diff = [f"{k}={saved[k]!r} in the checkpoint but {now[k]!r} now" for k in model_fields()
            if k in saved and k in now and _norm(saved[k]) != _norm(now[k])]
    if diff:
        raise CheckpointError(f"cannot resume from {where}: incompatible model config: {'; '.join(diff)}")


def check_args_compatible(saved_args: dict, args, where: str) -> None:
    """One-line CheckpointError naming every model-shaping flag (MODEL_SHAPE_ARGS) that differs."""
    diff = [f"--{k.replace('_', '-')} {saved_args[k]} in the checkpoint but {getattr(args, k)} now"
            for k in MODEL_SHAPE_ARGS if k in saved_args and hasattr(args, k) and saved_args[k] != getattr(args, k)]
    if diff:
        raise CheckpointError(f"cannot resume from {where}: the model differs: {'; '.join(diff)}")


def _norm(v):
    return tuple(v) if isinstance(v, list) else v


def latest_checkpoint(root: str) -> tuple[int, str] | None:
    """(iteration, directory) named by the latest file, or None for a fresh run."""
    iteration = read_latest_iteration(root) if root and os.path.isdir(root) else None
    if iteration is None:
        return None
    path = checkpoint_dir(root, iteration)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path += ".old"  # killed while re-saving this same iteration: the previous copy is intact
    if not os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(root, TRACKER_FILE)} names iteration {iteration} but {path} is missing")
    return iteration, path


def adopt_checkpoint_vocab(root: str, config, vocab_size: int) -> int | None:
    """Keep the checkpoint's padded vocabulary size when it serves this run; returns it if adopted.

    Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP, so a TP
    change alone changes the padded size (1152 at TP=1, 1280 at TP=2 for a 1100-id tokenizer). The
    checkpoint's padding works as well when it covers the tokenizer's `vocab_size` ids and splits
    evenly over this run's TP; then the embedding and output layer reshard like any weight.
    """
    found = latest_checkpoint(root)
    if found is None:
        return None
    saved = load_common(found[1]).get("config", {}).get("vocab_size")
    if (isinstance(saved, int) and saved != config.vocab_size and saved >= vocab_size
            and saved % config.tensor_model_parallel_size == 0):
        config.vocab_size = saved
        return saved
    return None


def check_resume_compatible(root: str, config, *, load_optim: bool = False,
                            use_distributed_optimizer: bool = False, args=None) -> None:
    """Fail before any model is built if the checkpoint to resume is damaged, describes another
    model (config fields; with `args`, the model-shaping flags too), or holds optimizer state this
    layout cannot take (collective-free; parallel state set)."""
    found = latest_checkpoint(root)
    if found is None:
        return
    common = load_common(found[1])
    if args is not None:
        check_args_compatible(common.get("args") or {}, args, found[1])
    check_config_compatible(common.get("config", {}), config, found[1])
    if load_optim:
        _check_optimizer_layout(common, use_distributed_optimizer, found[1])


def chained_optimizers(optimizer) -> list:
    """The optimizers inside Megatron-Core's ChainedOptimizer (or the one given)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adam(opt):
    """The torch Adam/AdamW a Megatron optimizer wraps, or None (TE/Apex Adam, SGD)."""
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) else None


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in chained_optimizers(optimizer))


def _layout() -> dict:
    """Model-parallel sizes; Megatron's dp_reshardable optimizer format reshards over DP only."""
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size()}


def _check_optimizer_compatible(common: dict, optimizer, path: str) -> None:
    _check_optimizer_layout(common, _is_distributed(optimizer), path)


def _check_optimizer_layout(common: dict, now: bool, path: str) -> None:
    """The distributed optimizer's dp_reshardable state is in buffer order: same flag and same
    model-parallel layout to resume it (the data-parallel size may change). The plain optimizer's
    state, and the distributed one's fully_reshardable state, are keyed by parameter and reshard
    over any TP/PP/EP layout (_regroup_optimizer_state)."""
    saved = bool(common.get("distributed_optimizer"))
    hint = "; pass --no-load-optim to load only the weights"
    if saved != now:
        flag = "with" if saved else "without"
        raise CheckpointError(f"cannot resume the optimizer from {path}: it was saved {flag} "
                              f"--use-distributed-optimizer{hint}")
    if now and _saved_sharding(common) != FULLY_RESHARDABLE and common.get("layout") != _layout():
        raise CheckpointError(f"cannot resume the distributed optimizer from {path}: saved with layout "
                              f"{common.get('layout')}, this run has {_layout()} (its dp_reshardable state "
                              f"reshards over data parallelism only; --dist-ckpt-optim-fully-reshardable "
                              f"saves one that reshards over any){hint}")


def _saved_sharding(common: dict) -> str:
    """The distributed optimizer's format in a checkpoint (those before the field: dp_reshardable)."""
    return common.get("optimizer_sharding") or OPTIM_SHARDING


def _match_checkpoint_keys(optim_sd, path: str) -> None:
    """Rename (in place) each requested optimizer tensor to the key the checkpoint holds it under.

    We save `optimizer.state.exp_avg.<param key>`; checkpoints written before that by a
    ChainedOptimizer (EP>1) hold `chained_<i>.optimizer.state....`: the same tensor, prefixed.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from torch.distributed.checkpoint import FileSystemReader

    with reraise_as("unreadable checkpoint index", os.path.join(path, ".metadata")):
        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
    unprefixed = {k.split(".", 1)[1]: k for k in saved if k.startswith("chained_")}
    for t in nested_values(optim_sd):
        if isinstance(t, (ShardedTensor, ShardedTensorFactory)) and t.key not in saved and t.key in unprefixed:
            t.key = unprefixed[t.key]


def _inner(state: dict) -> dict:
    """The torch optimizer's state dict inside a Megatron optimizer's (Float16Optimizer nests it)."""
    return state["optimizer"] if isinstance(state.get("optimizer"), dict) else state


def _regroup_optimizer_state(optimizer, loaded, saved, path: str):
    """The state dict `optimizer.load_state_dict` takes, from tensors loaded by parameter key.

    A ChainedOptimizer holds one optimizer with EP=1 and two (dense, expert) with EP>1, so the
    checkpoint's non-tensor part (param-group hyperparameters, Adam's common step, grad scaler)
    may be grouped differently from this run's. `loaded`: this run's sharded optimizer state dict
    as dist_checkpointing filled it (tensors, param ids); `saved`: the checkpoint's common part.
    Each of this run's param groups takes the hyperparameters of the saved group with the same
    (wd_mult, lr_mult, is_decoupled_lr), Megatron's group identity less the EP split.
    """
    opts = chained_optimizers(optimizer)
    now = [loaded] if len(opts) == 1 else [loaded[i] for i in sorted(loaded)]
    saved_list = [saved[k] for k in sorted(saved)] if saved and all(isinstance(k, int) for k in saved) else [saved]
    saved_groups = [g for s in saved_list for g in _inner(s).get("param_groups", [])]
    ident = ("wd_mult", "lr_mult", "is_decoupled_lr")
    out = []
    for i, (opt, part) in enumerate(zip(opts, now)):
        base = copy.deepcopy(saved_list[min(i, len(saved_list) - 1)])
        groups = []
        for group in opt.optimizer.param_groups:
            key = tuple(group.get(k) for k in ident)
            match = [g for g in saved_groups if tuple(g.get(k) for k in ident) == key]
            if not match:
                raise CheckpointError(f"cannot resume the optimizer from {path}: it has no parameter group with "
                                      f"{dict(zip(ident, key))}; pass --no-load-optim to load only the weights")
            groups.append({**match[0], "is_expert_parallel": group.get("is_expert_parallel")})
        _inner(base)["param_groups"] = groups
        out.append(_overlay(base, part))
    return out[0] if len(opts) == 1 else dict(enumerate(out))


def _overlay(base, new):
    """`new` (loaded tensors, param ids) laid over `base` (the checkpoint's common values)."""
    if isinstance(base, dict) and isinstance(new, dict):
        return {**base, **{k: _overlay(base[k], v) if k in base else v for k, v in new.items()}}
    if isinstance(base, list) and isinstance(new, list) and len(base) == len(new):
        return [_overlay(b, n) for b, n in zip(base, new)]
    return new


def _init_adam_steps(optimizer) -> None:
    """Give a fresh torch Adam/AdamW zero state, `step` included, before loading into it.

    Megatron-Core's DistributedOptimizer.state_dict() (called while building the state dict to
    load into) reads every parameter's `step` when neither TE nor Apex provides the Adam; a torch
    Adam that has not stepped has no state at all. The loaded values replace these zeros.
    """
    for opt in chained_optimizers(optimizer):
        inner = _torch_adam(opt)
        if inner is None or inner.state:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def _restore_adam_steps(optimizer, optim_state) -> None:
    """Per-parameter Adam `step` from a DistributedOptimizer checkpoint, for torch Adam.

    Without TE/Apex, megatron-core 0.16's DistributedOptimizer records the step in its param
    groups but its load leaves the per-parameter `step` of torch Adam at the value it had before
    the load, and hands every parameter the same tensor (which torch Adam increments in place).
    Both would give a wrong bias correction from the first step after a resume.
    """
    opts = chained_optimizers(optimizer)
    states = [optim_state] if len(opts) == 1 else [optim_state[k] for k in sorted(optim_state)]
    for opt, sd in zip(opts, states):
        inner = _torch_adam(opt)
        if inner is None or "param_state" not in sd:
            continue
        steps = {g.get("step") for g in sd["optimizer"]["param_groups"]} - {None}
        if len(steps) == 1:
            step = float(steps.pop())
            for st in inner.state.values():
                st["step"] = torch.tensor(step)


def load_scheduler_state(scheduler, state: dict, path: str) -> None:
    """Megatron's OptimizerParamScheduler asserts that the schedule flags match the checkpoint's."""
    try:
        scheduler.load_state_dict(state)
    except AssertionError as e:
        raise CheckpointError(
            f"cannot resume from {path}: the learning-rate schedule differs from the checkpoint's "
            f"({' '.join(str(e).split())}); pass --override-opt_param-scheduler to use this run's or "
            f"--use-checkpoint-opt_param-scheduler to keep the checkpoint's") from None


def load_checkpoint(root: str, model, optimizer, scheduler, config, *, load_optim: bool = True,
                    load_rng: bool = True, finetune: bool = False) -> dict | None:
    """Load the latest checkpoint under `root` into model/optimizer/scheduler/RNG (collective).

    Returns {"iteration", "consumed_train_samples", "path"} or None when `root` holds no checkpoint
    (a fresh run, as in Megatron-LM). With finetune, only the weights are loaded and the run starts
    at iteration 0.
    """
    found = latest_checkpoint(root)
    if found is None:
        return None
    path = found[1]
    common = load_common(path)
    check_config_compatible(common.get("config", {}), config, path)
    load_optim = load_optim and not finetune
    load_rng = load_rng and not finetune and common.get("world_size") == _world()
    if load_optim:
        _check_optimizer_compatible(common, optimizer, path)
        _init_adam_steps(optimizer)
    sd = _sharded_state_dict(model, optimizer if load_optim else None, scheduler if load_optim else None,
                             is_loading=True, with_rng=load_rng, optim_sharding=_saved_sharding(common))
    distributed = load_optim and _is_distributed(optimizer)
    by_key = load_optim and (not distributed or _saved_sharding(common) == FULLY_RESHARDABLE)
    if by_key:  # loaded by parameter key, regrouped below: the saved chaining may differ (EP change)
        sd[_BY_KEY_OPTIM_REQUEST] = sd.pop("optimizer")
        _match_checkpoint_keys(sd[_BY_KEY_OPTIM_REQUEST], path)
    with reraise_as("cannot load checkpoint", path):  # shape mismatches, torch's CheckpointException ...
        state = dist_checkpointing.load(sd, path)
    if len(model) == 1:
        _unwrap(model[0]).load_state_dict(state["model"], strict=True)
    else:
        for i, chunk in enumerate(model):
            _unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
    if load_optim:
        optim_state = (_regroup_optimizer_state(optimizer, state[_BY_KEY_OPTIM_REQUEST], state.get("optimizer"), path)
                       if by_key else state["optimizer"])
        with torch.no_grad():  # fp32 params: DistributedOptimizer's main params are views of them
            optimizer.load_state_dict(optim_state)
        if distributed:
            _restore_adam_steps(optimizer, optim_state)
        load_scheduler_state(scheduler, state["opt_param_scheduler"], path)
    if load_rng:
        set_rng_state(state["rng_state"])
    if finetune:
        return {"iteration": 0, "consumed_train_samples": 0, "path": path}
    return {"iteration": int(common["iteration"]), "consumed_train_samples": int(common["consumed_train_samples"]),
            "path": path, "loaded_optim": load_optim, "loaded_rng": load_rng}
