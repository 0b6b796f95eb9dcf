"""tools/preprocess_data.py: outputs read back with megatron-core's own IndexedDataset reader."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from selfmoe.data import preprocess as pp
from selfmoe.data.tokenizers import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPT2 = ["--tokenizer-type", "GPT2BPETokenizer"]

DOCS = [
    "Hello world",
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "naïve café 日本語 🙂 and a literal <|endoftext|> in the middle",
    "  whitespace\t\tand\n\n\nblank lines  ",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("GPT2BPETokenizer")


def run(capsys, *argv):
    """main() in-process (no 5 s interpreter start per case); returns (exit code, stderr lines)."""
    rc = pp.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.splitlines()


def read_back(prefix):
    ds = IndexedDataset(str(prefix))
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))], ds


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def leftovers(directory):
    """Every output-looking file (final or temporary) in directory."""
    return sorted(p.name for p in directory.glob("*") if ".bin" in p.name or ".idx" in p.name) \
        if directory.exists() else []


# -----------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("append_eod", [False, True])
def test_jsonl_round_trip(tmp_path, capsys, gpt2, append_eod):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    out = tmp_path / "out" / "corpus"
    rc, err = run(capsys, "--input", src, "--output-prefix", out, *GPT2, *(["--append-eod"] if append_eod else []))
    assert rc == 0, err
    ids, ds = read_back(f"{out}_text_document")
    eod = [50256] if append_eod else []
    assert ids == [gpt2.encode(d) + eod for d in DOCS]
    assert ds.index.dtype == np.uint16  # DType.optimal_dtype(50257)
    assert err[-1].startswith("done in ")
    assert sorted(os.listdir(out.parent)) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_several_json_keys_and_empty_documents(tmp_path, capsys, gpt2):
    records = [{"text": "first", "title": "A"}, {"text": "", "title": "B"},
               {"text": "third", "title": ""}, {"text": "fourth", "title": "D", "extra": [1, 2]}]
    src = write_jsonl(tmp_path / "in.json", records)
    out = tmp_path / "out"
    rc, err = run(capsys, "--input", src, "--output-prefix", out, *GPT2, "--json-keys", "text", "title", "--append-eod")
    assert rc == 0, err
    # Megatron-LM writes a key's empty document (no EOD), so document i is record i under every key
    for key, expect in (("text", ["first", "", "third", "fourth"]), ("title", ["A", "B", "", "D"])):
        ids, _ = read_back(f"{out}_{key}_document")
        assert ids == [gpt2.encode(t) + [50256] if t else [] for t in expect]
    assert f"wrote {out}_text_document.bin/.idx: 4 documents, 6 tokens ('text', 1 empty)" in err
    assert f"wrote {out}_title_document.bin/.idx: 4 documents, 6 tokens ('title', 1 empty)" in err


def test_plain_text_is_one_document_per_line(tmp_path, capsys, gpt2):
    src = tmp_path / "in.txt"
    src.write_bytes("first line\n\n   \nsecond line\r\nthird, no newline".encode())
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "t", *GPT2)
    assert rc == 0, err
    ids, _ = read_back(tmp_path / "t_text_document")
    assert ids == [gpt2.encode(t) for t in ("first line", "second line", "third, no newline")]


def test_several_inputs_and_utf8_bom(tmp_path, capsys, gpt2):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "bom first"}).encode() + b"\n")
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "second file"}])
    rc, err = run(capsys, "--input", a, b, "--output-prefix", tmp_path / "ab", *GPT2)
    assert rc == 0, err
    assert read_back(tmp_path / "ab_text_document")[0] == [gpt2.encode("bom first"), gpt2.encode("second file")]


def test_parquet_input(tmp_path, capsys, gpt2, monkeypatch):
    monkeypatch.setattr(pp, "ROW_BATCH", 5)  # chunks (8 rows) straddle read batches (5) and row groups (7)
    monkeypatch.setattr(pp, "CHUNK_RECORDS", 8)
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f"row {i}: " + DOCS[i % len(DOCS)] for i in range(50)]
    pq.write_table(pa.table({"text": texts, "n": list(range(50))}), tmp_path / "in.parquet", row_group_size=7)
    rc, err = run(capsys, "--input", tmp_path / "in.parquet", "--output-prefix", tmp_path / "p", *GPT2, "--append-eod")
    assert rc == 0, err
    assert read_back(tmp_path / "p_text_document")[0] == [gpt2.encode(t) + [50256] for t in texts]


def test_parquet_bad_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pp, "ROW_BATCH", 5)
    monkeypatch.setattr(pp, "CHUNK_RECORDS", 4)
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f"row {i}" for i in range(40)]
    texts[22] = texts[30] = None
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet", row_group_size=9)
    rc, err = run(capsys, "--input", tmp_path / "in.parquet", "--output-prefix", tmp_path / "out" / "p", *GPT2)
    assert (rc, err) == (2, [f"error: {tmp_path / 'in.parquet'}:23: key 'text' is null, expected a string"])
    assert leftovers(tmp_path / "out") == []
    rc, err = run(capsys, "--input", tmp_path / "in.parquet", "--output-prefix", tmp_path / "out" / "p", *GPT2,
                  "--json-keys", "body")
    assert (rc, err) == (2, [f"error: {tmp_path / 'in.parquet'}:1: missing key 'body'"])


def test_hf_save_to_disk_input(tmp_path, capsys, gpt2, monkeypatch):
    monkeypatch.setattr(pp, "ROW_BATCH", 4)
    monkeypatch.setattr(pp, "CHUNK_RECORDS", 7)
    import datasets
    texts = [f"{i} " + DOCS[i % len(DOCS)] for i in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    rc, err = run(capsys, "--input", tmp_path / "ds", "--output-prefix", tmp_path / "h", *GPT2)
    assert rc == 0, err
    assert read_back(tmp_path / "h_text_document")[0] == [gpt2.encode(t) for t in texts]

    # a DatasetDict: --hf-split picks the split
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:3]}),
                          "validation": datasets.Dataset.from_dict({"text": texts[3:5]})}
                         ).save_to_disk(str(tmp_path / "dd"))
    rc, err = run(capsys, "--input", tmp_path / "dd", "--input-format", "hf", "--hf-split", "validation",
                  "--output-prefix", tmp_path / "v", *GPT2)
    assert rc == 0, err
    assert read_back(tmp_path / "v_text_document")[0] == [gpt2.encode(t) for t in texts[3:5]]
    rc, err = run(capsys, "--input", tmp_path / "dd", "--hf-split", "test", "--output-prefix", tmp_path / "v", *GPT2)
    assert (rc, err) == (2, [f"error: {tmp_path / 'dd'}: no split 'test' (has train, validation); pass --hf-split"])


def test_null_tokenizer_round_trip(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": "  "}, {"text": "999 0"}])
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "n", "--tokenizer-type", "NullTokenizer",
                  "--vocab-size", "1000", "--append-eod")
    assert rc == 0, err
    assert read_back(tmp_path / "n_text_document")[0] == [[1, 2, 3, 1000], [999, 0, 1000]]
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "big", "--tokenizer-type", "NullTokenizer",
                  "--vocab-size", "100000")
    assert rc == 0, err
    assert read_back(tmp_path / "big_text_document")[1].index.dtype == np.int32  # vocab >= 65500


def test_workers_give_identical_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pp, "CHUNK_RECORDS", 16)  # many chunks, so ordering across workers matters
    records = [{"text": DOCS[i % len(DOCS)] * (1 + i % 3) if i % 11 else ""} for i in range(400)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    for w in (1, 2, 3):
        rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / f"w{w}", *GPT2, "--append-eod",
                      "--workers", w, "--log-interval", 100)
        assert rc == 0, err
        assert sum(line.startswith("processed ") for line in err) == 4  # every 100 records
        assert "tokens/s" in err[0] and "docs/s" in err[0] and "MB/s" in err[0]
    for ext in ("bin", "idx"):
        blobs = {(tmp_path / f"w{w}_text_document.{ext}").read_bytes() for w in (1, 2, 3)}
        assert len(blobs) == 1


def test_ordered_map_reads_only_a_window_ahead():
    """Streaming: an endless input is consumed only a few chunks ahead of the results."""
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield pp.Chunk("x", "text", i + 1, [f"{i}\n".encode()], 2)

    encoder = pp.Encoder(build_tokenizer("NullTokenizer", vocab_size=10**6), ["text"], False, np.int32)
    results = pp.ordered_map(encoder, endless(), 2, (encoder.tok.spec, ["text"], False, np.int32))
    firsts = [next(results).ids[0].tolist() for _ in range(20)]
    results.close()
    assert firsts == [[i] for i in range(20)]
    assert next(pulled) <= 20 + 2 * 2 + 2


# -----------------------------------------------------------------------------
# bad input: one line `error: <file>:<line>: <what>`, exit 2, nothing left behind

BAD_JSONL = [
    ("malformed", b'{"text": "a"}\n{"text": "b",}\n{"text": "c"}\n',
     "2: invalid JSON: Expecting property name enclosed in double quotes (column 14)"),
    ("missing-key", b'{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n', "3: missing key 'text'"),
    ("not-a-string", b'{"text": null}\n', "1: key 'text' is null, expected a string"),
    ("not-an-object", b'{"text": "a"}\n["text"]\n', "2: expected a JSON object, got an array"),
    ("non-utf8", b'{"text": "a"}\n{"text": "caf\xe9"}\n', "2: invalid UTF-8 (byte 0xe9 at byte 14 of the line)"),
    ("truncated", b'{"text": "a"}\n{"text": "b"}\n{"text": "cut in the mid',
     "3: truncated file: last record is incomplete JSON (Unterminated string starting at)"),
]


@pytest.mark.parametrize("name, data, where_what", BAD_JSONL, ids=[b[0] for b in BAD_JSONL])
def test_bad_jsonl(tmp_path, capsys, name, data, where_what):
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "out" / "c", *GPT2)
    assert (rc, err) == (2, [f"error: {src}:{where_what}"])
    assert leftovers(tmp_path / "out") == []


def test_bad_text_file(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"fine\nnot \xff fine\n")
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "out" / "c", *GPT2)
    assert (rc, err) == (2, [f"error: {src}:2: invalid UTF-8 (byte 0xff at byte 5 of the line)"])
    assert leftovers(tmp_path / "out") == []


def test_untokenizable_record(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2"}, {"text": "3 four"}])
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "out" / "n", "--tokenizer-type",
                  "NullTokenizer", "--vocab-size", "10")
    assert (rc, err) == (2, [f"error: {src}:2: cannot tokenize: invalid literal for int() with base 10: 'four'"])
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("workers", [1, 2])
def test_late_error_removes_partial_outputs(tmp_path, capsys, monkeypatch, workers):
    """The bad line comes after several chunks were already written to the temporary files."""
    monkeypatch.setattr(pp, "CHUNK_RECORDS", 8)
    lines = [json.dumps({"text": DOCS[i % len(DOCS)]}).encode() for i in range(300)]
    lines[250] = b'{"text": oops}'
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "c_text_document.idx").write_bytes(b"old")  # an earlier run's output survives
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "out" / "c", *GPT2,
                  "--workers", workers, "--log-interval", 0)
    assert (rc, err) == (2, [f"error: {src}:251: invalid JSON: Expecting value (column 10)"])
    assert leftovers(tmp_path / "out") == ["c_text_document.idx"]


def test_skip_bad_lines_counts(tmp_path, capsys, gpt2):
    data = b"".join(line + b"\n" for line, _ in BAD_JSONL_LINES) + b'{"text": "cut'
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    rc, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "s", *GPT2, "--skip-bad-lines")
    assert rc == 0, err
    good = [text for _, text in BAD_JSONL_LINES if text]
    assert read_back(tmp_path / "s_text_document")[0] == [gpt2.encode(t) for t in good]
    assert (f"skipped 6 bad records (first: {src}:2: invalid JSON: Expecting value (column 1))") in err
    assert f"wrote {tmp_path / 's'}_text_document.bin/.idx: 3 documents, 3 tokens ('text', skipped 1 empty)" in err


BAD_JSONL_LINES = [  # (line, its text if good, "" if empty, None if bad)
    (b'{"text": "one"}', "one"), (b"nope", None), (b'{"txt": "x"}', None), (b'{"text": ""}', ""),
    (b'{"text": "two"}', "two"), (b'{"text": "\xff"}', None), (b"[1]", None), (b'{"text": 3}', None),
    (b"", ""), (b'{"text": "three"}', "three"),
]


# -----------------------------------------------------------------------------
# argument errors: one line, before any work

@pytest.mark.parametrize("argv, message", [
    (["--input", "{tmp}/nope.jsonl", *GPT2], "error: {tmp}/nope.jsonl: no such file or directory"),
    (["--input", "{tmp}/in.csv", *GPT2], "error: {tmp}/in.csv: cannot tell the format from the file name; pass --input-format"),
    (["--input", "{tmp}/in.jsonl", "--tokenizer-type", "Nope"],
     "error: unknown --tokenizer-type 'Nope' (choose from GPT2BPETokenizer, SentencePieceTokenizer, "
     "GPTSentencePieceTokenizer, HuggingFaceTokenizer, NullTokenizer)"),
    (["--input", "{tmp}/in.jsonl", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{tmp}/x.model"],
     "error: SentencePieceTokenizer: model file not found: {tmp}/x.model"),
    (["--input", "{tmp}/in.jsonl", "--input-format", "hf", *GPT2],
     "error: {tmp}/in.jsonl: --input-format hf wants a directory written by save_to_disk"),
    (["--input", "{tmp}/in.txt", "--json-keys", "a", "b", *GPT2],
     "error: plain text input has one document per line: give a single --json-keys name"),
    (["--input", "{tmp}/ids.txt", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{tmp}/tok.json",
      "--append-eod"], "error: --append-eod: HuggingFaceTokenizer has no end-of-document token"),
])
def test_argument_errors(tmp_path, capsys, argv, message):
    from tokenizers import Tokenizer, models
    for name in ("in.csv", "in.jsonl", "in.txt", "ids.txt"):
        (tmp_path / name).write_text('{"text": "a"}\n')
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tok.json"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc, err = run(capsys, *argv, "--output-prefix", tmp_path / "out" / "x")
    assert (rc, err) == (2, [message.format(tmp=tmp_path)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "error: --workers must be >= 1 (got 0)"),
    (["--log-interval", "-1"], "error: --log-interval must be >= 0 (got -1)"),
    (["--workers", "two"], "error: argument --workers: invalid int value: 'two'"),  # argparse's own, one line
    (["--output-prefix", ""], "error: --output-prefix '': needs a file name part (e.g. data/my-corpus)"),
    (["--output-prefix", "{tmp}/out/"],
     "error: --output-prefix '{tmp}/out/': needs a file name part (e.g. data/my-corpus)"),
    (["--output-prefix", "{tmp}/in.jsonl/sub/x"],
     "error: --output-prefix {tmp}/in.jsonl/sub/x: {tmp}/in.jsonl is not a directory"),
])
def test_every_user_error_is_one_line_exit_2(tmp_path, capsys, extra, message):
    """Flag domains, argparse's own errors and an unusable --output-prefix: exit 2 like the trainer."""
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    argv = ["--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "out" / "x", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "10", *[a.format(tmp=tmp_path) for a in extra]]
    try:
        rc = pp.main([str(a) for a in argv])
    except SystemExit as e:  # the parser's errors exit from argparse
        rc = e.code
    assert (rc, capsys.readouterr().err.splitlines()) == (2, [message.format(tmp=tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_cli_subprocess(tmp_path):
    """The real entry point: exit codes and a stderr of exactly one line, no traceback, no warnings."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "ok"}])
    with open(src, "ab") as f:
        f.write(b'{"text": "cut')
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(src),
           "--output-prefix", str(tmp_path / "out" / "c"), *GPT2, "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {src}:2: truncated file: last record is incomplete JSON (Unterminated string starting at)\n"
    assert leftovers(tmp_path / "out") == []


def test_sigterm_mid_run_leaves_nothing(tmp_path):
    """Killed while workers are busy: exit 143, the pool is torn down, no output or temp file remains."""
    import signal
    src = write_jsonl(tmp_path / "big.jsonl", [{"text": f"{i} " + DOCS[1] * 50} for i in range(5000)])  # ~22 MB
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(src),
           "--output-prefix", str(tmp_path / "out" / "c"), *GPT2, "--workers", "2", "--log-interval", "50"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first = proc.stderr.readline()
    assert first.startswith("processed "), first
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, rest
    assert "Traceback" not in rest
    assert leftovers(tmp_path / "out") == []
