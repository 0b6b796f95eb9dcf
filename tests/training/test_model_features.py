"""Megatron-Core features reached through the command line, each against an independent reference:
a hand count of parameters, the same document run alone, the non-recomputed run."""

import pytest
import torch

from helpers import run_script, tb_scalars
from selfmoe.models import build_gpt_model
from selfmoe.routers import moe_layers
from selfmoe.training.arguments import ArgumentError, args_to_config, parse_args

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 60 "
        "--hidden-dropout 0 --attention-dropout 0").split()
MOE = ["--num-experts", "4", "--moe-ffn-hidden-size", "48", "--disable-bias-linear"]


def build(extra, seed=0):
    config = args_to_config(parse_args(BASE + list(extra)))
    torch.manual_seed(seed)
    return build_gpt_model(config), config


def nparams(model):
    return sum(p.numel() for p in model.parameters())


def test_qk_layernorm_adds_a_query_and_a_key_norm_per_layer(mp):
    plain, _ = build([])
    qk, c = build(["--qk-layernorm"])
    # LayerNorm over the head dimension (kv_channels = 32 / 4 = 8): weight + bias, for q and for k
    assert nparams(qk) - nparams(plain) == c.num_layers * 2 * (2 * c.kv_channels)
    rms, c = build(["--qk-layernorm", "--normalization", "RMSNorm"])
    plain_rms, _ = build(["--normalization", "RMSNorm"])
    assert nparams(rms) - nparams(plain_rms) == c.num_layers * 2 * c.kv_channels  # RMSNorm: weight only


def test_shared_experts_and_gate_are_built_as_asked(mp):
    """DeepSeek-style shared expert: fc1 H x S, fc2 S x H (no biases), plus a H -> 1 gate."""
    for router in ("learned", "self", "routing-free"):
        routed, c = build(MOE + ["--moe-router-type", router])
        shared, _ = build(MOE + ["--moe-router-type", router, "--moe-shared-expert-intermediate-size", "40"])
        gated, _ = build(MOE + ["--moe-router-type", router, "--moe-shared-expert-intermediate-size", "40",
                                "--moe-shared-expert-gate"])
        H, S = c.hidden_size, 40
        assert nparams(shared) - nparams(routed) == c.num_layers * (H * S + S * H), router
        assert nparams(gated) - nparams(shared) == c.num_layers * H, router
        ids = torch.randint(0, 60, (2, 16))
        loss = gated(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).mean()
        loss.backward()  # composes with this router: trains
        layer = moe_layers(gated)[0]
        assert layer.shared_experts.linear_fc1.weight.grad.abs().sum() > 0, router


def test_shared_expert_output_is_added_to_the_routed_output(mp):
    model, c = build(MOE + ["--moe-shared-expert-intermediate-size", "40"])
    layer = moe_layers(model)[0]
    x = torch.randn(16, 2, c.hidden_size)
    with torch.no_grad():
        out, _ = layer(x)
        shared = layer.shared_experts(x)
        layer.shared_experts.linear_fc2.weight.zero_()  # the routed part alone
        routed, _ = layer(x)
    torch.testing.assert_close(out, routed + shared)


@pytest.mark.parametrize("router", ["learned", "self"])
def test_group_limited_routing_picks_experts_from_the_top_groups_only(mp, router):
    """DeepSeek-V3 node-limited routing: 8 experts in 4 groups of 2, top-2 experts from the best group."""
    model, c = build(["--num-experts", "8", "--moe-ffn-hidden-size", "16", "--disable-bias-linear",
                      "--moe-router-type", router, "--moe-router-num-groups", "4", "--moe-router-group-topk", "1",
                      "--moe-router-topk", "2"])
    layer = moe_layers(model)[0]
    x = torch.randn(64, c.hidden_size)
    with torch.no_grad():
        _, routing_map = layer.router(x.view(64, 1, -1))
    groups_used = routing_map.view(64, 4, 2).any(-1).sum(-1)
    assert (groups_used == 1).all() and (routing_map.sum(-1) == 2).all()
    # without the group limit the same router spreads over several groups for some tokens
    free, _ = build(["--num-experts", "8", "--moe-ffn-hidden-size", "16", "--disable-bias-linear",
                     "--moe-router-type", router, "--moe-router-topk", "2"])
    with torch.no_grad():
        _, free_map = moe_layers(free)[0].router(x.view(64, 1, -1))
    assert (free_map.view(64, 4, 2).any(-1).sum(-1) > 1).any()


