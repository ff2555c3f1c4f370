"""The datasets: one table of per-dataset facts, and their readers: MNIST's IDX files here (gzipped
or not, as Debian's Fashion-MNIST is), CIFAR-10, SVHN and ImageNet's folders through torchvision.
Images come out in [0, 1] pixel space, where the noise of randomized smoothing lives.
"""

import contextlib
import gzip
import hashlib
import os
import stat
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    """A paper setting's training hyperparameters (Section 5.1, Appendix C); SGD with momentum 0.9,
    weight decay 5e-4 and batch 64 come from the authors' code for CIFAR-10, SVHN and MNIST; the
    ImageNet recipe takes them too (the authors released no ImageNet code)."""

    epochs: int
    lr: float
    milestones: tuple  # epochs at which the lr decays x0.1
    k: int
    lbd: dict  # sigma -> lambda; a sigma the paper did not use takes the nearest one's
    gamma: float = 8.0
    beta: float = 16.0
    augment: bool = False  # random crop (pad 4) and horizontal flip
    dynamic_lbd: tuple = ()  # sigmas where lambda = 0 until the first lr decay (footnote 5)
    grad_clip: float = 0.0
    train_subset: int = 0
    cert: dict = field(default_factory=dict)  # overrides of certify.CERT, skip and max


@dataclass(frozen=True)
class DatasetFacts:
    """What the code needs to know of a dataset; a record, not a torch Dataset."""

    classes: int
    shape: tuple  # (C, H, W)
    mean: tuple  # per-channel statistics of the training set, applied inside the model
    std: tuple
    arch: str  # the paper's network
    recipe: Recipe
    skip: int = 20  # the certification protocol: every skip-th test image from the first, ...
    max: int = 500  # ... at most this many


QUICK_CERT = dict(n=4000, skip=100, max=100)  # the quick run: n = 4,000 caps R at 0.73 (sigma 0.25)
PAPER = dict(epochs=440, lr=0.01, milestones=(200, 400), k=16)
LBD_16 = {0.25: 16, 0.5: 16, 1.0: 16}  # MNIST's lambda at each sigma
GRAY, RGB = dict(classes=10, shape=(1, 28, 28)), dict(classes=10, shape=(3, 32, 32))
DATASETS = {
    "mnist": DatasetFacts(
        **GRAY, mean=(0.1307,), std=(0.3081,), arch="lenet", recipe=Recipe(**PAPER, lbd=LBD_16)
    ),
    "cifar10": DatasetFacts(
        **RGB,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        arch="resnet110",  # Cohen's
        recipe=Recipe(**PAPER, lbd={0.25: 12, 0.5: 4, 1.0: 12}, dynamic_lbd=(1.0,), augment=True),
    ),
    "svhn": DatasetFacts(
        **RGB,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        arch="resnet110",
        recipe=Recipe(**PAPER, lbd={0.25: 12, 0.5: 12}, augment=True),
    ),
    # Every 100th of the 50,000 validation images, as Cohen et al. certify them: ImageFolder sorts
    # them by class, so every 20th would cover only classes 0-199.
    "imagenet": DatasetFacts(
        1000,
        (3, 224, 224),
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "resnet50",
        Recipe(120, 0.1, (30, 60, 90), 2, {0.25: 6, 0.5: 3, 1.0: 3}, augment=True),
        skip=100,
    ),
    # Not in the paper: the quick, offline first run, with MNIST's loss settings and the gradient
    # norm clipped at 5 (Algorithm 1 allows any first-order method; the README lists it).
    "fashion-mnist": DatasetFacts(
        **GRAY,
        mean=(0.2860,),
        std=(0.3530,),
        arch="lenet",
        recipe=Recipe(1, 0.01, (), 16, LBD_16, grad_clip=5.0, train_subset=30_000, cert=QUICK_CERT),
    ),
}


