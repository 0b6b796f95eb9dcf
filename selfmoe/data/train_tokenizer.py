"""CLI of tools/train_tokenizer.py: train a SentencePiece model on the inputs preprocess_data reads.

It sits beside both modules it uses (the readers and one-line errors of `preprocess`, the trainer of
`tokenizers`), so neither of those imports the other's CLI.
"""

from __future__ import annotations

import sys

from selfmoe.data.preprocess import (USER_ERRORS, OneLineParser, add_input_args, check_inputs, iter_documents,
                                     report_user_error)
from selfmoe.data.tokenizers import SentencePieceTokenizer, train_sentencepiece


def train_tokenizer_main(argv=None):
    """CLI of tools/train_tokenizer.py: same inputs and one-line errors as tools/preprocess_data.py."""
    parser = OneLineParser(
        description="Train a SentencePiece model ({output-prefix}.model/.vocab) on jsonl/text/parquet/hf "
                    "inputs, read exactly as tools/preprocess_data.py reads them. Each non-empty line of "
                    "every document is one training sentence. Use the result with "
                    "--tokenizer-type SentencePieceTokenizer --tokenizer-model {output-prefix}.model")
    add_input_args(parser)
    g = parser.add_argument_group("sentencepiece")
    g.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    g.add_argument("--vocab-size", type=int, required=True)
    g.add_argument("--output-prefix", required=True, help="writes {output-prefix}.model and .vocab")
    g.add_argument("--character-coverage", type=float, default=0.9995)
    g.add_argument("--input-sentence-size", type=int, default=10_000_000,
                   help="sample at most this many lines (0: all; they are all held in memory)")
    g.add_argument("--byte-fallback", action="store_true", help="unknown characters become byte pieces")
    args = parser.parse_args(argv)
    try:
        check_inputs(args.input, args.input_format)
        docs = iter_documents(args.input, args.input_format, args.json_keys, args.hf_split, args.skip_bad_lines)
        path = train_sentencepiece(docs, args.output_prefix, args.vocab_size, args.model_type,
                                   args.character_coverage, args.input_sentence_size, args.byte_fallback)
    except USER_ERRORS as e:
        return report_user_error(e)
    sp = SentencePieceTokenizer(path)
    print(f"wrote {path} ({args.model_type}, vocab_size={sp.vocab_size}, eod={sp.eod})", file=sys.stderr)
    return 0
