"""Train a smoothed classifier with MACER (Algorithm 1) or Cohen et al.'s Gaussian augmentation,
then certify it with certify.py. The paper's recipes are one flag away; every value can be
overridden.

    python train.py                                   # quick: LeNet, Fashion-MNIST, sigma 0.25
    python train.py --dataset cifar10 --sigma 0.5     # the paper's CIFAR-10 recipe (ResNet-110)
    python train.py --dataset cifar10 --method cohen  # the baseline: k = 1, lambda = 0
    torchrun --standalone --nproc_per_node 4 -- train.py --dataset imagenet --data-dir IMAGENET
"""

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import itertools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

import certify
import data
import models
import records
from macer import macer_loss, noisy_copies


# ---------------------------------------------------------------- Algorithm 1
def train_one_epoch(model, opt, batches, k, sigma, lbd, gamma, beta, grad_clip=0.0, log=None):
    """Algorithm 1, lines 2-9: one step of opt (SGD) on Eq. 17 for each minibatch in `batches`,
    with the model in whatever mode the caller set (train.py: model.train()).
    log((logits, y, loss_cls, loss_rob)), if given, sees each step's outcome, detached."""
    for x, y in batches:  # line 3: a minibatch (x_i, y_i), i = 1..n
        n = len(y)
        x_noisy = noisy_copies(x, k, sigma)  # line 4: k Gaussian copies of each x_i, (n*k, C, H, W)
        logits = model(x_noisy).view(n, k, -1)  # (n*k, K) -> (n, k, K)
        loss, loss_cls, loss_rob = macer_loss(logits, y, sigma, lbd, gamma, beta)  # lines 5-8
        opt.zero_grad(set_to_none=True)
        loss.backward()  # line 9: one step of a first-order method on Eq. 17 ...
        if grad_clip > 0:  # ... here SGD, with the gradient's norm clipped if grad_clip is set
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if log is not None:
            log((logits.detach(), y, loss_cls.detach(), loss_rob.detach()))


def epoch_lambda(cfg, epoch):
    """Footnote 5: with dynamic lambda, train with lambda = 0 until the first lr decay. Epochs
    count from 0 and the scheduler steps after each (lr_schedule), so the decay comes after epoch
    milestones[0] - 1 (check_config: milestones increasing, and given)."""
    return 0.0 if cfg.dynamic_lbd and epoch < cfg.milestones[0] else cfg.lbd


class Progress:
    """train_one_epoch's log: the epoch's sums of (loss_cls * n, loss_rob * n, correct, n) on the
    device, correct counting the inputs whose mean softmax over the k copies tops at y; a progress
    line every log_every steps, the only host sync inside an epoch."""

    def __init__(self, log_every, log):
        self.sums, self.steps, self.log_every, self.log = 0, 0, log_every, log

    def __call__(self, step):
        logits, y, loss_cls, loss_rob = step
        n = torch.full_like(loss_cls, len(y))
        correct = (logits.softmax(-1).mean(1).argmax(-1) == y).sum().to(n)
        self.sums = self.sums + torch.stack([loss_cls * n, loss_rob * n, correct, n])
        self.steps += 1
        if self.steps % self.log_every == 0:
            log_stats(self.sums, f"  step {self.steps:>6}", self.log)


def log_stats(stats, head, log, tail=""):
    """One progress line; a non-finite loss ends the run here, before a checkpoint can keep it."""
    s = stats.tolist()
    if not all(map(math.isfinite, s[:2])):
        raise FloatingPointError(
            f"the loss became non-finite ({head.strip()}); the last checkpoint is the last good "
            "one: lower --lr or --lbd, or clip harder with a smaller --grad-clip (0 is no clip)"
        )
    means = f"loss_cls {s[0] / s[3]:.4f}  loss_rob {s[1] / s[3]:.4f}  acc {s[2] / s[3]:.4f}"
    log(f"{head}  {means}{tail}", flush=True)


