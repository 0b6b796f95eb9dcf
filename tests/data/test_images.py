"""Image readers and the sample stream: ImageFolder == saved HF dataset, order/augmentation fixed by
(seed, position) whatever the worker count, resumable; bad input named in one line."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from selfmoe.data.images import (FolderSource, HFSource, ImageClassificationDataset, ImageDataError,
                                 build_transforms, check_labels, check_same_classes, open_sources)
from selfmoe.training.vit import VIT_DEMO_DEFAULTS, add_vision_args

CLASSES = ("cat", "dog", "fox")


def make_folder(root, per_class=3, size=8, seed=0):
    """root/{train,val}/<class>/<i>.png with random pixels; returns the list of (path, label) in
    torchvision's order (sorted classes, sorted files)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val"):
        out[split] = []
        for label, name in enumerate(CLASSES):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(per_class):
                path = str(root / split / name / f"{i}.png")
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
                out[split].append((path, label))
    return out


def vision_args(**kw):
    p = add_vision_args(argparse.ArgumentParser())
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args([])
    for k, v in {**VIT_DEMO_DEFAULTS, "img_h": 8, "img_w": 8, "num_channels": 3, **kw}.items():
        setattr(args, k, v)
    return args


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return root, make_folder(root)


def test_imagefolder_and_hf_dataset_give_the_same_samples(folder, tmp_path):
    import datasets

    root, files = folder
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    dd = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [p for p, _ in files[key]], "label": [y for _, y in files[key]]}, features=features)
        for split, key in (("train", "train"), ("validation", "val"))})
    dd.save_to_disk(str(tmp_path / "hf"))
    f_train, f_val = open_sources([str(root)])
    h_train, h_val = open_sources([str(tmp_path / "hf")])
    assert isinstance(h_train, HFSource) and isinstance(f_train, FolderSource)
    assert f_train.classes == h_train.classes == list(CLASSES) and len(f_train) == len(h_train) == 9
    for i in range(len(f_train)):
        (a, ya), (b, yb) = f_train.load(i), h_train.load(i)
        assert ya == yb == files["train"][i][1]
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # through the same augmentation pipeline, position by position
    args = vision_args()
    t = build_transforms(args, True)
    fa = ImageClassificationDataset(f_val, t, seed=3, shuffle=True)
    hb = ImageClassificationDataset(h_val, t, seed=3, shuffle=True)
    for p in range(12):
        xa, ya, _ = fa.sample(p)
        xb, yb, _ = hb.sample(p)
        assert ya == yb and torch.equal(xa, xb)


def test_stream_is_a_function_of_seed_and_position(folder):
    """Worker count and where an iterator starts (resume) do not change the batches; epochs reshuffle;
    DP ranks read disjoint positions; Mixup targets are deterministic too."""
    from timm.data import Mixup

    root, _ = folder
    train, _ = open_sources([str(root)])
    args = vision_args()

    def ds(workers):
        return ImageClassificationDataset(train, build_transforms(args, True), seed=5, shuffle=True,
                                          mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=3),
                                          num_workers=workers)

    it0 = ds(0).micro_batches(2, 0, 1, 0)
    ref = [next(it0) for _ in range(8)]  # 16 positions: crosses the 9-image epoch boundary
    it2 = ds(2).micro_batches(2, 0, 1, 0)
    for r in ref:
        b = next(it2)
        assert all(torch.equal(r[k], b[k]) for k in ("images", "labels", "targets"))
    resumed = ds(1).micro_batches(2, 0, 1, consumed_samples=10)
    assert torch.equal(next(resumed)["images"], ref[5]["images"])
    d = ds(0)
    epoch0, epoch1 = [d.index(p) for p in range(9)], [d.index(p) for p in range(9, 18)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(9)) and epoch0 != epoch1
    r0, r1 = d.micro_batches(2, 0, 2, 0), d.micro_batches(2, 1, 2, 0)
    assert torch.equal(next(r0)["labels"], ref[0]["labels"]) and torch.equal(next(r1)["labels"], ref[1]["labels"])
    assert ref[0]["targets"].shape == (2, 3) and torch.allclose(ref[0]["targets"].sum(1), torch.ones(2))


def test_repeated_augmentation_shows_each_image_n_times_differently(folder):
    root, _ = folder
    train, _ = open_sources([str(root)])
    d = ImageClassificationDataset(train, build_transforms(vision_args(), True), seed=5, shuffle=True, repeats=3)
    idx = [d.index(p) for p in range(9)]
    assert idx[0] == idx[1] == idx[2] and len(set(idx)) == 3
    assert not torch.equal(d.sample(0)[0], d.sample(1)[0])


def test_bad_input_is_named(tmp_path):
    root = tmp_path / "d"
    make_folder(root, per_class=1)
    (root / "train" / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(ImageDataError, match=r"notes.txt: not an image file"):
        open_sources([str(root)])
    skipping = FolderSource(str(root / "train"), skip_bad=True)
    assert len(skipping) == 3 and skipping.skipped_files[0].endswith("notes.txt")
    os.remove(root / "train" / "dog" / "notes.txt")
    os.makedirs(root / "train" / "emu")
    with pytest.raises(ImageDataError, match=r"train/emu: empty class folder"):
        open_sources([str(root)])
    os.rmdir(root / "train" / "emu")
    os.makedirs(root / "val" / "emu")
    Image.new("RGB", (8, 8)).save(root / "val" / "emu" / "0.png")
    train, val = open_sources([str(root)])
    with pytest.raises(ImageDataError, match=r"val: classes differ from the training split"):
        check_same_classes(train, val)
    with pytest.raises(ImageDataError, match=r"val/fox: class 'fox' has label 3, out of range for --num-classes 3"):
        check_labels(val, 3)
    # corrupt and truncated files fail when decoded, naming the file; with skip_bad they are replaced and counted
    good = root / "train" / "cat" / "0.png"
    (root / "train" / "cat" / "1.png").write_bytes(b"not a png at all")
    (root / "train" / "cat" / "2.png").write_bytes(good.read_bytes()[:-30])
    src = FolderSource(str(root / "train"))
    t = build_transforms(vision_args(), False)
    for i, name in ((1, "1.png"), (2, "2.png")):
        with pytest.raises(ImageDataError, match=rf"cat/{name}: cannot decode image"):
            ImageClassificationDataset(src, t, seed=0, shuffle=False).sample(i)
    d = ImageClassificationDataset(src, t, seed=0, shuffle=False, skip_bad=True)
    batch = next(d.micro_batches(5, 0, 1, 0))
    assert d.skipped == 3 and batch["labels"].tolist() == [0, 1, 1, 1, 2]  # 1.png and 2.png -> the next readable


def test_hf_labels_out_of_range_are_named(tmp_path):
    import datasets

    img = Image.new("RGB", (4, 4))
    ds = datasets.Dataset.from_dict({"image": [img, img], "label": [0, 7]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "hf"))
    train, _ = open_sources([str(tmp_path / "hf")])
    with pytest.raises(ImageDataError, match=r"\[train\] row 1: label 7 out of range \[0, 5\)"):
        check_labels(train, 5)
