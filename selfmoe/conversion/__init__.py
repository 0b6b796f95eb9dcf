"""Checkpoint conversion: Hugging Face export/import, upcycling, resharding, evaluation knobs.

The library behind tools/convert_checkpoint.py. Every function works on the world-size-1 model:
a dist checkpoint of any parallel layout is resharded to one rank by Megatron-Core's
dist_checkpointing on load, and any layout can load what we save.
"""

from selfmoe.conversion.common import ConversionError

__all__ = ["ConversionError"]