# ---------------------------------------------------------------- configuration
ONE_OR_0 = dict(type=int, choices=[0, 1])


def arg(default, help, **flag):
    return field(default=default, metadata=dict(help=help, **flag))


@dataclass
class Config:
    """Everything a run depends on; saved in its checkpoint. The defaults of the training fields
    come from the dataset's recipe (data.DATASETS), then the command line's flags."""

    dataset: str = arg("fashion-mnist", "mnist, fashion-mnist, cifar10, svhn or imagenet")
    sigma: float = arg(0.25, "noise level sigma, in [0, 1] pixel units")
    method: str = arg("macer", "macer, or cohen (k = 1, lambda = 0)", choices=["macer", "cohen"])
    arch: str = arg("", "network: lenet, resnet110 (resnet20, resnet56 for quick runs), resnet50")
    epochs: int = arg(0, "passes over the training set")
    lr: float = arg(0.0, "initial learning rate of SGD")
    milestones: list = arg((), "epochs at which the lr decays x0.1", nargs="*", type=int)
    batch: int = arg(64, "inputs per step and process (each seen k times)")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(5e-4, "SGD weight decay")
    k: int = arg(16, "Gaussian copies per input (Algorithm 1, line 4)")
    lbd: float = arg(0.0, "lambda, the weight of the robustness term (Eq. 17)")
    dynamic_lbd: bool = arg(False, "1: lambda = 0 until the first lr decay (fn. 5)", **ONE_OR_0)
    gamma: float = arg(8.0, "hinge factor gamma (Eq. 17)")
    beta: float = arg(16.0, "inverse temperature beta of the robustness term")
    augment: bool = arg(False, "1: random crop (pad 4) and horizontal flip", **ONE_OR_0)
    grad_clip: float = arg(0.0, "clip the gradient norm at this value (0: off)")
    train_subset: int = arg(0, "train on the first N training images only (0: all)")
    seed: int = arg(0, "seed of the shuffles, the noise and the initialisation, in [0, 2^32)")
    cert_n0: int = arg(certify.CERT["n0"], "certification: selection samples")
    cert_n: int = arg(certify.CERT["n"], "certification: estimation samples")
    cert_alpha: float = arg(certify.CERT["alpha"], "certification: failure probability")
    cert_skip: int = arg(20, "certify every skip-th test image (the recipe: the protocol's)")
    cert_max: int = arg(500, "certify at most this many test images (0: none)")
    cert_batch: int = arg(0, "noisy samples per forward pass in certification (0: certify.py's)")
    save_every: int = arg(10, "checkpoint every N epochs (and at the end)")
    log_every: int = arg(200, "a progress line every N steps within an epoch")
    data_dir: str = arg("data", "where the datasets are")
    out_dir: str = arg("", "where the run goes (default: runs/DATASET_METHOD_sSIGMA)")
    workers: int = arg(8, "data-loading processes (ImageNet; each seeds its own augmentation)")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N")
    fp32: bool = arg(False, "fp32 (default: on a CPU)", action="store_true")
    bf16: bool = arg(False, "bf16 autocast (default: on a GPU that has it)", action="store_true")
    compile: bool = arg(False, "torch.compile the model", action="store_true")


# What --resume may change; the rest of a run's settings are fixed by its checkpoint.
RESUMABLE = set(
    "epochs save_every log_every data_dir out_dir workers device fp32 bf16 compile cert_n0 cert_n "
    "cert_alpha cert_skip cert_max cert_batch".split()
)


