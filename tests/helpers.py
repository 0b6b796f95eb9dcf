"""Test helpers: tiny configs and an independent brute-force MoE reference."""

import os
import subprocess
import sys

import torch

from selfmoe.config import make_config


def tiny_config(router="learned", style="gpt2", **kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
                moe_ffn_hidden_size=48, ffn_hidden_size=64, vocab_size=64, seq_length=16,
                moe_router_type=router, routing_free_rank=8)
    base.update(kw)
    return make_config(style, **base)


def expert_fn(layer, e):
    """x [T, H] -> expert e's output, computed from the raw weights (not the expert modules)."""
    cfg = layer.config
    experts = layer.experts
    if hasattr(experts, "up_proj"):  # AoE form: (act(x A B) * (x W_up)) W_down
        A = layer.router.gate_proj[e]
        return lambda x: (cfg.activation_func(x @ A @ experts.gate_up[e]) * (x @ experts.up_proj[e].t())) @ experts.down_proj[e].t()
    mlp = experts.local_experts[e]
    w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    b1, b2 = mlp.linear_fc1.bias, mlp.linear_fc2.bias

    def f(x):
        h = x @ w1.t() + (b1 if b1 is not None else 0)
        if cfg.gated_linear_unit:
            a, b = h.chunk(2, dim=-1)
            h = cfg.activation_func(a) * b
        else:
            h = cfg.activation_func(h)
        return h @ w2.t() + (b2 if b2 is not None else 0)

    return f


def brute_force_moe(layer, hidden, probs, routing_map):
    """sum_e probs[t, e] * expert_e(x_t) over the chosen experts, token by token order-free."""
    x = hidden.reshape(-1, hidden.shape[-1])
    out = torch.zeros_like(x)
    for e in range(routing_map.shape[1]):
        rows = routing_map[:, e].nonzero().flatten()
        if rows.numel():
            out[rows] += probs[rows, e, None].to(x.dtype) * expert_fn(layer, e)(x[rows])
    return out.reshape(hidden.shape)


def lm_loss(model, ids):
    """Mean LM loss of a GPT (or a DeepSpeed engine around one) on token ids [b, s], labels = ids."""
    return model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None, labels=ids).mean()


def dp_step(engine, ids, rank, world):
    """One DeepSpeed optimizer step on this rank's equal share of the global batch `ids`; returns
    the global mean loss (every rank's share has the same size, so the mean of the means)."""
    import torch.distributed as dist

    micro = ids.shape[0] // world
    loss = lm_loss(engine, ids[rank * micro:(rank + 1) * micro])
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / world


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, argv, nproc=1, timeout=300):
    """Run a repo entry point (`pretrain_gpt.py`, ...) in a fresh process, under torchrun when
    nproc > 1, without the test session's rank variables; assert it succeeded, return stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(nproc)]
    p = subprocess.run([*launcher, script, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def tb_scalars(logdir, tag):
    """{step: value} of one TensorBoard scalar tag in `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}
