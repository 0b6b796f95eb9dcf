"""The vision pieces the shared trainer needs: flags, model provider, datasets, forward step, loss.

Flags: Megatron-LM's vision names (--img-h, --img-w, --num-channels, --patch-dim, --num-classes,
--data-path TRAIN VAL) and DeiT's training knobs (Touvron et al. 2021; timm's names where it has
them: --mixup, --cutmix, --smoothing, --drop-path, --auto-augment/--aa/--rand-augment, --reprob,
--repeated-aug, --color-jitter). The loss is timm's: soft-target cross entropy under Mixup/CutMix,
label-smoothing cross entropy otherwise; it is returned summed with its image count, so the
schedule averages over images, and validation reports top-1 and top-5 accuracy beside it.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from selfmoe.training.arguments import ROUTING_FREE_DEMO_DEFAULTS, ArgumentError

LOSS_NAME = "loss"

# `python pretrain_vit.py` with no model flags: a small Self-Routing MoE ViT on Fashion-MNIST that
# reaches > 80% validation top-1 in a few minutes on 2 CPU cores. Any flag given still wins.
VIT_DEMO_DEFAULTS = dict(
    num_layers=4, hidden_size=96, num_attention_heads=4, ffn_hidden_size=192, moe_ffn_hidden_size=96,
    num_experts=8, moe_router_topk=2, moe_router_type="self",
    img_h=28, img_w=28, num_channels=1, patch_dim=4, num_classes=10,
    micro_batch_size=64, train_iters=900, lr=2e-3, min_lr=1e-5, lr_decay_style="cosine", lr_warmup_fraction=0.05,
    weight_decay=0.05, adam_beta2=0.98, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
    init_method_std=0.05, log_interval=50, eval_interval=300, eval_iters=40, num_workers=1,
    smoothing=0.0, color_jitter=0.0, train_crop_scale=1.0, crop_pct=1.0, train_interpolation="bilinear",
    **ROUTING_FREE_DEMO_DEFAULTS,
)

# GPT data/tokenizer flags that mean nothing for an image classifier: refused, not dropped.
GPT_ONLY = ("mock_data", "train_data_path", "valid_data_path", "test_data_path", "split", "data_cache_path",
            "tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size", "reset_position_ids",
            "reset_attention_mask", "eod_mask_loss", "untie_embeddings_and_output_weights",
            "multi_latent_attention", "mtp_num_layers", "use_rope_scaling")  # the GPT builder's attention/heads


def add_vision_args(parser):
    """pretrain_vit.py's extra_args_provider (Megatron-LM's vision flags + DeiT's knobs)."""
    g = parser.add_argument_group("vision (Megatron-LM names)")
    g.add_argument("--img-h", type=int, default=224)
    g.add_argument("--img-w", type=int, default=224)
    g.add_argument("--num-channels", type=int, default=3, choices=(1, 3))
    g.add_argument("--patch-dim", type=int, default=16)
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--vit-pool", choices=("cls", "mean"), default="cls",
                   help="classify from the class token (ViT/DeiT) or the mean of the patch tokens (no class token)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank (decode+augment)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="replace undecodable images / skip non-image files and count them, instead of stopping")
    g = parser.add_argument_group("DeiT training recipe (timm names)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (DeiT: 0.8); 0 = off")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (DeiT: 1.0); 0 = off")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last layer (DeiT-S: 0.1)")
    g.add_argument("--auto-augment", "--aa", "--rand-augment", dest="auto_augment",
                   help="timm policy: rand-m9-mstd0.5-inc1 (DeiT), original, v0, augmix-m5-w4-d2, ...")
    g.add_argument("--color-jitter", type=float, default=0.3)
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability (DeiT: 0.25)")
    g.add_argument("--repeated-aug", type=int, nargs="?", const=3, default=1,
                   help="each image N times per epoch with different augmentations (DeiT: 3)")
    g.add_argument("--train-crop-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--train-interpolation", default="bicubic", choices=("bicubic", "bilinear", "random"))
    g.add_argument("--crop-pct", type=float, default=0.875, help="evaluation: center crop of the resized image")
    return parser