def recipe(dataset, sigma, method):
    """The paper's setting for (dataset, sigma, method), as a Config."""
    facts = data.dataset_facts(dataset)
    r = facts.recipe
    lbd = r.lbd[min(r.lbd, key=lambda s: abs(s - sigma))]  # a sigma not in the paper: the nearest
    cert = {**certify.CERT, "skip": facts.skip, "max": facts.max, **r.cert}
    same = "epochs lr k gamma beta augment grad_clip train_subset".split()  # Recipe's and Config's
    values = {name: getattr(r, name) for name in same} | {f"cert_{k}": v for k, v in cert.items()}
    values.update(milestones=list(r.milestones), lbd=lbd, dynamic_lbd=sigma in r.dynamic_lbd)
    cfg = Config(dataset=dataset, sigma=sigma, method=method, arch=facts.arch, **values)
    return dataclasses.replace(cfg, k=1, lbd=0.0, dynamic_lbd=False) if method == "cohen" else cfg


# The range of each numeric flag: (lowest, whether the lowest is allowed).
RANGES = {
    **dict.fromkeys("sigma lr gamma beta".split(), (0, False)),
    **dict.fromkeys("momentum weight_decay lbd grad_clip train_subset".split(), (0, True)),
    **dict.fromkeys("cert_max cert_batch workers".split(), (0, True)),
    **dict.fromkeys(
        "k epochs batch cert_n0 cert_n cert_skip save_every log_every".split(), (1, True)
    ),
}


def check_config(cfg):
    """Raise ValueError naming every out-of-range value (NaN and inf included)."""
    values = [(n, getattr(cfg, n), *RANGES[n]) for n in RANGES]
    values += [("milestones", m, 1, True) for m in cfg.milestones]
    bad = [
        f"--{n.replace('_', '-')} must be {'>=' if equal else '>'} {low} (got {v})"
        for n, v, low, equal in values
        if not (v >= low if equal else v > low) or not math.isfinite(v)
    ]
    decays = bool(cfg.milestones) or not cfg.dynamic_lbd
    cohen_ok = cfg.method != "cohen" or (cfg.k == 1 and cfg.lbd == 0 and not cfg.dynamic_lbd)
    rules = [  # (whether it holds, what to do if not)
        (0 <= cfg.seed < 2**32, f"--seed must be in [0, 2^32) (got {cfg.seed})"),
        (0 < cfg.cert_alpha < 1, f"--cert-alpha must be in (0, 1) (got {cfg.cert_alpha})"),
        (list(cfg.milestones) == sorted(set(cfg.milestones)), "--milestones must be increasing"),
        (decays, "--dynamic-lbd 1 waits for the first lr decay: give --milestones"),
        (cohen_ok, "--method cohen is k = 1 and lambda = 0: for other values use --method macer"),
        (not (cfg.fp32 and cfg.bf16), "--fp32 and --bf16 contradict each other; give at most one"),
        (cfg.k * cfg.batch <= 2**31, "--k times --batch must be at most 2^31 noisy copies a step"),
        (max(cfg.cert_n0, cfg.cert_n) <= 2**53, "--cert-n0 and --cert-n must be at most 2^53"),
    ]
    bad += [message for holds, message in rules if not holds]
    if not bad and cfg.cert_max > 0:  # before training, not after it
        cap = certify.largest_radius(1.0, cfg.cert_n, cfg.cert_alpha, "clopper-pearson")
        if cap is not None and not math.isfinite(cap):
            bad.append(
                "at this --cert-n and --cert-alpha the radius rounds to infinity: lower either"
            )
        if cap is None:
            bad.append(
                f"no input can be certified with --cert-n {cfg.cert_n} and --cert-alpha "
                f"{cfg.cert_alpha}: raise either (or --cert-max 0 to skip certification)"
            )
    if bad:
        raise ValueError("; ".join(bad))
    models.check_arch(cfg.dataset, cfg.arch)


