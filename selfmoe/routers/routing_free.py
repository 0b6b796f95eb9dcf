"""Routing-Free MoE (Liu et al. 2026): every expert scores itself and fires above a threshold.

- gate of expert i: G_i(x) = ReLU(s_i * ||x A_i||_2 - b_i) with A_i [H, r]; fires when G_i >= theta.
- routing_map = fired, probs = G * fired: 0..E experts per token, through Megatron's dispatchers.
- balance loss L = mu * L_EB + (1 - mu) * L_TB (product of means over experts / tokens), added
  with a coefficient lambda that follows the GLOBAL density of all MoE layers:
  lambda <- min(1, lambda * (1 + eta) ** sign(rho - rho_target)), see `update_balance_coefficient`.
- AoE experts: E_i(x) = (act(x A_i B_i) * (x W_up,i)) W_down,i reuse the gate's A_i.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker

from selfmoe import mcore_compat


def balance_losses(fired: torch.Tensor, gates: torch.Tensor, total_tokens, expert_fire_rate: torch.Tensor):
    """(L_EB, L_TB) for this rank's tokens, normalised by the total token count of the group.

    fired [T, E] (0/1), gates [T, E] (differentiable); expert_fire_rate [E] = mean_x f_i over the
    whole group (no gradient). Summing the returned values over the ranks that split the tokens
    gives the losses of the whole batch, which is how Megatron all-reduces router gradients.
    """
    E = fired.shape[1]
    l_eb = (expert_fire_rate * gates.sum(0)).sum() / (E * total_tokens)
    l_tb = (fired.mean(1) * gates.mean(1)).sum() / total_tokens
    return l_eb, l_tb


class RoutingFreeRouter(MegatronModule):
    is_routing_free = True

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config)
        pg_collection = mcore_compat.default_pg_collection(pg_collection)
        self.num_experts = E = config.num_moe_experts
        H, r = config.hidden_size, config.routing_free_rank
        self.tp_cp_group = pg_collection.tp_cp
        self.layer_number = None
        self.theta = float(config.routing_free_theta)
        self.mu = float(config.routing_free_mu)
        self.gate_proj = torch.nn.Parameter(torch.empty(E, H, r, dtype=config.params_dtype))
        s0 = config.routing_free_scale_init
        if s0 is None:
            s0 = 2.0 * self.theta / (config.init_method_std * (H * r) ** 0.5)
        self.gate_scale = torch.nn.Parameter(torch.full((E,), float(s0), dtype=torch.float32))
        self.gate_bias = torch.nn.Parameter(torch.full((E,), config.routing_free_bias_init, dtype=torch.float32))
        if config.perform_initialization:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                config.init_method(self.gate_proj)
        for p in self.parameters():
            # Replicated over TP; each TP rank sees other tokens under SP, so grads are all-reduced.
            setattr(p, "sequence_parallel", config.sequence_parallel)
        # The adaptive balance coefficient lambda is training state: a persistent buffer, so it is
        # saved with the model (all layers hold the same value).
        self.register_buffer("balance_coeff", torch.tensor([config.routing_free_lambda0], dtype=torch.float64))
        # Fired / seen (token, expert) pairs since the last lambda update; no synchronisation per step.
        self.register_buffer("fired_count", torch.zeros(1, dtype=torch.float64), persistent=False)
        self.register_buffer("pair_count", torch.zeros(1, dtype=torch.float64), persistent=False)

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

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """G [T, E] for tokens x [T, H]."""
        E, H, r = self.gate_proj.shape
        # one [T, H] x [H, E*r] GEMM for all experts' low-rank projections
        z = (x.float() @ self.gate_proj.float().permute(1, 0, 2).reshape(H, E * r)).view(-1, E, r)
        return torch.relu(self.gate_scale * torch.linalg.vector_norm(z, dim=-1) - self.gate_bias)

    def forward(self, input: torch.Tensor, padding_mask=None):
        x = input.reshape(-1, input.shape[-1])
        gates = self.gates(x)
        routing_map = gates >= self.theta
        fired = routing_map.to(gates.dtype)
        probs = gates * fired
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.fired_count += fired.sum()
                self.pair_count += fired.numel()
            probs = self._attach_balance_loss(probs, fired, gates)
        return probs, routing_map

    def _attach_balance_loss(self, probs, fired, gates):
        with torch.no_grad():
            stats = torch.cat([fired.sum(0), fired.new_tensor([fired.shape[0]])])
            if self.tp_cp_group.size() > 1:
                dist.all_reduce(stats, group=self.tp_cp_group)
            total_tokens = stats[-1]
            expert_fire_rate = stats[:-1] / total_tokens
        l_eb, l_tb = balance_losses(fired, gates, total_tokens, expert_fire_rate)
        loss = self.mu * l_eb + (1.0 - self.mu) * l_tb
        coeff = self.balance_coeff.to(loss.dtype)
        if self.config.calculate_per_token_loss:
            loss_for_grad = coeff * loss * fired.shape[0]
        else:
            loss_for_grad = coeff * loss
        save_to_aux_losses_tracker(
            "routing_free_balance_loss", loss.detach().reshape(()), self.layer_number,
            self.config.num_layers, reduce_group=self.tp_cp_group,
        )
        return MoEAuxLossAutoScaler.apply(probs, loss_for_grad.reshape(()))


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
        H, r, Fl = config.hidden_size, config.routing_free_rank, F // etp
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
        # Every local expert runs, even on 0 tokens: ZeRO and DDP expect grads for all of them.
        for j, (x, p) in enumerate(zip(torch.split(hidden, splits), torch.split(probs, splits))):
            a = self._router.gate_proj[self._local_ids[j]].to(x.dtype)
            h = self.activation_func(x @ a @ self.gate_up[j]) * (x @ self.up_proj[j].t())
            outs.append((h * p.unsqueeze(-1).to(h.dtype)) @ self.down_proj[j].t())
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
    """Once after building: give AoE experts their layer's router; size alltoall outputs by the map.

    Megatron's alltoall dispatcher sizes its permutation output as tokens x top-k, right for
    top-k routers only; permutes that honour that size (TransformerEngine's fused permute, the
    torch permute of megatron-core >= 0.19) would drop tokens here, where a token may use 0..E
    experts. The count of routed pairs is the right size on every version.
    """
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from selfmoe.routers import moe_layers

    for layer in moe_layers(model):
        if isinstance(layer.experts, AoEExperts):
            layer.experts.attach_gate(layer.router, layer.local_expert_indices)
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


def routing_free_routers(model) -> list[RoutingFreeRouter]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in c.modules() if isinstance(m, RoutingFreeRouter)]


@torch.no_grad()
def update_balance_coefficient(model, group=None):
    """One lambda step from the global density since the last call; call once per optimizer step.

    Collective over `group` (default: all ranks), so that every MoE layer on every pipeline stage,
    data-parallel and tensor-parallel rank sees the same density and keeps the same lambda.
    Returns (rho, lambda), or (None, lambda) when no training token was routed since the last call.
    """
    routers = routing_free_routers(model)
    stats = torch.zeros(2, dtype=torch.float64)
    for r in routers:
        stats += torch.cat([r.fired_count, r.pair_count]).cpu()
        r.fired_count.zero_()
        r.pair_count.zero_()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    if not routers:
        return None, None
    lam = routers[0].balance_coeff.clone()
    if stats[1] == 0:
        return None, float(lam)
    rho = float(stats[0] / stats[1])
    cfg = routers[0].config
    sign = (rho > cfg.routing_free_density_target) - (rho < cfg.routing_free_density_target)
    lam = torch.clamp(lam * (1.0 + cfg.routing_free_eta) ** sign, max=1.0)
    for r in routers:
        r.balance_coeff.copy_(lam)
    return rho, float(lam)


def set_theta(model, theta: float) -> None:
    """Change the firing threshold (a compute knob at inference: higher theta, fewer experts)."""
    for r in routing_free_routers(model):
        r.theta = float(theta)
