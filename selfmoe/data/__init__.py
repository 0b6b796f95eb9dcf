"""
selfmoe's data side: tokenizers, corpus -> Megatron-Core .bin/.idx preprocessing, the demo corpus.

    from selfmoe.data import build_tokenizer, preprocess, ensure_demo_corpus
"""

from selfmoe.data.corpus import demo_split, ensure_demo_corpus, split_for
from selfmoe.data.preprocess import DataError, UsageError, iter_documents, preprocess
from selfmoe.data.tokenizers import Tokenizer, TokenizerError, build_tokenizer, train_sentencepiece

__all__ = ["build_tokenizer", "Tokenizer", "TokenizerError", "train_sentencepiece", "preprocess",
           "iter_documents", "DataError", "UsageError", "ensure_demo_corpus", "demo_split", "split_for"]
