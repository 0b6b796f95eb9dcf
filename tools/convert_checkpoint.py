"""Convert selfmoe checkpoints: Hugging Face export/import, upcycling, router swaps, resharding.

    # dist checkpoint (any parallel layout) -> a folder AutoModelForCausalLM.from_pretrained reads
    python tools/convert_checkpoint.py export-hf --load checkpoints/run --output hf/run
    # Hugging Face Mixtral / Llama / Mistral / GPT-2 safetensors folder -> dist checkpoint (weights,
    # iteration 0); it prints the pretrain_gpt.py flags that continue from it with --finetune
    python tools/convert_checkpoint.py import-hf --input hf/model --save checkpoints/imported
    # dense -> MoE with E copies of the FFN (Sparse Upcycling); learned MoE -> another router
    python tools/convert_checkpoint.py upcycle --load checkpoints/dense --save checkpoints/moe \
        --num-experts 8 --moe-router-topk 2 --moe-router-type self
    python tools/convert_checkpoint.py swap-router --load checkpoints/moe --save checkpoints/moe-self --moe-router-type self
    # another TP/PP/EP layout offline (launches the ranks itself); DeepSpeed -> dist checkpoint
    python tools/convert_checkpoint.py reshard --load checkpoints/run --save checkpoints/run-tp2 --tensor-model-parallel-size 2
    python tools/convert_checkpoint.py from-deepspeed --load checkpoints/ds-run --save checkpoints/from-ds
    # Routing-Free's threshold at evaluation time: loss/PPL and experts per token for each theta
    python tools/convert_checkpoint.py theta-sweep --load checkpoints/rf --data-path data/owt_text_document --thetas 0.5,1,2
    # one safetensors file of our own parameter names, and back
    python tools/convert_checkpoint.py to-safetensors --load checkpoints/run --output run.safetensors
    python tools/convert_checkpoint.py from-safetensors --input run.safetensors --save checkpoints/new

Every command reads any parallel layout (dist_checkpointing reshards on load), checks its inputs
before writing anything (`error: ...`, exit 2), writes under a temporary name, renames at the
end and never overwrites an existing output. The library is selfmoe/conversion/.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_to_safetensors(args):
    import json

    import torch
    from safetensors.torch import save_file

    from selfmoe.conversion.common import check_new_output, load_model

    check_new_output(args.output, "--output")
    model, cfg, common = load_model(args.load, args.iteration)
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        if not torch.is_tensor(v) or k.endswith("_extra_state") or v.data_ptr() in seen:
            continue  # tied embeddings: stored once, like HF does
        seen.add(v.data_ptr())
        tensors[k] = v.detach().contiguous().clone()
    meta = {"selfmoe_config": json.dumps(common["config"]), "iteration": str(common.get("iteration", 0))}
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.output)), f".tmp_{os.path.basename(args.output)}_{os.getpid()}")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values")


def cmd_from_safetensors(args):
    import json

    import torch
    from safetensors import safe_open

    from selfmoe.conversion.common import (ConversionError, check_new_output, config_from_fingerprint,
                                           init_one_rank, save_model)
    from selfmoe.models import build_gpt_model

    if not os.path.isfile(args.input):
        raise ConversionError(f"--input {args.input}: no such file")
    check_new_output(args.save, "--save")
    init_one_rank()
    with safe_open(args.input, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "selfmoe_config" not in meta:
        raise ConversionError(f"--input {args.input}: no 'selfmoe_config' metadata (write it with to-safetensors)")
    cfg = config_from_fingerprint(json.loads(meta["selfmoe_config"]))
    model = build_gpt_model(cfg)
    sd = model.state_dict()
    ptrs = {sd[t].data_ptr() for t in tensors if t in sd}
    missing = [k for k, v in sd.items() if torch.is_tensor(v) and k not in tensors and not k.endswith("_extra_state")
               and v.data_ptr() not in ptrs]
    if missing:
        raise ConversionError(f"--input {args.input}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    bad = [k for k, v in tensors.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise ConversionError(f"--input {args.input}: {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, the config "
                              f"says {tuple(sd[bad[0]].shape)}")
    model.load_state_dict(tensors, strict=False)
    final = save_model(model, cfg, args.save)
    print(f"wrote {final} (weights only): continue with --load {args.save} --finetune")


def cmd_export_hf(args):
    _quiet_transformers()
    from selfmoe.conversion import hf
    from selfmoe.conversion.common import check_new_output, load_model

    check_new_output(args.output, "--output")
    model, cfg, common = load_model(args.load, args.iteration)
    what, notes = hf.export(model, cfg, args.output, run_args=common.get("args") or {},
                            max_shard_size=args.max_shard_size, dtype=args.dtype)
    for n in notes:
        print(n)
    print(f"wrote {args.output}: {what}" + (" (AutoModelForCausalLM.from_pretrained loads it)"
                                             if what != "selfmoe safetensors" else ""))


def cmd_import_hf(args):
    _quiet_transformers()
    from selfmoe.conversion import hf
    from selfmoe.conversion.common import check_new_output, init_one_rank, pretrain_flags, save_model
    from selfmoe.models import build_gpt_model

    check_new_output(args.save, "--save")
    init_one_rank()
    model_hf, hc, cfg = hf.load_hf(args.input)
    cfg, sd, notes = hf.import_state_dict(model_hf, hc, cfg)
    model = build_gpt_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:  # a weight map bug, never a user error: say so loudly
        raise RuntimeError(f"import weight map mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    final = save_model(model, cfg, args.save)
    for n in notes:
        print(n)
    print(f"wrote {final} from {hf.IMPORTABLE[hc.model_type]} (weights only, iteration 0)")
    print("continue with: pretrain_gpt.py --load " + args.save + " --finetune --make-vocab-size-divisible-by 1 "
          + " ".join(pretrain_flags(cfg)))


def _router_options(args) -> dict:
    from selfmoe.config import router_of_flag

    for dest in ("self_routing_subspace", "self_routing_temperature", "routing_free_rank", "routing_free_theta",
                 "routing_free_expert_type"):
        flag = "--" + dest.replace("_", "-")
        owner = router_of_flag(flag)
        if getattr(args, dest) is not None and args.moe_router_type != owner:  # said, not silently dropped
            print(f"ignored: {flag} (only --moe-router-type {owner} reads it; this is "
                  f"--moe-router-type {args.moe_router_type})")
    sub = args.self_routing_subspace
    if sub not in (None, "last", "first"):
        try:
            sub = tuple(int(i) for i in sub.split(","))
        except ValueError:
            fail(f"--self-routing-subspace {sub}: expected last, first or comma-separated channel ids")
    return dict(self_routing_subspace=sub, self_routing_temperature=args.self_routing_temperature,
                routing_free_rank=args.routing_free_rank, routing_free_theta=args.routing_free_theta,
                routing_free_expert_type=args.routing_free_expert_type)


def cmd_upcycle(args):
    from selfmoe.conversion import upcycle as up
    from selfmoe.conversion.common import check_new_output, load_model, save_model

    check_new_output(args.save, "--save")
    dense, dense_cfg, _ = load_model(args.load, args.iteration)
    moe_cfg = up.upcycled_config(dense_cfg, num_experts=args.num_experts, topk=args.moe_router_topk,
                                 router=args.moe_router_type, **_router_options(args))
    moe = up.upcycle(dense, dense_cfg, moe_cfg, seed=args.seed)
    final = save_model(moe, moe_cfg, args.save)
    exact = "equals the dense model at step 0" if up.EXACT_AT_STEP0[args.moe_router_type] else \
        "does NOT equal the dense model at step 0 (unnormalised gates over a variable number of experts)"
    print(f"wrote {final}: {args.num_experts} copies of the dense FFN, {up.describe(moe_cfg)}; {exact}")


def cmd_swap_router(args):
    from selfmoe.conversion import upcycle as up
    from selfmoe.conversion.common import check_new_output, load_model, save_model

    check_new_output(args.save, "--save")
    model, cfg, _ = load_model(args.load, args.iteration)
    new, new_cfg = up.swap_router(model, cfg, args.moe_router_type, seed=args.seed, **_router_options(args))
    final = save_model(new, new_cfg, args.save)
    print(f"wrote {final}: experts kept, {cfg.moe_router_type} router -> {up.describe(new_cfg)}")


def cmd_reshard(args):
    from selfmoe.conversion import reshard

    reshard.main(args)


def cmd_from_deepspeed(args):
    from selfmoe.conversion import reshard
    from selfmoe.conversion.common import check_new_output, save_model

    check_new_output(args.save, "--save")
    model, cfg, path = reshard.load_deepspeed(args.load, args.tag)
    final = save_model(model, cfg, args.save)
    print(f"wrote {final} from DeepSpeed checkpoint {path} (weights only): continue with --load {args.save} --finetune")


def cmd_theta_sweep(args):
    from selfmoe.conversion import reshard

    reshard.theta_sweep(args)


def add_router_flags(p):
    p.add_argument("--moe-router-type", required=True, choices=("learned", "self", "random", "hash", "routing-free"))
    p.add_argument("--self-routing-subspace", default=None, help="last | first | comma-separated channel ids")
    p.add_argument("--self-routing-temperature", type=float, default=None)
    p.add_argument("--routing-free-rank", type=int, default=None)
    p.add_argument("--routing-free-theta", type=float, default=None)
    p.add_argument("--routing-free-expert-type", choices=("aoe", "mlp"), default=None)
    p.add_argument("--seed", type=int, default=1234, help="router initialisation")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line (no usage block), exit code 2 like every user error."""

    def error(self, message):
        fail(message)


