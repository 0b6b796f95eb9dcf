"""selfmoe: train and compare MoE routers on Megatron-Core.

Importing the package applies the CPU compatibility layer when CUDA is absent (and only then).
"""

from selfmoe import cpu_compat

cpu_compat.apply()

__version__ = "0.1.0"
