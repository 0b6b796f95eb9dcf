"""Routing-Free MoE (Liu et al. 2026): every expert scores itself and fires above a threshold.

- gate of expert i: G_i(x) = ReLU(s_i * ||x A_i||_2 - b_i) with A_i [H, r]; fires when G_i >= theta.
- routing_map = fired, probs P = G * fired: 0..E experts per token, through Megatron's dispatchers.
- ONE balance loss over all MoE layers, on the [tokens, L*E] matrix of every layer's P (the
  authors' code, RoutingFreeMoE@9cce561 `balancing_loss_func`; README "Routing-Free MoE"):
      L_EB = mean_{l,e}( mean_t m[t,l,e] * mean_t P[t,l,e] )
      L_TB = mean_t( mean_{l,e} m[t,l,e] * mean_{l,e} P[t,l,e] )      m = fired (no gradient)
      loss = lambda * (mu * L_EB + (1 - mu) * L_TB)
  added with a coefficient lambda that follows the GLOBAL density of all MoE layers
  (`update_balance_coefficient`; rule "sign" or the reference's "quadratic").
- AoE experts: E_i(x) = (act(x A_i B_i) * (x W_up,i)) W_down,i share the gate's A_i; each expert
  computes x A_i for its own tokens (the gate's [T, E*r] product is not reused: reusing it changes
  the float rounding, and saves ~2% of the layer's time; bench/routing_free_speed.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker

from selfmoe import mcore_compat
from selfmoe.routers.base import router_option


def tracker_layers(config) -> int:
    """Slots of Megatron-Core's aux-loss tracker: decoder layers plus MTP depths, whose layer
    numbers follow the decoder's (megatron-core's routers size it the same way)."""
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


class _ForwardStats:
    """Per-token fire counts of one forward pass, filled by every Routing-Free layer of one model
    chunk in turn; read in the backward pass, when every layer has added its count.

    A fresh object per forward pass (the chunk's first Routing-Free layer makes it), so the
    micro-batches a pipeline schedule keeps in flight do not mix.
    """

    def __init__(self):
        self.count = None  # [T] fired (layer, expert) pairs per token, summed over layers
        self.p_sum = None  # [T] sum of P over the layers' experts (padding: 0), no gradient
        self.layers = 0
        self.fired = 0.0   # fired / seen valid pairs, for the per-micro-batch lambda update
        self.pairs = 0.0

    def add(self, count, p_sum, fired, pairs, valid):
        self.valid = valid  # [T] 1 = not padding
        self.count = count if self.count is None else self.count + count
        self.p_sum = p_sum if self.p_sum is None else self.p_sum + p_sum
        self.layers += 1
        self.fired += fired
        self.pairs += pairs


class _Chunk:
    """What the Routing-Free layers of one model chunk share (set by `link_routers`)."""

    def __init__(self, routers, num_layers):
        self.routers = routers
        self.num_layers = num_layers  # L of the loss: MoE layers of the whole model
        self.current = None


class _BalanceLoss(torch.autograd.Function):
    """Identity on P [T, E]; its backward adds lambda * d(mu L_EB + (1-mu) L_TB)/dP.

    The loss is linear in P once the (non-differentiable) fire fractions are known:
        dL/dP[t,l,e] = mu * fire_rate[l,e] / (L E T) + (1 - mu) * m_t / (L E T),
    with m_t = token t's fire fraction over the L*E (layer, expert) columns. m_t needs the later
    layers' firing, so it is read from `stats` at backward time, when every layer has run.
    """

    @staticmethod
    def forward(ctx, probs, fire_rate, valid, total_tokens, stats, router, coeff, scale):
        ctx.save_for_backward(probs.detach(), fire_rate, valid, total_tokens)
        ctx.stats, ctx.router, ctx.coeff, ctx.scale = stats, router, coeff, scale
        return probs

    @staticmethod
    def backward(ctx, grad):
        probs, fire_rate, valid, T = ctx.saved_tensors
        r = ctx.router
        E, L = probs.shape[1], r.chunk.num_layers
        # exact when this chunk holds every MoE layer (pipeline size 1); per stage otherwise
        m = ctx.stats.count / (ctx.stats.layers * E)
        d_eb = r.mu * fire_rate / (L * E * T)                       # [E]
        d_tb = (1.0 - r.mu) * m * valid / (L * E * T)                # [T]
        d = (d_eb[None, :] * valid[:, None] + d_tb[:, None]).to(grad.dtype)
        with torch.no_grad():  # this layer's share of the one loss, for logging
            share = (d * probs).sum()
            save_to_aux_losses_tracker("routing_free_balance_loss", (share * L).reshape(()), r.layer_number,
                                       tracker_layers(r.config), reduce_group=r.tp_cp_group)
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        scale = 1.0 if scale is None else scale.to(grad.device)
        return grad + d * (ctx.coeff.to(d.dtype) * ctx.scale * scale), None, None, None, None, None, None, None


class RoutingFreeRouter(MegatronModule):
    is_routing_free = True

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config)
        pg_collection = mcore_compat.default_pg_collection(pg_collection)
        self.num_experts = E = config.num_moe_experts
        H, r = config.hidden_size, router_option(config, "routing_free_rank")
        self.tp_cp_group = pg_collection.tp_cp
        self.layer_number = None
        self.theta = float(router_option(config, "routing_free_theta"))
        self.mu = float(router_option(config, "routing_free_mu"))
        self.gate_proj = torch.nn.Parameter(torch.empty(E, H, r, dtype=config.params_dtype))
        s0 = router_option(config, "routing_free_scale_init")
        if s0 is None:
            s0 = 2.0 * self.theta / (config.init_method_std * (H * r) ** 0.5)
        self.gate_scale = torch.nn.Parameter(torch.full((E,), float(s0), dtype=torch.float32))
        b0 = router_option(config, "routing_free_bias_init")
        self.gate_bias = torch.nn.Parameter(torch.full((E,), b0, dtype=torch.float32))
        if config.perform_initialization:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                config.init_method(self.gate_proj)
        for p in self.parameters():
            # Replicated over TP; each TP rank sees other tokens under SP, so grads are all-reduced.
            setattr(p, "sequence_parallel", config.sequence_parallel)
        # The adaptive balance coefficient lambda is training state: a persistent buffer, so it is
        # saved with the model (all layers hold the same value).
        lam0 = router_option(config, "routing_free_lambda0")
        self.register_buffer("balance_coeff", torch.tensor([lam0], dtype=torch.float64))
        # Fired / seen (token, expert) pairs since the last lambda update; no synchronisation per step.
        self.register_buffer("fired_count", torch.zeros(1, dtype=torch.float64), persistent=False)
        self.register_buffer("pair_count", torch.zeros(1, dtype=torch.float64), persistent=False)
        # Alone until `link_routers` joins the layers of a model into one loss.
        object.__setattr__(self, "chunk", _Chunk([self], 1))

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def _apply(self, fn, recurse=True):
        # Float16Module casts every floating buffer to bf16/fp16; lambda moves by factors of
        # (1 + eta) ~ 1.02, which bf16 cannot represent, so its buffers stay float64.
        saved = {n: getattr(self, n).detach().clone() for n in ("balance_coeff", "fired_count", "pair_count")}
        super()._apply(fn, recurse)
        for n, v in saved.items():
            getattr(self, n).data = v.to(getattr(self, n).device)
        return self

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x A for all experts at once: [T, H] -> [T, E*r] (one GEMM), in the gate's dtype."""
        E, H, r = self.gate_proj.shape
        return x.to(self.gate_proj.dtype) @ self.gate_proj.permute(1, 0, 2).reshape(H, E * r)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """G [T, E] (float32) for tokens x [T, H]."""
        E, H, r = self.gate_proj.shape
        z = self.project(x)
        norm = torch.linalg.vector_norm(z.view(-1, E, r), dim=-1, dtype=torch.float32)
        return torch.relu(self.gate_scale * norm - self.gate_bias)

    def forward(self, input: torch.Tensor, padding_mask=None):
        """input [s, b, H]; padding_mask [s, b] bool, True = padding (Megatron-Core's router
        convention): padding tokens are routed but count in neither the loss nor the density."""
        x = input.reshape(-1, input.shape[-1])
        gates = self.gates(x)
        routing_map = gates >= self.theta
        fired = routing_map.to(gates.dtype)
        probs = gates * fired
        if self.training and torch.is_grad_enabled():
            valid = (torch.ones_like(gates[:, 0]) if padding_mask is None
                     else (~padding_mask.reshape(-1).bool()).to(gates.dtype))
            probs = self._attach_balance_loss(probs, fired * valid[:, None], valid)
        return probs, routing_map

    def _attach_balance_loss(self, probs, fired, valid):
        """fired [T, E]: fired AND not padding (0/1); valid [T]: 1 = not padding."""
        with torch.no_grad():
            local = torch.cat([fired.sum(0), valid.sum().reshape(1)]).double()
            self.fired_count += local[:-1].sum()
            self.pair_count += local[-1] * fired.shape[1]
            stats = local.to(probs.dtype)
            if self.tp_cp_group.size() > 1:
                stats = stats.clone()
                dist.all_reduce(stats, group=self.tp_cp_group)
            total_tokens = stats[-1].clamp(min=1)
            fire_rate = stats[:-1] / total_tokens
            chunk = self.chunk
            if chunk.current is None or self is chunk.routers[0]:
                chunk.current = _ForwardStats()
            fs = chunk.current
            fs.add(fired.sum(1), (probs * valid[:, None]).sum(1), local[:-1].sum(), local[-1] * fired.shape[1], valid)
        coeff = self.balance_coeff.clone()  # the lambda of this forward (a later update must not leak in)
        scale = local[-1].to(probs.dtype) if self.config.calculate_per_token_loss else 1.0
        out = _BalanceLoss.apply(probs, fire_rate, valid, total_tokens, fs, self, coeff, scale)
        if self is chunk.routers[-1] and getattr(self.config, "routing_free_lambda_update", "step") == "micro-batch":
            _micro_batch_update(chunk, fs)
        return out


def link_routers(routers, num_layers: int) -> None:
    """Make `routers` (the Routing-Free layers of one model chunk, in layer order) share one
    balance loss whose L is `num_layers` (the MoE layers of the whole model)."""
    chunk = _Chunk(list(routers), int(num_layers))
    for r in routers:
        object.__setattr__(r, "chunk", chunk)


def next_lambda(lam: float, rho: float, config) -> float:
    """One lambda step for density rho, clamped at 1 from above (no lower clamp in either rule).

    sign:      lambda * (1 + eta) ** sign(rho - rho*)                 (the paper, as recorded here)
    quadratic: lambda * (1 + eta * (rho - rho*) ** 2) ** sign(rho - rho*)   (the authors' code)
    """
    target, eta = router_option(config, "routing_free_density_target"), router_option(config, "routing_free_eta")
    sign = (rho > target) - (rho < target)
    rule = router_option(config, "routing_free_lambda_rule")
    base = 1.0 + eta if rule == "sign" else 1.0 + eta * (rho - target) ** 2
    return min(1.0, lam * base ** sign)


@torch.no_grad()
def _micro_batch_update(chunk, fs) -> None:
    """The reference's timing: after this micro-batch's loss used the old lambda, step lambda from
    this micro-batch's density (all MoE layers, this data-parallel replica's tokens)."""
    r0 = chunk.routers[0]
    stats = torch.stack([fs.fired, fs.pairs]).double()
    if r0.tp_cp_group.size() > 1:
        dist.all_reduce(stats, group=r0.tp_cp_group)
    if stats[1] == 0:
        return
    lam = next_lambda(float(r0.balance_coeff), float(stats[0] / stats[1]), r0.config)
    for r in chunk.routers:
        r.balance_coeff.fill_(lam)


class AoEExperts(MegatronModule):
    """The local experts in AoE form; each expert's gate factor A_i comes from the router.

    Expert-tensor-parallel ranks hold a slice of the FFN width; their partial outputs are reduced
    by the token dispatcher, as for Megatron's own experts.
    """

    def __init__(self, num_local_experts, config, pg_collection=None, submodules=None):
        super().__init__(config)
        pg_collection = mcore_compat.default_pg_collection(pg_collection)
        self.num_local_experts = n = num_local_experts
        self.ep_group, self.expt_tp_group, self.expt_dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        etp = self.expt_tp_group.size()
        F = config.moe_ffn_hidden_size
        if F % etp:
            raise ValueError(f"moe_ffn_hidden_size ({F}) must divide by expert tensor parallel size ({etp})")
        H, r, Fl = config.hidden_size, router_option(config, "routing_free_rank"), F // etp
        dt = config.params_dtype
        self.up_proj = torch.nn.Parameter(torch.empty(n, Fl, H, dtype=dt))
        self.gate_up = torch.nn.Parameter(torch.empty(n, r, Fl, dtype=dt))
        self.down_proj = torch.nn.Parameter(torch.empty(n, H, Fl, dtype=dt))
        if config.perform_initialization:
            with tensor_parallel.get_cuda_rng_tracker().fork(tensor_parallel.get_expert_parallel_rng_tracker_name()):
                config.init_method(self.up_proj)
                config.init_method(self.gate_up)
                config.output_layer_init_method(self.down_proj)
        for p, dim in ((self.up_proj, 1), (self.gate_up, 2), (self.down_proj, 2)):
            # As Megatron marks expert weights: with EP>1 grads are reduced over the expert-DP group.
            p.allreduce = self.ep_group.size() == 1
            p.tensor_model_parallel = etp > 1
            p.partition_dim = dim
        self.activation_func = config.activation_func
        self._router = None
        self._local_ids: list[int] = []

    def attach_gate(self, router: RoutingFreeRouter, local_expert_indices):
        # A plain attribute, not a submodule: the router owns A_i; the experts only read it.
        object.__setattr__(self, "_router", router)
        self._local_ids = list(local_expert_indices)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        if self._router is None:
            raise RuntimeError("AoEExperts need the Routing-Free router's gates (attach_gate)")
        splits = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        outs = []
        # unbind, not [j]: indexing a parameter per expert costs a zero-filled full-size gradient
        # per expert in backward (E^2 memory traffic); unbind's backward is one stack.
        gate = self._router.gate_proj.unbind(0)
        ups, gate_ups, downs = self.up_proj.unbind(0), self.gate_up.unbind(0), self.down_proj.unbind(0)
        # Every local expert runs, even on 0 tokens: ZeRO and DDP expect grads for all of them.
        for j, (x, p) in enumerate(zip(torch.split(hidden, splits), torch.split(probs, splits))):
            xa = x @ gate[self._local_ids[j]].to(x.dtype)
            h = self.activation_func(xa @ gate_ups[j]) * (x @ ups[j].t())
            # G scales the expert's output; applied after W_down (H wide, not F wide; same by linearity)
            outs.append((h @ downs[j].t()) * p.unsqueeze(-1).to(h.dtype))
        return torch.cat(outs, dim=0), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        P = len(sharded_offsets)
        ep, etp = self.ep_group, self.expt_tp_group
        out = {}
        for name, p, dim in (("up_proj", self.up_proj, 1), ("gate_up", self.gate_up, 2), ("down_proj", self.down_proj, 2)):
            offsets = [*sharded_offsets, (P, ep.rank(), ep.size())]
            if etp.size() > 1:
                offsets.append((P + dim, etp.rank(), etp.size()))
            out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", p, *offsets, replica_id=(0, 0, self.expt_dp_group.rank()), prepend_axis_num=P
            )
        return out


