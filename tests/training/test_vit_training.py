"""pretrain_vit.py on the shared trainer with real images (Fashion-MNIST from Debian's package):
every router learns (validation top-1 far above chance), a killed run resumes onto the identical
loss curve, bad input is one `error:` line with exit code 2."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import pretrain_vit  # noqa: E402

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--img-h", "28", "--img-w", "28", "--num-channels", "1", "--num-classes", "10", "--patch-dim", "14",
        "--vit-pool", "mean", "--init-method-std", "0.05",
        "--micro-batch-size", "32", "--lr", "5e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--disable-bias-linear", "--log-interval", "5",
        "--smoothing", "0", "--color-jitter", "0", "--train-crop-scale", "1", "--crop-pct", "1",
        "--num-workers", "0"]
ROUTERS = {
    "dense": [],
    "learned": ["--num-experts", "4", "--moe-router-type", "learned", "--moe-aux-loss-coeff", "1e-2"],
    "self": ["--num-experts", "4", "--moe-router-type", "self", "--moe-layer-freq", "2"],
    "random": ["--num-experts", "4", "--moe-router-type", "random"],
    "hash": ["--num-experts", "4", "--moe-router-type", "hash"],
    "routing-free": ["--num-experts", "4", "--moe-router-type", "routing-free", "--routing-free-rank", "8"],
}


@pytest.fixture(scope="module", autouse=True)
def fashion_mnist():
    from selfmoe.data.images import fetch_fashion_mnist

    try:
        fetch_fashion_mnist()
    except RuntimeError as e:  # no network and no cached package
        pytest.skip(str(e))


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_router_learns_fashion_mnist(router):
    out = pretrain_vit.main(TINY + ROUTERS[router] + ["--train-iters", "30", "--eval-interval", "30",
                                                      "--eval-iters", "4"])
    losses = [out["losses"][i] for i in range(1, 31)]
    assert losses[0] == pytest.approx(2.303, abs=0.25)  # ln 10: a fresh classifier is ~uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 0.35
    assert out["final_val_top-1"] > 0.25, out  # chance: 0.10 +- 0.027 (128 validation images)
    assert out["final_val_top-5"] >= out["final_val_top-1"]
    assert (out["routing_entropy"] is None) == (router == "dense")


def test_kill_and_resume_continues_the_identical_curve(tmp_path):
    """--exit-interval stops after saving; --load continues with the same batches (data position
    from the checkpoint, augmentation by position, 1 DataLoader worker) and the same losses."""
    flags = TINY + ROUTERS["self"] + ["--train-iters", "8", "--eval-iters", "0", "--num-workers", "1",
                                      "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--auto-augment",
                                      "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--drop-path", "0.1",
                                      "--micro-batch-size", "16", "--global-batch-size", "32"]
    full = pretrain_vit.main(flags)
    ck = ["--save", str(tmp_path / "ck"), "--save-interval", "4"]
    first = pretrain_vit.main(flags + ck + ["--exit-interval", "4"])
    assert sorted(first["losses"]) == [1, 2, 3, 4]
    second = pretrain_vit.main(flags + ck + ["--load", str(tmp_path / "ck")])
    assert sorted(second["losses"]) == [5, 6, 7, 8]
    for i in range(1, 9):
        assert {**first["losses"], **second["losses"]}[i] == pytest.approx(full["losses"][i], rel=1e-6), i


def _error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain_vit.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            Image.new("L", (28, 28), 40).save(tmp_path / split / c / "0.png")
    flags = TINY + ["--train-iters", "3", "--eval-iters", "0", "--data-path", str(tmp_path), "--micro-batch-size", "2"]
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"GIF89a but not really")
    assert _error(flags, capsys).endswith("train/b/1.png: cannot decode image (UnidentifiedImageError: "
                                          f"cannot identify image file '{tmp_path}/train/b/1.png')")
    assert "train/b/1.png: cannot decode" in _error(flags + ["--num-workers", "1"], capsys)  # from a worker
    out = pretrain_vit.main(flags + ["--skip-bad-images"])
    assert out["iteration"] == 3
    os.remove(tmp_path / "train" / "b" / "1.png")
    os.makedirs(tmp_path / "val" / "c")
    Image.new("L", (28, 28)).save(tmp_path / "val" / "c" / "0.png")
    assert "val: classes differ from the training split" in _error(flags, capsys)
    assert "--num-classes 2" in _error(flags[:] + ["--num-classes", "2", "--data-path", str(tmp_path / "val"),
                                                   str(tmp_path / "val")], capsys)
    assert _error(flags + ["--tokenizer-type", "GPT2BPETokenizer"], capsys) == \
        "error: --tokenizer-type has no meaning for pretrain_vit.py"
    assert "--patch-dim 5" in _error(TINY + ["--patch-dim", "5"], capsys)
    # the vision flags have domains too (TINY's --num-workers 0 is in range: data read in-process)
    assert _error(TINY + ["--smoothing", "1"], capsys) == "error: --smoothing must be in [0, 1) (got 1)"
    assert _error(TINY + ["--num-workers", "-1"], capsys) == "error: --num-workers must be >= 0 (got -1)"
    assert "--moe-layer-freq" in _error(TINY + ["--train-iters", "3"] + ROUTERS["self"][:4] + ["--moe-layer-freq", "[1,0,1]"],
                                        capsys)


@pytest.fixture(scope="module", params=["megatron", "deepspeed"])
def one_step_vit_checkpoint(request, tmp_path_factory):
    """(flags, checkpoint folder) of 1 iteration on a 2-class folder of 28x28 grey images, saved
    by the Megatron path or by DeepSpeed (each keeps the flags in its own checkpoint format)."""
    from PIL import Image

    root = tmp_path_factory.mktemp(f"vit-shape-{request.param}")
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / "images" / split / c)
            Image.new("L", (28, 28), 40).save(root / "images" / split / c / "0.png")
    flags = TINY + ["--num-classes", "2", "--data-path", str(root / "images"), "--micro-batch-size", "2",
                    "--eval-iters", "0", "--lr-warmup-iters", "0", "--load", str(root / "ck")]
    if request.param == "deepspeed":
        flags += ["--deepspeed", "--deepspeed-config", os.path.join(REPO, "examples", "deepspeed", "zero2.json"),
                  "--global-batch-size", "2"]
    pretrain_vit.main(flags + ["--train-iters", "1", "--save", str(root / "ck")])
    return flags, root / "ck"


@pytest.mark.parametrize("change, named", [
    (["--img-h", "56"], "--img-h 28 in the checkpoint but 56 now"),
    (["--img-w", "42"], "--img-w 28 in the checkpoint but 42 now"),
    (["--patch-dim", "7"], "--patch-dim 14 in the checkpoint but 7 now"),
    (["--num-classes", "3"], "--num-classes 2 in the checkpoint but 3 now"),
    (["--num-channels", "3"], "--num-channels 1 in the checkpoint but 3 now"),
    (["--vit-pool", "cls"], "--vit-pool mean in the checkpoint but cls now"),
])
def test_resume_with_another_image_geometry_or_head_is_one_line_naming_the_flag(change, named, one_step_vit_checkpoint,
                                                                                  capsys):
    """These flags shape the model without being config fields: refused before the model is built."""
    flags, ckpt = one_step_vit_checkpoint
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pretrain_vit.main(flags + ["--train-iters", "2"] + change)
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert err.splitlines() == [f"error: cannot resume from {ckpt / 'iter_0000001'}: the model differs: {named}"]
    assert "parameters:" not in out
