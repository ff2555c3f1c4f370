"""The paper's networks: LeNet (MNIST), ResNet-110 (CIFAR-10, SVHN), ResNet-50 (ImageNet).

Inputs are images in [0, 1] pixel space, where the Gaussian noise of randomized smoothing lives;
each model normalises them (per-channel mean and std) as its first step. The statistics are
non-persistent buffers, so the state dicts carry exactly the parameter names of the MACER authors'
released LeNet and ResNet-110, and of torchvision's ResNet-50.
"""

import contextlib
import copy
import datetime
import hashlib
import io
import os
import platform
import re
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from data import DATASETS, dataset_facts, read_regular


class Normalize(nn.Module):
    """(x - mean) / std per channel, applied after the noise. No state-dict entries."""

    def __init__(self, mean, std):
        super().__init__()
        shape = (1, -1, 1, 1)  # (C,) -> (1, C, 1, 1), to broadcast over (b, C, H, W)
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class LogitLinear(nn.Linear):
    """The logit layer, in float32 even under bf16 autocast: MACER's robustness term and Soft-RS
    multiply the logits by beta = 16, and bf16's rounding with them; a small part of the work."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class LeNet(nn.Module):
    """conv 1->20 5x5, max-pool, conv 20->50 5x5, max-pool, fc 800->500, fc 500->10."""

    def __init__(self, normalize=None, num_classes=10):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = LogitLinear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(self.normalize(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))  # (b, 50, 4, 4) -> (b, 800)
        return self.fc2(x)


def basic_block(c_in, c_out, stride):
    """torchvision's BasicBlock, with the 1x1-conv shortcut of the authors' code where it changes
    the shape."""
    downsample = None
    if stride != 1 or c_in != c_out:
        downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
        )
    return torchvision.models.resnet.BasicBlock(c_in, c_out, stride, downsample)


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
        for s, (c_in, w) in enumerate([(16, 16), (16, 32), (32, 64)], start=1):
            first = basic_block(c_in, w, 1 if s == 1 else 2)  # stages 2 and 3 halve H and W
            rest = [basic_block(w, w, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{s}", nn.Sequential(first, *rest))
        self.fc = LogitLinear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))  # global average pool: (b, 64, 8, 8) -> (b, 64)


class ResNet50(torchvision.models.ResNet):
    """torchvision's ResNet-50 with the normalisation in front and a LogitLinear fc (nn.Linear's
    parameters and initialisation, applied in float32 under autocast)."""

    def __init__(self, normalize=None, num_classes=1000):
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], num_classes)
        self.normalize = normalize or nn.Identity()
        self.fc = LogitLinear(
            self.fc.in_features, num_classes
        )  # nn.Linear's init, as torchvision's

    def forward(self, x):
        return super().forward(self.normalize(x))


def check_arch(dataset, arch):
    """Raise ValueError unless `arch` is a network this project builds for `dataset`."""
    facts = dataset_facts(dataset)
    m = re.fullmatch(r"resnet(\d+)", arch or "")
    cifar_like = facts.shape[1:] == (32, 32)
    if not (arch == facts.arch or (cifar_like and m and (int(m.group(1)) - 2) % 6 == 0)):
        other = " or another resnet of depth 6n + 2" if cifar_like else ""
        raise ValueError(f"architecture {arch!r} does not fit {dataset}: use {facts.arch}{other}")


def get_model(dataset, normalize=True, arch=None):
    """The paper's network for `dataset`; arch overrides it ("resnet20", "resnet56", ...)."""
    facts = dataset_facts(dataset)
    arch = arch or facts.arch
    check_arch(dataset, arch)
    norm = Normalize(facts.mean, facts.std) if normalize else nn.Identity()
    if arch == "lenet":
        return LeNet(norm, facts.classes)
    if arch == "resnet50" and facts.arch == "resnet50":
        return ResNet50(norm, facts.classes)
    return CifarResNet(int(arch[len("resnet") :]), norm, facts.classes)