def parse_config(argv=None):
    """(Config, flags given, resume, overwrite): the recipe, then the flags given on top (only
    those: argparse.SUPPRESS drops the rest)."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        epilog="A flag not given takes the value of the dataset's recipe (data.DATASETS) at "
        "that sigma; the run's whole configuration is saved in OUT_DIR/checkpoint.pt.",
    )
    for f in dataclasses.fields(Config):
        flag = dict(f.metadata)
        if "action" not in flag:
            flag.setdefault("type", f.type)
        p.add_argument("--" + f.name.replace("_", "-"), **flag)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR's checkpoint, if any")
    flags = vars(p.parse_args(argv))
    resume, overwrite = flags.pop("resume", False), flags.pop("overwrite", False)
    if resume and overwrite:
        raise ValueError("--resume continues the run and --overwrite replaces it; give one of them")
    cfg = recipe(*(flags.get(k, getattr(Config, k)) for k in ("dataset", "sigma", "method")))
    cfg = dataclasses.replace(cfg, **flags)
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("runs", f"{cfg.dataset}_{cfg.method}_s{cfg.sigma}")
    check_config(cfg)
    return cfg, flags, resume, overwrite


def resumed_config(saved, flags, epochs_done):
    """The saved config with the flags --resume may change; another flag that changes it: error."""
    saved = Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})
    fixed = sorted(k for k, v in flags.items() if k not in RESUMABLE and v != getattr(saved, k))
    if fixed:
        names = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise ValueError(
            f"--resume continues the saved run and cannot change {names}; drop those flags, or "
            "start a new run in another --out-dir"
        )
    if "fp32" in flags or "bf16" in flags:  # a precision given now replaces the saved one
        saved = dataclasses.replace(saved, fp32=False, bf16=False)
    cfg = dataclasses.replace(saved, **{k: v for k, v in flags.items() if k in RESUMABLE})
    if cfg.epochs < epochs_done:
        raise ValueError(
            f"the checkpoint trained {epochs_done} epochs; give --epochs {epochs_done} or more"
        )
    check_config(cfg)
    return cfg


# ---------------------------------------------------------------- the run
def main(argv=None):
    try:
        run(*parse_config(argv))
    except (ValueError, FloatingPointError) as e:
        sys.exit(f"error: {str(e).rstrip('.')}.")
    except RuntimeError as e:
        if not certify.out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0][:120]
        sys.exit(f"error: out of memory ({first}); lower --batch or --k.")


def run(cfg, flags, resume, overwrite):
    """The processes and the run folder's lock around fit(); both are released however it ends,
    and a folder that this run made and left empty (it stopped before its first save) goes."""
    device, rank, world, joined = models.join_processes(cfg.device)
    cfg.device = str(device)
    folder_lock, made = None, not os.path.exists(cfg.out_dir)
    try:
        folder_lock = lock_run_folder(cfg.out_dir) if rank == 0 else None
        fit(cfg, flags, resume, overwrite, rank, world)
    finally:
        if folder_lock is not None:
            os.close(folder_lock)
            if made:
                with contextlib.suppress(OSError):  # not empty: it holds the run
                    os.rmdir(cfg.out_dir)
        if joined:
            dist.destroy_process_group()


def fit(cfg, flags, resume, overwrite, rank, world):
    """Set up (settings, data, model), train the remaining epochs, certify."""
    log = print if rank == 0 else (lambda *a, **k: None)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    cfg, ckpt = open_run(cfg, flags, resume, overwrite, ckpt_path, rank, world)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed + rank)
    model, opt, sched = build(cfg, device, ckpt, rank)
    ddp = world > 1
    train_set, train_sha256 = load_train_set(cfg, device, ddp)
    recorded = (ckpt or {}).get("config", {}).get("train_set_sha256")
    if recorded not in (None, train_sha256):  # checkpoints before the fingerprint have none
        raise ValueError(
            f"the training images under --data-dir {cfg.data_dir} are not those the checkpoint "
            "was trained on; resume with the same data, or start a new --out-dir"
        )
    loader = isinstance(train_set, DataLoader)  # whose len() counts batches
    per_epoch = len(train_set) if loader else len(train_set) // (cfg.batch * world)
    last = epoch_precisions(ckpt)[-1:] or [None]  # a resume trains on as it last trained
    shape = (min(cfg.batch * cfg.k, 512), *data.dataset_facts(cfg.dataset).shape)  # noisy batch
    args = (cfg, last[0], cfg.epochs * per_epoch, model, device, shape, True, log)
    precision = models.from_rank0(models.pick_precision(*args))  # every process: rank 0's
    model = model.to(memory_format=torch.channels_last)  # the saved model; net trains it
    gpu = [device.index] if device.type == "cuda" else None
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=gpu) if ddp else model
    net = models.fast_path(torch.compile(net) if cfg.compile else net, precision)
    precisions = epoch_precisions(ckpt)
    log(
        f"{cfg.method} on {cfg.dataset} ({cfg.arch}), sigma {cfg.sigma}, k {cfg.k}, lambda "
        f"{cfg.lbd}{' (dynamic)' if cfg.dynamic_lbd else ''}, gamma {cfg.gamma}, beta {cfg.beta}, "
        f"{cfg.epochs} epochs, {device} {precision}, {world} process(es) -> {cfg.out_dir}"
        + (f"; resumed at epoch {ckpt['epoch']}" if ckpt else "")
    )
    paper_sigmas = data.dataset_facts(cfg.dataset).recipe.lbd
    if not (ckpt or "lbd" in flags or cfg.method == "cohen" or cfg.sigma in paper_sigmas):
        log(
            f"note: the paper gives no lambda for sigma {cfg.sigma}: the nearest sigma's, {cfg.lbd}"
        )
    t_run = time.time() - (ckpt["train_seconds"] if ckpt else 0.0)
    for epoch in range(ckpt["epoch"] if ckpt else 0, cfg.epochs):
        net.train()
        t0 = time.time()
        batches = data.batches(
            train_set, cfg.batch, epoch, cfg.seed, cfg.augment, device, rank, world
        )
        loss_args = (cfg.k, cfg.sigma, epoch_lambda(cfg, epoch), cfg.gamma, cfg.beta)
        meter = Progress(cfg.log_every, log)
        train_one_epoch(net, opt, batches, *loss_args, cfg.grad_clip, meter)
        stats = meter.sums
        if isinstance(stats, int):  # no batch: fewer images than processes
            raise ValueError(
                f"the training set gives no batch of {cfg.batch} to each of {world} process(es)"
            )
        lr = opt.param_groups[0]["lr"]
        sched.step()
        if ddp:
            dist.all_reduce(stats)
        rate = f"{stats[3].item() / (time.time() - t0):.0f} img/s, {time.time() - t_run:.0f}s"
        log_stats(stats, f"epoch {epoch + 1}", log, f"  lr {lr:.5f}  {rate}  {precision}")
        check_finite(model, epoch, ckpt_path)
        precisions.append(precision)
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            progress = dict(epoch=epoch + 1, train_seconds=time.time() - t_run)
            progress.update(precisions=precisions, train_set_sha256=train_sha256)
            save_checkpoint(ckpt_path, (model, opt, sched), cfg, progress, device, rank, world)
    if cfg.cert_max > 0:
        log(f"trained in {time.time() - t_run:.0f}s; checkpoint {ckpt_path}")
        certify_checkpoint(cfg, ckpt_path, rank, world)


def lock_run_folder(out_dir):
    """Create out_dir and lock it for this run's life, so that two runs never share it."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # writable: fail now, not after an epoch
            pass
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise ValueError(
            f"cannot write to --out-dir {out_dir} ({e.strerror}); choose a writable folder"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(
            f"another train.py is running in {out_dir}; wait for it, or choose another --out-dir"
        ) from None
    return fd


def open_run(cfg, flags, resume, overwrite, ckpt_path, rank, world):
    """(cfg, checkpoint or None): the saved run's settings and state on --resume, else a new run,
    refused where it would replace a checkpoint without --overwrite. The checkpoint is the run's
    one record: its config holds every setting, and nothing beside it repeats them."""
    ckpt = None
    if os.path.isdir(ckpt_path):
        raise ValueError(f"{ckpt_path} is a folder; remove it or choose another --out-dir")
    if resume:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume found no checkpoint at {ckpt_path}; check --out-dir")
        try:
            blob = io.BytesIO(data.read_regular(ckpt_path, "checkpoint"))  # a FIFO: refused
            ckpt = torch.load(blob, map_location="cpu", weights_only=True)
            saved, epoch, trained_by = dict(ckpt["config"]), int(ckpt["epoch"]), len(ckpt["rng"])
            if trained_by < 1 or any(len(r) != 2 for r in ckpt["rng"]):
                raise ValueError  # one (CPU, CUDA) RNG state per process; caught just below
        except Exception:
            raise ValueError(
                f"{ckpt_path} is not a readable train.py checkpoint: delete it, or change --out-dir"
            ) from None
        try:
            cfg = resumed_config(saved, {**flags, "out_dir": cfg.out_dir}, epoch)
        except TypeError:  # a field of another type than the Config's, edited by hand
            raise ValueError(f"{ckpt_path} has a config that train.py did not write") from None
        if trained_by != world:  # one RNG state per process
            raise ValueError(
                f"the checkpoint was trained by {trained_by} process(es), and a resume is exact "
                f"only with as many: resume with torchrun --nproc_per_node {trained_by}, or anew"
            )
    elif os.path.exists(ckpt_path) and not overwrite:
        raise ValueError(f"{ckpt_path} exists; pass --resume, --overwrite or another --out-dir")
    return cfg, ckpt


def load_train_set(cfg, device, ddp):
    """(training set, its fingerprint): a small dataset whole on the device, ImageNet through a
    DataLoader (sharded under DDP); both the first --train-subset images, if given."""
    train_set = data.load_dataset(cfg.dataset, cfg.data_dir, train=True, augment=cfg.augment)
    N = cfg.train_subset or len(train_set)
    if N > len(train_set):
        raise ValueError(
            f"--train-subset {N} is more than the {len(train_set)} training images in "
            f"--data-dir {cfg.data_dir}; lower it (0: all)"
        )
    fingerprint = data.fingerprint(train_set, N)
    if isinstance(train_set, data.TensorImages):
        return data.TensorImages(
            train_set.x[:N].to(device), train_set.y[:N].to(device)
        ), fingerprint
    train_set = Subset(train_set, range(N))
    sampler = DistributedSampler(train_set, seed=cfg.seed, drop_last=True) if ddp else None
    opts = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", drop_last=True)
    loader = DataLoader(train_set, cfg.batch, shuffle=sampler is None, sampler=sampler, **opts)
    return loader, fingerprint


def check_finite(model, epoch, ckpt_path):
    """A FloatingPointError unless every weight and buffer is finite after `epoch`'s steps: the
    loss is checked before each step, and the last step can still break the weights."""
    if not all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()]):
        raise FloatingPointError(
            f"the weights became non-finite in epoch {epoch + 1} and were not saved; {ckpt_path} "
            "holds the last good epoch, if any: lower --lr or --lbd, or clip harder with a smaller "
            "--grad-clip (0 is no clip)"
        )


