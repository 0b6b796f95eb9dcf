"""Dense -> MoE upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling") and router swaps.

Upcycling copies the dense FFN into each of the E experts with Megatron-Core's own
`upcycling_utils.upcycle_state_dict` (granularity 1: moe_ffn_hidden_size = ffn_hidden_size, so
every expert is an exact copy; attention, norms and embeddings carry over by name). The router
starts from its usual initialisation:

- learned: Megatron's router init; softmax over the top-k logits sums to 1, and k identical
  experts weighted to 1 give the dense FFN: the MoE equals the dense model at step 0.
- self: no router parameters; the same TopKRouter renormalised weights: equal at step 0.
- random / hash: weights 1/k each over k identical experts: equal at step 0.
- routing-free: the output is sum_i G_i * FFN(x) over the fired experts with unnormalised gates
  G_i (0..E of them), so it is NOT the dense output; gates start so that every expert fires, as in
  training from scratch. Only with routing_free_expert_type "mlp": the "aoe" experts factor their
  gate projection through the router's rank-r A_i, which a full-rank dense FFN does not have.

`swap_router` turns a trained MoE into another router type, keeping the experts and dropping (or
freshly initialising) the router: learned -> self / routing-free, as in the Self-Routing paper's
ablation of removing the router from a trained model.
"""

from __future__ import annotations

import torch

from selfmoe.conversion.common import ConversionError, config_from_fingerprint

EXACT_AT_STEP0 = {"learned": True, "self": True, "random": True, "hash": True, "routing-free": False}


def _router_fields(router: str, extra: dict) -> dict:
    kw = dict(moe_router_type=router)
    if router == "routing-free":
        kw["routing_free_expert_type"] = "mlp"
    kw.update({k: v for k, v in extra.items() if v is not None})
    if router == "routing-free" and kw["routing_free_expert_type"] != "mlp":
        raise ConversionError("routing-free upcycling needs --routing-free-expert-type mlp: 'aoe' experts factor the "
                              "gate projection through the router's rank-r A_i, a dense FFN's is full rank")
    return kw


def upcycled_config(dense_cfg, *, num_experts: int, topk: int, router: str, **router_options):
    """The MoE config of an upcycled dense config: same model, E experts of the dense FFN's size."""
    from selfmoe.config import config_fingerprint

    if dense_cfg.num_moe_experts:
        raise ConversionError(f"--load holds an MoE model ({dense_cfg.num_moe_experts} experts, "
                              f"{dense_cfg.moe_router_type} router); upcycling takes a dense checkpoint")
    if num_experts < 1:
        raise ConversionError(f"--num-experts must be >= 1, got {num_experts}")
    fp = config_fingerprint(dense_cfg)
    fp.update(num_moe_experts=num_experts, moe_ffn_hidden_size=dense_cfg.ffn_hidden_size, moe_router_topk=topk,
              moe_layer_freq=1, **_router_fields(router, router_options))
    return config_from_fingerprint(fp)


def upcycle(dense_model, dense_cfg, moe_cfg, seed: int = 0):
    """The upcycled one-rank MoE model (Megatron-Core's upcycle_state_dict; fresh router init)."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from selfmoe.models import build_gpt_model

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    moe = build_gpt_model(moe_cfg)
    sd = upcycle_state_dict([moe], [dense_model])["model"]
    moe.load_state_dict(sd, strict=True)
    return moe.eval()


def swap_router(model, cfg, router: str, seed: int = 0, **router_options):
    """(new model, new config): the same experts and trunk, `router` in every MoE layer."""
    from megatron.core import tensor_parallel

    from selfmoe.config import config_fingerprint
    from selfmoe.models import build_gpt_model

    if not cfg.num_moe_experts:
        raise ConversionError("--load holds a dense model; use `upcycle` to make it an MoE")
    if cfg.moe_router_type == "routing-free" and cfg.routing_free_expert_type == "aoe":
        raise ConversionError("--load has routing-free 'aoe' experts, which live inside the router; no other router "
                              "can keep them")
    fp = config_fingerprint(cfg)
    fp.update(_router_fields(router, router_options))
    new_cfg = config_from_fingerprint(fp)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    new = build_gpt_model(new_cfg)
    old = {k: v for k, v in model.state_dict().items() if ".mlp.router." not in k}
    fresh = new.state_dict()
    missing = [k for k in fresh if k not in old and ".mlp.router." not in k]
    if missing:
        raise ConversionError(f"cannot swap the router: the new model has tensors the old one lacks: {missing[:3]}")
    fresh.update({k: v for k, v in old.items() if k in fresh})
    new.load_state_dict(fresh, strict=True)
    return new.eval(), new_cfg


def describe(cfg) -> str:
    """One line: which channels Self-Routing reads, or that the router is trained from init."""
    if cfg.moe_router_type == "self":
        from selfmoe.routers.self_routing import subspace_indices

        ids = subspace_indices(cfg.self_routing_subspace, cfg.num_moe_experts, cfg.hidden_size)
        return (f"self routing reads hidden channels {ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1))
                else f"self routing reads hidden channels {ids}") + f" (temperature {cfg.self_routing_temperature})"
    return f"{cfg.moe_router_type} router initialised as in training from scratch"

