"""Speed of this MACER implementation, as ratios measured in one run on one device.

1. Loss overhead: one MACER training step (n = 64 inputs x k = 16 Gaussian copies -> model ->
   macer_loss -> backward -> SGD) over one cross-entropy step on the same 1024 noisy images, same
   model, on the device's default path. LeNet and ResNet-110 (ResNet-20 with --quick on CPU).
2. Training, bf16 / fp32: train.train_one_epoch over the same 6,400 (--quick: 1,600) images of
   Fashion-MNIST's size (LeNet, MACER, k = 16), under bf16 autocast against fp32, both
   channels_last: whether bf16 pays here, beside what precision auto's probe
   (models.measure_precision) picks.
3. Certification: (b) noisy samples/s at the default batch against the best of a grid, per
   model; (c) Smooth.certify against a naive Cohen-style loop (fp32, one host copy per batch,
   predictions counted in Python); (d) LeNet noisy samples/s at batch 400 in fp32, channels_last
   against NCHW; (e) the same in channels_last, bf16 autocast against fp32.
4. Ceiling: the machine's matmul rate (2048 x 2048, fp32 and bf16) and the GFLOP/s that a LeNet
   MACER training step achieves on the fast path, as a fraction of each.
5. GPU only: (a) a ResNet-110 MACER epoch on 50,000 CIFAR-size images, eager fp32 against the fast
   path with the data on the GPU; (b) the time to certify 500 CIFAR-size inputs at n = 100,000.
6. CPU only: certification at n = 100,000 in two one-thread processes side by side against one (the
   e10 LeNet on Fashion-MNIST test images where this checkout has them): samples/s, seconds/image.

A and B are timed alternately (A, B, A, B, ...) after a warm-up, so drift in the machine's speed
reaches both alike and cancels in the ratio; each figure is a median.

    python bench.py --quick                    # CPU-sized: minutes on 2 cores (results/README.md)
    python bench.py --json results/bench.json  # full sizes, on the GPU if there is one
"""

import argparse
import copy
import datetime
import json
import multiprocessing
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import certify
import data
import models
import train
from macer import macer_loss, noisy_copies

SIGMA, N, K = 0.25, 64, 16  # noise level; inputs per step; Gaussian copies per input
LBD, GAMMA, BETA = 16.0, 8.0, 16.0  # the MNIST recipe's loss settings
N0, ALPHA = 100, 0.001
STEPS_PER_EPOCH = 782  # ceil(50,000 / 64)


