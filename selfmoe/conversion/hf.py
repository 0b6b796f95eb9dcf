"""Hugging Face transformers <-> our Megatron-Core GPT: exact weight maps both ways.

Which transformers class expresses which of our models (all checked field by field in
`hf_architecture`, refused in one line otherwise):

- MoE, learned router -> MixtralForCausalLM. Megatron's TopKRouter (score "softmax", not
  pre-softmax) takes top-k of the logits and softmaxes the k values; Mixtral softmaxes all E and
  renormalises the top k: the same weights (softmax is monotone and the renormalisation cancels the
  partition function). Aux/z-loss coefficients only change training. Not expressible: sigmoid
  scores, pre-softmax (no renormalisation), a top-k scaling factor, expert bias, group-limited
  routing, shared experts, capacity/token dropping, biases, qk-layernorm, dense layers in between.
- MoE, Self-Routing -> MixtralForCausalLM: the logits x[S]/T are x @ W^T with the one-hot gate
  W[e, S_e] = 1/T; the rest of the routing is the same TopKRouter code as above.
- dense, RMSNorm + SwiGLU + RoPE -> LlamaForCausalLM (same conventions as MistralForCausalLM
  without a sliding window); dense, LayerNorm + GeLU + learned positions -> GPT2LMHeadModel
  (exact GeLU: activation_function "gelu").
- Routing-Free, random and hash routing: no stock transformers class (thresholded gates with 0..E
  experts per token, an RNG stream, a token-id table); `export` writes our safetensors + config.

Conventions checked against transformers 5 (models/{mixtral,llama,gpt2}/modeling_*.py): RoPE is
rotate-half on both sides (Megatron's rotary_interleaved=False); Megatron's fused QKV is
[groups, (heads/groups) q + 1 k + 1 v, head_dim] rows, HF has separate q/k/v with query head h
using kv head h // (heads/groups); Megatron's SwiGLU fc1 is [gate; up] rows, Mixtral's
gate_up_proj is [E, gate; up, H]; GPT-2's Conv1D stores weights transposed ([in, out]).
"""

from __future__ import annotations

import json
import os

import torch

from selfmoe.conversion.common import ConversionError