def lr_schedule(opt, milestones):
    """The lr times 0.1 at each milestone epoch (the scheduler steps after each epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)


def sgd(model, cfg):
    """SGD with the run's lr, momentum and weight decay (bench.py times the same)."""
    hyper = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), **hyper)


def build(cfg, device, ckpt, rank):
    """The model on its fast path, SGD and the step schedule, restored from ckpt if given."""
    model = models.get_model(cfg.dataset, arch=cfg.arch).to(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    opt = sgd(model, cfg)
    sched = lr_schedule(opt, cfg.milestones)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise ValueError(
                f"the checkpoint in {cfg.out_dir} does not fit {cfg.arch}: start a new --out-dir"
            ) from None
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        rng_cpu, rng_cuda = ckpt["rng"][rank % len(ckpt["rng"])]
        torch.set_rng_state(rng_cpu)
        if device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, device)
    return model, opt, sched


def epoch_precisions(ckpt):
    """The precision of each epoch trained (a record of one for the whole run: that, each epoch)."""
    if ckpt is None:
        return []
    return list(ckpt.get("precisions") or [ckpt["config"].get("precision")] * ckpt["epoch"])


def describe_precisions(precisions):
    """ "bf16", or "bf16 in epochs 1-5, fp32 in epochs 6-10" where a resume changed it."""
    spans, first = [], 1
    for p, run in itertools.groupby(precisions):
        last = first + len(list(run)) - 1
        spans.append(f"{p} in epochs {first}-{last}")
        first = last + 1
    return precisions[0] if len(spans) == 1 else ", ".join(spans)