def parser():
    p = _Parser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name, fn, help):
        s = sub.add_parser(name, help=help)
        s.set_defaults(fn=fn)
        return s

    def load(s):
        s.add_argument("--load", required=True, help="a --save directory or one iter_XXXXXXX directory in it")
        s.add_argument("--iteration", type=int, default=None, help="default: the latest")

    s = cmd("export-hf", cmd_export_hf, "dist checkpoint -> Hugging Face folder (or our safetensors + config)")
    load(s)
    s.add_argument("--output", required=True)
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the written weights (the logits check holds for float32)")
    s = cmd("import-hf", cmd_import_hf, "Hugging Face Mixtral/Llama/Mistral/GPT-2 folder -> dist checkpoint")
    s.add_argument("--input", required=True)
    s.add_argument("--save", required=True)
    s = cmd("upcycle", cmd_upcycle, "dense dist checkpoint -> MoE with E copies of the FFN")
    load(s)
    s.add_argument("--save", required=True)
    s.add_argument("--num-experts", type=int, required=True)
    s.add_argument("--moe-router-topk", type=int, default=2)
    add_router_flags(s)
    s = cmd("swap-router", cmd_swap_router, "MoE dist checkpoint -> the same experts under another router")
    load(s)
    s.add_argument("--save", required=True)
    add_router_flags(s)
    s = cmd("reshard", cmd_reshard, "dist checkpoint -> dist checkpoint saved in another TP/PP/EP layout")
    load(s)
    s.add_argument("--save", required=True)
    s.add_argument("--tensor-model-parallel-size", type=int, default=1)
    s.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    s.add_argument("--expert-model-parallel-size", type=int, default=1)
    s.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    s = cmd("from-deepspeed", cmd_from_deepspeed, "DeepSpeed checkpoint (ZeRO 0-3) -> dist checkpoint")
    s.add_argument("--load", required=True, help="the DeepSpeed --save directory")
    s.add_argument("--tag", default=None, help="default: the one named by `latest`")
    s.add_argument("--save", required=True)
    s = cmd("theta-sweep", cmd_theta_sweep, "Routing-Free: loss/PPL and experts per token for a list of theta")
    load(s)
    s.add_argument("--data-path", required=True, help="a Megatron indexed dataset prefix (.bin/.idx)")
    s.add_argument("--thetas", required=True, help="comma-separated, e.g. 0.5,1,2")
    s.add_argument("--seq-length", type=int, default=None, help="default: the model's max_position_embeddings")
    s.add_argument("--eval-tokens", type=int, default=16384, help="tokens evaluated, from the end of the corpus")
    s.add_argument("--micro-batch-size", type=int, default=4)
    s = cmd("to-safetensors", cmd_to_safetensors, "dist checkpoint -> one safetensors file of our names")
    load(s)
    s.add_argument("--output", required=True)
    s = cmd("from-safetensors", cmd_from_safetensors, "safetensors file of our names -> dist checkpoint")
    s.add_argument("--input", required=True)
    s.add_argument("--save", required=True)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    import selfmoe  # noqa: F401  (CPU compatibility layer before megatron is used)
    from selfmoe.conversion.common import ConversionError

    try:
        args.fn(args)
    except ConversionError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
