"""Train a smoothed classifier with MACER (Algorithm 1) or Cohen et al.'s Gaussian augmentation,
then certify it (certify.py). The paper's recipes are one flag away; every value can be overridden.

    python train.py                                   # quick run: LeNet, Fashion-MNIST, sigma 0.25, CPU
    python train.py --dataset cifar10 --sigma 0.5     # the paper's CIFAR-10 recipe (ResNet-110)
    python train.py --dataset cifar10 --method cohen  # the baseline: k = 1, lambda = 0
    torchrun --nproc_per_node 4 train.py --dataset imagenet --data-dir /path/to/imagenet
"""
import argparse
import contextlib
import gzip
import json
import os
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import certify
import models
from macer import macer_loss, noisy_copies

# The paper's recipes (Section 5.1, Appendix C). SGD with momentum 0.9, weight decay 5e-4 and
# batch 64 come from the authors' code. lbd maps sigma -> lambda; dynamic_lbd lists the sigmas
# where lambda = 0 until the first lr decay (footnote 5). Fashion-MNIST is not in the paper: it is
# this project's quick, offline first run (MNIST's loss settings, a budget that fits 10 minutes on
# 2 CPU cores).
RECIPES = {
    "cifar10": dict(epochs=440, lr=0.01, milestones=[200, 400], k=16, lbd={0.25: 12, 0.5: 4, 1.0: 12},
                    dynamic_lbd=[1.0], gamma=8, beta=16, augment=True, grad_clip=0),
    "svhn": dict(epochs=440, lr=0.01, milestones=[200, 400], k=16, lbd={0.25: 12, 0.5: 12}, gamma=8, beta=16,
                 augment=True, grad_clip=0),
    "mnist": dict(epochs=440, lr=0.01, milestones=[200, 400], k=16, lbd={0.25: 16, 0.5: 16, 1.0: 16}, gamma=8,
                  beta=16, augment=False, grad_clip=0),
    "imagenet": dict(epochs=120, lr=0.1, milestones=[30, 60, 90], k=2, lbd={0.25: 6, 0.5: 3, 1.0: 3}, gamma=8,
                     beta=16, augment=True, grad_clip=0),
    "fashion-mnist": dict(epochs=1, lr=0.01, milestones=[], k=16, lbd={0.25: 16, 0.5: 16, 1.0: 16}, gamma=8,
                          beta=16, augment=False, grad_clip=5, train_subset=30000,
                          cert_n=4000, cert_skip=100, cert_max=100),
}
COMMON = dict(batch=64, momentum=0.9, weight_decay=5e-4, dynamic_lbd=False, train_subset=0, seed=0,
              cert_n0=100, cert_n=100_000, cert_alpha=0.001, cert_skip=20, cert_max=500, cert_batch=0,
              save_every=10, log_every=200)


