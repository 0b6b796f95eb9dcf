"""
Tokenize a corpus into Megatron-Core .bin/.idx files (Megatron-LM's preprocess_data.py flags).

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/my \
        --tokenizer-type GPT2BPETokenizer --append-eod --workers 2

See `--help` and selfmoe/data/preprocess.py.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
# megatron.core (imported by `selfmoe`) warns about Apex/TE on every CPU box; keep stderr for our lines
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from selfmoe.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
