"""
Train a SentencePiece tokenizer on the same inputs tools/preprocess_data.py reads.

    python tools/train_tokenizer.py --input data.jsonl --model-type bpe --vocab-size 8000 \
        --output-prefix data/my_spm
    python tools/preprocess_data.py --input data.jsonl --output-prefix data/my \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/my_spm.model --append-eod
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
# megatron.core (imported by `selfmoe`) warns about Apex/TE on every CPU box; keep stderr for our lines
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from selfmoe.data.train_tokenizer import train_tokenizer_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_tokenizer_main())