def save_checkpoint(path, run, cfg, progress, device, rank, world):
    """Every rank's RNG state (a resumed DDP run draws the same noise) and rank 0's model,
    optimizer and schedule (run), written atomically by rank 0, with the progress: epoch,
    train_seconds and precisions, one per epoch trained."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    rng = [(torch.get_rng_state(), cuda_rng)]
    if world > 1:
        mine, rng = rng[0], [None] * world
        dist.all_gather_object(rng, mine)
    if rank != 0:
        dist.barrier()  # rank 0 is writing the checkpoint that certification will read
        return
    model, opt, sched = run
    precision, machine = describe_precisions(progress["precisions"]), models.device_name(device)
    config = dict(dataclasses.asdict(cfg), precision=precision, device_name=machine)
    config["train_set_sha256"] = progress.pop("train_set_sha256")  # the training images' hash
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), rng=rng, config=config)
    state.update(scheduler=sched.state_dict(), **progress)
    try:
        data.atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError on a full disk
        why = getattr(e, "strerror", None) or e
        raise ValueError(f"could not write {path} ({why}); make room, then --resume") from None
    if world > 1:
        dist.barrier()


def certify_checkpoint(cfg, ckpt_path, rank, world):
    """Cohen et al.'s protocol (Hard-RS, Clopper-Pearson) on the checkpoint, by certify.py's own
    command line, in every process of a torchrun launch. certify.tsv starts afresh only when its
    rows are of another checkpoint; rows of this one under other settings are kept, and
    certify.py says what to do."""
    out = os.path.join(cfg.out_dir, "certify.tsv")
    record = records.read_settings(out, strict=False)
    with open(ckpt_path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    checkpoint_changed = record is not None and record.get("checkpoint_sha256") != sha256
    flags = dict(data_dir=cfg.data_dir, device=cfg.device, out=out, seed=cfg.seed)
    for k in ("n0", "n", "alpha", "skip", "max") + ("batch",) * (cfg.cert_batch > 0):
        flags[k] = getattr(cfg, f"cert_{k}")  # certify.py's --k is train.py's --cert-k
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]  # "=": a value may start "-"
    argv += ["--overwrite"] * checkpoint_changed + ["--fp32"] * cfg.fp32 + ["--bf16"] * cfg.bf16
    argv += ["--", ckpt_path]
    if rank == 0:
        launcher = f"torchrun --nproc_per_node {world} --" if world > 1 else "python"
        print(f"+ {launcher} certify.py " + " ".join(argv), flush=True)
    try:
        certify.main(argv)
    except SystemExit as e:
        why = str(e.code).removeprefix("error: ").rstrip(".")
        raise ValueError(
            f"the checkpoint is saved, but certifying it stopped: {why} (certify.py's flags: run "
            f"certify.py -- {ckpt_path} yourself; train.py's --overwrite would train again)"
        ) from None


if __name__ == "__main__":
    main()