def parse_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument  # every default is None here: None means "take the recipe's value"
    a("--dataset", default="fashion-mnist", help="mnist, fashion-mnist, cifar10, svhn or imagenet")
    a("--sigma", type=float, default=0.25, help="noise level sigma, in [0, 1] pixel units")
    a("--method", default="macer", choices=["macer", "cohen"], help="cohen: k = 1, lambda = 0")
    a("--arch", help="network: lenet, resnet110 (resnet20, resnet56 for quick runs), resnet50")
    a("--epochs", type=int); a("--lr", type=float)
    a("--milestones", type=int, nargs="*", help="epochs at which the lr decays x0.1")
    a("--batch", type=int, help="inputs per step and process (each seen k times)")
    a("--momentum", type=float); a("--weight-decay", type=float)
    a("--k", type=int, help="Gaussian copies per input")
    a("--lbd", type=float, help="lambda, the weight of the robustness term")
    a("--dynamic-lbd", type=int, choices=[0, 1], help="1: lambda = 0 until the first lr decay")
    a("--gamma", type=float, help="hinge factor gamma"); a("--beta", type=float, help="inverse temperature beta")
    a("--augment", type=int, choices=[0, 1], help="random crop (pad 4) and horizontal flip")
    a("--grad-clip", type=float, help="clip the gradient norm at this value (0: off)")
    a("--train-subset", type=int, help="train on the first N training images only (0: all)")
    a("--seed", type=int)
    a("--cert-n0", type=int); a("--cert-n", type=int); a("--cert-alpha", type=float)
    a("--cert-skip", type=int, help="certify every skip-th test image")
    a("--cert-max", type=int, help="certify at most this many test images (0: none)")
    a("--cert-batch", type=int, help="noisy samples per forward pass while certifying (0: 1000 on CPU, 10000 on CUDA)")
    a("--save-every", type=int, help="checkpoint every N epochs (and at the end)")
    a("--log-every", type=int, help="a progress line every N steps within an epoch")
    a("--data-dir", default="data"); a("--out-dir", default=None, help="default: runs/DATASET_METHOD_sSIGMA")
    a("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    a("--fp32", action="store_true", help="no bf16 autocast and channels_last on CUDA")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    cfg = dict(COMMON)
    if args.dataset not in RECIPES:
        sys.exit(f"error: unknown dataset {args.dataset!r}; choose one of {', '.join(RECIPES)}.")
    recipe = dict(RECIPES[args.dataset])
    lbd = recipe.pop("lbd")  # sigma -> lambda; a sigma the paper did not use takes the nearest one's
    cfg.update(recipe, lbd=lbd[min(lbd, key=lambda s: abs(s - args.sigma))],
               dynamic_lbd=args.sigma in recipe.get("dynamic_lbd", []), arch=models.DEFAULT_ARCH[args.dataset])
    if args.method == "cohen":
        cfg.update(k=1, lbd=0.0, dynamic_lbd=False)
    cfg.update({key: v for key, v in vars(args).items() if v is not None})
    cfg["out_dir"] = cfg.get("out_dir") or os.path.join("runs", f"{cfg['dataset']}_{cfg['method']}_s{cfg['sigma']}")
    cfg["normalize"] = True
    for key in ("dynamic_lbd", "augment"):
        cfg[key] = bool(cfg[key])
    check_config(cfg)
    return cfg


def check_config(cfg):
    """A bad value ends in one sentence, not a traceback."""
    bad = [f"--sigma must be > 0 (got {cfg['sigma']})" if cfg["sigma"] <= 0 else "",
           f"--k must be >= 1 (got {cfg['k']})" if cfg["k"] < 1 else "",
           f"--lbd must be >= 0 (got {cfg['lbd']})" if cfg["lbd"] < 0 else "",
           f"--gamma must be > 0 (got {cfg['gamma']})" if cfg["gamma"] <= 0 else "",
           f"--beta must be > 0 (got {cfg['beta']})" if cfg["beta"] <= 0 else "",
           f"--cert-alpha must lie in (0, 1) (got {cfg['cert_alpha']})" if not 0 < cfg["cert_alpha"] < 1 else "",
           "--cert-n0 and --cert-n must be >= 1" if min(cfg["cert_n0"], cfg["cert_n"]) < 1 else "",
           "--epochs, --batch, --cert-skip, --save-every and --log-every must be >= 1"
           if min(cfg["epochs"], cfg["batch"], cfg["cert_skip"], cfg["save_every"], cfg["log_every"]) < 1 else "",
           "--cert-batch must be >= 0 (0: automatic)" if cfg["cert_batch"] < 0 else "",
           "--cert-max must be >= 0 (0: no certification)" if cfg["cert_max"] < 0 else ""]
    bad = [b for b in bad if b]
    if bad:
        sys.exit("error: " + "; ".join(bad) + ".")
    try:
        models.check_arch(cfg["dataset"], cfg["arch"])
    except ValueError as e:
        sys.exit(f"error: {e}.")


# ---------------------------------------------------------------- data
class TensorImages:
    """A small image dataset held as uint8 tensors x (N, C, H, W) and labels y (N,)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].float() / 255, int(self.y[i])


def read_idx(path):
    """An IDX file (MNIST's format), gzipped or not, as a uint8 tensor."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*shape)


IDX_FOLDERS = {"mnist": ("MNIST", None), "fashion-mnist": ("FashionMNIST", "/usr/share/datasets/fashion-mnist")}


def load_idx_dataset(name, data_dir, train):
    """MNIST or Fashion-MNIST from torchvision's layout DATA_DIR/<Name>/raw, then Debian's
    dataset-fashion-mnist folder, else torchvision's download."""
    folder, system_dir = IDX_FOLDERS[name]
    prefix = "train" if train else "t10k"
    files = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    places = [os.path.join(data_dir, folder, "raw")] + ([system_dir] if system_dir else [])
    for place in places:
        found = [next((os.path.join(place, f + ext) for ext in ("", ".gz") if os.path.exists(os.path.join(place, f + ext))),
                      None) for f in files]
        if all(found):
            x, y = read_idx(found[0]), read_idx(found[1])
            return TensorImages(x.unsqueeze(1), y.long())  # (N, 28, 28) -> (N, 1, 28, 28)
    try:
        import torchvision
        getattr(torchvision.datasets, folder)(data_dir, train=train, download=True)
    except Exception:
        hint = " or run `apt-get install dataset-fashion-mnist`" if system_dir else ""
        sys.exit(f"error: {name} not found in {' or '.join(places)} and the download failed; put the four IDX "
                 f"files in {places[0]}{hint}.")
    return load_idx_dataset(name, data_dir, train)


def load_dataset(name, data_dir, train):
    """The dataset as images in [0, 1]: TensorImages for the small ones, an ImageFolder for ImageNet."""
    import torchvision
    import torchvision.transforms as T
    if name in IDX_FOLDERS:
        return load_idx_dataset(name, data_dir, train)
    if name == "imagenet":
        path = os.path.join(data_dir, "train" if train else "val")
        if not os.path.isdir(path):
            sys.exit(f"error: no ImageNet folder at {path}; point --data-dir at a folder with train/ and val/ "
                     "class subfolders (torchvision ImageFolder layout).")
        tf = (T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()]) if train else
              T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()]))
        return torchvision.datasets.ImageFolder(path, tf)
    if name not in ("cifar10", "svhn"):
        sys.exit(f"error: unknown dataset {name!r}; choose one of {', '.join(RECIPES)}.")
    for download in (False, True):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                if name == "cifar10":
                    d = torchvision.datasets.CIFAR10(data_dir, train=train, download=download)
                    return TensorImages(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),  # NHWC -> NCHW
                                        torch.tensor(d.targets))
                d = torchvision.datasets.SVHN(data_dir, split="train" if train else "test", download=download)
                return TensorImages(torch.from_numpy(d.data), torch.from_numpy(d.labels).long())
        except Exception:
            continue
    sys.exit(f"error: {name} not found in {data_dir} and the download failed; place torchvision's {name} files "
             f"there or pass --data-dir.")


