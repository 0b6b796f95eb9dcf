"""Acceptance: Megatron-LM's own DeepSeek-V3 launch (examples/megatron_fsdp/sbatch_mfsdp_deepseek_v3.sh
at Megatron-LM d98e8a6, its Megatron-FSDP branch included), sizes shrunk and the data swapped for
`--mock-data --tokenizer-type NullTokenizer`, every other flag kept. It parses, lists what cannot take
effect here with the reason, builds the model the flags describe (multi-latent attention, a dense
first layer, shared experts, group-limited sigmoid routing with expert bias, one MTP depth; parameter
count equal to a hand count), and trains on 1 process and at EP=2."""

import math
import os

import pytest
import torch

from helpers import run_script, tb_scalars
from selfmoe.models import build_gpt_model
from selfmoe.training.arguments import args_to_config, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The script's flags in its order; sizes shrunk (61 -> 3 layers, 7168 -> 32 hidden, 256 -> 8 experts
# in 4 groups, 128 -> 4 heads, ranks 1536/512 -> 16/8, head dims 128/64/128 -> 8/4/8, 4096 -> 16 tokens).
DEEPSEEK_V3 = """--distributed-timeout-minutes 60 --tensor-model-parallel-size 1 --expert-model-parallel-size 1
    --expert-tensor-parallel-size 1 --context-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce
    --overlap-param-gather --use-mcore-models --sequence-parallel --use-flash-attn --disable-bias-linear
    --micro-batch-size 2 --global-batch-size 4 --train-samples 12 --exit-duration-in-mins 220
    --no-check-for-nan-in-loss-and-grad --manual-gc --manual-gc-interval 10 --recompute-granularity selective
    --recompute-modules mlp moe mla_up_proj layernorm --transformer-impl transformer_engine --seq-length 16
    --mock-data --tokenizer-type NullTokenizer --vocab-size 60 --split 99,1,0 --no-mmap-bin-files
    --no-create-attention-mask-in-dataloader --num-workers 6 --num-layers 3 --hidden-size 32 --ffn-hidden-size 64
    --num-attention-heads 4 --kv-channels 8 --max-position-embeddings 16 --position-embedding-type rope
    --rotary-base 10000 --make-vocab-size-divisible-by 32 --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
    --untie-embeddings-and-output-weights --multi-latent-attention --attention-dropout 0.0 --hidden-dropout 0.0
    --clip-grad 1.0 --weight-decay 0.1 --qk-layernorm --lr-decay-samples 12 --lr-warmup-samples 4
    --lr-warmup-init 3.9e-7 --lr 3.9e-4 --min-lr 3.9e-5 --lr-decay-style cosine --adam-beta1 0.9 --adam-beta2 0.95
    --num-experts 8 --moe-layer-freq [0]*1+[1]*2 --moe-ffn-hidden-size 16 --moe-shared-expert-intermediate-size 16
    --moe-router-load-balancing-type seq_aux_loss --moe-router-topk 2 --moe-token-dispatcher-type flex
    --moe-flex-dispatcher-backend hybridep --moe-router-pre-softmax --moe-grouped-gemm --moe-aux-loss-coeff 1e-4
    --moe-router-group-topk 2 --moe-router-num-groups 4 --moe-router-topk-scaling-factor 2.5
    --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
    --moe-router-dtype fp32 --moe-permute-fusion --moe-router-force-load-balancing --q-lora-rank 16
    --kv-lora-rank 8 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 --rotary-scaling-factor 40
    --mscale 1.0 --mscale-all-dim 1.0 --mtp-num-layers 1 --mtp-loss-scaling-factor 0.1 --eval-iters 1
    --eval-interval 100 --auto-detect-ckpt-format --save-interval 100 --dist-ckpt-strictness log_all
    --init-method-std 0.02 --log-timers-to-tensorboard --log-memory-to-tensorboard --log-num-zeros-in-grad
    --log-params-norm --log-validation-ppl-to-tensorboard --log-throughput --log-interval 1 --logging-level 40
    --bf16 --enable-experimental --use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params
    --no-gradient-accumulation-fusion --use-distributed-optimizer --calculate-per-token-loss
    --init-model-with-meta-device --ckpt-format fsdp_dtensor --fsdp-double-buffer --use-nccl-ub
    --megatron-fsdp-grad-comm-dtype bf16 --megatron-fsdp-main-grads-dtype bf16""".split()

# What cannot take effect on this machine (no CUDA, no TransformerEngine/DeepEP, no Megatron FSDP),
# each listed at start-up with its reason.
LISTED = {
    "--overlap-param-gather", "--use-mcore-models", "--use-flash-attn",
    "--no-check-for-nan-in-loss-and-grad", "--manual-gc", "--manual-gc-interval",
    "--no-create-attention-mask-in-dataloader", "--num-workers", "--auto-detect-ckpt-format", "--dist-ckpt-strictness",
    "--log-timers-to-tensorboard", "--log-memory-to-tensorboard", "--log-num-zeros-in-grad", "--log-params-norm",
    "--log-validation-ppl-to-tensorboard", "--log-throughput", "--logging-level", "--enable-experimental",
    "--use-megatron-fsdp", "--data-parallel-sharding-strategy", "--no-gradient-accumulation-fusion",
    "--fsdp-double-buffer", "--use-nccl-ub", "--megatron-fsdp-grad-comm-dtype", "--megatron-fsdp-main-grads-dtype",
    "--ckpt-format fsdp_dtensor", "--transformer-impl transformer_engine", "--recompute-modules mla_up_proj",
    "--recompute-modules layernorm", "--init-model-with-meta-device",
    "--moe-grouped-gemm", "--moe-flex-dispatcher-backend", "--moe-permute-fusion", "--moe-token-dispatcher-type flex",
}
H, NH, E, V = 32, 4, 8, 64  # V: 60 ids + eod padded to a multiple of 32