OURS_CONFIG_FILE = "selfmoe_config.json"
OURS_WEIGHTS_FILE = "model.safetensors"
# the key under which an exported config.json keeps our config fingerprint (lets the import
# restore the exact config, e.g. a Self-Routing model exported as Mixtral)
HF_CONFIG_KEY = "selfmoe_config"
IMPORTABLE = {"mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "gpt2": "GPT2LMHeadModel"}


# ---------------------------------------------------------------------------------------------
# what can be exported

def _refuse_if(checks, what):
    bad = [msg for cond, msg in checks if cond]
    if bad:
        raise ConversionError(f"{what}: {'; '.join(bad)}")


def hf_architecture(cfg) -> str | None:
    """The transformers class that computes exactly `cfg`'s model, None when no stock class does.

    Raises ConversionError naming every field a would-be target cannot express.
    """
    E = cfg.num_moe_experts
    if E and cfg.moe_router_type in ("routing-free", "random", "hash"):
        return None
    common = [
        (cfg.qk_layernorm, "qk_layernorm (no qk norm in the target)"),
        (cfg.layernorm_zero_centered_gamma, "layernorm_zero_centered_gamma"),
        (cfg.apply_residual_connection_post_layernorm, "apply_residual_connection_post_layernorm"),
        (getattr(cfg, "multi_latent_attention", False), "multi_latent_attention"),
        (getattr(cfg, "mtp_num_layers", None), "mtp_num_layers (multi-token prediction)"),
        (cfg.rotary_percent != 1.0 and cfg.position_embedding_type == "rope", "rotary_percent != 1"),
        (getattr(cfg, "rotary_interleaved", False), "rotary_interleaved (the target uses rotate-half RoPE)"),
    ]
    llama_like = [
        (cfg.normalization != "RMSNorm", f"normalization {cfg.normalization} (target: RMSNorm)"),
        (not cfg.gated_linear_unit, "no SwiGLU (target: gated SiLU MLP)"),
        (cfg.position_embedding_type != "rope", f"position_embedding_type {cfg.position_embedding_type} (target: rope)"),
    ]
    if E:
        what = f"cannot export the {cfg.moe_router_type}-router MoE as MixtralForCausalLM"
        freq = cfg.moe_layer_freq
        _refuse_if(common + llama_like + [
            (cfg.moe_router_score_function != "softmax", f"moe_router_score_function {cfg.moe_router_score_function!r}"
                                                         " (Mixtral: softmax)"),
            (cfg.moe_router_pre_softmax, "moe_router_pre_softmax (Mixtral renormalises the top-k weights)"),
            (cfg.moe_router_topk_scaling_factor not in (None, 1.0), "moe_router_topk_scaling_factor"),
            (cfg.moe_router_enable_expert_bias, "moe_router_enable_expert_bias (Mixtral's router has no expert bias)"),
            (getattr(cfg, "moe_router_num_groups", None), "moe_router_num_groups (group-limited routing)"),
            (cfg.moe_shared_expert_intermediate_size, "moe_shared_expert_intermediate_size (shared experts)"),
            (cfg.moe_expert_capacity_factor is not None, "moe_expert_capacity_factor (token dropping)"),
            (not (freq == 1 or (isinstance(freq, (list, tuple)) and all(freq))), "moe_layer_freq (dense layers between MoE layers)"),
            (cfg.add_bias_linear or cfg.add_qkv_bias, "linear biases (Mixtral has none)"),
        ], what)
        return "MixtralForCausalLM"
    if cfg.normalization == "LayerNorm" and cfg.position_embedding_type == "learned_absolute":
        _refuse_if(common + [
            (cfg.gated_linear_unit, "SwiGLU (GPT-2's MLP is not gated)"),
            (cfg.num_query_groups not in (None, cfg.num_attention_heads), "grouped-query attention"),
            (cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size, "kv_channels * heads != hidden_size"),
            (cfg.add_qkv_bias and not cfg.add_bias_linear, "qkv bias without the other linear biases"),
        ], "cannot export the dense model as GPT2LMHeadModel")
        return "GPT2LMHeadModel"
    _refuse_if(common + llama_like + [
        (cfg.add_qkv_bias and not cfg.add_bias_linear, "qkv bias without the other linear biases"),
    ], "cannot export the dense model as LlamaForCausalLM")
    return "LlamaForCausalLM"


def hf_config(cfg, arch: str, tokenizer: dict | None = None):
    """The transformers config of `arch` for our config (fp32; eval-time: no dropout, no jitter)."""
    import transformers

    from selfmoe.config import config_fingerprint

    tok = tokenizer or {}
    ids = dict(bos_token_id=tok.get("bos"), eos_token_id=tok.get("eos"), pad_token_id=None)
    extra = {HF_CONFIG_KEY: config_fingerprint(cfg)}
    if arch == "GPT2LMHeadModel":
        c = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
            activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=cfg.layernorm_epsilon, tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
            **ids)
    else:
        kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads, head_dim=cfg.kv_channels,
                  hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.layernorm_epsilon, attention_dropout=0.0,
                  tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
                  rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)}, **ids)
        if arch == "MixtralForCausalLM":
            c = transformers.MixtralConfig(intermediate_size=cfg.moe_ffn_hidden_size,
                                           num_local_experts=cfg.num_moe_experts,
                                           num_experts_per_tok=cfg.moe_router_topk, router_jitter_noise=0.0,
                                           router_aux_loss_coef=cfg.moe_aux_loss_coeff or 0.0, **kw)
        else:
            c = transformers.LlamaConfig(intermediate_size=cfg.ffn_hidden_size, attention_bias=cfg.add_bias_linear,
                                         mlp_bias=cfg.add_bias_linear, **kw)
    c.architectures = [arch]
    for k, v in extra.items():
        setattr(c, k, v)
    return c


# ---------------------------------------------------------------------------------------------
# tensor maps