def prepare_vision_args(args) -> None:
    """Before the shared validation: the transformer's sequence is the image's patches."""
    from selfmoe.models.vit import num_tokens

    args.local_spec_reason = "pretrain_vit.py builds megatron-core's local spec"  # TE-spec flags: listed

    for name in ("img_h", "img_w", "patch_dim", "num_classes"):
        if getattr(args, name) <= 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be > 0")
    if args.img_h % args.patch_dim or args.img_w % args.patch_dim:
        raise ArgumentError(f"--img-h {args.img_h} / --img-w {args.img_w} must be multiples of --patch-dim "
                            f"{args.patch_dim}")
    seq = num_tokens(args.img_h, args.img_w, args.patch_dim, args.vit_pool == "cls")
    if args.seq_length is not None and args.seq_length != seq:
        raise ArgumentError(f"--seq-length {args.seq_length}: a ViT's sequence is its {seq} tokens "
                            f"((img-h/patch-dim)*(img-w/patch-dim){' + class token' if args.vit_pool == 'cls' else ''})"
                            f"; leave it out")
    args.seq_length = seq
    if args.max_position_embeddings not in (None, seq):
        raise ArgumentError(f"--max-position-embeddings must be the token count {seq}; leave it out")
    args.max_position_embeddings = seq
    args.hash_router_by = "position"  # hash routing keys on the patch position (no token ids)


def validate_vision_data(args) -> None:
    """The shared validation's data step for images (replaces the GPT corpus/tokenizer checks)."""
    for name in GPT_ONLY:
        if getattr(args, name, None):
            raise ArgumentError(f"--{name.replace('_', '-')} has no meaning for pretrain_vit.py")
    if args.position_embedding_type != "learned_absolute":
        raise ArgumentError("--position-embedding-type: pretrain_vit.py uses learned absolute position embeddings")
    if args.num_workers < 0:
        raise ArgumentError(f"--num-workers must be >= 0, got {args.num_workers}")
    if (args.mixup > 0 or args.cutmix > 0) and args.micro_batch_size % 2:
        raise ArgumentError(f"--mixup/--cutmix pair images within a micro-batch: --micro-batch-size "
                            f"{args.micro_batch_size} must be even")
    if not 0 <= args.smoothing < 1:
        raise ArgumentError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if not 0 <= args.drop_path < 1:
        raise ArgumentError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.repeated_aug < 1:
        raise ArgumentError(f"--repeated-aug must be >= 1, got {args.repeated_aug}")
    if not 0 < args.train_crop_scale <= 1:
        raise ArgumentError(f"--train-crop-scale must be in (0, 1], got {args.train_crop_scale}")
    tp = args.tensor_model_parallel_size
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(f"--sequence-parallel splits the {args.seq_length} image tokens over "
                            f"--tensor-model-parallel-size {tp}: choose an image/patch size (or --vit-pool) that "
                            f"divides")
    if args.auto_augment:
        from timm.data.auto_augment import auto_augment_transform, augment_and_mix_transform, rand_augment_transform

        hp = dict(translate_const=int(min(args.img_h, args.img_w) * 0.45), img_mean=(124, 116, 104))
        make = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(
            args.auto_augment.split("-")[0], auto_augment_transform)
        try:
            make(args.auto_augment, hp)
        except (AssertionError, KeyError, ValueError, IndexError) as e:
            raise ArgumentError(f"--auto-augment {args.auto_augment!r}: not a timm policy ({e})") from None
    args.use_demo_images = not args.data_path
    if args.use_demo_images and (args.img_h, args.img_w, args.num_channels, args.num_classes) != (28, 28, 1, 10):
        raise ArgumentError("without --data-path the demo trains on Fashion-MNIST (28x28, 1 channel, 10 classes): "
                            "give --data-path for other images or keep --img-h/--img-w 28 --num-channels 1 "
                            "--num-classes 10")
    if args.data_path:
        for p in args.data_path:
            if not os.path.isdir(p):
                raise ArgumentError(f"--data-path {p}: no such directory")
        from selfmoe.data.images import ImageDataError, check_labels, check_same_classes, open_sources

        try:  # the folder scan and label checks are cheap; decoding errors surface when a file is read
            train, valid = open_sources(args.data_path, "L" if args.num_channels == 1 else "RGB",
                                        args.skip_bad_images)
            check_same_classes(train, valid)
            check_labels(train, args.num_classes)
            check_labels(valid, args.num_classes)
        except ImageDataError as e:
            raise ArgumentError(str(e)) from None
        args._image_sources = (train, valid)
        skipped = sum(len(getattr(s, "skipped_files", [])) for s in (train, valid))
        if skipped:
            args.notes.append(f"--skip-bad-images: {skipped} non-image files skipped")


