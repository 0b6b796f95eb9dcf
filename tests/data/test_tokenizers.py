"""Tokenizers, checked against references that do not share our code paths."""

import hashlib
import io
import inspect
import json
import random
import re

import pytest

from selfmoe.data.preprocess import preprocess
from selfmoe.data.tokenizers import TokenizerError, build_tokenizer, bundled_gpt2_files
from selfmoe.data.train_tokenizer import train_tokenizer_main

SAMPLES = [
    "Hello world",
    "To be, or not to be: that is the question.\n",
    "  leading spaces,   runs of spaces\t\ttabs\n\n\nand newlines  ",
    "It's we'll they're I'd you've I'M DON'T",
    "Numbers 1234567890 3.14159 -42 1e10, 2024-01-01",
    "naïve café, Zürich, Ελληνικά, русский, 日本語のテキスト, emoji 🙂🚀 and a ZWJ 👩‍👩‍👧",
    "the special token <|endoftext|> is plain text inside a document",
    "",
    "\n",
]


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("GPT2BPETokenizer")


def test_bundled_gpt2_files_are_openais():
    # the sha256s OpenAI publishes for gpt-2's encoder.json/vocab.bpe, read from tiktoken's source
    src = inspect.getsource(__import__("tiktoken_ext.openai_public", fromlist=["gpt2"]).gpt2)
    published = dict(re.findall(r'(vocab_bpe_hash|encoder_json_hash)="([0-9a-f]{64})"', src))
    encoder_json, vocab_bpe = bundled_gpt2_files()
    assert hashlib.sha256(open(encoder_json, "rb").read()).hexdigest() == published["encoder_json_hash"]
    assert hashlib.sha256(open(vocab_bpe, "rb").read()).hexdigest() == published["vocab_bpe_hash"]


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello") == [18435]
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256
    assert gpt2.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_gpt2_matches_hf_bytelevel_bpe(gpt2):
    """Independent implementation (HF tokenizers' ByteLevel BPE) on the same files: same ids."""
    from tokenizers import ByteLevelBPETokenizer
    hf = ByteLevelBPETokenizer(*bundled_gpt2_files())
    rng = random.Random(0)
    words = [w for s in SAMPLES for w in s.split()]
    texts = SAMPLES + [" ".join(rng.choice(words) for _ in range(200)) for _ in range(5)]
    for text in texts:
        ids = gpt2.encode(text)
        assert ids == hf.encode(text).ids, text
        assert gpt2.encode_numpy(text).tolist() == ids
        assert gpt2.decode(ids) == text
    assert 50256 not in gpt2.encode(SAMPLES[6])  # "<|endoftext|>" in text is text, as in Megatron-LM
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]


def test_gpt2_lone_surrogate_is_repaired_not_fatal(gpt2):
    text = json.loads('"a\\ud800b"')  # valid JSON, invalid Unicode
    assert gpt2.encode_numpy(text).tolist() == gpt2.encode(text) == gpt2.encode("a\ufffdb")


def test_gpt2_vocab_and_merge_file_override(tmp_path, gpt2):
    encoder_json, vocab_bpe = bundled_gpt2_files()
    # a vocabulary cut to the 256 byte tokens + first 100 merges: a different tokenizer, same format
    merges = open(vocab_bpe, encoding="utf-8").read().split("\n")
    (tmp_path / "merges.txt").write_text("\n".join(merges[:101]) + "\n", encoding="utf-8")
    vocab = {k: v for k, v in json.load(open(encoder_json, encoding="utf-8")).items() if v < 356}
    vocab["<|endoftext|>"] = 356
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    small = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                            merge_file=str(tmp_path / "merges.txt"))
    assert (small.vocab_size, small.eod) == (357, 356)
    from tokenizers import ByteLevelBPETokenizer
    hf = ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in SAMPLES:
        assert small.encode(text) == hf.encode(text).ids
    assert small.encode("Hello world") != gpt2.encode("Hello world")


def test_huggingface_tokenizer_json(tmp_path, gpt2):
    from tokenizers import ByteLevelBPETokenizer
    ByteLevelBPETokenizer(*bundled_gpt2_files()).save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):  # the file, or its directory
        hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
        assert (hf.vocab_size, hf.eod) == (50257, 50256)
        for text in SAMPLES:
            assert hf.encode(text) == gpt2.encode(text)
        assert hf.encode_batch(SAMPLES) == [gpt2.encode(t) for t in SAMPLES]


