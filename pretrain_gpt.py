"""Pretrain a (Mixture-of-Experts) GPT with Megatron-Core: Megatron-LM's flags, selfmoe's routers.

    python pretrain_gpt.py                       # demo: Self-Routing MoE GPT on bundled Shakespeare
    python pretrain_gpt.py --moe-router-type routing-free --train-iters 100
    torchrun --nproc-per-node 2 pretrain_gpt.py --expert-model-parallel-size 2
    bash examples/<a Megatron-LM launch script, paths changed>

Everything lives in selfmoe.training; this file only wires the GPT pieces into the shared loop.
Imports happen inside main(): dist_checkpointing starts a helper with multiprocessing "spawn",
which re-imports this file, and that should not cost a second megatron-core import.
"""

import os
import warnings

# megatron-core warns about missing TransformerEngine/Apex on every CPU import; on a CPU box that
# is expected, and it would bury the one-line errors this script promises.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning)  # torch/megatron deprecations inside checkpoint I/O


def exit_with_parent():
    """Make this process exit when the process that started it dies, even by kill -9.

    The trainer's spawned helpers (dist_checkpointing's multiprocessing manager, which holds the
    write-results queue) re-import this file as `__mp_main__`; nothing tells them when the trainer
    is SIGKILLed, and they would live on under init. A daemon thread polls the parent pid (a
    re-parented process sees another one). The resource tracker exits by itself once the last
    process holding its pipe -- trainer and manager -- is gone.
    """
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


if __name__ == "__mp_main__":  # a helper process spawned by the trainer (see exit_with_parent)
    exit_with_parent()


def demo_paths(args, family: str = "gpt"):
    """The demo writes ./runs/<name> and ./checkpoints/<name> unless told otherwise."""
    if not args.demo:
        return
    moe = f"{args.moe_router_type}-{args.num_experts}e" if args.num_experts else "dense"
    name = args.run_name or f"{family}-{moe}"
    if args.tensorboard_dir is None:
        args.tensorboard_dir = os.path.join("runs", name)
    if args.save is None:
        args.save = os.path.join("checkpoints", name)


def main(argv=None):
    from selfmoe.training.arguments import DEMO_DEFAULTS, ArgumentError, args_to_config, fail, parse_args

    args = parse_args(argv, demo_defaults=DEMO_DEFAULTS)
    demo_paths(args)
    try:
        config = args_to_config(args)
    except ArgumentError as e:
        fail(str(e))
    from selfmoe.training import gpt
    from selfmoe.training.errors import run_or_exit
    from selfmoe.training.trainer import pretrain

    def train():
        gpt.check_data(args)  # before the model: a bad data file costs no model build
        return pretrain(args, config, gpt.model_provider, gpt.forward_step, gpt.datasets_provider)

    return run_or_exit(train)


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import __main__
    main()
