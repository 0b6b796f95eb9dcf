"""Pretrain a (Mixture-of-Experts) ViT/DeiT image classifier with Megatron-Core: Megatron-LM's
flags (vision names included), DeiT's recipe knobs, selfmoe's routers.

    python pretrain_vit.py                       # demo: Self-Routing MoE ViT on Fashion-MNIST (Debian package)
    python pretrain_vit.py --moe-router-type learned --moe-layer-freq 2
    python pretrain_vit.py --data-path /data/imagenet ...    # <root>/train/<class>/*, <root>/val/<class>/*
    torchrun --nproc-per-node 8 pretrain_vit.py ... (see examples/deit_small_imagenet.sh)

The training loop is the one pretrain_gpt.py uses (selfmoe.training.trainer.pretrain); this file
wires the vision pieces of selfmoe.training.vit into it.
"""


# The entry-script pieces both models share (warning filters, helpers that exit with the trainer);
# a light import: pretrain_gpt.py imports torch/megatron only inside its main().
from pretrain_gpt import demo_paths, exit_with_parent

if __name__ == "__mp_main__":  # a helper process spawned by the trainer (see exit_with_parent)
    exit_with_parent()


def one_line(e: Exception) -> str:
    """An ImageDataError's message, also when a DataLoader worker raised it (then it carries the
    worker's traceback and the message is its last line)."""
    text = str(e).strip().splitlines()
    last = text[-1] if text else type(e).__name__
    return last.split("ImageDataError: ", 1)[-1]


def main(argv=None):
    from functools import partial

    from selfmoe.training.arguments import ArgumentError, args_to_config, fail, parse_args
    from selfmoe.training.vit import (LOSS_NAME, VIT_DEMO_DEFAULTS, add_vision_args, prepare_vision_args,
                                      validate_vision_data)

    args = parse_args(argv, demo_defaults=VIT_DEMO_DEFAULTS, extra_args_provider=add_vision_args,
                      prepare_args=prepare_vision_args, validate_data=validate_vision_data)
    demo_paths(args, "vit")
    try:
        config = args_to_config(args)
    except ArgumentError as e:
        fail(str(e))
    from selfmoe.data.images import ImageDataError
    from selfmoe.training import vit
    from selfmoe.training.errors import run_or_exit
    from selfmoe.training.trainer import pretrain

    return run_or_exit(lambda: pretrain(args, config, partial(vit.model_provider, args),
                                        partial(vit.forward_step, args), vit.datasets_provider, loss_name=LOSS_NAME,
                                        throughput_unit="images", eval_metrics=("top-1", "top-5")),
                       data_errors=(ImageDataError,), describe=one_line)


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import __main__
    main()