def test_null_tokenizer_matches_megatron():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as MegatronNull
    ours, ref = build_tokenizer("NullTokenizer", vocab_size=1000), MegatronNull(1000)
    assert (ours.vocab_size, ours.eod) == (ref.vocab_size, ref.eod) == (1001, 1000)
    assert ours.encode("1 2 3") == ref.text_to_ids("1 2 3") == [1, 2, 3]
    assert ours.encode(" 7\t8\n 9 ") == [7, 8, 9]
    assert ours.decode([1, 2, 3]) == "1 2 3"
    with pytest.raises(ValueError):
        ours.encode("1 two 3")
    with pytest.raises(ValueError):
        ours.encode("1001")


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokenizer_type="BertWordPieceLowerCase"), "unknown --tokenizer-type 'BertWordPieceLowerCase'"),
    (dict(tokenizer_type="SentencePieceTokenizer"), "needs --tokenizer-model"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nope/x.model"), "model file not found: /nope/x.model"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nope"), "tokenizer file not found: /nope"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nope/v.json"), "give both --vocab-file and --merge-file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nope/v.json", merge_file="/nope/m.txt"), "file not found: /nope/v.json"),
    (dict(tokenizer_type="NullTokenizer"), "needs --vocab-size"),
])
def test_bad_tokenizer_requests(kwargs, message):
    with pytest.raises(TokenizerError, match=re.escape(message)):
        build_tokenizer(**kwargs)


def _english(n_lines, seed=0):
    rng = random.Random(seed)
    words = ("the king queen lord lady sword crown night day love death heart blood fair foul "
             "speak hath thou thee thy art doth shall would could upon before after tomorrow").split()
    return ["".join(rng.choice(words).capitalize() if i == 0 else " " + rng.choice(words)
                    for i in range(rng.randint(4, 14))) + rng.choice(".,;!?") for _ in range(n_lines)]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_sentencepiece_then_encode(tmp_path, capsys, model_type):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    lines = _english(600)
    docs = ["\n".join(lines[i:i + 6]) for i in range(0, len(lines), 6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prefix = tmp_path / "tok" / "sp"
    assert train_tokenizer_main(["--input", str(data), "--model-type", model_type, "--vocab-size", "80",
                                 "--output-prefix", str(prefix)]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {prefix}.model ({model_type}, vocab_size=80, eod=2)"
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["sp.model", "sp.vocab"]

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=f"{prefix}.model")
    ref = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    proto = sentencepiece_model_pb2.ModelProto.FromString(open(f"{prefix}.model", "rb").read())
    assert proto.trainer_spec.model_type == proto.trainer_spec.ModelType.Value(model_type.upper())
    assert (tok.vocab_size, tok.eod) == (80, ref.eos_id())
    text = "Tomorrow the queen shall speak upon thy heart."
    assert tok.encode(text) == ref.encode(text) and len(tok.encode(text)) > 0
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(docs[:3]) == [ref.encode(d) for d in docs[:3]]

    # and the trained model drives preprocessing (uint16 ids, eod appended)
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    stats = preprocess(str(data), str(tmp_path / "out" / "sp"), tok, append_eod=True, log=io.StringIO())
    ds = IndexedDataset(stats.outputs[0])
    assert [ds[i].tolist() for i in range(len(ds))] == [ref.encode(d) + [2] for d in docs]


def test_train_sentencepiece_from_parquet_and_hf_dataset(tmp_path, capsys):
    """Both inputs are read: letters a-m only occur in the parquet file, n-z only in the dataset."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(1)

    def words(letters):
        return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(12))
                for _ in range(200)]
    pq.write_table(pa.table({"text": words("abcdefghijklm")}), tmp_path / "am.parquet")
    datasets.Dataset.from_dict({"text": words("nopqrstuvwxyz")}).save_to_disk(str(tmp_path / "nz"))
    prefix = tmp_path / "sp"
    assert train_tokenizer_main(["--input", str(tmp_path / "am.parquet"), str(tmp_path / "nz"), "--vocab-size", "60",
                                 "--character-coverage", "1.0", "--output-prefix", str(prefix)]) == 0, capsys.readouterr()
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=f"{prefix}.model")
    ids = tok.encode("abcdefghijklmnopqrstuvwxyz")
    assert tok.sp.unk_id() not in ids and tok.decode(ids) == "abcdefghijklmnopqrstuvwxyz"


def test_train_sentencepiece_errors(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("\n".join(_english(50)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert train_tokenizer_main(["--input", str(data), "--vocab-size", "100000", "--output-prefix", str(out / "sp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sentencepiece: ") and "Vocabulary size too high" in err and err.count("\n") == 1
    assert list(out.iterdir()) == []  # the temporary model was removed

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 1}\n', encoding="utf-8")
    assert train_tokenizer_main(["--input", str(bad), "--vocab-size", "50", "--output-prefix", str(out / "sp")]) == 2
    assert capsys.readouterr().err == f"error: {bad}:2: key 'text' is a number, expected a string\n"
    assert list(out.iterdir()) == []