@pytest.mark.parametrize("router", ["random", "hash", "routing-free"])
def test_group_limited_routing_is_refused_for_routers_without_scores(router):
    from selfmoe.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(BASE + MOE + ["--moe-router-type", router, "--moe-router-num-groups", "2",
                                                   "--moe-router-group-topk", "1"])
    args.demo, args.ignored_flags, args.notes = False, [], []
    with pytest.raises(ArgumentError, match="^--moe-router-num-groups: "):
        validate_args(args, 1)


def test_reset_attention_mask_keeps_attention_inside_each_document(mp):
    """With --reset-attention-mask (+ --reset-position-ids) the second document of a packed sequence
    gets exactly the per-token losses it gets when run alone."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from selfmoe.training.gpt import forward_step

    model, _ = build(["--position-embedding-type", "rope"])
    model.eval()
    eod = 59
    doc1, doc2 = torch.randint(0, 59, (6,)), torch.randint(0, 59, (9,))
    packed = torch.cat([doc1, torch.tensor([eod]), doc2])  # 16 tokens

    def losses(tokens, reset):
        mask, loss_mask, pos = _get_ltor_masks_and_position_ids(tokens, eod, reset, reset, False, True)
        batch = {"tokens": tokens[None], "labels": tokens[None], "position_ids": pos[None],
                 "attention_mask": mask[None], "loss_mask": loss_mask[None]}
        with torch.no_grad():
            out, _ = forward_step(iter([batch]), model)
        return out[0]

    alone = losses(doc2, False)
    torch.testing.assert_close(losses(packed, True)[7:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(losses(packed, False)[7:], alone, atol=1e-3)  # the plain causal mask leaks


@pytest.mark.parametrize("recompute", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "selective"],
    ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"],
    ["--moe-layer-recompute"],
], ids=["full-uniform", "full-block", "selective", "selective-modules", "moe-layer"])
def test_recomputation_gives_the_same_loss_and_gradients(mp, recompute):
    from megatron.core import tensor_parallel

    ids = torch.randint(0, 60, (2, 16))

    def run(extra):
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        model, _ = build(MOE + extra, seed=3)
        loss = model(ids, torch.arange(16)[None].expand(2, 16), None, labels=ids).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = run([])
    if "--recompute-modules" in recompute:
        args = parse_args(BASE + MOE + recompute + ["layernorm", "moe_act"])  # these two need TransformerEngine
        assert {"--recompute-modules layernorm", "--recompute-modules moe_act"} <= set(args.ignored_flags)
        assert args_to_config(args).recompute_modules == ["core_attn", "mlp"]
    loss, grads = run(recompute)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], msg=n)


@pytest.mark.parametrize("per_token", [False, True], ids=["per-micro-batch", "per-token"])
def test_calculate_per_token_loss_weights_every_token_equally(per_token):
    """Two micro-batches with 32 and 4 loss tokens. Megatron-LM's default averages each micro-batch,
    then the micro-batches; --calculate-per-token-loss averages over all 36 tokens. The gradients
    megatron-core's schedule + finalize_model_grads produce equal plain autograd on that formula."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from selfmoe.training import gpt
    from selfmoe.training.distributed import destroy_distributed, init_distributed, set_random_seed
    from selfmoe.training.trainer import build_model, build_optimizer, wire_config

    args = parse_args(BASE + ["--global-batch-size", "4"] + (["--calculate-per-token-loss"] if per_token else []))
    config = args_to_config(args)
    assert config.calculate_per_token_loss is per_token
    init_distributed(args)
    try:
        set_random_seed(args.seed)
        model = build_model(args, config, gpt.model_provider)
        optimizer, _ = build_optimizer(args, model)
        wire_config(config, optimizer)
        ids, pos = torch.randint(0, 60, (4, 16)), torch.arange(16)[None].expand(2, 16)
        masks = [torch.ones(2, 16), torch.zeros(2, 16)]
        masks[1][0, :4] = 1
        batches = [dict(tokens=ids[2 * i:2 * i + 2], labels=ids[2 * i:2 * i + 2], position_ids=pos,
                        loss_mask=masks[i]) for i in range(2)]
        model[0].zero_grad_buffer()
        get_forward_backward_func()(forward_step_func=gpt.forward_step, data_iterator=iter(batches), model=model,
                                    num_microbatches=2, seq_length=16, micro_batch_size=2, decoder_seq_length=16,
                                    forward_only=False)
        params = dict(model[0].module.named_parameters())
        got = {n: p.main_grad.clone() for n, p in params.items()}

        model[0].zero_grad_buffer()  # the reference: plain autograd on the formula (DDP hooks collect it)
        sums = [(model[0].module(b["tokens"], pos, None, labels=b["labels"]) * b["loss_mask"]).sum() for b in batches]
        if per_token:
            loss = (sums[0] + sums[1]) / (masks[0].sum() + masks[1].sum())
        else:
            loss = (sums[0] / masks[0].sum() + sums[1] / masks[1].sum()) / 2
        loss.backward()
        for n, p in params.items():
            torch.testing.assert_close(got[n], p.main_grad, rtol=1e-4, atol=1e-6, msg=n)
    finally:
        destroy_distributed()