def prepare_layers(model) -> None:
    """Once after building: one balance loss over the Routing-Free layers of each model chunk; give
    AoE experts their layer's router; size alltoall outputs by the map.

    Megatron's alltoall dispatcher sizes its permutation output as tokens x top-k, right for
    top-k routers only; permutes that honour that size (TransformerEngine's fused permute, the
    torch permute of megatron-core >= 0.19) would drop tokens here, where a token may use 0..E
    experts. The count of routed pairs is the right size on every version.
    """
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from selfmoe.models.moe_spec import num_moe_layers
    from selfmoe.routers import moe_layers

    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        rs = sorted((layer.router for layer in moe_layers(chunk) if isinstance(layer.router, RoutingFreeRouter)),
                    key=lambda r: r.layer_number or 0)
        if rs:
            link_routers(rs, num_moe_layers(rs[0].config))
            if rs[0].config.pipeline_model_parallel_size > 1 and not getattr(prepare_layers, "_noted", False):
                prepare_layers._noted = True
                if not dist.is_initialized() or dist.get_rank() == 0:
                    print("routing-free: pipeline parallel: the balance loss's token term uses each stage's own "
                          "per-token fire fraction (a per-stage approximation of the authors' one loss over all "
                          "layers; exact at pipeline size 1); its difference from the exact value is measured "
                          "and printed after the first step", flush=True)
    for layer in moe_layers(model):
        if isinstance(layer.experts, AoEExperts):
            ex = layer.experts
            ex.attach_gate(layer.router, layer.local_expert_indices)
        dispatcher = layer.token_dispatcher
        if isinstance(dispatcher, MoEAlltoAllTokenDispatcher) and not getattr(dispatcher, "_variable_k", False):
            dispatcher.preprocess = _variable_k_preprocess(dispatcher, dispatcher.preprocess)
            dispatcher._variable_k = True


