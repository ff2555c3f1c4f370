"""The paper's networks: LeNet (MNIST), ResNet-110 (CIFAR-10, SVHN), ResNet-50 (ImageNet).

Inputs are images in [0, 1] pixel space, where the Gaussian noise of randomized smoothing lives;
each model normalises them (per-channel mean and std) as its first step. The statistics are
non-persistent buffers, so the state dicts carry exactly the parameter names of the MACER authors'
released LeNet and ResNet-110, and of torchvision's ResNet-50.
"""
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "svhn": 10, "imagenet": 1000}
INPUT_SHAPE = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
               "svhn": (3, 32, 32), "imagenet": (3, 224, 224)}
STATS = {  # per-channel (mean, std) of each training set; CIFAR-10's are Cohen et al.'s
    "mnist": ([0.1307], [0.3081]),
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "svhn": ([0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
DEFAULT_ARCH = {"mnist": "lenet", "fashion-mnist": "lenet", "cifar10": "resnet110", "svhn": "resnet110",
                "imagenet": "resnet50"}


class Normalize(nn.Module):
    """(x - mean) / std per channel, applied after the noise. No state-dict entries."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class LeNet(nn.Module):
    """conv 1->20 5x5, max-pool, conv 20->50 5x5, max-pool, fc 800->500, fc 500->10."""

    def __init__(self, normalize=None, num_classes=10):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(self.normalize(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))  # (b, 50, 4, 4) -> (b, 800)
        return self.fc2(x)


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:  # 1x1-conv shortcut, as in the authors' code
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al.: 3 stages of (depth - 2) / 6 BasicBlocks, widths 16/32/64."""

    def __init__(self, depth=110, normalize=None, num_classes=10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 56, 110, ...), not {depth}")
        blocks = (depth - 2) // 6
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, c_in = [16, 32, 64], 16
        for s, w in enumerate(widths):
            layer = [BasicBlock(c_in if i == 0 else w, w, 2 if (s > 0 and i == 0) else 1) for i in range(blocks)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
            c_in = w
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))  # global average pool: (b, 64, 8, 8) -> (b, 64)


class ResNet50(torchvision.models.ResNet):
    """torchvision's ResNet-50, unchanged but for the normalisation in front."""

    def __init__(self, normalize=None, num_classes=1000):
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
        self.normalize = normalize or nn.Identity()

    def forward(self, x):
        return super().forward(self.normalize(x))


def check_arch(dataset, arch):
    """Raise ValueError unless `arch` is a network this project builds for `dataset`."""
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(NUM_CLASSES)}")
    m = re.fullmatch(r"resnet(\d+)", arch or "")
    ok = {"mnist": arch == "lenet", "fashion-mnist": arch == "lenet", "imagenet": arch == "resnet50",
          "cifar10": bool(m) and (int(m.group(1)) - 2) % 6 == 0, "svhn": bool(m) and (int(m.group(1)) - 2) % 6 == 0}
    if not ok[dataset]:
        raise ValueError(f"architecture {arch!r} does not fit {dataset}: use {DEFAULT_ARCH[dataset]}"
                         + (" or another resnet of depth 6n + 2" if dataset in ("cifar10", "svhn") else ""))


def get_model(dataset, normalize=True, arch=None):
    """The paper's network for `dataset`; arch overrides it ("resnet20", "resnet56", ...)."""
    arch = arch or DEFAULT_ARCH.get(dataset)
    check_arch(dataset, arch)
    norm = Normalize(*STATS[dataset]) if normalize else nn.Identity()
    K = NUM_CLASSES[dataset]
    if arch == "lenet":
        return LeNet(norm, K)
    if arch == "resnet50" and dataset == "imagenet":
        return ResNet50(norm, K)
    return CifarResNet(int(arch[len("resnet"):]), norm, K)


def strip_prefix(state_dict):
    """Drop Sequential/DataParallel prefixes such as '1.module.' from Cohen et al.'s keys."""
    return {re.sub(r"^((\d+|module)\.)+", "", k): v for k, v in state_dict.items()}


def load_checkpoint(path, dataset=None, arch=None, normalize=None):
    """Load this project's checkpoint, the MACER authors' ({'net', 'epoch'}) or Cohen et al.'s
    ({'arch', 'state_dict'}). Returns (model, config). Flags fill in what a checkpoint lacks; a user
    mistake ends the program with one sentence. weights_only=True: a checkpoint never runs code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        sys.exit(f"error: no checkpoint at {path}.")
    except Exception as e:
        sys.exit(f"error: {path} is not a readable PyTorch checkpoint ({type(e).__name__}); is the file complete?")
    if not isinstance(ckpt, dict):
        sys.exit(f"error: {path} holds no state dict; pass a checkpoint saved by train.py, MACER or Cohen et al.")
    cfg = {}
    if "model" in ckpt and "config" in ckpt:  # ours
        cfg, state = dict(ckpt["config"]), ckpt["model"]
        cfg.update(epochs_done=ckpt.get("epoch"), train_seconds=ckpt.get("train_seconds"))
    elif "net" in ckpt:  # the MACER authors': trained on unnormalised [0, 1] inputs
        cfg, state = {"normalize": False}, ckpt["net"]
    elif "state_dict" in ckpt:  # Cohen et al.'s: normalisation was layer 0 of a Sequential
        state, name = ckpt["state_dict"], str(ckpt.get("arch", ""))
        cfg = {"normalize": True, "arch": "resnet50" if name == "resnet50" else name.replace("cifar_", "")}
        cfg.update({"dataset": "imagenet"} if name == "resnet50" else {"dataset": "cifar10"} if "cifar" in name else {})
    elif all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        sys.exit(f"error: {path} is not a checkpoint of train.py, MACER or Cohen et al.")
    for key, value in (("dataset", dataset), ("arch", arch), ("normalize", normalize)):
        if value is not None:
            cfg[key] = value
    if cfg.get("dataset") is None:
        sys.exit(f"error: the checkpoint does not say its dataset; pass --dataset (one of {', '.join(NUM_CLASSES)}).")
    if cfg["dataset"] not in NUM_CLASSES:
        sys.exit(f"error: unknown dataset {cfg['dataset']!r}; choose one of {', '.join(NUM_CLASSES)}.")
    cfg.setdefault("arch", DEFAULT_ARCH[cfg["dataset"]])
    cfg.setdefault("normalize", True)
    try:
        model = get_model(cfg["dataset"], cfg["normalize"], cfg["arch"])
        model.load_state_dict(strip_prefix(state))
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200]
        sys.exit(f"error: {path} does not fit {cfg['arch']} for {cfg['dataset']} ({first}); "
                 "pass the --dataset and --arch it was trained with.")
    return model, cfg