def dataset_facts(name):
    """DATASETS[name], or a ValueError that names the choices."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


UMASK = os.umask(0o22)
os.umask(UMASK)


def atomic_write(path, content):
    """Write content (str, bytes, or a function that writes to a binary file) to a temporary file
    beside path, flush it to disk, rename it to path: a crash leaves the old file or the new one,
    an error (a full disk) raises OSError with the old file as it was. A symlink is replaced."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:  # closed here, so that a failed flush raises
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would have made it
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def read_regular(path, what):
    """The bytes of the regular file at path: opened without blocking, so that a FIFO or a device
    there is refused (ValueError naming `what`) instead of hanging."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"no {what} at {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path} ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        kind = "a folder" if os.path.isdir(path) else "not a regular file"
        raise ValueError(f"{path} is {kind}, not a {what}")
    with os.fdopen(fd, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- in-memory datasets
class TensorImages:
    """A small image dataset held as uint8 tensors x (N, C, H, W) and labels y (N,)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].float() / 255, int(self.y[i])


def checked(x, y, name, where):
    """TensorImages(x, y), once the shapes and labels fit the table, else one clear ValueError."""
    facts = DATASETS[name]
    if tuple(x.shape[1:]) != facts.shape or len(x) != len(y):
        raise ValueError(
            f"{where} holds {len(x)} images of shape {tuple(x.shape[1:])} and {len(y)} labels, "
            f"not {name}'s {facts.shape}, one label each; replace the files"
        )
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < facts.classes:
        raise ValueError(f"{where} has labels outside 0..{facts.classes - 1}; replace the files")
    return TensorImages(x, y.long())


def read_idx(path):
    """An IDX file (MNIST's format), gzipped or not, as a uint8 tensor."""
    try:
        gz = path.endswith(".gz")
        with (gzip.open if gz else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip (BadGzipFile is an OSError), or cut
        raise ValueError(
            f"{path} is not a complete {'gzip ' * gz}file ({type(e).__name__}); download it again"
        ) from None
    ndim = data[3] if len(data) >= 4 and data[:3] == b"\0\0\x08" else 0  # magic: uint8, ndim
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]) if len(data) >= 4 + 4 * ndim else ()
    if not ndim or len(data) != 4 + 4 * ndim + torch.Size(shape).numel():
        raise ValueError(f"{path} is not a complete uint8 IDX file; download it again")
    if 0 in shape:
        raise ValueError(f"{path} holds no images (shape {shape}); download it again")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(*shape)


IDX = {
    "mnist": ("MNIST", None),
    "fashion-mnist": ("FashionMNIST", "/usr/share/datasets/fashion-mnist"),
}


def load_idx(name, data_dir, train):
    """MNIST or Fashion-MNIST from the first place that holds any of its files: torchvision's layout
    DATA_DIR/<Name>/raw, then Debian's dataset-fashion-mnist folder; else torchvision's download.
    Train and test come from the same place."""
    folder, system_dir = IDX[name]
    places = [os.path.join(data_dir, folder, "raw")] + ([system_dir] if system_dir else [])
    names = [f"{p}-{s}-ubyte" for p in ("train", "t10k") for s in ("images-idx3", "labels-idx1")]
    for place in places:
        found = {
            f: [p for p in (f, f + ".gz") if os.path.exists(os.path.join(place, p))] for f in names
        }
        if not any(found.values()):
            continue
        if missing := [f for f in names if not found[f]]:
            raise ValueError(f"{place} lacks {', '.join(missing)}; put all four IDX files there")
        x, y = (
            read_idx(os.path.join(place, found[f][0])) for f in (names[:2] if train else names[2:])
        )
        return checked(x.unsqueeze(1), y, name, place)  # (N, 28, 28) -> (N, 1, 28, 28)
    import torchvision

    try:
        with contextlib.redirect_stdout(sys.stderr):
            for split in (True, False):
                getattr(torchvision.datasets, folder)(data_dir, train=split, download=True)
    except Exception:
        where = places[0] + (" or run `apt-get install dataset-fashion-mnist`" * bool(system_dir))
        raise ValueError(f"{name} was not found nor downloaded; put it in {where}") from None
    return load_idx(name, data_dir, train)