def _variable_k_preprocess(dispatcher, original):
    def preprocess(routing_map, *args, **kwargs):
        out = original(routing_map, *args, **kwargs)
        if not dispatcher.drop_and_pad:
            dispatcher.num_out_tokens = int(routing_map.sum())
        return out

    return preprocess


_pp_gap_reported = False


def token_balance_gap(model, group=None):
    """(exact, per-stage) L_TB of the last training micro-batch, when the model's MoE layers are
    split over pipeline stages (each a chunk of `model` here, or ranks of `group`).

    Each stage's backward can only see its own layers' firing, so there the token fire fraction m_t
    is the stage's own (count over its n_s layers / (n_s E)) instead of over all L layers:
        exact     = mean_t (sum_s c_ts / (L E)) (sum_s S_ts / (L E))
        per-stage = mean_t  sum_s (c_ts / (n_s E)) (S_ts / (L E))
    with c_ts the fired pairs and S_ts the summed P of token t on stage s. Collective over `group`
    (the pipeline group) and the tensor/context-parallel group; every rank gets the same numbers.
    """
    chunks = {id(r.chunk): r.chunk for r in routing_free_routers(model)}.values()
    fss = [(c, c.current) for c in chunks if c.current is not None and c.current.count is not None]
    if not fss:
        return None
    c0 = fss[0][0]
    L, E = c0.num_layers, c0.routers[0].num_experts
    count = sum(fs.count for _, fs in fss).double()
    p_sum = sum(fs.p_sum for _, fs in fss).double()
    approx = sum((fs.count / (fs.layers * E)) * (fs.p_sum / (L * E)) for _, fs in fss).double()
    vec = torch.cat([count, p_sum, approx])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(vec, group=group)
    T = count.numel()
    count, p_sum, approx = vec[:T], vec[T:2 * T], vec[2 * T:]
    valid_tokens = fss[0][1].valid.sum().double().reshape(1)
    sums = torch.stack([(count / (L * E) * p_sum / (L * E)).sum(), approx.sum()])
    tp = c0.routers[0].tp_cp_group
    out = torch.cat([sums, valid_tokens])
    if tp.size() > 1:
        dist.all_reduce(out, group=tp)
    return float(out[0] / out[2]), float(out[1] / out[2])


