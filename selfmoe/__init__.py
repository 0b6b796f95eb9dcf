"""selfmoe: train and compare MoE routers on Megatron-Core.

Importing the package applies the CPU compatibility layer when CUDA is absent (and only then).
"""

import os
import warnings

# Megatron-Core warns at import for every optional GPU accelerator it does not find; they are
# optional here by design, so say it once in the docs instead of ten times per process.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|TransformerEngine).*not installed")

from selfmoe import cpu_compat  # noqa: E402

if os.environ.get(cpu_compat.DISABLE_ENV, "1") != "0":
    cpu_compat.apply()

__version__ = "0.1.0"