def hand_count(router: str) -> int:
    """Parameters of the shrunk DeepSeek-V3, counted from its architecture."""
    q, kv, qk, pe, v = 16, 8, 8, 4, 8
    attention = (H * q + q + q * NH * (qk + pe)  # query: down-projection, RMSNorm, up-projection
                 + H * (kv + pe) + kv + kv * NH * (qk + v)  # key/value latent + shared RoPE key, RMSNorm, up
                 + NH * v * H)  # output projection
    swiglu = lambda f: H * 2 * f + f * H  # noqa: E731
    dense = H + attention + H + swiglu(64)
    moe = H + attention + H + (E * H if router == "learned" else 0) + E * swiglu(16) + swiglu(16)  # + shared
    mtp = 2 * H + 2 * H * H + moe + H  # enorm, hnorm, eh_proj, a layer like the last, final norm
    return dense + 2 * moe + mtp + V * H + V * H + H  # + embedding, output layer, final norm


@pytest.mark.parametrize("router", ["learned", "self"])
def test_deepseek_v3_launch_builds_the_model_it_describes(mp, router):
    args = parse_args(DEEPSEEK_V3 + ["--moe-router-type", router])
    assert set(args.ignored_flags) == LISTED and all(args.ignored_reasons[f] for f in LISTED)
    assert (args.train_iters, args.moe_token_dispatcher_type) == (3, "alltoall")
    c = args_to_config(args)
    assert (c.multi_latent_attention, c.q_lora_rank, c.rope_type, c.rotary_scaling_factor) == (True, 16, "yarn", 40.0)
    assert (c.moe_layer_freq, c.mtp_num_layers, c.mtp_loss_scaling_factor) == ([0, 1, 1], 1, 0.1)
    assert (c.moe_router_num_groups, c.moe_router_group_topk, c.moe_router_score_function) == (4, 2, "sigmoid")
    assert c.moe_router_enable_expert_bias and c.qk_layernorm and c.calculate_per_token_loss
    assert c.recompute_modules == ["mlp", "moe"]
    torch.manual_seed(0)
    model = build_gpt_model(c)
    assert sum(p.numel() for p in model.parameters()) == hand_count(router)
    assert not hasattr(model.decoder.layers[0].mlp, "router")  # the dense first layer
    assert model.decoder.layers[1].mlp.shared_experts is not None
    assert type(model.mtp.layers[0].transformer_layer.mlp.router).__name__ == type(
        model.decoder.layers[2].mlp.router).__name__


@pytest.mark.parametrize("router", ["learned", "self"])
def test_force_load_balancing_routes_by_random_scores(mp, router):
    """--moe-router-force-load-balancing (megatron-core's benchmark mode, in the script) reaches the
    router: its choices then change from call to call on the same tokens (random scores), while
    without it the same tokens get the same experts."""
    from selfmoe.routers import moe_layers

    c = args_to_config(parse_args(DEEPSEEK_V3 + ["--moe-router-type", router]))
    assert c.moe_router_force_load_balancing
    torch.manual_seed(0)
    router_ = moe_layers(build_gpt_model(c))[0].router
    x = torch.randn(64, 1, H)
    with torch.no_grad():
        forced = [router_(x)[1] for _ in range(2)]
        c.moe_router_force_load_balancing = False
        own = [router_(x)[1] for _ in range(2)]
    assert torch.equal(own[0], own[1]) and not torch.equal(forced[0], forced[1])
    assert (forced[0].sum(-1) == 2).all()  # still top-2 per token


@pytest.mark.slow
@pytest.mark.parametrize("router", ["learned", "self"])
def test_deepseek_v3_launch_trains_on_one_process_and_at_ep2(router, tmp_path):
    """pretrain_gpt.py with the script's flags: 1 process, then 2 gloo ranks with
    --expert-model-parallel-size 2 (EP=2 against 1 rank, weights equal, is tests/distributed's)."""
    for nproc, extra in ((1, []), (2, ["--expert-model-parallel-size", "2"])):
        out = run_script("pretrain_gpt.py", DEEPSEEK_V3 + ["--moe-router-type", router,
                                                           "--tensorboard-dir", str(tmp_path / str(nproc))] + extra, nproc)
        assert f"expert-parallel {nproc} |" in out
        assert "ignored: --moe-token-dispatcher-type flex (needs DeepEP or HybridEP" in out
        assert f"parameters: total {hand_count(router) / 1000:.2f}k" in out
        for tag in ("lm loss", "mtp_1 loss"):  # the MTP head trains and is logged per depth
            losses = tb_scalars(tmp_path / str(nproc), tag)
            assert sorted(losses) == [1, 2, 3] and all(math.isfinite(x) for x in losses.values())
