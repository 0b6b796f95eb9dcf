"""Routing metrics: counted in the MoE layers at every forward, reduced only at log time.

A forward hook on each router adds its routing decisions into local count tensors (no
communication); `RoutingStats.reduce()` all-reduces them once per log interval and turns them into
numbers. Duplicate counting on tensor-parallel ranks scales every count alike, so fractions are exact.

What is counted is the routing actually decided: the map before capacity dropping and padding
(a padded slot is not a routed token), padding tokens (the `padding_mask` the MoE layer hands the
router, True = padding) excluded. Token-expert pairs dropped over capacity are counted separately.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from selfmoe.routers import moe_layers


def routing_metrics(counts: torch.Tensor, k_hist: torch.Tensor, dropped: torch.Tensor | None = None) -> dict:
    """Metrics from per-layer expert loads counts [L, E] (routed token-expert pairs, before capacity),
    experts-per-token histograms [L, E+1] and dropped pairs [L, E] (over capacity; optional).

    Layers with no routed token (e.g. on another pipeline stage, before reduction) are skipped.
    `dropped_fraction` = dropped pairs / routed pairs.
    """
    counts, k_hist = counts.double(), k_hist.double()
    dropped = torch.zeros_like(counts) if dropped is None else dropped.double()
    L, E = counts.shape
    out: dict = {"layers": {}}
    for layer in range(L):
        total, ntok = counts[layer].sum(), k_hist[layer].sum()
        if ntok == 0:
            continue
        m = {}
        if total > 0:
            f = counts[layer] / total
            nz = f[f > 0]
            m["normalized_entropy"] = float(-(nz * nz.log()).sum() / math.log(E)) if E > 1 else 1.0
            m["cv"] = float(f.std(unbiased=False) / f.mean())
            m["max_overload"] = float(E * f.max())
            m["dead_experts"] = int((f == 0).sum())
            m["load_fraction"] = f.tolist()
        else:
            m.update(normalized_entropy=0.0, cv=0.0, max_overload=0.0, dead_experts=E, load_fraction=[0.0] * E)
        ks = torch.arange(E + 1, dtype=torch.float64)
        m["experts_per_token"] = float((ks * k_hist[layer]).sum() / ntok)
        cdf = k_hist[layer].cumsum(0) / ntok
        m["experts_per_token_p50"] = int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)))
        m["experts_per_token_p99"] = int(torch.searchsorted(cdf, torch.tensor(0.99, dtype=torch.float64)))
        m["density"] = m["experts_per_token"] / E
        m["dropped"] = int(dropped[layer].sum())
        m["dropped_fraction"] = float(dropped[layer].sum() / total) if total > 0 else 0.0
        out["layers"][layer + 1] = m
    if out["layers"]:
        for key in ("normalized_entropy", "cv", "max_overload", "dead_experts", "experts_per_token",
                    "experts_per_token_p50", "experts_per_token_p99", "density", "dropped_fraction"):
            vals = [m[key] for m in out["layers"].values()]
            out[key] = sum(vals) / len(vals)
    return out


class RoutingStats:
    """Counts routing decisions of every MoE layer of `model` (a module or a list of chunks)."""

    def __init__(self, model, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.k_hist = torch.zeros(num_layers, num_experts + 1, dtype=torch.float64)
        self.dropped = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.enabled = True
        self.layers = moe_layers(model)
        self._handles = [layer.router.register_forward_hook(self._hook, with_kwargs=True) for layer in self.layers]

    @torch.no_grad()
    def _hook(self, router, args, kwargs, outputs):
        if not self.enabled or router.layer_number is None:
            return
        E = self.num_experts
        routing_map = outputs[1].reshape(-1, E)
        routed = routing_map
        last = getattr(router, "last_routing", None)  # (before capacity, returned map), see mcore_compat
        if last is not None and last[1] is outputs[1]:
            routed = last[0].reshape(-1, E)
        padding_mask = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        if padding_mask is not None:  # [s, b], True = padding token
            valid = ~padding_mask.reshape(-1, 1).bool()
            routed, routing_map = routed & valid, routing_map & valid
            k = routed.sum(1)[valid.flatten()]
        else:
            k = routed.sum(1)
        i = router.layer_number - 1
        self.counts[i] += routed.sum(0).to(self.counts)
        self.dropped[i] += (routed & ~routing_map).sum(0).to(self.dropped)
        self.k_hist[i] += torch.bincount(k, minlength=E + 1).to(self.k_hist)

    def reset(self):
        self.counts.zero_()
        self.k_hist.zero_()
        self.dropped.zero_()

    def reduce(self, group=None, reset: bool = True) -> dict:
        """All-reduce the counts (collective over `group`, default all ranks) and compute metrics."""
        parts = (self.counts, self.k_hist, self.dropped)
        buf = torch.cat([t.flatten() for t in parts])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(buf, group=group)
        views, at = [], 0
        for t in parts:
            views.append(buf[at:at + t.numel()].view_as(t))
            at += t.numel()
        metrics = routing_metrics(*views)
        rf = [layer.router for layer in self.layers if getattr(layer.router, "is_routing_free", False)]
        if rf:
            metrics["lambda"] = float(rf[0].balance_coeff)
            metrics["theta"] = float(rf[0].theta)
        if reset:
            self.reset()
        return metrics

    def remove(self):
        for h in self._handles:
            h.remove()


def parameter_counts(model, config) -> dict:
    """Total, active-per-token and router parameter counts of the whole (possibly sharded) model.

    Local counts are summed over the model-parallel groups: tensor-parallel duplicates are counted
    once; expert parameters are summed over expert-parallel ranks. Active = dense + k/E of experts
    (for Routing-Free, the target density replaces k/E).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    chunks = model if isinstance(model, (list, tuple)) else [model]
    layers = moe_layers(chunks)
    router_ids = {id(p) for layer in layers for p in layer.router.parameters()}
    expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
    dense = expert = router = 0
    seen = set()
    for c in chunks:
        for p in c.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if getattr(p, "shared_embedding", False) and not ps.is_pipeline_first_stage(ignore_virtual=True):
                continue  # tied output layer on the last stage: the first stage counts the embedding
            if id(p) in expert_ids:
                if ps.get_expert_tensor_parallel_rank() == 0 or getattr(p, "tensor_model_parallel", False):
                    expert += p.numel()
            elif param_is_not_tensor_parallel_duplicate(p):
                dense += p.numel()
                if id(p) in router_ids:
                    router += p.numel()
    if dist.is_initialized() and dist.get_world_size() > 1:
        d = torch.tensor([dense, router], dtype=torch.float64)
        dist.all_reduce(d, group=ps.get_model_parallel_group())
        e = torch.tensor([expert], dtype=torch.float64)
        dist.all_reduce(e, group=ps.get_expert_tensor_model_pipeline_parallel_group())
        dense, router, expert = int(d[0]), int(d[1]), int(e[0])
    E = config.num_moe_experts or 0
    if E and config.moe_router_type == "routing-free":
        active_frac = config.routing_free_density_target
    elif E:
        active_frac = config.moe_router_topk / E
    else:
        active_frac = 0.0
    return {"total": dense + expert, "active": int(dense + active_frac * expert), "router": router,
            "expert": expert, "dense": dense}