def _split_qkv(w, cfg):
    """Megatron's fused QKV rows -> (q, k, v) rows in HF's head order (works for weights and biases)."""
    heads, groups, hd = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads, cfg.kv_channels
    per = heads // groups
    x = w.reshape(groups, per + 2, hd, *w.shape[1:])
    q = x[:, :per].reshape(heads * hd, *w.shape[1:])
    k = x[:, per].reshape(groups * hd, *w.shape[1:])
    v = x[:, per + 1].reshape(groups * hd, *w.shape[1:])
    return q, k, v


def _fuse_qkv(q, k, v, cfg):
    heads, groups, hd = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads, cfg.kv_channels
    per = heads // groups
    rest = q.shape[1:]
    x = torch.cat([q.reshape(groups, per, hd, *rest), k.reshape(groups, 1, hd, *rest),
                   v.reshape(groups, 1, hd, *rest)], dim=1)
    return x.reshape(groups * (per + 2) * hd, *rest)


def self_routing_gate(cfg) -> torch.Tensor:
    """The one-hot gate [E, H] whose logits x @ W^T equal Self-Routing's x[S] / T."""
    from selfmoe.routers.self_routing import subspace_indices

    E, H = cfg.num_moe_experts, cfg.hidden_size
    W = torch.zeros(E, H)
    W[torch.arange(E), torch.tensor(subspace_indices(cfg.self_routing_subspace, E, H))] = 1.0 / cfg.self_routing_temperature
    return W


