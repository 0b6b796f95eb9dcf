"""Image classification data: readers, DeiT augmentation in DataLoader workers, resumable order.

Readers (each gives a PIL image and an integer label per index, plus the class names):
- `FolderSource`: the ImageFolder layout, `<split>/<class>/<image>` (torchvision's scan);
- `HFSource`: a Hugging Face `datasets` dataset saved with `save_to_disk` (image + label columns);
- `ArraySource`: uint8 arrays in memory (the embedded Fashion-MNIST demo, `fashion_mnist()`).

Order and augmentation are pure functions of (seed, global sample position): position p of the
training stream is sample `perm_e[(p mod N) // repeats]` of epoch e = p // N (a fresh permutation
per epoch, DeiT's repeated augmentation when repeats > 1), augmented with RNGs seeded from
(seed, p). So the data order does not depend on the number of workers, and a run resumed from a
consumed-samples count (what checkpoints store) sees exactly the batches it would have seen.
Positions are laid out over data-parallel ranks as in Megatron-LM (selfmoe.training.data).

Bad input is an `ImageDataError` whose message names the file: a non-image file, an empty class
folder, train/val class mismatch and labels >= --num-classes before training; an undecodable or
truncated image when it is read (or, with skip_bad, replaced by the next readable sample and counted).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import random
import tarfile
import urllib.request

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FASHION_MNIST_ROOT = os.path.join(REPO_ROOT, "data", "demo", "fashion-mnist")
FASHION_MNIST_DEB = "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
FASHION_MNIST_URL = "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/" + FASHION_MNIST_DEB
FASHION_MNIST_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


class ImageDataError(ValueError):
    """Bad image data; str() is one line naming the file (or folder / row)."""


# ---------------------------------------------------------------------------------------------
# readers

class FolderSource:
    """`root/<class>/<file>`: classes are the sorted sub-folders (torchvision's ImageFolder rules)."""

    def __init__(self, root: str, mode: str = "RGB", skip_bad: bool = False):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        if not os.path.isdir(root):
            raise ImageDataError(f"{root}: no such image folder")
        self.root, self.mode = root, mode
        try:
            self.classes, class_to_idx = find_classes(root)
        except FileNotFoundError:
            raise ImageDataError(f"{root}: no class folders (expected {root}/<class>/<image>)") from None
        self.skipped_files: list[str] = []

        def valid(path):
            if os.path.basename(path).startswith("."):
                return False
            if path.lower().endswith(IMG_EXTENSIONS):
                return True
            if not skip_bad:
                raise ImageDataError(f"{path}: not an image file (extensions: {' '.join(IMG_EXTENSIONS)})")
            self.skipped_files.append(path)
            return False

        self.samples = make_dataset(root, class_to_idx, is_valid_file=valid, allow_empty=True)
        counts = np.bincount([y for _, y in self.samples], minlength=len(self.classes))
        for name, n in zip(self.classes, counts):
            if n == 0:
                raise ImageDataError(f"{os.path.join(root, name)}: empty class folder (no image files)")

    def __len__(self):
        return len(self.samples)

    def label(self, i: int) -> int:
        return self.samples[i][1]

    def name(self, i: int) -> str:
        return self.samples[i][0]

    def load(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            img.load()  # decodes now: a truncated or corrupt file fails here, not later
            return img.convert(self.mode), label


class HFSource:
    """One split of a `datasets` dataset saved with save_to_disk: an image column and a label column."""

    IMAGE_COLUMNS, LABEL_COLUMNS = ("image", "img", "pixel_values"), ("label", "labels", "fine_label")

    def __init__(self, path: str, split: str, mode: str = "RGB"):
        import datasets

        self.path, self.split, self.mode = path, split, mode
        dd = datasets.load_from_disk(path)
        if isinstance(dd, datasets.DatasetDict):
            if split not in dd:
                raise ImageDataError(f"{path}: no split {split!r} (has {', '.join(dd)})")
            ds = dd[split]
        else:
            ds = dd
        self.image_col = next((c for c in self.IMAGE_COLUMNS if c in ds.column_names), None)
        self.label_col = next((c for c in self.LABEL_COLUMNS if c in ds.column_names), None)
        if self.image_col is None or self.label_col is None:
            raise ImageDataError(f"{path} [{split}]: needs an image column ({'/'.join(self.IMAGE_COLUMNS)}) and a "
                                 f"label column ({'/'.join(self.LABEL_COLUMNS)}); has {', '.join(ds.column_names)}")
        feat = ds.features[self.label_col]
        self.labels = np.asarray(ds[self.label_col], dtype=np.int64)
        self.classes = list(feat.names) if hasattr(feat, "names") else [str(i) for i in range(int(self.labels.max()) + 1)]
        self.ds = ds.cast_column(self.image_col, datasets.Image(decode=False))  # decode in load(), to name bad rows
        if len(self.labels) and self.labels.min() < 0:
            raise ImageDataError(f"{self.name(int(self.labels.argmin()))}: negative label {self.labels.min()}")

    def __len__(self):
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def name(self, i: int) -> str:
        return f"{self.path} [{self.split}] row {i}"

    def load(self, i: int):
        from PIL import Image

        cell = self.ds[i][self.image_col]
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if data is None and isinstance(cell, dict) and cell.get("path"):
            with open(cell["path"], "rb") as f:
                data = f.read()
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert(self.mode), int(self.labels[i])


class ArraySource:
    """uint8 images [N, H, W] (or [N, H, W, C]) and labels [N] already in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes, name: str = "array"):
        self.images, self.labels, self.classes, self._name = images, labels.astype(np.int64), list(classes), name

    def __len__(self):
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def name(self, i: int) -> str:
        return f"{self._name}[{i}]"

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i]), int(self.labels[i])


def check_labels(source, num_classes: int) -> None:
    """Every label in [0, num_classes): else an ImageDataError naming the first bad sample."""
    labels = source.labels if hasattr(source, "labels") else np.array([y for _, y in source.samples])
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if len(bad) and not isinstance(source, FolderSource):
        i = int(bad[0])
        raise ImageDataError(f"{source.name(i)}: label {source.label(i)} out of range [0, {num_classes})")
    if len(source.classes) > num_classes:  # a folder's label is its class index: name the folder
        name = source.classes[num_classes]
        where = os.path.join(source.root, name) if isinstance(source, FolderSource) else repr(name)
        raise ImageDataError(f"{where}: class {name!r} has label {num_classes}, out of range for --num-classes "
                             f"{num_classes} ({len(source.classes)} classes found)")


def check_same_classes(train, valid) -> None:
    """Train and validation must name the same classes in the same order (the labels are indices)."""
    if list(train.classes) != list(valid.classes):
        extra = sorted(set(valid.classes) - set(train.classes)) or sorted(set(train.classes) - set(valid.classes))
        where = valid.root if isinstance(valid, FolderSource) else valid.name(0).rsplit(" row", 1)[0]
        raise ImageDataError(f"{where}: classes differ from the training split's "
                             f"({len(valid.classes)} vs {len(train.classes)}; e.g. {extra[:3] or 'order'})")


def open_sources(data_path: list[str], mode: str = "RGB", skip_bad: bool = False):
    """(train, valid) readers for Megatron-LM's --data-path: `TRAIN VAL` folders, a root holding
    train/ and val/ (ImageNet's layout), or a saved HF dataset (splits train and validation/val/test)."""
    if len(data_path) == 2:
        return FolderSource(data_path[0], mode, skip_bad), FolderSource(data_path[1], mode, skip_bad)
    if len(data_path) != 1:
        raise ImageDataError(f"--data-path takes TRAIN VAL folders or one root, got {len(data_path)} paths")
    root = data_path[0]
    if not os.path.isdir(root):
        raise ImageDataError(f"{root}: no such directory")
    if os.path.exists(os.path.join(root, "dataset_dict.json")):
        import json

        with open(os.path.join(root, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        val = next((s for s in ("validation", "val", "valid", "test") if s in splits), None)
        if "train" not in splits or val is None:
            raise ImageDataError(f"{root}: a saved dataset needs a train and a validation/val/test split, has {splits}")
        return HFSource(root, "train", mode), HFSource(root, val, mode)
    val = next((s for s in ("val", "validation") if os.path.isdir(os.path.join(root, s))), None)
    if not os.path.isdir(os.path.join(root, "train")) or val is None:
        raise ImageDataError(f"{root}: expected {root}/train/<class>/* and {root}/val/<class>/* "
                             f"(or a datasets.save_to_disk directory)")
    return FolderSource(os.path.join(root, "train"), mode, skip_bad), FolderSource(os.path.join(root, val), mode, skip_bad)


# ---------------------------------------------------------------------------------------------
# the embedded demo: Fashion-MNIST from Debian's dataset-fashion-mnist package

def _read_ar_member(deb_path: str, prefix: str) -> bytes:
    """The first member of a .deb (an `ar` archive) whose name starts with `prefix`."""
    with open(deb_path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{deb_path}: not a Debian package")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise RuntimeError(f"{deb_path}: no {prefix}* member")
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith(prefix):
                return data


def _read_idx(data: bytes) -> np.ndarray:
    """An IDX file (LeCun's MNIST format): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fetch_fashion_mnist(root: str = FASHION_MNIST_ROOT) -> str:
    """Download Debian's dataset-fashion-mnist .deb once (checked by sha256) and unpack its four
    IDX files into `root` without installing it; returns `root`."""
    files = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    if all(os.path.exists(os.path.join(root, f)) for f in files):
        return root
    os.makedirs(root, exist_ok=True)
    deb = os.path.join(root, FASHION_MNIST_DEB)
    if not os.path.exists(deb):
        tmp = deb + f".tmp{os.getpid()}"
        try:
            urllib.request.urlretrieve(FASHION_MNIST_URL, tmp)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise RuntimeError(f"could not download {FASHION_MNIST_URL} ({e}); put {FASHION_MNIST_DEB} "
                               f"(apt-get download dataset-fashion-mnist) into {root}") from None
        os.replace(tmp, deb)
    h = hashlib.sha256()
    with open(deb, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != FASHION_MNIST_SHA256:
        raise RuntimeError(f"{deb}: sha256 mismatch; delete it to download again")
    with tarfile.open(fileobj=io.BytesIO(_read_ar_member(deb, "data.tar"))) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if base in files:
                tmp = os.path.join(root, base + f".tmp{os.getpid()}")
                with open(tmp, "wb") as out:
                    out.write(tar.extractfile(member).read())
                os.replace(tmp, os.path.join(root, base))
    return root


def fashion_mnist(root: str = FASHION_MNIST_ROOT):
    """(train, valid) ArraySources: Fashion-MNIST's 60k/10k 28x28 grayscale images, 10 classes."""
    fetch_fashion_mnist(root)

    def load(prefix):
        with gzip.open(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")) as f:
            x = _read_idx(f.read())
        with gzip.open(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")) as f:
            y = _read_idx(f.read())
        return ArraySource(x, y, FASHION_MNIST_CLASSES, name=f"fashion-mnist/{prefix}")

    return load("train"), load("t10k")


# ---------------------------------------------------------------------------------------------
# the dataset the trainer reads

@contextlib.contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch (CPU) for one sample's augmentation; restore them afterwards.

    (torch's CPU generator directly: torch.manual_seed would also queue CUDA seeding, 5 ms a call.)
    """
    gen = torch.default_generator
    py, npy, pt = random.getstate(), np.random.get_state(), gen.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    gen.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        gen.set_state(pt)


def _mix(*xs: int) -> int:
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1, np.uint64)[0] >> 1)


class ImageClassificationDataset:
    """The sample stream over one split: `sample(p)` for a global position p (see the module doc).

    shuffle: a fresh permutation per epoch (training); else positions wrap over the split in order.
    mixup: a timm Mixup applied per micro-batch (soft `target` [b, C] next to the hard `label`).
    """

    def __init__(self, source, transform, seed: int, shuffle: bool, repeats: int = 1, mixup=None,
                 skip_bad: bool = False, num_workers: int = 0):
        self.source, self.transform, self.seed, self.shuffle = source, transform, seed, shuffle
        self.repeats, self.mixup, self.skip_bad, self.num_workers = max(1, repeats), mixup, skip_bad, num_workers
        self._perms: dict = {}
        self.skipped = 0  # bad samples replaced (skip_bad), counted as batches arrive

    def __len__(self):
        return len(self.source)

    def index(self, p: int) -> int:
        n = len(self.source)
        epoch, j = divmod(p, n)
        if not self.shuffle:
            return j
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))}
        return int(self._perms[epoch][j // self.repeats])

    def sample(self, p: int) -> tuple[torch.Tensor, int, int]:
        """(image tensor [C, H, W], label, bad samples skipped) at global position p."""
        i, skipped = self.index(p), 0
        while True:
            try:
                img, label = self.source.load(i)
                break
            except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), ...
                if not self.skip_bad:
                    raise ImageDataError(f"{self.source.name(i)}: cannot decode image ({type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
                skipped += 1
                if skipped >= len(self.source):
                    raise ImageDataError(f"{self.source.name(i)}: no readable image in the split") from None
                i = (i + 1) % len(self.source)
        with seeded(_mix(self.seed, p, 1)):
            x = self.transform(img)
        return x, label, skipped

    def collate(self, positions: list[int]) -> dict:
        samples = [self.sample(p) for p in positions]
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
        batch = {"images": images, "labels": labels, "skipped": torch.tensor(sum(s[2] for s in samples))}
        if self.mixup is not None:
            with seeded(_mix(self.seed, positions[0], 2)):
                batch["images"], batch["targets"] = self.mixup(images.clone(), labels.clone())
        return batch

    def micro_batches(self, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                      wrap: bool = False):
        """This rank's micro-batches from `consumed_samples` on (the trainer's data iterator hook)."""
        return ImageBatchIterator(self, micro_batch_size, dp_rank, dp_size, consumed_samples, wrap)


class _Positions(torch.utils.data.IterableDataset):
    """Yields collated micro-batches; worker w of W builds micro-batches w, w+W, ... (DataLoader
    returns them round-robin, so the order is the same for any number of workers)."""

    def __init__(self, dataset, mbs, dp_rank, dp_size, consumed, limit):
        self.dataset, self.mbs, self.dp_rank, self.dp_size, self.consumed, self.limit = (
            dataset, mbs, dp_rank, dp_size, consumed, limit)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.mbs * self.dp_size
        m = wid
        while True:
            start = self.consumed + m * step + self.dp_rank * self.mbs
            if self.limit is not None and start + self.mbs > self.limit:
                return
            yield self.dataset.collate(list(range(start, start + self.mbs)))
            m += nw


class ImageBatchIterator:
    """Micro-batches (dict of images [b, C, H, W], labels [b], targets [b, C] with mixup) for one
    data-parallel rank, decoded and augmented in `dataset.num_workers` DataLoader worker processes."""

    def __init__(self, dataset, mbs, dp_rank, dp_size, consumed_samples, wrap):
        self.dataset = dataset
        limit = None if (wrap or dataset.shuffle) else len(dataset)  # training streams over epochs
        nw = dataset.num_workers
        self.loader = iter(torch.utils.data.DataLoader(
            _Positions(dataset, mbs, dp_rank, dp_size, consumed_samples, limit), batch_size=None,
            num_workers=nw, prefetch_factor=2 if nw else None, persistent_workers=False,
            # workers start from a clean forkserver, not a fork of the trainer: forking a process that
            # holds gloo/NCCL threads and in-process state can crash the child (seen in the tests)
            multiprocessing_context="forkserver" if nw else None,
            # its own generator: DataLoader draws its workers' base seed from it, which would otherwise
            # consume the global torch RNG (drop path) whenever an iterator starts (resume, validation)
            generator=torch.Generator().manual_seed(dataset.seed)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.loader)
        self.dataset.skipped += int(batch.pop("skipped"))
        return batch


def build_transforms(args, training: bool):
    """timm's DeiT training transform (RandomResizedCrop, flip, RandAugment/AutoAugment, color
    jitter, random erasing) or its evaluation transform (resize, center crop by --crop-pct)."""
    from timm.data import create_transform

    mean, std = ((0.5,), (0.5,)) if args.num_channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    size = (args.img_h, args.img_w)
    if training:
        return create_transform(size, is_training=True, scale=(args.train_crop_scale, 1.0), hflip=args.hflip,
                                color_jitter=args.color_jitter, auto_augment=args.auto_augment,
                                interpolation=args.train_interpolation, mean=mean, std=std, re_prob=args.reprob,
                                re_mode="pixel", re_count=1)
    return create_transform(size, is_training=False, interpolation="bicubic", mean=mean, std=std,
                            crop_pct=args.crop_pct)
