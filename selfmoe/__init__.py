"""selfmoe: train and compare MoE routers on Megatron-Core.

Importing the package applies the CPU compatibility layer when CUDA is absent (and only then).
"""

import os

from selfmoe import cpu_compat

if os.environ.get(cpu_compat.DISABLE_ENV, "1") != "0":
    cpu_compat.apply()

__version__ = "0.1.0"