def load_torchvision(name, data_dir, train):
    """CIFAR-10 (DATA_DIR/cifar-10-batches-py) or SVHN (DATA_DIR/{train,test}_32x32.mat) through
    torchvision, which checks the files' MD5 sums; missing or corrupt files are downloaded."""
    from torchvision.datasets import CIFAR10, SVHN

    cifar = name == "cifar10"
    cls = CIFAR10 if cifar else SVHN
    split = dict(train=train) if cifar else dict(split="train" if train else "test")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            try:
                ds = cls(data_dir, **split)
            except RuntimeError:  # missing, or not the official file
                ds = cls(data_dir, download=True, **split)
    except Exception as e:
        raise ValueError(
            f"{name} is missing from {data_dir} or corrupt, and could not be downloaded "
            f"({type(e).__name__}); put torchvision's files of {name} there"
        ) from None
    x = torch.as_tensor(ds.data)  # CIFAR's (N, H, W, C) -> (N, C, H, W); SVHN's is (N, C, H, W)
    x, y = (x.permute(0, 3, 1, 2).contiguous(), ds.targets) if cifar else (x, ds.labels)
    return checked(x, torch.as_tensor(y), name, data_dir)


def load_dataset(name, data_dir, train, augment=True):
    """The dataset as images in [0, 1]: TensorImages for the small ones, an ImageFolder for
    ImageNet. A missing or corrupt dataset raises ValueError with one sentence saying what to do."""
    dataset_facts(name)
    if name in IDX:
        return load_idx(name, data_dir, train)
    if name in ("cifar10", "svhn"):
        return load_torchvision(name, data_dir, train)
    import torchvision
    import torchvision.transforms as T

    path = os.path.join(data_dir, "train" if train else "val")
    if not os.path.isdir(path):
        raise ValueError(
            f"no ImageNet folder at {path}: --data-dir needs train/ and val/, a folder per class"
        )
    crop = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train and augment else None
    crop = crop or [T.Resize(256), T.CenterCrop(224)]  # the small sets: crop_flip, on the device
    return torchvision.datasets.ImageFolder(path, T.Compose([*crop, T.ToTensor()]))


def labels(dataset):
    """The labels of a TensorImages or an ImageFolder, without reading an image."""
    return dataset.y.tolist() if isinstance(dataset, TensorImages) else list(dataset.targets)


def fingerprint(dataset, count=None):
    """sha256 of a dataset's images and labels (of an ImageFolder's file names and labels), of its
    first `count` (default: all), so that results certified on one test set are never read as
    another's, and a run is never resumed on other training images."""
    h = hashlib.sha256()
    if isinstance(dataset, TensorImages):
        h.update(dataset.x[:count].cpu().contiguous().numpy().tobytes())
        h.update(dataset.y[:count].cpu().numpy().tobytes())
    else:
        for path, label in dataset.samples[:count]:
            h.update(f"{os.path.relpath(path, dataset.root)}\t{label}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- batches on the device
def crop_flip(x, pad=4):
    """Random crop with zero padding and random horizontal flip, per image, on x's device."""
    b, C, H, W = x.shape
    arange = lambda n, shape: torch.arange(n, device=x.device).view(shape)
    i0 = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=x.device)
    j0 = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=x.device)
    flip = torch.rand(b, 1, 1, 1, device=x.device) < 0.5
    cols = arange(W, (1, 1, 1, W))
    cols = j0 + torch.where(flip, W - 1 - cols, cols)  # (b, 1, 1, W), reversed where flipped
    rows = i0 + arange(H, (1, 1, H, 1))  # (b, 1, H, 1)
    x_pad = F.pad(x, (pad, pad, pad, pad))
    return x_pad[arange(b, (b, 1, 1, 1)), arange(C, (1, C, 1, 1)), rows, cols]  # (b, C, H, W)


def batches(data, batch, epoch, seed, augment, device, rank=0, world=1):
    """(x, y) minibatches on `device` for one epoch, this process's shard. A TensorImages sits on
    the device whole, shuffled by (seed, epoch): a resumed run sees the same order. Every rank takes
    as many steps (else DDP's all-reduce would hang): the tail that does not split is dropped."""
    if isinstance(data, TensorImages):
        shuffle = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(data), generator=shuffle)
        perm = perm[: len(perm) // world * world][rank::world].to(device)
        for s in range(0, len(perm), batch):
            idx = perm[s : s + batch]
            x = data.x[idx].float() / 255
            yield (crop_flip(x) if augment else x), data.y[idx]
    else:
        if hasattr(data.sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            data.sampler.set_epoch(epoch)
        for x, y in data:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
