"""
selfmoe's data side: tokenizers, corpus -> Megatron-Core .bin/.idx preprocessing, the demo corpus.

    from selfmoe.data import build_tokenizer, ensure_demo_corpus
    from selfmoe.data.preprocess import preprocess   # (the module keeps its name: not re-exported)
"""

from selfmoe.data.corpus import demo_split, ensure_demo_corpus, split_for
from selfmoe.data.preprocess import DataError, UsageError, iter_documents
from selfmoe.data.tokenizers import Tokenizer, TokenizerError, build_tokenizer, train_sentencepiece

__all__ = ["build_tokenizer", "Tokenizer", "TokenizerError", "train_sentencepiece", "iter_documents",
           "DataError", "UsageError", "ensure_demo_corpus", "demo_split", "split_for"]