def to_hf_state_dict(sd: dict, cfg, arch: str) -> dict:
    """Our one-rank state dict -> the state dict of transformers' `arch` (new tensors)."""
    L = "decoder.layers.{}."
    out = {}
    has_bias = cfg.add_bias_linear

    def g(k):
        return sd[k].detach().clone()

    if arch == "GPT2LMHeadModel":
        H = cfg.hidden_size
        zeros = lambda n: torch.zeros(n)  # noqa: E731  (GPT-2 always has biases; ours may not)
        out["transformer.wte.weight"] = g("embedding.word_embeddings.weight")
        out["transformer.wpe.weight"] = g("embedding.position_embeddings.weight")
        for i in range(cfg.num_layers):
            p, h = L.format(i), f"transformer.h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[h + theirs + ".weight"] = g(p + ours + ".weight")
                out[h + theirs + ".bias"] = g(p + ours + ".bias")
            q, k, v = _split_qkv(sd[p + "self_attention.linear_qkv.weight"], cfg)
            out[h + "attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
            qb = p + "self_attention.linear_qkv.bias"
            out[h + "attn.c_attn.bias"] = torch.cat(_split_qkv(sd[qb], cfg)) if qb in sd else zeros(3 * H)
            for ours, theirs, n in (("self_attention.linear_proj", "attn.c_proj", H),
                                    ("mlp.linear_fc1", "mlp.c_fc", cfg.ffn_hidden_size),
                                    ("mlp.linear_fc2", "mlp.c_proj", H)):
                out[h + theirs + ".weight"] = g(p + ours + ".weight").t().contiguous()
                out[h + theirs + ".bias"] = g(p + ours + ".bias") if has_bias else zeros(n)
        out["transformer.ln_f.weight"] = g("decoder.final_layernorm.weight")
        out["transformer.ln_f.bias"] = g("decoder.final_layernorm.bias")
        out["lm_head.weight"] = g("output_layer.weight" if cfg.untie_embeddings_and_output_weights
                                  else "embedding.word_embeddings.weight")
        return out

    out["model.embed_tokens.weight"] = g("embedding.word_embeddings.weight")
    for i in range(cfg.num_layers):
        p, h = L.format(i), f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = g(p + "input_layernorm.weight")
        out[h + "post_attention_layernorm.weight"] = g(p + "pre_mlp_layernorm.weight")
        for name, t in zip("qkv", _split_qkv(sd[p + "self_attention.linear_qkv.weight"], cfg)):
            out[h + f"self_attn.{name}_proj.weight"] = t.clone()
        out[h + "self_attn.o_proj.weight"] = g(p + "self_attention.linear_proj.weight")
        if has_bias:
            for name, t in zip("qkv", _split_qkv(sd[p + "self_attention.linear_qkv.bias"], cfg)):
                out[h + f"self_attn.{name}_proj.bias"] = t.clone()
            out[h + "self_attn.o_proj.bias"] = g(p + "self_attention.linear_proj.bias")
        if arch == "MixtralForCausalLM":
            E = cfg.num_moe_experts
            ex = p + "mlp.experts.local_experts.{}."
            out[h + "mlp.gate.weight"] = (g(p + "mlp.router.weight") if cfg.moe_router_type == "learned"
                                         else self_routing_gate(cfg))
            out[h + "mlp.experts.gate_up_proj"] = torch.stack([g(ex.format(e) + "linear_fc1.weight") for e in range(E)])
            out[h + "mlp.experts.down_proj"] = torch.stack([g(ex.format(e) + "linear_fc2.weight") for e in range(E)])
        else:
            gate, up = sd[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate.clone(), up.clone()
            out[h + "mlp.down_proj.weight"] = g(p + "mlp.linear_fc2.weight")
            if has_bias:
                gb, ub = sd[p + "mlp.linear_fc1.bias"].chunk(2, dim=0)
                out[h + "mlp.gate_proj.bias"], out[h + "mlp.up_proj.bias"] = gb.clone(), ub.clone()
                out[h + "mlp.down_proj.bias"] = g(p + "mlp.linear_fc2.bias")
    out["model.norm.weight"] = g("decoder.final_layernorm.weight")
    out["lm_head.weight"] = g("output_layer.weight" if cfg.untie_embeddings_and_output_weights
                              else "embedding.word_embeddings.weight")
    return out


def from_hf_state_dict(hsd: dict, cfg, arch: str) -> dict:
    """transformers' state dict of `arch` -> our one-rank state dict for `cfg` (inverse of to_hf_state_dict)."""
    L = "decoder.layers.{}."
    out = {}

    def g(k):
        return hsd[k].detach().clone()

    if arch == "GPT2LMHeadModel":
        H = cfg.hidden_size
        out["embedding.word_embeddings.weight"] = g("transformer.wte.weight")
        out["embedding.position_embeddings.weight"] = g("transformer.wpe.weight")
        for i in range(cfg.num_layers):
            p, h = L.format(i), f"transformer.h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[p + ours + ".weight"] = g(h + theirs + ".weight")
                out[p + ours + ".bias"] = g(h + theirs + ".bias")
            q, k, v = hsd[h + "attn.c_attn.weight"].t().split(H, dim=0)
            out[p + "self_attention.linear_qkv.weight"] = _fuse_qkv(q, k, v, cfg).contiguous()
            if cfg.add_bias_linear:
                out[p + "self_attention.linear_qkv.bias"] = _fuse_qkv(*hsd[h + "attn.c_attn.bias"].split(H), cfg).clone()
            for ours, theirs in (("self_attention.linear_proj", "attn.c_proj"), ("mlp.linear_fc1", "mlp.c_fc"),
                                 ("mlp.linear_fc2", "mlp.c_proj")):
                out[p + ours + ".weight"] = g(h + theirs + ".weight").t().contiguous()
                if cfg.add_bias_linear:
                    out[p + ours + ".bias"] = g(h + theirs + ".bias")
        out["decoder.final_layernorm.weight"] = g("transformer.ln_f.weight")
        out["decoder.final_layernorm.bias"] = g("transformer.ln_f.bias")
        if cfg.untie_embeddings_and_output_weights:
            out["output_layer.weight"] = g("lm_head.weight")
        return out

    out["embedding.word_embeddings.weight"] = g("model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        p, h = L.format(i), f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = g(h + "input_layernorm.weight")
        out[p + "pre_mlp_layernorm.weight"] = g(h + "post_attention_layernorm.weight")
        out[p + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            *(hsd[h + f"self_attn.{n}_proj.weight"] for n in "qkv"), cfg).clone()
        out[p + "self_attention.linear_proj.weight"] = g(h + "self_attn.o_proj.weight")
        if cfg.add_bias_linear:
            out[p + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                *(hsd[h + f"self_attn.{n}_proj.bias"] for n in "qkv"), cfg).clone()
            out[p + "self_attention.linear_proj.bias"] = g(h + "self_attn.o_proj.bias")
        if arch == "MixtralForCausalLM":
            if cfg.moe_router_type == "learned":
                out[p + "mlp.router.weight"] = g(h + "mlp.gate.weight")
            gu, dn = hsd[h + "mlp.experts.gate_up_proj"], hsd[h + "mlp.experts.down_proj"]
            for e in range(cfg.num_moe_experts):
                ex = p + f"mlp.experts.local_experts.{e}."
                out[ex + "linear_fc1.weight"] = gu[e].clone()
                out[ex + "linear_fc2.weight"] = dn[e].clone()
        else:
            out[p + "mlp.linear_fc1.weight"] = torch.cat([hsd[h + "mlp.gate_proj.weight"], hsd[h + "mlp.up_proj.weight"]])
            out[p + "mlp.linear_fc2.weight"] = g(h + "mlp.down_proj.weight")
            if cfg.add_bias_linear:
                out[p + "mlp.linear_fc1.bias"] = torch.cat([hsd[h + "mlp.gate_proj.bias"], hsd[h + "mlp.up_proj.bias"]])
                out[p + "mlp.linear_fc2.bias"] = g(h + "mlp.down_proj.bias")
    out["decoder.final_layernorm.weight"] = g("model.norm.weight")
    if cfg.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = g("lm_head.weight")
    return out


# ---------------------------------------------------------------------------------------------
# tokenizer

def tokenizer_files(args: dict):
    """(tokenizer object with save_pretrained, {"bos", "eos"}) for the run's tokenizer, or (None, reason)."""
    t = (args or {}).get("tokenizer_type")
    try:
        if t == "GPT2BPETokenizer":
            from transformers import GPT2Tokenizer

            from selfmoe.data.tokenizers import bundled_gpt2_files

            vocab_file, merge_file = args.get("vocab_file"), args.get("merge_file")
            if not vocab_file or not merge_file:
                vocab_file, merge_file = bundled_gpt2_files()
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merge_file, encoding="utf-8") as f:  # "#version" header, then "a b" per line
                merges = [tuple(ln.split()) for ln in f.read().split("\n")[1:] if ln.strip()]
            tok = GPT2Tokenizer(vocab=vocab, merges=merges)
            return tok, {"bos": tok.eos_token_id, "eos": tok.eos_token_id}
        if t == "HuggingFaceTokenizer" and args.get("tokenizer_model"):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args["tokenizer_model"])
            return tok, {"bos": tok.bos_token_id, "eos": tok.eos_token_id}
    except Exception as e:  # noqa: BLE001 - a missing file: export the model without a tokenizer
        return None, f"the run's {t} files are not readable here ({' '.join(str(e).split())[:120]})"
    return None, f"tokenizer {t or 'unknown'} has no Hugging Face form here; add tokenizer files yourself"


# ---------------------------------------------------------------------------------------------
# export / import

def export(model, cfg, out_dir: str, *, run_args: dict | None = None, max_shard_size: str = "2GB",
           dtype: str = "float32") -> tuple[str, list[str]]:
    """Write `model` as a folder `from_pretrained` reads; returns (what was written, notes).

    Refusals (ConversionError) happen before anything is written; the folder appears atomically.
    """
    from selfmoe.conversion.common import atomic_output_dir, check_new_output

    check_new_output(out_dir, "--output")
    arch = hf_architecture(cfg)
    sd = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    notes = []
    if arch is None:
        from safetensors.torch import save_file

        from selfmoe.config import config_fingerprint

        notes.append(f"note: no stock transformers class expresses the {cfg.moe_router_type} router "
                     f"(0..E experts per token, an RNG stream or a token table); wrote selfmoe safetensors + config "
                     f"(load with `tools/convert_checkpoint.py from-safetensors`)")
        tensors, seen = {}, set()
        for k, v in sd.items():
            if v.data_ptr() in seen or k.endswith("_extra_state"):
                continue
            seen.add(v.data_ptr())
            tensors[k] = v.detach().contiguous().clone()
        with atomic_output_dir(out_dir, "--output") as tmp:
            fp = config_fingerprint(cfg)
            save_file(tensors, os.path.join(tmp, OURS_WEIGHTS_FILE), metadata={"selfmoe_config": json.dumps(fp)})
            with open(os.path.join(tmp, OURS_CONFIG_FILE), "w") as f:
                json.dump(fp, f, indent=1)
        return "selfmoe safetensors", notes

    import transformers

    tok, tok_ids = tokenizer_files(run_args or {})
    if tok is None:
        notes.append(f"note: no tokenizer files written: {tok_ids}")
        tok_ids = {}
    elif len(tok) > cfg.vocab_size:
        raise ConversionError(f"the run's tokenizer has {len(tok)} ids but the model's vocab_size is {cfg.vocab_size}")
    hcfg = hf_config(cfg, arch, tok_ids)
    hsd = to_hf_state_dict(sd, cfg, arch)
    with torch.device("meta"):
        hf = getattr(transformers, arch)(hcfg)
    missing, unexpected = hf.load_state_dict(hsd, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and hcfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ConversionError(f"internal weight map mismatch for {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hcfg.tie_word_embeddings:
        hf.tie_weights()
    hf = hf.to(getattr(torch, dtype))
    with atomic_output_dir(out_dir, "--output") as tmp:
        hf.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tok is not None:
            tok.save_pretrained(tmp)
    return arch, notes


def check_hf_folder(path: str):
    """The folder's transformers config, after checking it names a supported class and all its shards exist."""
    if not os.path.isdir(path):
        raise ConversionError(f"--input {path}: no such directory")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ConversionError(f"--input {path}: no config.json (not a Hugging Face model folder)")
    with open(cfg_file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_file}: invalid JSON ({e})") from None
    mt = raw.get("model_type")
    if mt not in IMPORTABLE:
        arch = (raw.get("architectures") or [mt])[0]
        raise ConversionError(f"{cfg_file}: architecture {arch} (model_type {mt!r}) is not supported; "
                              f"supported: {', '.join(sorted(set(IMPORTABLE.values())))}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        gone = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if gone:
            raise ConversionError(f"--input {path}: missing shard(s) {', '.join(gone)} named in {os.path.basename(index)}")
    elif not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise ConversionError(f"--input {path}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors folders are imported)")
    import transformers

    return transformers.AutoConfig.from_pretrained(path), raw


def config_from_hf(hc, raw: dict):
    """Our SelfMoEConfig for a transformers config (refusing what we cannot express), and notes."""
    from selfmoe.config import make_config
    from selfmoe.conversion.common import config_from_fingerprint

    mt = hc.model_type
    where = f"{IMPORTABLE[mt]}"
    if mt == "gpt2":
        _refuse_if([
            (hc.activation_function != "gelu", f"activation_function {hc.activation_function!r} (our GPT-2 style "
                                               f"uses exact GeLU, 'gelu'; 'gelu_new' is the tanh approximation)"),
            (not hc.scale_attn_weights, "scale_attn_weights=False"),
            (getattr(hc, "scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
        ], f"cannot import {where}")
        kw = dict(num_layers=hc.n_layer, hidden_size=hc.n_embd, num_attention_heads=hc.n_head,
                  ffn_hidden_size=hc.n_inner or 4 * hc.n_embd, vocab_size=hc.vocab_size,
                  max_position_embeddings=hc.n_positions, layernorm_epsilon=hc.layer_norm_epsilon,
                  add_bias_linear=True, add_qkv_bias=True,
                  untie_embeddings_and_output_weights=not hc.tie_word_embeddings)
        style = "gpt2"
    else:
        rp = getattr(hc, "rope_parameters", None) or {}
        _refuse_if([
            (hc.hidden_act != "silu", f"hidden_act {hc.hidden_act!r} (ours: silu)"),
            (rp.get("rope_type", "default") != "default", f"rope_type {rp.get('rope_type')!r} (RoPE scaling)"),
            (rp.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor"),
            (mt != "mixtral" and getattr(hc, "attention_bias", False) != getattr(hc, "mlp_bias", False),
             "attention_bias != mlp_bias (Megatron has one --add-bias-linear)"),
            (getattr(hc, "sliding_window", None) not in (None, 0) and hc.sliding_window < hc.max_position_embeddings,
             f"sliding_window {getattr(hc, 'sliding_window', None)} (full causal attention only)"),
            (hc.num_attention_heads % (hc.num_key_value_heads or hc.num_attention_heads),
             "num_attention_heads not divisible by num_key_value_heads"),
        ], f"cannot import {where}")
        groups = hc.num_key_value_heads or hc.num_attention_heads
        head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        kw = dict(num_layers=hc.num_hidden_layers, hidden_size=hc.hidden_size, num_attention_heads=hc.num_attention_heads,
                  num_query_groups=groups, kv_channels=head_dim, ffn_hidden_size=hc.intermediate_size,
                  vocab_size=hc.vocab_size, max_position_embeddings=hc.max_position_embeddings,
                  layernorm_epsilon=hc.rms_norm_eps, rotary_base=int(rp.get("rope_theta", 10000)),
                  untie_embeddings_and_output_weights=not hc.tie_word_embeddings)
        if mt == "mixtral":
            kw.update(num_moe_experts=hc.num_local_experts, moe_router_topk=hc.num_experts_per_tok,
                      moe_ffn_hidden_size=hc.intermediate_size, moe_router_type="learned",
                      moe_aux_loss_coeff=hc.router_aux_loss_coef, moe_router_load_balancing_type="aux_loss")
        else:
            bias = bool(getattr(hc, "attention_bias", False))
            kw.update(add_bias_linear=bias, add_qkv_bias=bias)
        style = "mixtral"
    ours = raw.get(HF_CONFIG_KEY)
    if ours:  # exported by us: restore the exact config if the architecture agrees with it
        cfg = config_from_fingerprint(ours)
        skip = {"moe_router_type", "moe_aux_loss_coeff", "moe_router_load_balancing_type"}
        if kw.get("num_moe_experts"):
            skip.add("ffn_hidden_size")  # Mixtral has only the experts' size; ours keeps the dense one too
        if mt == "gpt2":
            skip |= {"add_bias_linear", "add_qkv_bias"}  # GPT-2 always has biases: zeros if ours had none
        if all(getattr(cfg, k) == v for k, v in kw.items() if k not in skip):
            return cfg
    try:
        return make_config(style, **kw)
    except (ValueError, AssertionError) as e:
        raise ConversionError(f"cannot import {where}: {' '.join(str(e).split())}") from None


def load_hf(path: str):
    """(transformers model in fp32, its config, our config) for a checked safetensors folder."""
    import transformers

    hc, raw = check_hf_folder(path)
    cfg = config_from_hf(hc, raw)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - truncated shards etc.
        raise ConversionError(f"--input {path}: transformers cannot load it: {' '.join(str(e).split())[:300]}") \
            from None
    hf.eval()
    return hf, hc, cfg


def import_state_dict(hf, hc, cfg):
    """(our config, our one-rank state dict, notes) for a loaded transformers model.

    A Mixtral we exported from Self-Routing comes back as Self-Routing while its gates are still
    the one-hot selection; gates changed since (fine-tuned elsewhere) come back as a learned router.
    """
    import dataclasses

    arch = IMPORTABLE[hc.model_type]
    if arch == "MistralForCausalLM":
        arch = "LlamaForCausalLM"  # same parameter names and math (no sliding window, checked)
    hsd = hf.state_dict()
    notes = []
    if arch == "GPT2LMHeadModel" and not cfg.add_bias_linear:
        lin = [v for k, v in hsd.items() if k.endswith(("c_attn.bias", "c_proj.bias", "c_fc.bias"))]
        if any(bool(v.any()) for v in lin):  # biases trained since our export: keep them
            cfg = dataclasses.replace(cfg, add_bias_linear=True, add_qkv_bias=True)
    if cfg.num_moe_experts and cfg.moe_router_type == "self":
        W = self_routing_gate(cfg)
        if not all(torch.equal(hsd[f"model.layers.{i}.mlp.gate.weight"], W) for i in range(cfg.num_layers)):
            cfg = dataclasses.replace(cfg, moe_router_type="learned")
            notes.append("note: the router gates are no longer Self-Routing's one-hot selection; imported as learned")
    return cfg, from_hf_state_dict(hsd, cfg, arch), notes
