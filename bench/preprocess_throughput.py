"""
How close does our preprocessing get to raw tiktoken? Tokens/s of

  (a) raw: tiktoken's encode_ordinary over the documents, already in memory, one process
  (b) preprocess(..., workers=1): read jsonl + parse + encode + write .bin/.idx, in-process
  (c) preprocess(..., workers=2): the same with two tokenizer processes

on the demo corpus text (Shakespeare, GPT-2 BPE) repeated to --mb megabytes. Our wall time
includes everything preprocess() does (pool start-up too), but not the interpreter start.

    python bench/preprocess_throughput.py                 # whole plays as documents (~140 KB)
    python bench/preprocess_throughput.py --doc-chars 4000  # web-page sized documents
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from selfmoe.data.corpus import DEMO_ROOT, ensure_demo_corpus  # noqa: E402
from selfmoe.data.preprocess import preprocess  # noqa: E402
from selfmoe.data.tokenizers import build_tokenizer  # noqa: E402


def chop(text, size):
    """Split at line boundaries into pieces of about `size` characters."""
    pieces, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            pieces.append("".join(cur))
            cur, n = [], 0
    if cur:
        pieces.append("".join(cur))
    return pieces


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=32.0, help="size of the sample in MB of text")
    p.add_argument("--doc-chars", type=int, default=0, help="cut plays into documents of ~N chars (0: whole plays)")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = p.parse_args()

    ensure_demo_corpus(quiet=True)
    with open(os.path.join(DEMO_ROOT, "shakespeare.jsonl"), encoding="utf-8") as f:
        plays = [json.loads(line)["text"] for line in f]
    if args.doc_chars:
        plays = [piece for play in plays for piece in chop(play, args.doc_chars)]
    docs, size = [], 0
    while size < args.mb * 1e6:
        for d in plays:
            docs.append(d)
            size += len(d.encode("utf-8"))
    tok = build_tokenizer("GPT2BPETokenizer")

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "sample.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        mb = os.path.getsize(src) / 1e6
        print(f"sample: {len(docs)} documents, {size / 1e6:.1f} MB of text ({mb:.1f} MB jsonl), "
              f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")

        def raw():
            t = time.perf_counter()
            n = sum(len(tok.enc.encode_ordinary(d)) for d in docs)
            return n, time.perf_counter() - t

        def ours(workers):
            t = time.perf_counter()
            stats = preprocess(src, os.path.join(tmp, f"out{workers}"), tok, workers=workers, log=io.StringIO())
            return sum(stats.tokens), time.perf_counter() - t

        results, counts = {}, set()
        for name, fn in (("(a) raw tiktoken, 1 process", raw),
                         ("(b) preprocess --workers 1", lambda: ours(1)),
                         ("(c) preprocess --workers 2", lambda: ours(2))):
            runs = [fn() for _ in range(args.repeat)]
            tokens, seconds = runs[0][0], min(s for _, s in runs)
            results[name] = tokens / seconds
            counts.add(tokens)
            print(f"{name}: {tokens:,} tokens in {seconds:.2f}s = {tokens / seconds / 1e6:.2f}M tokens/s, "
                  f"{size / seconds / 1e6:.1f} MB/s")
        assert len(counts) == 1, f"token counts differ: {counts}"  # same ids, or the comparison is moot
        base = results["(a) raw tiktoken, 1 process"]
        for name in list(results)[1:]:
            print(f"ratio {name[4:]} / raw: {results[name] / base:.2f}x")


if __name__ == "__main__":
    main()
