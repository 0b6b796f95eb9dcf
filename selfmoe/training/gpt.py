"""The GPT pieces the shared trainer needs: model provider, datasets, forward step and loss.

Data goes through Megatron-Core's BlendedMegatronDatasetBuilder(GPTDataset) (or MockGPTDataset
for --mock-data); the loss is Megatron-LM's: per-token cross entropy from GPTModel, masked, summed,
and returned with its token count so the schedule averages over tokens.
"""

from __future__ import annotations

import functools
import logging
import os
from functools import partial

import torch

from selfmoe.models import build_gpt_model
from selfmoe.training.arguments import build_tokenizer_from_args, parse_blend
from selfmoe.training.distributed import is_last_rank
from selfmoe.training.errors import InputError, reraise_as


def model_provider(config, pre_process=None, post_process=None, vp_stage=None):
    _say_layer_spec(config)
    return build_gpt_model(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


@functools.lru_cache(maxsize=None)
def _layer_spec_line(backend: str, why: str | None) -> None:
    if is_last_rank():
        print(f"layer spec: megatron-core's {'TransformerEngine spec' if why is None else f'local spec ({why})'}",
              flush=True)


def _say_layer_spec(config) -> None:
    """Once per run, which of megatron-core's layer specs the model is built from, and why."""
    from selfmoe.models.gpt import layer_spec_backend

    _layer_spec_line(*layer_spec_backend(config))


class DatasetTokenizer:
    """What megatron-core's GPT datasets read from a tokenizer (eod, vocab size, a cache identity)."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.vocab_size
        self.eod = tok.eod
        self.unique_identifiers = {"class": type(tok).__name__, **{k: str(v) for k, v in tok.spec.items()}}


def data_prefixes(args) -> list[str]:
    """Every .bin/.idx prefix the flags name (none for --mock-data and the demo corpus)."""
    if args.mock_data or args.use_demo_corpus:
        return []
    blends = [args.data_path] if args.data_path else [args.train_data_path, args.valid_data_path, args.test_data_path]
    return [prefix for b in blends if b for prefix in parse_blend(b)[0]]


def check_data(args) -> None:
    """Each data file opens, is as long as its index says, holds documents, and has only token ids
    below the tokenizer's vocabulary size. Raises InputError naming the file; call before building."""
    vocab = build_tokenizer_from_args(args).vocab_size
    for prefix in data_prefixes(args):
        files = [prefix + ".idx", prefix + ".bin"]
        stats = [(st.st_ino, st.st_size, st.st_mtime_ns) if os.path.isfile(f) and (st := os.stat(f)) else None
                 for f in files]
        _check_indexed_dataset(prefix, vocab, args.split if args.data_path else None, *stats)


def _check_split_not_empty(prefix: str, split: str, lengths) -> None:
    """Every split --split gives a weight holds at least one document of `prefix` (document lengths
    `lengths`), with megatron-core's rounding of the document ranges: an empty one makes GPTDataset
    count epochs forever (a hang)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    n = len(lengths)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, span in zip(("training", "validation", "test"), matrix):
        if span is None:
            continue
        beg, end = int(round(span[0] * n)), int(round(span[1] * n))
        if int(lengths[beg:end].sum()) == 0:
            raise InputError("empty data split", prefix + ".idx",
                             f"--split {split!r} leaves the {name} split none of its {n} documents "
                             f"(give that split weight 0, or more data)")


@functools.lru_cache(maxsize=None)
def _check_indexed_dataset(prefix: str, vocab_size: int, split: str | None, idx_stat, bin_stat) -> None:
    """(cached per file state: the id scan reads the whole .bin once); `split`: Megatron's --split
    over this prefix's documents, or None (a per-split --*-data-path)"""
    import numpy as np

    from selfmoe.data.preprocess import megatron_indexed_dataset

    for path, st in ((prefix + ".idx", idx_stat), (prefix + ".bin", bin_stat)):
        if st is None:
            raise InputError("missing data file", path, "no such file (a --data-path prefix names <prefix>.bin/.idx)")
    with reraise_as("unreadable dataset index", prefix + ".idx"):
        index = megatron_indexed_dataset()._IndexReader(prefix + ".idx", multimodal=False)
    n = len(index.sequence_lengths)
    if n == 0 or int(index.sequence_lengths.sum()) == 0:
        raise InputError("empty dataset", prefix + ".idx", "no documents")
    need = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    have = os.path.getsize(prefix + ".bin")
    if have < need:
        raise InputError("truncated data file", prefix + ".bin", f"{have} bytes, its .idx needs {need}")
    if np.iinfo(index.dtype).max >= vocab_size:  # else no id of this dtype can reach the vocabulary size
        tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r", shape=(need // index.dtype_size,))
        largest = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))
        del tokens
        if largest >= vocab_size:
            raise InputError("token ids out of range", prefix + ".bin",
                             f"largest id {largest}, but the tokenizer's vocabulary size is {vocab_size}")
    if split:
        _check_split_not_empty(prefix, split, index.sequence_lengths)


def datasets_provider(args, num_samples):
    """[train, valid, test] GPT datasets of the requested sizes (None where a split is empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    check_data(args)
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
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.reset_attention_mask,
        mmap_bin_files=getattr(args, "mmap_bin_files", True),
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
    """One micro-batch through GPTModel: causal attention from the layer spec, or, with
    --reset-attention-mask, the dataset's document-level causal mask ([b, 1, s, s], True = masked)."""
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    kwargs = {}
    pad = padding_mask(batch["loss_mask"], model) if batch["loss_mask"].numel() else None
    if pad is not None:
        kwargs["padding_mask"] = pad
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   **kwargs)
    return output, partial(loss_func, batch["loss_mask"])