def crop_flip(x, pad=4):
    """Random crop with zero padding and random horizontal flip, per image, on x's device."""
    b, C, H, W = x.shape
    x_pad = F.pad(x, (pad, pad, pad, pad))
    i0 = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=x.device)
    j0 = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=x.device)
    rows = i0 + torch.arange(H, device=x.device).view(1, 1, H, 1)  # (b, 1, H, 1)
    cols = j0 + torch.arange(W, device=x.device).view(1, 1, 1, W)  # (b, 1, 1, W)
    x = x_pad[torch.arange(b, device=x.device).view(b, 1, 1, 1), torch.arange(C, device=x.device).view(1, C, 1, 1),
              rows, cols]  # (b, C, H, W)
    flip = torch.rand(b, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def batches(data, cfg, epoch, device, rank, world):
    """(x, y) minibatches on `device` for one epoch, this process's shard. Small datasets sit on
    the device whole and are shuffled with a generator seeded by (seed, epoch), so a resumed run
    sees the same order."""
    if isinstance(data, TensorImages):
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch))
        perm = perm[rank::world].to(device)
        for s in range(0, len(perm), cfg["batch"]):
            idx = perm[s: s + cfg["batch"]]
            x = data.x[idx].float() / 255
            yield (crop_flip(x) if cfg["augment"] else x), data.y[idx]
    else:
        if hasattr(data.sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            data.sampler.set_epoch(epoch)
        for x, y in data:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ---------------------------------------------------------------- checkpoints
def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_factor(cfg):
    return lambda epoch: 0.1 ** sum(epoch >= m for m in cfg["milestones"])


def main(argv=None):
    cfg = parse_config(argv)
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    else:
        rank, world = 0, 1
    device = torch.device(cfg["device"])
    fast = device.type == "cuda" and not cfg["fp32"]  # bf16 autocast + channels_last
    cfg["device_name"] = (torch.cuda.get_device_name(device) + (" bf16" if fast else " fp32") if device.type == "cuda"
                          else f"cpu ({torch.get_num_threads()} threads)")
    log = print if rank == 0 else (lambda *a, **k: None)
    ckpt_path = os.path.join(cfg["out_dir"], "checkpoint.pt")

    start_epoch, ckpt = 0, None
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            sys.exit(f"error: --resume found no checkpoint at {ckpt_path}; check --out-dir.")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            saved = ckpt["config"]
        except Exception:
            sys.exit(f"error: {ckpt_path} is not a readable train.py checkpoint; delete it or pick another --out-dir.")
        saved.update(epochs=cfg["epochs"], device=cfg["device"], fp32=cfg["fp32"], compile=cfg["compile"])
        cfg, start_epoch = saved, ckpt["epoch"]
    torch.manual_seed(cfg["seed"] + rank)

    train_set = load_dataset(cfg["dataset"], cfg["data_dir"], train=True)
    if isinstance(train_set, TensorImages):
        if cfg["train_subset"]:
            train_set = TensorImages(train_set.x[: cfg["train_subset"]], train_set.y[: cfg["train_subset"]])
        train_set = TensorImages(train_set.x.to(device), train_set.y.to(device))  # whole set on the GPU
    else:
        sampler = torch.utils.data.DistributedSampler(train_set, seed=cfg["seed"]) if ddp else None
        train_set = torch.utils.data.DataLoader(train_set, cfg["batch"], shuffle=sampler is None, sampler=sampler,
                                                num_workers=8, pin_memory=True, drop_last=True)

    model = models.get_model(cfg["dataset"], cfg["normalize"], cfg["arch"]).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        rng_cpu, rng_cuda = ckpt["rng"][rank % len(ckpt["rng"])]
        torch.set_rng_state(rng_cpu)
        if device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, device)
        log(f"resumed {ckpt_path} at epoch {start_epoch}")
    raw_model = model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)
    amp = torch.autocast("cuda", torch.bfloat16) if fast else contextlib.nullcontext()

    os.makedirs(cfg["out_dir"], exist_ok=True)
    log(f"{cfg['method']} on {cfg['dataset']} ({cfg['arch']}), sigma {cfg['sigma']}, k {cfg['k']}, lambda {cfg['lbd']}"
        f"{' (dynamic)' if cfg['dynamic_lbd'] else ''}, gamma {cfg['gamma']}, beta {cfg['beta']}, {cfg['epochs']} epochs, "
        f"{device}{' bf16' if fast else ' fp32'}, {world} process(es) -> {cfg['out_dir']}")
    log(f"{'epoch':>5} {'loss_cls':>9} {'loss_rob':>9} {'acc':>6} {'lr':>8} {'img/s':>7} {'time':>8}")
    t_run = time.time() - (ckpt["train_seconds"] if ckpt else 0.0)
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        lbd = 0.0 if cfg["dynamic_lbd"] and epoch < (cfg["milestones"] or [0])[0] else cfg["lbd"]
        stats = torch.zeros(4, device=device)  # sums of loss_cls * n, loss_rob * n, correct, n
        t0 = time.time()
        for step, (x, y) in enumerate(batches(train_set, cfg, epoch, device, rank, world)):
            n, k = len(y), cfg["k"]
            x_noisy = noisy_copies(x, k, cfg["sigma"])  # (n*k, C, H, W)
            if fast:
                x_noisy = x_noisy.contiguous(memory_format=torch.channels_last)
            with amp:
                logits = model(x_noisy).view(n, k, -1)  # (n*k, K) -> (n, k, K)
            loss, loss_cls, loss_rob = macer_loss(logits, y, cfg["sigma"], lbd, cfg["gamma"], cfg["beta"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            with torch.no_grad():  # accuracy of the smoothed (beta = 1) prediction on this batch
                correct = (logits.float().softmax(-1).mean(1).argmax(-1) == y).sum()
                stats += torch.stack([loss_cls.detach() * n, loss_rob.detach() * n, correct.float(),
                                      torch.full_like(loss_cls, n)])  # a fill, not a host-to-device copy
            if (step + 1) % cfg["log_every"] == 0:  # the only host sync inside an epoch
                s = stats.tolist()
                log(f"  step {step + 1:>6}  loss_cls {s[0] / s[3]:.4f}  loss_rob {s[1] / s[3]:.4f}  acc {s[2] / s[3]:.4f}"
                    f"  {s[3] * world / (time.time() - t0):.0f} img/s", flush=True)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        if ddp:
            dist.all_reduce(stats)
        s = stats.tolist()
        log(f"{epoch + 1:>5} {s[0] / s[3]:>9.4f} {s[1] / s[3]:>9.4f} {s[2] / s[3]:>6.3f} {lr:>8.5f} "
            f"{s[3] / (time.time() - t0):>7.0f} {time.time() - t_run:>7.0f}s", flush=True)
        if (epoch + 1) % cfg["save_every"] == 0 or epoch + 1 == cfg["epochs"]:
            rng = [(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)]
            if ddp:  # every rank's RNG state, so that a resumed DDP run draws the same noise
                mine, rng = rng[0], [None] * world
                dist.all_gather_object(rng, mine)
            if rank == 0:
                save_atomic(dict(model=raw_model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                 epoch=epoch + 1, rng=rng, config=cfg, train_seconds=time.time() - t_run), ckpt_path)
    train_seconds = time.time() - t_run
    if ddp:
        dist.destroy_process_group()
    if rank != 0 or cfg["cert_max"] == 0:
        return

    # Certification (Cohen et al.'s protocol; Hard-RS with Clopper-Pearson).
    log(f"trained in {train_seconds:.0f}s; checkpoint {ckpt_path}")
    test_set = load_dataset(cfg["dataset"], cfg["data_dir"], train=False)
    indices = list(range(0, len(test_set), cfg["cert_skip"]))[: cfg["cert_max"]]
    tsv = os.path.join(cfg["out_dir"], "certify.tsv")
    log(f"certifying {len(indices)} test images: n0 {cfg['cert_n0']}, n {cfg['cert_n']}, alpha {cfg['cert_alpha']} -> {tsv}")
    smooth = certify.Smooth(raw_model.eval(), models.NUM_CLASSES[cfg["dataset"]], cfg["sigma"], amp=fast)
    summary = certify.certify_dataset(smooth, test_set, indices, tsv, cfg["cert_n0"], cfg["cert_n"], cfg["cert_alpha"],
                                      cfg["cert_batch"] or certify.default_batch(cfg["dataset"], device),
                                      "clopper-pearson", log=log)
    log(certify.save_table(summary, tsv, f"{cfg['method']} s={cfg['sigma']}"))  # also certify_table.txt
    log(json.dumps({"acr": round(summary["acr"], 4), "train_seconds": round(train_seconds, 1)}))


if __name__ == "__main__":
    main()