def device_name(device):
    """The GPU's name, or the CPU's model and torch's threads: every timing names its machine."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # Linux
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return f"{model or platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


BF16_MARGIN = 1.2  # the hint names the other precision where it measured this much faster


def seconds_per_call(fn, device, budget):
    """fn's mean wall time over 2 calls or more and `budget` seconds, after one untimed call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < budget:
        fn()
        sync()
        calls += 1
    return (time.perf_counter() - t0) / calls


def measure_precision(model, device, x, train, budget=0.25):
    """bf16's speed as a multiple of fp32's on the workload itself, both in channels_last, on a
    copy of the model (BatchNorm's statistics and the gradients stay as they were): a training
    step (forward and backward) if train, else inference, on the batch x. A short probe, which
    other processes on the machine can move by 2-4x: it advises, it never decides."""
    probe = copy.deepcopy(model).to(device, memory_format=torch.channels_last).train(train)
    x = x.to(device).contiguous(memory_format=torch.channels_last)

    def call(bf16):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            with torch.inference_mode(not train):
                out = probe(x)
        if train:
            out.float().sum().backward()

    return seconds_per_call(lambda: call(False), device, budget) / seconds_per_call(
        lambda: call(True), device, budget
    )


def default_precision(device):
    """The precision of a run that names none: fixed per kind of device, never measured, so that
    the same command certifies the same classifier whatever else the machine runs. bf16 on a GPU
    that has it; fp32 on a CPU, where bf16 runs from 0.1x to 2.4x fp32's speed by CPU model."""
    cuda = device.type == "cuda"
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def pick_precision(flags, saved, batches, model, device, shape, train, log=print):
    """--bf16 or --fp32 if given (flags); else `saved`, what a resumed run last trained in or a
    results file began in; else default_precision. For 50 batches of work or more, a 0.25 s probe
    on a batch of this shape (its own seed: the run's is kept) prints a hint where the other
    precision measured BF16_MARGIN times faster here."""
    if flags.bf16 or flags.fp32:
        return "bf16" if flags.bf16 else "fp32"
    if saved in ("bf16", "fp32"):
        return saved
    precision = default_precision(device)
    if batches >= 50 and (device.type == "cpu" or precision == "bf16"):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        ratio = measure_precision(model, device, x, train)
        other, gain = ("bf16", ratio) if precision == "fp32" else ("fp32", 1 / ratio)
        if gain >= BF16_MARGIN:
            log(
                f"hint: {other} measured {gain:.2f}x faster than {precision} here (a short probe, "
                f"{device_name(device)}); --{other} takes it, as a different base classifier",
                flush=True,
            )
    return precision


class FastPath(nn.Module):
    """A classifier on the fast path: its input in channels_last (faster in fp32 too, bench.py row
    3d), its forward pass under bf16 autocast if bf16, its logits float32 either way (LogitLinear
    keeps their digits). A certificate is about this classifier, valid in either precision."""

    def __init__(self, net, bf16):
        super().__init__()
        self.net, self.bf16 = net, bf16

    def forward(self, x):
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            logits = self.net(x)
        return logits if logits.dtype == torch.float64 else logits.float()


def fast_path(model, precision):
    """model, with its weights in channels_last, on the fast path in `precision` ("bf16" or
    "fp32"). The returned module shares model's parameters: save model's state_dict."""
    return FastPath(model.to(memory_format=torch.channels_last), precision == "bf16")


def default_batch(arch, device):
    """Noisy samples per forward pass. On a CPU: for LeNet the best of bench.py's grid (row 3b) on
    a Xeon and an AMD EPYC, for ResNet-20 at least 0.77x the best's speed; on a GPU, a guess."""
    cuda = torch.device(device).type == "cuda"
    return (400 if cuda else 100) if arch == "resnet50" else (10_000 if cuda else 400)