def model_provider(args, config, pre_process=None, post_process=None, vp_stage=None):
    from selfmoe.models.vit import build_vit_model

    return build_vit_model(config, args.img_h, args.img_w, args.patch_dim, args.num_channels, args.num_classes,
                           pool=args.vit_pool, drop_path=args.drop_path, pre_process=pre_process,
                           post_process=post_process, vp_stage=vp_stage)


def datasets_provider(args, num_samples):
    """[train, valid, None]: ImageClassificationDatasets over the --data-path splits (or Fashion-MNIST)."""
    from selfmoe.data.images import ImageClassificationDataset, build_transforms, fashion_mnist
    from selfmoe.training.distributed import is_last_rank

    if args.use_demo_images:
        train, valid = fashion_mnist()
        if is_last_rank():
            print(f"demo data: Fashion-MNIST from Debian's dataset-fashion-mnist package "
                  f"({len(train):,} train / {len(valid):,} validation images, 10 classes)", flush=True)
    else:
        train, valid = args._image_sources
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode="batch", label_smoothing=args.smoothing,
                      num_classes=args.num_classes)
    common = dict(seed=args.seed, skip_bad=args.skip_bad_images, num_workers=args.num_workers)
    return [ImageClassificationDataset(train, build_transforms(args, True), shuffle=True, repeats=args.repeated_aug,
                                       mixup=mixup, **common),
            ImageClassificationDataset(valid, build_transforms(args, False), shuffle=False, **common),
            None]


def loss_func(args, batch, logits: torch.Tensor):
    """(loss sum, image count, {loss, top-1, top-5: [sum, count]}) for one micro-batch.

    timm's SoftTargetCrossEntropy on Mixup/CutMix targets, LabelSmoothingCrossEntropy with
    --smoothing, else cross entropy; accuracy is against the hard labels.
    """
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    labels = batch["labels"]
    logits = logits.float()
    if "targets" in batch:
        mean = SoftTargetCrossEntropy()(logits, batch["targets"])
    elif args.smoothing > 0:
        mean = LabelSmoothingCrossEntropy(args.smoothing)(logits, labels)
    else:
        mean = torch.nn.functional.cross_entropy(logits, labels)
    n = labels.shape[0]
    loss = mean * n
    k = min(5, logits.shape[-1])
    top = logits.detach().topk(k, dim=-1).indices
    hit = top == labels[:, None]
    count = torch.tensor(float(n))
    report = {LOSS_NAME: torch.stack([loss.detach(), count]),
              "top-1": torch.stack([hit[:, 0].sum().float(), count]),
              "top-5": torch.stack([hit.any(-1).sum().float(), count])}
    return loss, torch.tensor(n, dtype=torch.int), report


def forward_step(args, data_iterator, model):
    """One micro-batch through the ViT (every stage reads the batch: images first, labels last)."""
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    logits = model(batch["images"])
    return logits, partial(loss_func, args, batch)