# ---------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device):
    """Seconds of fn(), with the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fn_a, fn_b, device, repeats):
    """Median seconds of fn_a and of fn_b: one warm-up call each, then A, B, A, B, ..."""
    fn_a()
    fn_b()
    times = [(clock(fn_a, device), clock(fn_b, device)) for _ in range(repeats)]
    return statistics.median(a for a, _ in times), statistics.median(b for _, b in times)


def row(name, a, b, unit, target, note=""):
    ratio = a / b if a is not None and b is not None else None
    return dict(name=name, a=a, b=b, unit=unit, ratio=ratio, target=target, note=note)


# ---------------------------------------------------------------- 1. loss overhead
def train_step(model, opt, x, y, loss, noise=None, targets=None):
    """One step of `model` (on its fast path: layout and precision) on the K noisy copies of each
    of the len(x) inputs. No .item(): nothing in a step waits for the device. targets: y repeated
    per copy, for the cross-entropy step."""
    logits = model(noisy_copies(x, K, SIGMA, noise))  # (n*K, C, H, W) -> (n*K, 10)
    if loss == "macer":
        value = macer_loss(logits.view(len(x), K, -1), y, SIGMA, LBD, GAMMA, BETA)[0]
    else:
        value = F.cross_entropy(logits, targets)
    opt.zero_grad(set_to_none=True)
    value.backward()
    opt.step()


def default_path(model, dataset, device, train, batch=N * K):
    """The model on the path that train.py (train) or certify.py would take here: channels_last,
    and the precision that models.measure_precision picks. Returns (model, precision)."""
    x = torch.rand(min(batch, 512), *data.DATASETS[dataset].shape)
    precision = models.measure_precision(model, device, x, train)
    return models.fast_path(model, precision), precision


def loss_overhead(label, dataset, arch, device, repeats, iters, compile, note=""):
    """Seconds per MACER step (A) and per cross-entropy step (B), `iters` steps per timing."""
    torch.manual_seed(0)
    model, precision = default_path(
        models.get_model(dataset, arch=arch).to(device), dataset, device, True
    )
    torch.backends.cudnn.benchmark = device.type == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net = torch.compile(model) if compile else model
    x = torch.rand(N, *data.DATASETS[dataset].shape, device=device)
    y = torch.randint(0, 10, (N,), device=device)
    # One noise draw for both steps: the same 1024 noisy images, and the ratio isolates the loss.
    noise = torch.randn(N * K, *x.shape[1:], device=device)
    targets = y.repeat_interleave(K)  # copies of input i sit in rows i*K .. i*K+K-1
    macer = lambda: [train_step(net, opt, x, y, "macer", noise) for _ in range(iters)]
    ce = lambda: [train_step(net, opt, x, y, "ce", noise, targets) for _ in range(iters)]
    t_macer, t_ce = alternate(macer, ce, device, repeats)
    return row(
        f"1. {label} step: MACER / CE",
        t_macer / iters,
        t_ce / iters,
        "s",
        "<= 1.05x",
        note=f"{precision}. {note}",
    )


# ---------------------------------------------------------------- 2. training, bf16 / fp32
def training(device, images, repeats):
    """Seconds of train.train_one_epoch over the same `images` Fashion-MNIST-size inputs: the
    bf16 autocast (A) against fp32 (B), both channels_last, each from the same initialisation: the
    question that models.measure_precision answers by a short probe."""
    cfg = train.recipe("fashion-mnist", SIGMA, "macer")
    g = torch.Generator().manual_seed(0)
    images = data.TensorImages(
        torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8, generator=g).to(device),
        torch.randint(0, 10, (images,), generator=g).to(device),
    )
    init = models.get_model("fashion-mnist").to(device).state_dict()

    def epoch(fp32, images=images):
        model = models.get_model("fashion-mnist").to(device)
        model.load_state_dict(init)
        model = models.fast_path(model, "fp32" if fp32 else "bf16")
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        batches = data.batches(images, N, 0, 0, False, device)
        paper = (cfg.k, cfg.sigma, LBD, cfg.gamma, cfg.beta)
        return lambda: sum(train.train_one_epoch(model, opt, batches, *paper)).tolist()

    warm = data.TensorImages(images.x[: 4 * N], images.y[: 4 * N])
    for fp32 in (False, True):  # warm-up on a few steps: the full-size A and B alternate below
        epoch(fp32, warm)()
    times = [(clock(epoch(False), device), clock(epoch(True), device)) for _ in range(repeats)]
    t_fast, t_fp32 = statistics.median(a for a, _ in times), statistics.median(b for _, b in times)
    default = default_path(
        models.get_model("fashion-mnist").to(device), "fashion-mnist", device, True
    )[1]
    return row(
        f"2. LeNet training {len(images):,} images: bf16 / fp32",
        t_fast,
        t_fp32,
        "s",
        "< 1.0x where bf16 pays",
        note=f"{len(images) / t_fast:.0f} against {len(images) / t_fp32:.0f} img/s; "
        f"precision auto's probe here: {default}",
    )


# ---------------------------------------------------------------- 3. certification
@torch.inference_mode()
def batch_sweep(label, dataset, arch, device, n, grid):
    """3b: noisy samples/s of the default certification batch (A) and of the best in `grid` (B)."""
    torch.manual_seed(0)
    model = models.get_model(dataset, arch=arch).to(device).eval()
    model, precision = default_path(
        model, dataset, device, False, models.default_batch(arch, device)
    )
    smooth = certify.Smooth(model, 10, SIGMA, device=device)
    x = torch.rand(*data.DATASETS[dataset].shape, device=device)
    default = models.default_batch(arch, device)
    rate = {}
    for b in sorted(set(grid) | {default}):
        smooth.certify(x, 1, b, ALPHA, b)  # warm-up at this shape
        rate[b] = (1 + n) / statistics.median(
            clock(lambda b=b: smooth.certify(x, 1, n, ALPHA, b), device) for _ in range(3)
        )
    best = max(rate, key=rate.get)
    return row(
        f"3b. {label} certify samples/s: default / best",
        rate[default],
        rate[best],
        "/s",
        "~1.0x",
        note=f"{precision}; default {default}, best {best}; "
        + ", ".join(f"{b}: {r:,.0f}" for b, r in rate.items()),
    )


def naive_certify(model, x, n0, n, alpha, batch_size=400):
    """Cohen et al.'s CERTIFY as in locuslab/smoothing: fp32, x.repeat per batch, one host copy
    per batch and the predictions counted one by one in Python (_sample_noise, _count_arr)."""

    def sample(num):
        counts = np.zeros(10, dtype=int)
        for start in range(0, num, batch_size):
            batch = x.repeat(min(batch_size, num - start), 1, 1, 1)
            predictions = model(batch + torch.randn_like(batch) * SIGMA).argmax(1)
            for p in predictions.cpu().numpy():
                counts[p] += 1
        return counts

    c_A = int(sample(n0).argmax())
    return c_A, certify.radius(certify.clopper_pearson_lower(int(sample(n)[c_A]), n, alpha), SIGMA)


@torch.inference_mode()
def against_naive(device, n, repeats):
    """3c: Smooth.certify in fp32 at batch 400 against the naive loop at batch 400."""
    torch.manual_seed(0)
    model = models.get_model("fashion-mnist").to(device).eval()
    x = torch.rand(1, 28, 28, device=device)
    smooth = certify.Smooth(model, 10, SIGMA, device=device)
    t_smooth, t_naive = alternate(
        lambda: smooth.certify(x, N0, n, ALPHA, 400),
        lambda: naive_certify(model, x, N0, n, ALPHA),
        device,
        repeats,
    )
    return row(
        f"3c. LeNet certify n={n:,}: Smooth / naive",
        (N0 + n) / t_smooth,
        (N0 + n) / t_naive,
        "/s",
        ">= 1.0x (CPU), >= 5x (GPU)",
        note="both fp32, batch 400",
    )


@torch.inference_mode()
def layout_and_precision(device, n, repeats):
    """3d: fp32 Smooth on a channels_last model (A) against an NCHW one (B); 3e: bf16 autocast (A)
    against fp32 (B), both channels_last. Noisy samples/s of CERTIFY at batch 400."""
    torch.manual_seed(0)
    nchw = models.get_model("fashion-mnist").to(device).eval()
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = torch.rand(1, 28, 28, device=device)
    rate = lambda t: (N0 + n) / t
    on_path = lambda bf16: models.FastPath(cl, bf16)  # channels_last batches too
    smooth = {
        name: certify.Smooth(m, 10, SIGMA, device=device)
        for name, m in (("nchw", nchw), ("cl", on_path(False)), ("bf16", on_path(True)))
    }
    certify_with = lambda name: lambda: smooth[name].certify(x, N0, n, ALPHA, 400)
    t_cl, t_nchw = alternate(certify_with("cl"), certify_with("nchw"), device, repeats)
    t_bf16, t_fp32 = alternate(certify_with("bf16"), certify_with("cl"), device, repeats)
    return [
        row(
            f"3d. LeNet certify n={n:,}: channels_last / NCHW",
            rate(t_cl),
            rate(t_nchw),
            "/s",
            "> 1.0x",
            note="fp32, batch 400",
        ),
        row(
            f"3e. LeNet certify n={n:,}: bf16 / fp32",
            rate(t_bf16),
            rate(t_fp32),
            "/s",
            "> 1.0x where bf16 pays",
            note="both channels_last, batch 400",
        ),
    ]


# ---------------------------------------------------------------- 4. the machine's ceiling
def matmul_rate(device, dtype, size=2048, repeats=5):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    return 2 * size**3 / statistics.median(clock(lambda: a @ b, device) for _ in range(repeats))


def ceiling(device, repeats):
    """GFLOP/s of a LeNet MACER training step on the fast path, against the matmul rate of its
    precision. The bf16 matmul is timed only where the hardware has bf16 (CUDA, AVX-512 BF16, AMX):
    emulated, a 2048 x 2048 product takes a minute."""
    model, precision = default_path(
        models.get_model("fashion-mnist").to(device), "fashion-mnist", device, True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(N, 1, 28, 28, device=device), torch.randint(0, 10, (N,), device=device)
    step = lambda: train_step(model, opt, x, y, "macer")
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = statistics.median(clock(step, device) for _ in range(repeats))
    flags = set(models.cpuinfo("flags").split())
    native_bf16 = device.type == "cuda" or bool({"avx512_bf16", "amx_bf16"} & flags)
    fp32 = matmul_rate(device, torch.float32) / 1e9  # GFLOP/s
    bf16 = matmul_rate(device, torch.bfloat16) / 1e9 if native_bf16 else None
    peak = bf16 if precision == "bf16" else fp32
    return [
        row(
            "4. matmul 2048: bf16 / fp32",
            bf16,
            fp32,
            "GFLOP/s",
            "-",
            note="" if native_bf16 else "no bf16 instructions: bf16 not timed",
        ),
        row(
            f"4. LeNet MACER step / {precision} matmul",
            flops / seconds / 1e9,
            peak,
            "GFLOP/s",
            "-",
            note=f"{precision}; {flops / 1e9:.1f} GFLOP per step",
        ),
    ]


# ---------------------------------------------------------------- 5. GPU: epoch and certification
def bf16_works(device):
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def epoch_time(device, arch, steps, repeats, compile):
    """A MACER epoch on 50,000 synthetic CIFAR-size images, extrapolated from `steps` steps. A:
    eager fp32, data on the host, augmented there and copied each step. B: the fast path."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50_000,))
    images_dev, labels_dev = images.to(device), labels.to(device)
    model_a = models.get_model("cifar10", arch=arch).to(device)
    model_b = models.fast_path(copy.deepcopy(model_a), "bf16" if bf16_works(device) else "fp32")
    opt_a, opt_b = (
        torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for m in (model_a, model_b)
    )
    net_b = torch.compile(model_b) if compile else model_b

    def eager_fp32():
        torch.backends.cudnn.benchmark = False
        for _ in range(steps):
            idx = torch.randint(0, len(images), (N,))
            x = data.crop_flip(images[idx].float() / 255).to(device)
            train_step(model_a, opt_a, x, labels[idx].to(device), "macer")

    def fast():
        torch.backends.cudnn.benchmark = True  # autotuned in the warm-up call
        for _ in range(steps):
            idx = torch.randint(0, len(images), (N,), device=device)
            x = data.crop_flip(images_dev[idx].float() / 255)
            train_step(net_b, opt_b, x, labels_dev[idx], "macer")

    t_a, t_b = alternate(eager_fp32, fast, device, repeats)
    return row(
        f"5a. {arch} epoch: fp32 / fast",
        t_a / steps * STEPS_PER_EPOCH,
        t_b / steps * STEPS_PER_EPOCH,
        "s",
        "B <= 15 s (H100)",
        note=f"{steps} steps timed x{repeats}, extrapolated to {STEPS_PER_EPOCH}",
    )


