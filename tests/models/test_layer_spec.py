"""Which of megatron-core's layer specs the GPT builder uses, given what is importable: the
TransformerEngine spec (grouped-GEMM experts under --moe-grouped-gemm) where TE and CUDA are there,
the local spec otherwise with the reason; our router in the MoE submodules either way. The import
probe and the CUDA check are replaced, megatron-core is not."""

import pytest
import torch

from helpers import tiny_config
from selfmoe.models import gpt
from selfmoe.routers import get_router_class
from selfmoe.training import config_flags
from selfmoe.training.arguments import build_parser, parse_args

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 60 "
        "--num-experts 4 --disable-bias-linear --moe-router-type self").split()


def present(monkeypatch, te: bool, cuda: bool):
    monkeypatch.setattr(gpt, "te_importable", lambda: te)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


@pytest.mark.parametrize("te,cuda,why", [(False, False, "TransformerEngine is not installed"),
                                         (False, True, "TransformerEngine is not installed"),
                                         (True, False, "no CUDA device (TransformerEngine's modules need one)")])
def test_local_spec_with_the_reason_where_te_or_cuda_is_missing(monkeypatch, te, cuda, why):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.moe.experts import SequentialMLP

    present(monkeypatch, te, cuda)
    config = tiny_config("self", moe_grouped_gemm=True)
    assert gpt.layer_spec_backend(config) == ("local", why)
    sub = gpt.transformer_layer_spec(config).submodules
    assert sub.self_attention.submodules.linear_qkv is ColumnParallelLinear
    assert sub.mlp.submodules.experts.module is SequentialMLP  # no grouped GEMM on the local spec
    assert sub.mlp.submodules.router is get_router_class("self")


def test_te_spec_with_grouped_gemm_and_our_router_where_te_and_cuda_are(monkeypatch):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    present(monkeypatch, True, True)
    config = tiny_config("self", moe_grouped_gemm=True, qk_layernorm=True)
    assert gpt.layer_spec_backend(config) == ("transformer_engine", None)
    build, kwargs = gpt.layer_spec_plan(config, moe=True)
    assert build is get_gpt_layer_with_transformer_engine_spec
    assert kwargs == dict(num_experts=4, moe_grouped_gemm=True, qk_layernorm=True, multi_latent_attention=False,
                          qk_l2_norm=False)
    config.transformer_impl = "local"  # --transformer-impl local wins
    assert gpt.layer_spec_backend(config) == ("local", "--transformer-impl local")


@pytest.mark.skipif(not gpt.te_importable() or not torch.cuda.is_available(), reason="needs TransformerEngine + CUDA")
def test_te_spec_classes_where_te_is_installed():
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    sub = gpt.transformer_layer_spec(tiny_config("self", moe_grouped_gemm=True)).submodules
    assert sub.self_attention.submodules.linear_qkv is TELayerNormColumnParallelLinear
    assert sub.mlp.submodules.experts.module is TEGroupedMLP
    assert sub.mlp.submodules.router is get_router_class("self")
    from megatron.core.extensions.transformer_engine import TENorm

    block = gpt.transformer_layer_spec(tiny_config("self", moe_layer_freq=[0, 1]))  # dense + MoE layers
    assert block.layer_norm is TENorm  # the final norm (the layers' own is fused into their QKV)


def test_te_spec_flags_are_honoured_only_with_the_te_spec(monkeypatch):
    args = parse_args(BASE + ["--moe-grouped-gemm", "--moe-permute-fusion"])  # here: listed, with the reason
    assert args.ignored_reasons["--moe-grouped-gemm"] == ("needs megatron-core's TransformerEngine layer spec; the "
                                                          "local spec is used (TransformerEngine is not installed)"
                                                          if not gpt.te_importable() else args.ignored_reasons[
                                                              "--moe-grouped-gemm"])
    present(monkeypatch, True, True)
    args = build_parser().parse_args(BASE + ["--moe-grouped-gemm", "--moe-permute-fusion"])
    args.ignored_flags = []
    config_flags.resolve_needs(args)
    assert args.moe_grouped_gemm and args.moe_permute_fusion and args.ignored_flags == []