QWEN3 = """--num-layers 2 --hidden-size 32 --ffn-hidden-size 96 --num-attention-heads 4 --group-query-attention
        --num-query-groups 2 --kv-channels 16 --qk-layernorm --position-embedding-type rope --rotary-base 1000000
        --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --untie-embeddings-and-output-weights
        --disable-bias-linear --num-experts 4 --moe-ffn-hidden-size 24 --moe-router-topk 2
        --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3 --moe-grouped-gemm
        --moe-token-dispatcher-type alltoall --moe-router-dtype fp32 --moe-permute-fusion --attention-backend fused
        --cross-entropy-loss-fusion --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
        --manual-gc --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
        --seq-length 16 --max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4
        --train-samples 40 --lr-warmup-samples 0 --lr-decay-samples 40 --lr 1e-4 --min-lr 1e-5
        --lr-decay-style cosine --exit-duration-in-mins 230 --ckpt-format torch_dist --hidden-dropout 0
        --attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 60""".split()


def test_qwen3_moe_style_launch_builds_the_model_it_describes(mp):
    """The flags of a Qwen3-30B-A3B launch (Megatron-LM style), sizes shrunk, GPU flags kept: parses,
    lists what cannot take effect here, and builds a model whose parameter count is the hand count."""
    for router in ("learned", "self"):
        args = parse_args(QWEN3 + ["--moe-router-type", router])
        assert {"--moe-grouped-gemm", "--moe-permute-fusion", "--attention-backend", "--cross-entropy-loss-fusion",
                "--manual-gc", "--overlap-param-gather"} == set(args.ignored_flags)
        assert args.train_iters == 10
        c = args_to_config(args)
        assert (c.qk_layernorm, c.recompute_granularity, c.moe_router_dtype) == (True, "full", "fp32")
        torch.manual_seed(0)
        model = build_gpt_model(c)
        H, nh, ng, kv, E, F, V = 32, 4, 2, 16, 4, 24, 128  # V: 60 ids + eod padded to 128
        per_layer = (H                          # input RMSNorm
                     + H * (nh * kv + 2 * ng * kv)  # fused QKV, grouped-query
                     + 2 * kv                   # q and k RMSNorm over the head dimension
                     + nh * kv * H              # attention output projection
                     + H                        # pre-MLP RMSNorm
                     + (E * H if router == "learned" else 0)  # router weight (self routing reads H's channels)
                     + E * (H * 2 * F + F * H))  # SwiGLU experts
        assert nparams(model) == 2 * per_layer + V * H + V * H + H, router  # + embedding, output layer, final norm


@pytest.mark.slow
def test_qwen3_moe_style_launch_trains_at_ep2_as_on_one_process(tmp_path):
    """The same launch through pretrain_gpt.py with self routing, from one 1-rank checkpoint (same
    weights in both layouts): 1 process, and 2 gloo ranks at --expert-model-parallel-size 2
    (alltoall, as the script asks) give the same 10 losses."""
    argv = QWEN3 + ["--moe-router-type", "self", "--eval-iters", "0"]
    run_script("pretrain_gpt.py", argv + ["--train-samples", "4", "--lr-decay-samples", "4", "--save", str(tmp_path / "ckpt")], 1)
    start = ["--finetune", "--load", str(tmp_path / "ckpt")]
    run_script("pretrain_gpt.py", argv + start + ["--tensorboard-dir", str(tmp_path / "one")], 1)
    run_script("pretrain_gpt.py", argv + start + ["--expert-model-parallel-size", "2", "--tensorboard-dir", str(tmp_path / "ep2")], 2)
    one, ep2 = tb_scalars(tmp_path / "one", "lm loss"), tb_scalars(tmp_path / "ep2", "lm loss")
    assert sorted(one) == sorted(ep2) == list(range(1, 11))
    assert ep2 == pytest.approx(one, rel=1e-5)