@torch.inference_mode()
def certify_time(device, arch, n, inputs):
    """The time to certify 500 CIFAR-size inputs with certify.py's defaults, from `inputs` of
    them."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    batch = models.default_batch(arch, device)
    model = models.get_model("cifar10", arch=arch).to(device).eval()
    model, precision = default_path(model, "cifar10", device, False, batch)
    smooth = certify.Smooth(model, 10, SIGMA, device=device)
    xs = torch.rand(inputs, 3, 32, 32, device=device)
    smooth.certify(xs[0], N0, batch * 10, ALPHA, batch)  # warm-up
    seconds = statistics.median(
        clock(lambda x=x: smooth.certify(x, N0, n, ALPHA, batch), device) for x in xs
    )
    return row(
        f"5b. {arch} certify 500 @ n={n:,}",
        None,
        seconds * 500,
        "s",
        "B <= 300 s (H100)",
        note=f"{inputs} inputs timed, extrapolated to 500",
    )


# ---------------------------------------------------------------- 6. certification across processes
E10 = "results/e10/macer_s0.25/checkpoint.pt"  # the 10-epoch LeNet, if this checkout has it


def certify_worker(n, inputs):
    """One process, one thread: Hard-RS CERTIFY on `inputs` Fashion-MNIST test images (random
    images if the data is absent) with the e10 LeNet (a fresh LeNet if absent), per-input noise as
    certify.py draws it. Returns (noisy samples/s, seconds per image)."""
    import records

    torch.set_num_threads(1)
    model = (
        models.load_checkpoint(E10)[0] if os.path.exists(E10) else models.get_model("fashion-mnist")
    )
    model = models.fast_path(model.eval(), "fp32")
    try:
        test_set = data.load_dataset("fashion-mnist", "data", train=False)
        xs = [test_set[i][0] for i in range(0, 20 * inputs, 20)]
    except ValueError:
        xs = list(torch.rand(inputs, 1, 28, 28))
    smooth = certify.Smooth(model, 10, SIGMA, device="cpu")
    smooth.certify(xs[0], N0, 4000, ALPHA, 400)  # warm-up
    t0 = time.perf_counter()
    for i, x in enumerate(xs):
        smooth.certify(x, N0, n, ALPHA, 400, generator=records.input_generator(0, i, "cpu"))
    seconds = time.perf_counter() - t0
    return (N0 + n) * len(xs) / seconds, seconds / len(xs)


def processes(n, inputs):
    """6: certification throughput of one one-thread process, and of two such processes side by
    side (spawned, each certifying `inputs` images): samples/s of each, their sum against one."""
    pool = multiprocessing.get_context("spawn").Pool
    with pool(1) as p:
        (one,) = p.starmap(certify_worker, [(n, inputs)])
    with pool(2) as p:
        two = p.starmap(certify_worker, [(n, inputs)] * 2)
    source = "e10 LeNet" if os.path.exists(E10) else "LeNet (untrained)"
    return [
        row(
            f"6a. CPU certify n={n:,}: 2 processes / 1",
            sum(r for r, _ in two),
            one[0],
            "/s",
            ">= 1.7x",
            note=f"{source}, 1 thread each; each of the two: "
            f"{two[0][0]:,.0f} and {two[1][0]:,.0f} /s",
        ),
        row(
            f"6b. {source} one image at n={n:,}: 2 processes / 1",
            max(s for _, s in two),
            one[1],
            "s",
            "-",
            note="seconds per image, fp32, batch 400",
        ),
    ]


# ---------------------------------------------------------------- report
def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "/s":
        return f"{v:,.0f} /s"
    if unit != "s":
        return f"{v:,.1f} {unit}"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.1f} s"


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats and smaller sizes; ResNet-20 on CPU"
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the models trained in 1 and 5a"
    )
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    repeats = 3 if a.quick else 5
    # ResNet-110 has about 5x the layers of ResNet-20, whose step (1,024 images, forward and
    # backward) already takes seconds on 2 CPU cores (row 1 in results/README.md): --quick there
    # uses ResNet-20.
    small = a.quick and not cuda
    resnet, resnet_repeats = ("resnet20", 5) if small else ("resnet110", repeats)
    info = dict(
        device=models.device_name(device),
        torch=torch.__version__,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        quick=a.quick,
        compile=a.compile,
    )
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    rows = []
    # Training and certification come first: a fresh process's memory allocator is what train.py
    # and certify.py meet (after the ResNet steps of 1, glibc serves large blocks without page
    # faults, and fp32 LeNet steps run up to 1.5x faster than in a fresh process).
    print("2. training, bf16 / fp32", flush=True)
    rows.append(
        training(device, 64_000 if cuda else 1600 if a.quick else 6400, 1 if a.quick else 3)
    )
    print("3. certification", flush=True)
    rows.append(
        batch_sweep(
            "LeNet",
            "fashion-mnist",
            "lenet",
            device,
            4000 if not cuda else 100_000,
            [100, 200, 400, 1000, 4000] if not cuda else [1000, 4000, 10_000, 25_000],
        )
    )
    rows.append(
        batch_sweep(
            resnet,
            "cifar10",
            resnet,
            device,
            800 if small else 4000 if not cuda else 100_000,
            [100, 200, 400, 1000] if not cuda else [1000, 4000, 10_000, 25_000],
        )
    )
    rows.append(against_naive(device, 5_000 if a.quick else 20_000, repeats))
    rows.extend(layout_and_precision(device, 5_000 if a.quick else 20_000, repeats))
    print("1. loss overhead", flush=True)
    # LeNet steps are cheap, so they get two more repeats; on a GPU one timing spans several steps.
    rows.append(
        loss_overhead(
            "LeNet", "fashion-mnist", None, device, repeats + 2, 20 if cuda else 1, a.compile
        )
    )
    rows.append(
        loss_overhead(
            resnet,
            "cifar10",
            resnet,
            device,
            resnet_repeats,
            5 if cuda else 1,
            a.compile,
            note="ResNet-20 stands in for ResNet-110 (--quick on CPU)" if small else "",
        )
    )
    print("4. the machine's ceiling", flush=True)
    rows.extend(ceiling(device, repeats))
    if not cuda:
        print("6. certification across processes", flush=True)
        rows.extend(processes(100_000, 2 if a.quick else 5))
    if cuda:
        print("5. ResNet-110 epoch and certification", flush=True)
        rows.append(epoch_time(device, "resnet110", 20, repeats, a.compile))
        rows.append(certify_time(device, "resnet110", 100_000, 3))

    print(f"\n{'name':<40} {'A':>14} {'B':>14} {'ratio':>7}  target")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(
            f"{r['name']:<40} {fmt(r['a'], r['unit']):>14} {fmt(r['b'], r['unit']):>14} {ratio:>7} "
            f" {r['target']}" + (f"   [{r['note']}]" if r["note"] else "")
        )
    if a.json:
        data.atomic_write(a.json, json.dumps(dict(info, rows=rows), indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
