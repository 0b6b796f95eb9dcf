"""Bad files given to pretrain_gpt.py: damaged checkpoints, checkpoints of the other backend, DeepSpeed
JSON that is not a usable config, broken data files. Each case asserts exit code 2, exactly one
stderr line `error: ...` naming the file or flag, no traceback (an uncaught exception fails the
test), every file under the case's folder byte-identical afterwards (nothing written, nothing of
the user's touched), and -- where the input is known then -- no model built.

The cases run in-process through pretrain_gpt.main (one megatron import for all); two real
checkpoints (Megatron dist, DeepSpeed) are made once per module and copied per case. Flag-domain
cases (numbers, --split, blends) are in tests/training/test_arguments.py.
"""

import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from selfmoe.training import gpt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
        "--lr-warmup-iters", "0", "--eval-iters", "0", "--disable-bias-linear", "--num-experts", "4",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--log-interval", "1"]
MOCK = ["--mock-data"]
DS_JSON = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "zero_optimization": {"stage": 1}, "steps_per_print": 1000000}


def load_main():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_cli", os.path.join(REPO, "pretrain_gpt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


MAIN = load_main()


def run_cli(argv, capsys, monkeypatch):
    """(exit code, stdout, stderr, models built) of pretrain_gpt.main(argv) in this process."""
    built = []
    provider = gpt.model_provider
    monkeypatch.setattr(gpt, "model_provider", lambda *a, **kw: built.append(1) or provider(*a, **kw))
    monkeypatch.delenv("RANK", raising=False)
    capsys.readouterr()
    try:
        MAIN(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err, len(built)


def tree(root) -> dict:
    """{relative path: sha256 or 'dir'} of everything under root."""
    state = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            state[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                state[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return state


# ---------------------------------------------------------------------------------------------
# fixtures made once: a Megatron checkpoint, a DeepSpeed checkpoint, token files

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("made")
    mp = pytest.MonkeyPatch()
    mp.delenv("RANK", raising=False)
    try:
        MAIN(TINY + MOCK + ["--train-iters", "1", "--save", str(root / "megatron")])
        (root / "ds.json").write_text(json.dumps(DS_JSON))
        MAIN(TINY + MOCK + ["--train-iters", "1", "--save", str(root / "deepspeed"), "--deepspeed",
                            "--deepspeed-config", str(root / "ds.json")])
    finally:
        mp.undo()
    write_tokens(root / "good", [[1, 2, 3, 4] * 20, [5, 6, 7] * 20])
    return root


def write_tokens(prefix, docs, dtype=np.uint16):
    from selfmoe.data.preprocess import megatron_indexed_dataset
    import torch

    idx = megatron_indexed_dataset()
    builder = idx.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        builder.add_item(torch.tensor(d, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def first_file(path, suffix):
    return sorted(n for n in os.listdir(path) if n.endswith(suffix))[0]


def truncate(path, size=0):
    with open(path, "r+b") as f:
        f.truncate(size)


# ---------------------------------------------------------------------------------------------
# the cases: name -> (setup(case dir, made dir) -> extra argv, text the one line must contain,
#                     refused before the model is built)

def mg(edit):
    """A copy of the Megatron checkpoint, edited, resumed with --load."""
    def setup(d, made):
        shutil.copytree(made / "megatron", d / "ck")
        edit(d / "ck", d / "ck" / "iter_0000001")
        return MOCK + ["--train-iters", "2", "--load", str(d / "ck"), "--save", str(d / "ck")]
    return setup


def dsck(edit, extra=()):
    """A copy of the DeepSpeed checkpoint, edited, resumed with --load --deepspeed."""
    def setup(d, made):
        shutil.copytree(made / "deepspeed", d / "ck")
        edit(d / "ck", d / "ck" / "iter_0000001")
        return MOCK + ["--train-iters", "2", "--load", str(d / "ck"), "--deepspeed", "--deepspeed-config",
                       str(made / "ds.json"), *extra]
    return setup


def dsjson(cfg, extra=()):
    def setup(d, made):
        (d / "bad.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return MOCK + ["--train-iters", "2", "--deepspeed", "--deepspeed-config", str(d / "bad.json"), *extra]
    return setup


def data(make, flag="--data-path", with_good=False):
    def setup(d, made):
        make(d / "bad")
        paths = ["--data-path", str(d / "bad")] if flag == "--data-path" else [
            "--train-data-path", str(made / "good"), "--valid-data-path", str(d / "bad"),
            "--test-data-path", str(made / "good"), "--eval-iters", "1"]
        if with_good:
            paths = ["--data-path", "0.5", str(made / "good"), "0.5", str(d / "bad")]
        return ["--train-iters", "2", "--split", "1,0,0", *paths]
    return setup


def good_then(edit):
    def make(prefix):
        write_tokens(prefix, [[1, 2, 3, 4] * 20, [5, 6, 7] * 20])
        edit(prefix)
    return make


def write(path, content):
    with open(path, "wb") as f:
        f.write(content)


def rm(path):
    os.remove(path)


CASES = {
    # kind 1: damaged Megatron dist checkpoints
    "distcp-truncated-0": (mg(lambda ck, it: truncate(it / "__0_1.distcp")), "truncated checkpoint", True),
    "distcp-truncated-half": (mg(lambda ck, it: truncate(it / "__0_0.distcp", os.path.getsize(it / "__0_0.distcp") // 2)),
                              "__0_0.distcp: ", True),
    "distcp-missing": (mg(lambda ck, it: rm(it / "__0_1.distcp")), "__0_1.distcp: missing", True),
    "metadata-missing": (mg(lambda ck, it: rm(it / ".metadata")), ".metadata: missing", True),
    "metadata-garbage": (mg(lambda ck, it: write(it / ".metadata", b"garbage")), ".metadata: ", True),
    "metadata-json-missing": (mg(lambda ck, it: rm(it / "metadata.json")), "metadata.json: missing", True),
    "common-missing": (mg(lambda ck, it: rm(it / "common.pt")), "common.pt: missing", True),
    "common-truncated": (mg(lambda ck, it: truncate(it / "common.pt", 10)), "common.pt: ", True),
    "common-garbage": (mg(lambda ck, it: write(it / "common.pt", b"\0" * 100)), "common.pt: ", True),
    "tracker-not-a-number": (mg(lambda ck, it: write(ck / "latest_checkpointed_iteration.txt", b"abc")),
                             "latest_checkpointed_iteration.txt: expected an iteration number", True),
    "tracker-names-missing-iteration": (mg(lambda ck, it: write(ck / "latest_checkpointed_iteration.txt", b"9")),
                                        "names iteration 9", True),
    "iteration-dir-removed": (mg(lambda ck, it: shutil.rmtree(it)), "iter_0000001 is missing", True),
    "another-hidden-size": (lambda d, made: mg(lambda ck, it: None)(d, made) + ["--hidden-size", "64"],
                            "hidden_size=32 in the checkpoint but 64 now", True),
    "another-expert-count": (lambda d, made: mg(lambda ck, it: None)(d, made) + ["--num-experts", "8"],
                             "num_moe_experts=4 in the checkpoint but 8 now", True),
    "distributed-optimizer-switch": (lambda d, made: mg(lambda ck, it: None)(d, made) + ["--use-distributed-optimizer"],
                                     "--no-load-optim", True),
    "lr-schedule-changed": (lambda d, made: mg(lambda ck, it: None)(d, made) + ["--lr-decay-style", "linear",
                                                                                "--lr-decay-iters", "7"],
                            "learning-rate schedule differs", False),
    "tracker-empty": (mg(lambda ck, it: write(ck / "latest_checkpointed_iteration.txt", b"")),
                      "expected an iteration number", True),
    "tracker-negative": (mg(lambda ck, it: write(ck / "latest_checkpointed_iteration.txt", b"-1")),
                         "expected an iteration number", True),
    "iteration-is-a-file": (mg(lambda ck, it: (shutil.rmtree(it), write(it, b"x"))), "iter_0000001 is missing", True),
    "metadata-truncated": (mg(lambda ck, it: truncate(it / ".metadata", 100)), ".metadata: ", True),
    "metadata-json-garbage": (mg(lambda ck, it: write(it / "metadata.json", b"{not json")), "unreadable checkpoint metadata: {d}/ck/iter_0000001/metadata.json: ", True),
    "distcp-garbage-same-size": (mg(lambda ck, it: write(it / "__0_1.distcp", b"\1" * os.path.getsize(it / "__0_1.distcp"))),
                                 "cannot load checkpoint: {d}/ck/iter_0000001: ", False),
    "load-is-a-file": (lambda d, made: write(d / "f", b"x") or MOCK + ["--train-iters", "2", "--load", str(d / "f")],
                       "not a directory", True),
    "save-is-a-file": (lambda d, made: write(d / "f", b"x") or MOCK + ["--train-iters", "2", "--save", str(d / "f")],
                       "--save: {d}/f: not a directory", True),
    # kind 3: the other backend's folder, for --load or --save
    "deepspeed-checkpoint-without-deepspeed": (
        lambda d, made: shutil.copytree(made / "deepspeed", d / "ck") and
        MOCK + ["--train-iters", "2", "--load", str(d / "ck"), "--save", str(d / "ck")],
        "--load: {d}/ck: holds DeepSpeed checkpoints; pass --deepspeed", True),
    "megatron-checkpoint-with-deepspeed": (
        lambda d, made: shutil.copytree(made / "megatron", d / "ck") and
        MOCK + ["--train-iters", "2", "--load", str(d / "ck"), "--save", str(d / "ck"), "--deepspeed",
                "--deepspeed-config", str(made / "ds.json")],
        "--load: {d}/ck: holds Megatron-Core dist checkpoints; drop --deepspeed", True),
    "save-into-deepspeed-folder": (
        lambda d, made: shutil.copytree(made / "deepspeed", d / "ck") and
        MOCK + ["--train-iters", "2", "--save", str(d / "ck")],
        "--save: {d}/ck: holds DeepSpeed checkpoints; this run would write Megatron-Core dist", True),
    "save-into-megatron-folder": (
        lambda d, made: shutil.copytree(made / "megatron", d / "ck") and
        MOCK + ["--train-iters", "2", "--save", str(d / "ck"), "--deepspeed", "--deepspeed-config",
                str(made / "ds.json")],
        "--save: {d}/ck: holds Megatron-Core dist checkpoints; this run would write DeepSpeed", True),
    "deepspeed-folder-without-latest": (
        lambda d, made: (shutil.copytree(made / "deepspeed", d / "ck"), rm(d / "ck" / "latest")) and
        MOCK + ["--train-iters", "2", "--load", str(d / "ck")],
        "holds DeepSpeed checkpoints", True),
    "megatron-folder-without-tracker": (
        lambda d, made: (shutil.copytree(made / "megatron", d / "ck"),
                         rm(d / "ck" / "latest_checkpointed_iteration.txt")) and
        MOCK + ["--train-iters", "2", "--save", str(d / "ck"), "--deepspeed", "--deepspeed-config",
                str(made / "ds.json")],
        "holds Megatron-Core dist checkpoints", True),
    # kind 1: damaged DeepSpeed checkpoints
    "deepspeed-optim-states-truncated": (
        dsck(lambda ck, it: truncate(it / first_file(it, "optim_states.pt"), 100)), "optim_states.pt: ", True),
    "deepspeed-optim-states-empty": (dsck(lambda ck, it: truncate(it / first_file(it, "optim_states.pt"))),
                                     "optim_states.pt: ", True),
    "deepspeed-model-states-truncated": (dsck(lambda ck, it: truncate(it / "mp_rank_00_model_states.pt", 100)),
                                         "mp_rank_00_model_states.pt: ", True),
    "deepspeed-model-states-missing": (dsck(lambda ck, it: rm(it / "mp_rank_00_model_states.pt")),
                                       "holds no mp_rank_00_model_states.pt", True),
    "deepspeed-another-hidden-size": (dsck(lambda ck, it: None, ["--hidden-size", "64"]),
                                      "hidden_size=32 in the checkpoint but 64 now", True),
    # (a smaller --train-iters changes the default --lr-decay-iters the same way)
    "deepspeed-schedule-changed": (dsck(lambda ck, it: None, ["--lr-decay-iters", "7"]),
                                   "learning-rate schedule differs", False),
    "deepspeed-latest-names-nothing": (dsck(lambda ck, it: write(ck / "latest", b"iter_0000042")),
                                       "holds no mp_rank_00_model_states.pt", True),
    "deepspeed-model-states-garbage": (dsck(lambda ck, it: write(it / "mp_rank_00_model_states.pt", b"PK" * 50)),
                                       "mp_rank_00_model_states.pt: ", True),
    # kind 1: DeepSpeed JSON that parses but is no usable config
    "ds-stage-7": (dsjson({**DS_JSON, "zero_optimization": {"stage": 7}}), "zero_optimization.stage is 7", True),
    "ds-stage-string": (dsjson({**DS_JSON, "zero_optimization": {"stage": "two"}}), "zero_optimization.stage", True),
    "ds-top-level-list": (dsjson("[1, 2]"), "a DeepSpeed config is a JSON object, not a list", True),
    "ds-zero-section-not-object": (dsjson({**DS_JSON, "zero_optimization": 2}), '"zero_optimization" must be', True),
    "ds-micro-batch-contradicts": (dsjson({**DS_JSON, "train_micro_batch_size_per_gpu": 3}),
                                   "--micro-batch-size is 2", True),
    "ds-accumulation-contradicts": (dsjson({**DS_JSON, "gradient_accumulation_steps": 5}),
                                    "--global-batch-size needs 2", True),
    "ds-train-batch-contradicts": (dsjson({**DS_JSON, "train_batch_size": 1000}), "--deepspeed-config: ", True),
    "ds-bad-field-type": (dsjson({**DS_JSON, "zero_optimization": {"stage": 1, "reduce_bucket_size": "big"}}),
                          "--deepspeed-config: ", True),
    "ds-fp16-not-object": (dsjson({**DS_JSON, "fp16": True}), '"fp16" must be a JSON object', True),
    "ds-optimizer-not-object": (dsjson({**DS_JSON, "optimizer": "adam"}), '"optimizer" must be a JSON object', True),
    "ds-bf16-enabled-not-bool": (dsjson({**DS_JSON, "bf16": {"enabled": "maybe"}}), "--deepspeed-config: ", True),
    "ds-micro-batch-negative": (dsjson({**DS_JSON, "train_micro_batch_size_per_gpu": -1}), "--deepspeed-config: ",
                                True),
    "ds-accumulation-zero": (dsjson({**DS_JSON, "gradient_accumulation_steps": 0}), "--deepspeed-config: ", True),
    "ds-string-config": (dsjson('"zero2"'), "not a str", True),
    # kind 5: data files wrong at training time
    "data-bin-missing": (data(good_then(lambda p: rm(f"{p}.bin"))), "bad.bin", True),
    "data-idx-missing": (data(good_then(lambda p: rm(f"{p}.idx"))), "bad.idx", True),
    "data-bin-truncated": (data(good_then(lambda p: truncate(f"{p}.bin", 50))),
                           "truncated data file: {d}/bad.bin: 50 bytes, its .idx needs", True),
    "data-bin-empty": (data(good_then(lambda p: truncate(f"{p}.bin"))), "bad.bin: 0 bytes", True),
    "data-idx-truncated": (data(good_then(lambda p: truncate(f"{p}.idx", 20))), "bad.idx: ", True),
    "data-idx-empty": (data(good_then(lambda p: truncate(f"{p}.idx"))), "bad.idx: ", True),
    "data-idx-garbage": (data(good_then(lambda p: write(f"{p}.idx", b"not an index" * 10))), "bad.idx: ", True),
    "data-no-documents": (data(lambda p: write_tokens(p, [])), "empty dataset: {d}/bad.idx: no documents", True),
    "data-ids-beyond-vocab": (data(lambda p: write_tokens(p, [[1, 2, 300, 4] * 10])),
                              "bad.bin: largest id 300, but the tokenizer's vocabulary size is 256", True),
    "data-ids-beyond-vocab-int32": (data(lambda p: write_tokens(p, [[1, 70000]], dtype=np.int32)),
                                    "largest id 70000", True),
    "data-bad-valid-set": (data(lambda p: write_tokens(p, [[999] * 30]), flag="--valid-data-path"),
                           "largest id 999", True),
    "data-bad-in-blend": (data(good_then(lambda p: truncate(f"{p}.bin", 10)), with_good=True),
                          "bad.bin: 10 bytes", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, made, tmp_path, capsys, monkeypatch):
    setup, want, before_build = CASES[case]
    argv = TINY + setup(tmp_path, made)
    before = tree(tmp_path)
    code, out, err, built = run_cli(argv, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:], out[-1000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert want.format(d=tmp_path) in lines[0], lines[0]
    assert tree(tmp_path) == before  # nothing written, nothing of the user's changed
    if before_build:
        assert built == 0, "the check ran only after the model was built"


def test_enough_cases():
    assert len(CASES) >= 60  # the issue asks for >= 60 together with test_arguments.py's flag cases


# ---------------------------------------------------------------------------------------------
# not bad input, but the same promise of a clear word: resume past the end, NaN streak stop

def test_resume_past_train_iters_says_so(made, tmp_path, capsys, monkeypatch):
    shutil.copytree(made / "megatron", tmp_path / "ck")
    before = tree(tmp_path)
    code, out, err, _ = run_cli(TINY + MOCK + ["--train-iters", "1", "--load", str(tmp_path / "ck"), "--save",
                                               str(tmp_path / "ck")], capsys, monkeypatch)
    assert code == 0, err
    assert "the checkpoint is at iteration 1, --train-iters is 1: nothing to train" in out
    assert tree(tmp_path) == before


def test_nan_stop_names_the_checkpoint_saved_before_the_streak(tmp_path):
    """Saves at 2 (healthy), 4 and 6 (inside the NaN streak that starts at 3): the stop message must
    point at iteration 2, the one a resume can continue from."""
    import torch

    from selfmoe.training.arguments import args_to_config, parse_args
    from selfmoe.training.trainer import TrainingDiverged, pretrain

    calls = {"n": 0}

    def forward_step(data_iterator, model):
        output, loss_func = gpt.forward_step(data_iterator, model)
        calls["n"] += 1
        if calls["n"] < 3 or not torch.is_grad_enabled():
            return output, loss_func
        return output, lambda t: tuple(x * float("nan") if torch.is_tensor(x) and x.is_floating_point() else x
                                       for x in loss_func(t)[:2]) + ({k: v * float("nan") for k, v in
                                                                      loss_func(t)[2].items()},)

    args = parse_args(TINY + MOCK + ["--global-batch-size", "2", "--train-iters", "20", "--save", str(tmp_path),
                                     "--save-interval", "2"])
    with pytest.raises(TrainingDiverged) as e:
        pretrain(args, args_to_config(args), gpt.model_provider, forward_step, gpt.datasets_provider)
    assert (tmp_path / "iter_0000006").is_dir()  # saved during the streak (finite weights: skipped steps)
    assert str(e.value).endswith(f"last checkpoint before the streak: {tmp_path / 'iter_0000002'}"), str(e.value)


# ---------------------------------------------------------------------------------------------
# preprocessing (tools/preprocess_data.py's contract: one `error:` line, exit 2, nothing written)

NULL_TOK = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


@pytest.mark.parametrize("content,name", [('{"text": ""}\n{"text": ""}\n', "in.jsonl"), ("\n\n  \n", "in.txt"),
                                          ("", "in.jsonl")])
def test_preprocess_all_empty_corpus_writes_nothing(tmp_path, capsys, content, name):
    from selfmoe.data import preprocess

    (tmp_path / name).write_text(content)
    capsys.readouterr()
    rc = preprocess.main(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "out" / "c"), *NULL_TOK])
    err = capsys.readouterr().err.strip().splitlines()
    assert (rc, err) == (2, [f"error: {tmp_path / name}: no documents"])
    assert sorted(os.listdir(tmp_path)) == [name] + (["out"] if (tmp_path / "out").exists() else [])
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


@pytest.mark.slow  # a subprocess: the limit must not hit pytest itself
def test_preprocess_write_error_names_the_file_and_removes_temporaries(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the .bin
    write fail with EFBIG, as a full disk fails with ENOSPC."""
    import resource
    import signal
    import subprocess
    import sys

    src = tmp_path / "in.txt"
    src.write_text("".join(" ".join(str(i % 90) for i in range(200)) + "\n" for _ in range(200)))  # 40k tokens

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))

    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(src),
                        "--output-prefix", str(out / "c"), *NULL_TOK], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"error: {out / 'c'}_text_document.bin/.idx: File too large\n"
    assert os.listdir(out) == []  # the temporary .bin is gone


# ---------------------------------------------------------------------------------------------
# kind 8: no helper process outlives a trainer killed with -9

def _children_map() -> dict:
    kids: dict = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def _descendants(pid) -> list:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_no_helper_process_survives_kill9_of_the_trainer(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    p = subprocess.Popen([sys.executable, "pretrain_gpt.py", *TINY, *MOCK, "--train-iters", "1000", "--save",
                          str(tmp_path / "ck"), "--save-interval", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:
            if line.startswith("saved checkpoint"):
                break
        helpers = _descendants(p.pid)
        assert helpers, "the save started no helper process: nothing to check"
        os.kill(p.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer would
        p.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(h) for h in helpers):
            time.sleep(0.5)
        assert [h for h in helpers if _alive(h)] == []
    finally:
        p.stdout.close()
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("split, empty", [("969,30,1", "validation"), ("10,0,1", "test"), ("1,1,0", None)])
def test_a_split_left_without_documents_is_one_line_before_building(tmp_path, capsys, monkeypatch, split, empty):
    """Two documents under Megatron's default --split 969,30,1 leave the validation split none
    (round(0.969 * 2) = 2): megatron-core's GPTDataset then counts epochs of 0 tokens forever.
    The check names the file and the split before any model exists; a split with weight 0 is fine."""
    from selfmoe.training.arguments import parse_args
    from selfmoe.training.errors import InputError

    write_tokens(tmp_path / "two", [[1, 2, 3], [4, 5, 6, 7]])
    args = parse_args(TINY + ["--train-iters", "2", "--data-path", str(tmp_path / "two"), "--split", split],
                      world_size=1)
    if empty is None:
        gpt.check_data(args)  # one document each for training and validation
        return
    with pytest.raises(InputError) as e:
        gpt.check_data(args)
    assert str(e.value) == (f"empty data split: {tmp_path / 'two'}.idx: --split '{args.split}' leaves the {empty} "
                            f"split none of its 2 documents (give that split weight 0, or more data)")
