"""Training: Megatron-LM style arguments, one shared training loop, dist_checkpointing checkpoints.

    from selfmoe.training import parse_args, args_to_config, pretrain
    from selfmoe.training import gpt
    args = parse_args(["--num-layers", "2", ...])
    pretrain(args, args_to_config(args), gpt.model_provider, gpt.forward_step, gpt.datasets_provider)
"""

from selfmoe.training.arguments import ArgumentError, args_to_config, parse_args, validate_args
from selfmoe.training.trainer import TrainingDiverged, pretrain

__all__ = ["ArgumentError", "TrainingDiverged", "args_to_config", "parse_args", "pretrain", "validate_args"]
