"""The GPT pieces the shared trainer needs: model provider, datasets, forward step and loss.

Data goes through Megatron-Core's BlendedMegatronDatasetBuilder(GPTDataset) (or MockGPTDataset
for --mock-data); the loss is Megatron-LM's: per-token cross entropy from GPTModel, masked, summed,
and returned with its token count so the schedule averages over tokens.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from selfmoe.models import build_gpt_model
from selfmoe.training.arguments import build_tokenizer_from_args, parse_blend
from selfmoe.training.distributed import is_last_rank


def model_provider(config, pre_process=None, post_process=None, vp_stage=None):
    return build_gpt_model(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


class DatasetTokenizer:
    """What megatron-core's GPT datasets read from a tokenizer (eod, vocab size, a cache identity)."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.vocab_size
        self.eod = tok.eod
        self.unique_identifiers = {"class": type(tok).__name__, **{k: str(v) for k, v in tok.spec.items()}}


def datasets_provider(args, num_samples):
    """[train, valid, test] GPT datasets of the requested sizes (None where a split is empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    tokenizer = DatasetTokenizer(build_tokenizer_from_args(args))
    blend, blend_per_split, split = None, None, args.split
    if args.mock_data:
        split = None
    elif args.use_demo_corpus:
        from selfmoe.data.corpus import demo_split, ensure_demo_corpus

        prefix = ensure_demo_corpus(quiet=not is_last_rank())
        blend = ([prefix], None)
        split = split or demo_split(prefix)  # whole plays: the last two are the validation set
    elif args.data_path:
        blend = parse_blend(args.data_path)
    else:
        blend_per_split = [parse_blend(args.train_data_path), parse_blend(args.valid_data_path),
                           parse_blend(args.test_data_path)]
        split = None
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=split, path_to_cache=args.data_cache_path, tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=False,
    )
    cls = MockGPTDataset if args.mock_data else GPTDataset
    log = logging.getLogger("megatron.core.datasets")
    level = log.level
    if args.mock_data:
        log.setLevel(logging.ERROR)  # mock indices are never cached; megatron warns about it per split
    try:
        return BlendedMegatronDatasetBuilder(cls, num_samples, lambda: True, config).build()
    finally:
        log.setLevel(level)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(masked loss sum, token count, report) -- Megatron-LM's per-token loss reduction."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def padding_mask(loss_mask: torch.Tensor, model):
    """[b, s] bool, True where the loss ignores the token (padding of a short sample, and EOD under
    --eod-mask-loss), or None when nothing is masked. GPTModel hands it to the MoE routers so that
    no routing statistic (aux loss, expert-bias counts, Routing-Free density, metrics) counts them.
    GPTModel splits it over sequence-parallel ranks on the first pipeline stage only; later
    stages get their share here."""
    mask = loss_mask == 0
    if not bool(mask.any()):
        return None
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if inner.config.sequence_parallel and not getattr(inner, "pre_process", True):
        from megatron.core import tensor_parallel

        mask = tensor_parallel.scatter_to_sequence_parallel_region(mask.t().contiguous()).t().contiguous()
    return mask


def forward_step(data_iterator, model):
    """One micro-batch through GPTModel; causal attention from the layer spec (no mask tensor)."""
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    kwargs = {}
    pad = padding_mask(batch["loss_mask"], model) if batch["loss_mask"].numel() else None
    if pad is not None:
        kwargs["padding_mask"] = pad
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **kwargs)
    return output, partial(loss_func, batch["loss_mask"])