def join_processes(device_name):
    """(device, rank, world, joined). Under torchrun: join its process group unless already in it
    (train.py calling certify.py), joined saying whether this call did, for the caller to leave it;
    on CUDA, the GPU of LOCAL_RANK. Else (device, 0, 1, False). A device not here: ValueError."""
    joined = "RANK" in os.environ and not dist.is_initialized()
    if joined:
        backend = "nccl" if device_name.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(days=7))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1 and device_name.startswith("cuda"):
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device_name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"no CUDA device {device_name!r} is visible here: use --device cpu")
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    return device, rank, world, joined


def load_checkpoint(path, dataset=None, arch=None, normalize=None):
    """Load this project's checkpoint, the MACER authors' ({'net', 'epoch'}; they feed the network
    unnormalised [0, 1] inputs) or Cohen et al.'s ({'arch', 'state_dict'}; their normalisation is
    layer 0, inside the model, as here). Returns (model, config); arguments fill in what a
    checkpoint lacks; config["sha256"] is the hash of the very bytes that were loaded.
    weights_only=True: a checkpoint never runs code. A file that does not fit raises ValueError with
    one sentence saying what to do."""
    blob = read_regular(path, "checkpoint")  # once: a save that replaces it cannot change the hash
    try:
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}); is it complete?"
        ) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds no state dict; pass a train.py, MACER or Cohen checkpoint")
    cfg = {}
    if "model" in ckpt and "config" in ckpt:  # ours
        if not isinstance(ckpt["config"], dict):
            raise ValueError(f"{path} has a config that is not a dict; not saved by train.py")
        cfg, state = dict(ckpt["config"]), ckpt["model"]
    elif "net" in ckpt:  # the MACER authors'
        cfg, state = {"normalize": False}, ckpt["net"]
    elif "state_dict" in ckpt:  # Cohen et al.'s: Sequential(NormalizeLayer, DataParallel(net))
        state, name = ckpt["state_dict"], str(ckpt.get("arch", ""))
        their_arch = "resnet50" if name == "resnet50" else name.replace("cifar_", "")
        their_data = "imagenet" if name == "resnet50" else "cifar10" if "cifar" in name else None
        cfg = {"normalize": True, "arch": their_arch or None, "dataset": their_data}
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise ValueError(f"{path} is not a checkpoint of train.py, MACER or Cohen et al.")
    if "model" in ckpt:  # ours: its networks normalise inside, always
        cfg.setdefault("normalize", True)
    facts = dict(dataset=str, arch=str, normalize=bool, sigma=(int, float), beta=(int, float))
    odd = lambda k, t: isinstance(cfg[k], bool) and t is not bool or not isinstance(cfg[k], t)
    if any(cfg.get(k) is not None and odd(k, t) for k, t in facts.items()):  # what it says
        raise ValueError(f"{path} has a config that train.py did not write; retrain or restore it")
    given = dict(dataset=dataset, arch=arch, normalize=normalize)
    for key, value in given.items():  # a flag fills in what the checkpoint lacks, never more
        if value is not None and cfg.get(key) not in (None, value):
            flag = "--no-normalize" if key == "normalize" else f"--{key} {value}"
            raise ValueError(
                f"{flag} contradicts {path}, which records {key} {cfg[key]!r}; drop the flag"
            )
        if value is not None:
            cfg[key] = value
    if cfg.get("dataset") is None:
        names = ", ".join(DATASETS)
        raise ValueError(f"the checkpoint does not say its dataset; pass --dataset ({names})")
    cfg.setdefault("arch", dataset_facts(cfg["dataset"]).arch)
    cfg.setdefault("normalize", True)
    cfg["sha256"] = hashlib.sha256(blob).hexdigest()
    model = get_model(cfg["dataset"], cfg["normalize"], cfg["arch"])
    try:
        # Cohen et al.'s keys without their Sequential and DataParallel prefixes ('1.module.')
        model.load_state_dict({re.sub(r"^((\d+|module)\.)+", "", k): v for k, v in state.items()})
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(
            f"{path} does not fit {cfg['arch']} for {cfg['dataset']} ({first}); "
            "pass the --dataset and --arch it was trained with"
        ) from None
    return model, cfg


def from_rank0(value):
    """value as rank 0 has it, in every process of a torchrun launch."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value