def routing_free_routers(model) -> list[RoutingFreeRouter]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in c.modules() if isinstance(m, RoutingFreeRouter)]


@torch.no_grad()
def update_balance_coefficient(model, group=None):
    """Once per optimizer step: lambda from the global density since the last call.

    Collective over `group` (default: all ranks), so that every MoE layer on every pipeline stage,
    data-parallel and tensor-parallel rank sees the same density and keeps the same lambda.
    With `routing_free_lambda_update == "micro-batch"` lambda already moved after every micro-batch
    (the reference's timing); here it is only averaged over the ranks (as the reference does).
    Returns (rho, lambda), or (None, lambda) when no training token was routed since the last call.
    """
    routers = routing_free_routers(model)
    stats = torch.zeros(3, dtype=torch.float64)
    for r in routers:
        stats[:2] += torch.cat([r.fired_count, r.pair_count]).cpu()
        r.fired_count.zero_()
        r.pair_count.zero_()
    if routers:
        stats[2] = float(routers[0].balance_coeff)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(stats, group=group)
    if not routers:
        return None, None
    cfg = routers[0].config
    if getattr(cfg, "routing_free_lambda_update", "step") == "micro-batch":
        lam = float(stats[2]) / world
    else:
        lam = float(routers[0].balance_coeff)
        if stats[1] == 0:
            return None, lam
        lam = next_lambda(lam, float(stats[0] / stats[1]), cfg)
    for r in routers:
        r.balance_coeff.fill_(lam)
    global _pp_gap_reported
    if cfg.pipeline_model_parallel_size > 1 and not _pp_gap_reported:
        from megatron.core import parallel_state

        gap = token_balance_gap(model, parallel_state.get_pipeline_model_parallel_group())
        _pp_gap_reported = True
        if gap is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            exact, approx = gap
            print(f"routing-free: pipeline-parallel per-stage L_TB, measured on the first step's last micro-batch: "
                  f"exact {exact:.6g}, per-stage {approx:.6g} ({100 * (approx - exact) / max(exact, 1e-30):+.2f}%; "
                  f"it enters the loss with weight 1 - mu = {1 - cfg.routing_free_mu:g})", flush=True)
    if stats[1] == 0:
        return None, lam
    return float(stats[0] / stats[1]), lam


def set_theta(model, theta: float) -> None:
    """Change the firing threshold (a compute knob at inference: higher theta, fewer experts)."""
    for r in routing_free_routers(model):
        r.theta = float(theta)
