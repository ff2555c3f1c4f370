"""Speed of this MACER implementation: each row is a ratio A / B of two timings in one run on one
device. Rows 1, 2, 3d, 3e and 7 time A and B alternately (A, B, A, B, ...) after a warm-up, so
that drift in the machine's speed cancels, and report medians; 3b times each batch size in turn
(a median of 3); 5a and 5b give one figure (B); 6a and 6b are one run each. Each row decides
something:

1. A MACER training step / a cross-entropy step on the same 64 x 16 noisy images, on the default
   path: the loss's overhead. LeNet, and ResNet-110 (ResNet-20 with --quick on CPU).
2. train.train_one_epoch over 6,400 LeNet images (--quick: 1,600; GPU: 64,000), bf16 / fp32:
   whether --bf16 pays for training here (the default is fixed per device: models.pick_precision).
3. Certification, noisy samples/s: (b) at models.default_batch / the best of a grid: the default
   batch; LeNet at batch 400, (d) in fp32, channels_last / NCHW: models.FastPath's layout; (e) in
   channels_last, bf16 autocast / fp32: whether --bf16 pays for certification.
5. GPU only: (a) a ResNet-110 MACER epoch on train.py's path; (b) the time to certify 500
   CIFAR-size inputs at n = 100,000: whether they meet the paper's scale.
6. CPU only: certification at n = 100,000, two one-thread processes side by side / one: whether
   results/reproduce.sh runs two pipelines at once.
7. With --compile: torch.compile'd / eager, training and certification (LeNet on a CPU, ResNet-110
   on a GPU), in fp32 (a, c) and bf16 (b, d): whether --compile pays, its compile time included
   (from scratch: the compile caches are off for a run with --compile).

Rows keep their numbers (ROWS) so that every JSON file's rows line up; results/tables.py shows
only the rows in ROWS.

    python bench.py --quick                    # CPU-sized: minutes on 2 cores (results/README.md)
    python bench.py --json results/bench.json  # full sizes, on the GPU if there is one
"""

import argparse
import copy
import datetime
import itertools
import json
import multiprocessing
import statistics
import time

import torch
import torch.nn.functional as F

import certify
import data
import models
import records
import train
from macer import macer_loss, noisy_copies

# results/tables.py shows only these rows
ROWS = ("1", "2", "3b", "3d", "3e", "5a", "5b", "6a", "6b", "7a", "7b", "7c", "7d")
SIGMA, N, K = 0.25, 64, 16  # noise level; inputs per step; Gaussian copies per input
RECIPE = train.recipe("fashion-mnist", SIGMA, "macer")  # its loss settings and SGD, as train.py's
LBD, GAMMA, BETA = RECIPE.lbd, RECIPE.gamma, RECIPE.beta
N0, ALPHA = 100, 0.001
STEPS_PER_EPOCH = 782  # ceil(50,000 / 64)


# ---------------------------------------------------------------- timing
def clock(fn, device):
    """Seconds of fn(), with the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def alternate(fn_a, fn_b, device, repeats, warm_up=True):
    """Median seconds of fn_a and of fn_b: one warm-up call each, then A, B, A, B, ..."""
    if warm_up:
        fn_a()
        fn_b()
    times = [(clock(fn_a, device), clock(fn_b, device)) for _ in range(repeats)]
    return statistics.median(a for a, _ in times), statistics.median(b for _, b in times)


def row(name, a, b, unit, target, note=""):
    """One row of the results, printed as soon as it is measured."""
    assert name.split(".")[0] in ROWS, name
    ratio = a / b if a is not None and b is not None else None
    line = f"{name:<50} {fmt(a, unit):>14} {fmt(b, unit):>14} {fmt(ratio, 'x'):>7}  {target}"
    print(line + (f"   [{note}]" if note else ""), flush=True)
    return dict(name=name, a=a, b=b, unit=unit, ratio=ratio, target=target, note=note)


def fmt(v, unit):
    if v is None:
        return "-"
    seconds = f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.1f} s"
    return {"x": f"{v:.2f}x", "/s": f"{v:,.0f} /s"}.get(unit, seconds)


def default_path(arch, device, train, batch=N * K):
    """A fresh LeNet (Fashion-MNIST's input) or ResNet (CIFAR-10's) on train.py's (train) or
    certify.py's path: channels_last, in the device's default precision. (model, precision,
    shape)."""
    torch.manual_seed(0)
    dataset = "fashion-mnist" if arch == "lenet" else "cifar10"
    model = models.get_model(dataset, arch=arch).to(device)
    x = torch.rand(min(batch, 512), *data.DATASETS[dataset].shape)
    precision = models.default_precision(device)
    return models.fast_path(model, precision), precision, x.shape[1:]


# ---------------------------------------------------------------- 1. loss overhead
def loss_overhead(arch, device, repeats, iters, compile):
    """Seconds per MACER step (A) and per cross-entropy step (B), `iters` steps per timing."""
    model, precision, shape = default_path(arch, device, True)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    opt = train.sgd(model, RECIPE)
    net = torch.compile(model) if compile else model
    x = torch.rand(N, *shape, device=device)
    y = torch.randint(0, 10, (N,), device=device)
    # One noise draw for both steps: the same 1024 noisy images, and the ratio isolates the loss.
    noise = torch.randn(N * K, *shape, device=device)
    targets = y.repeat_interleave(K)  # copies of input i sit in rows i*K .. i*K+K-1
    macer = lambda logits: macer_loss(logits.view(N, K, -1), y, SIGMA, LBD, GAMMA, BETA)[0]
    ce = lambda logits: F.cross_entropy(logits, targets)

    def steps(loss):
        for _ in range(iters):  # no .item(): nothing in a step waits for the device
            value = loss(net(noisy_copies(x, K, SIGMA, noise)))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()

    t_macer, t_ce = alternate(lambda: steps(macer), lambda: steps(ce), device, repeats)
    name = f"1. {'LeNet' if arch == 'lenet' else arch} step: MACER / CE"
    note = "ResNet-20 stands in for ResNet-110 (--quick on CPU)" if arch == "resnet20" else ""
    return row(name, t_macer / iters, t_ce / iters, "s", "<= 1.05x", f"{precision}. {note}")


# ---------------------------------------------------------------- 2. training, bf16 / fp32
def training(device, images, repeats):
    """Seconds of an epoch of `images` inputs in bf16 (A) and fp32 (B), from the same start."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (images,), generator=g).to(device)
    model = models.get_model("fashion-mnist").to(device)
    init = copy.deepcopy(model.state_dict())

    def epoch(precision, count=images):
        model.load_state_dict(init)
        net = models.fast_path(model, precision)
        batches = data.batches(data.TensorImages(x[:count], y[:count]), N, 0, 0, False, device)
        train.train_one_epoch(net, train.sgd(net, RECIPE), batches, K, SIGMA, LBD, GAMMA, BETA)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the host waits for the device once, at the end

    epoch("bf16", 4 * N)  # the warm-up: a few steps each; the full-size A and B alternate below
    epoch("fp32", 4 * N)
    bf16, fp32 = lambda: epoch("bf16"), lambda: epoch("fp32")
    t_bf16, t_fp32 = alternate(bf16, fp32, device, repeats, warm_up=False)
    note = f"{images / t_bf16:.0f} against {images / t_fp32:.0f} img/s"
    name = f"2. LeNet training {images:,} images: bf16 / fp32"
    return row(name, t_bf16, t_fp32, "s", "< 1.0x where bf16 pays", note)


# ---------------------------------------------------------------- 3. certification
@torch.inference_mode()
def batch_sweep(arch, device, n, grid):
    """3b: noisy samples/s of the default certification batch (A) and of the best in `grid` (B)."""
    default = models.default_batch(arch, device)
    model, precision, shape = default_path(arch, device, False, default)
    smooth = certify.Smooth(model, 10, SIGMA, device=device)
    x = torch.rand(*shape, device=device)
    rate = {}
    for b in sorted(set(grid) | {default}):
        smooth.certify(x, 1, b, ALPHA, b)  # warm-up at this shape
        times = [clock(lambda b=b: smooth.certify(x, 1, n, ALPHA, b), device) for _ in range(3)]
        rate[b] = (1 + n) / statistics.median(times)
    best = max(rate, key=rate.get)
    grid = ", ".join(f"{b}: {r:,.0f}" for b, r in rate.items())
    note = f"{precision}; default {default}, best {best}; {grid}"
    name = f"3b. {'LeNet' if arch == 'lenet' else arch} certify samples/s: default / best"
    return row(name, rate[default], rate[best], "/s", "~1.0x", note)


@torch.inference_mode()
def layout_and_precision(device, n, repeats):
    """3d and 3e: noisy samples/s of CERTIFY at batch 400, on the models that they compare."""
    torch.manual_seed(0)
    nchw = models.get_model("fashion-mnist").to(device).eval()
    fp32 = models.fast_path(copy.deepcopy(nchw), "fp32")  # channels_last weights and batches
    bf16 = models.fast_path(fp32.net, "bf16")
    x = torch.rand(1, 28, 28, device=device)

    def compare(number, model_a, model_b, what, target, note):
        smooth_a = certify.Smooth(model_a, 10, SIGMA, device=device)
        smooth_b = certify.Smooth(model_b, 10, SIGMA, device=device)
        run = lambda smooth: lambda: smooth.certify(x, N0, n, ALPHA, 400)
        t_a, t_b = alternate(run(smooth_a), run(smooth_b), device, repeats)
        name = f"{number}. LeNet certify n={n:,}: {what}"
        return row(name, (N0 + n) / t_a, (N0 + n) / t_b, "/s", target, note)

    layout = compare("3d", fp32, nchw, "channels_last / NCHW", "> 1.0x", "fp32, batch 400")
    note = "both channels_last, batch 400"
    return [layout, compare("3e", bf16, fp32, "bf16 / fp32", "> 1.0x where bf16 pays", note)]


# ---------------------------------------------------------------- 5. GPU: epoch and certification
def epoch_time(device, arch, steps, repeats, compile):
    """Seconds of a MACER epoch on train.py's path (data on the device), from `steps` steps."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, device=device)
    images = data.TensorImages(x, torch.randint(0, 10, (50_000,), device=device))
    model, precision, _ = default_path(arch, device, True)
    opt, net = train.sgd(model, RECIPE), torch.compile(model) if compile else model
    torch.backends.cudnn.benchmark = True

    def epoch():
        batches = itertools.islice(data.batches(images, N, 0, 0, True, device), steps)
        train.train_one_epoch(net, opt, batches, K, SIGMA, LBD, GAMMA, BETA)

    epoch()  # the warm-up, which autotunes cuDNN
    seconds = statistics.median(clock(epoch, device) for _ in range(repeats))
    note = f"{precision}; {steps} steps timed x{repeats}, extrapolated to {STEPS_PER_EPOCH}"
    name = f"5a. {arch} MACER epoch"
    return row(name, None, seconds * STEPS_PER_EPOCH / steps, "s", "B <= 15 s (H100)", note)


@torch.inference_mode()
def certify_time(device, arch, n, inputs):
    """The time to certify 500 CIFAR-size inputs with certify.py's defaults, from `inputs`."""
    torch.backends.cudnn.benchmark = True
    batch = models.default_batch(arch, device)
    model, _, shape = default_path(arch, device, False, batch)
    smooth = certify.Smooth(model, 10, SIGMA, device=device)
    xs = torch.rand(inputs, *shape, device=device)
    smooth.certify(xs[0], N0, batch * 10, ALPHA, batch)  # warm-up
    times = [clock(lambda x=x: smooth.certify(x, N0, n, ALPHA, batch), device) for x in xs]
    note = f"{inputs} inputs timed, extrapolated to 500"
    name = f"5b. {arch} certify 500 @ n={n:,}"
    return row(name, None, statistics.median(times) * 500, "s", "B <= 300 s (H100)", note)


# ---------------------------------------------------------------- 6. certification across processes
def certify_worker(n, inputs):
    """One thread: Hard-RS CERTIFY of a LeNet on `inputs` images, per-input noise as in certify.py
    (the cost depends on neither weights nor image). Returns (samples/s, seconds per image)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.fast_path(models.get_model("fashion-mnist").eval(), "fp32")
    smooth = certify.Smooth(model, 10, SIGMA, device="cpu")
    xs = torch.rand(inputs, 1, 28, 28)
    smooth.certify(xs[0], N0, 4000, ALPHA, 400)  # warm-up
    t0 = time.perf_counter()
    for i, x in enumerate(xs):
        smooth.certify(x, N0, n, ALPHA, 400, generator=records.input_generator(0, i, "cpu"))
    seconds = time.perf_counter() - t0
    return (N0 + n) * len(xs) / seconds, seconds / len(xs)


def processes(n, inputs):
    """6a: the samples/s of two spawned processes side by side, summed, against one; 6b: seconds."""
    pool = multiprocessing.get_context("spawn").Pool
    with pool(1) as p:
        ((rate, seconds),) = p.starmap(certify_worker, [(n, inputs)])
    with pool(2) as p:
        (rate_1, seconds_1), (rate_2, seconds_2) = p.starmap(certify_worker, [(n, inputs)] * 2)
    note = f"LeNet, 1 thread each; each of the two: {rate_1:,.0f} and {rate_2:,.0f} /s"
    name = f"6a. CPU certify n={n:,}: 2 processes / 1"
    six_a = row(name, rate_1 + rate_2, rate, "/s", ">= 1.7x", note)
    name = f"6b. LeNet one image at n={n:,}: 2 processes / 1"
    note = "seconds per image, fp32, batch 400"
    return [six_a, row(name, max(seconds_1, seconds_2), seconds, "s", "-", note)]


# ---------------------------------------------------------------- 7. torch.compile
def compiled(device, arch, images, n, repeats):
    """7a-7d: torch.compile'd / eager, in fp32 and bf16: (a, b) seconds to train on `images`
    CIFAR- or MNIST-size images (train.py's path), (c, d) seconds to certify one input at n
    (certify.py's path, its default batch). A is the compiled model's time once compiled; the note
    gives the compile time (the first call's extra seconds) and the images it takes to repay it."""
    dataset = "fashion-mnist" if arch == "lenet" else "cifar10"
    shape = data.DATASETS[dataset].shape
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, *shape), dtype=torch.uint8, generator=g).to(device)
    images_set = data.TensorImages(x, torch.randint(0, 10, (images,), generator=g).to(device))
    torch.manual_seed(0)
    model = models.get_model(dataset, arch=arch).to(device)
    opt = train.sgd(model, RECIPE)  # both paths train the same weights: only the speed matters
    batch = models.default_batch(arch, device)

    def fit(net):
        batches = data.batches(images_set, N, 0, 0, False, device)
        train.train_one_epoch(net, opt, batches, K, SIGMA, LBD, GAMMA, BETA)

    def cert(net):
        with torch.inference_mode():
            smooth = certify.Smooth(net.eval(), 10, SIGMA, device=device)
            smooth.certify(torch.rand(shape, device=device), N0, n, ALPHA, batch)
        net.train()

    out = []
    for precision in ("fp32", "bf16"):
        for work, per, letters in ((fit, images, "ab"), (cert, 1, "cd")):
            torch._dynamo.reset()  # a compile from scratch: no graph of an earlier row is reused
            fast = models.fast_path(torch.compile(model), precision)
            eager = models.fast_path(model, precision)
            first = clock(lambda w=work, f=fast: w(f), device)  # compiles
            runs = (lambda w=work, f=fast: w(f)), (lambda w=work, e=eager: w(e))
            t_fast, t_eager = alternate(*runs, device, repeats)
            compile_s, saved = first - t_fast, (t_eager - t_fast) / per  # saved: s per image
            repays = (
                f"repays after {compile_s / saved:,.0f} images" if saved > 0 else "never repays"
            )
            what = f"training {images:,} images" if per > 1 else f"certify n={n:,}"
            name = f"7{letters[precision == 'bf16']}. {arch} {what}, {precision}: compiled / eager"
            note = f"compile {compile_s:.0f} s, {repays}"
            out.append(row(name, t_fast, t_eager, "s", "< 1.0x", note))
    return out


# ---------------------------------------------------------------- the run
def main():
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats, smaller sizes; ResNet-20 on CPU"
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the models trained in 1 and 5a, and measure section 7",
    )
    a = p.parse_args()
    if a.compile:  # compile times from scratch, not from the on-disk cache of an earlier run
        torch.compiler.config.force_disable_caches = True
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    repeats = 3 if a.quick else 5
    small = a.quick and not cuda  # ResNet-20: its step takes seconds on 2 cores; ResNet-110 is 5x
    resnet = "resnet20" if small else "resnet110"
    now = datetime.datetime.now().isoformat(timespec="seconds")
    info = dict(device=models.device_name(device), torch=torch.__version__, date=now)
    info.update(quick=a.quick, compile=a.compile)
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    print(f"{'name':<50} {'A':>14} {'B':>14} {'ratio':>7}  target", flush=True)

    # Training and certification come first, in a fresh process's memory allocator, as train.py
    # and certify.py meet it (after the ResNet steps of 1, glibc serves large blocks differently).
    rows = [training(device, 64_000 if cuda else 1600 if a.quick else 6400, 1 if a.quick else 3)]
    gpu_grid = [1000, 4000, 10_000, 25_000]
    n, grid = (100_000, gpu_grid) if cuda else (4000, [100, 200, 400, 1000, 4000])
    rows.append(batch_sweep("lenet", device, n, grid))
    n, grid = (100_000, gpu_grid) if cuda else (800 if small else 4000, [100, 200, 400, 1000])
    rows.append(batch_sweep(resnet, device, n, grid))
    rows += layout_and_precision(device, 5_000 if a.quick else 20_000, repeats)
    if a.compile:  # before row 1 compiles: its compile times start from nothing built
        arch = "resnet110" if cuda else "lenet"
        rows += compiled(device, arch, 6400 if cuda else 640, 100_000 if cuda else 4000, repeats)
    # Cheap steps (LeNet, ResNet-20) get two more repeats; on a GPU a timing spans several steps.
    for arch, gpu_iters in (("lenet", 20), (resnet, 5)):
        more = 0 if arch == "resnet110" else 2
        rows.append(
            loss_overhead(arch, device, repeats + more, gpu_iters if cuda else 1, a.compile)
        )
    if cuda:
        rows.append(epoch_time(device, "resnet110", 20, repeats, a.compile))
        rows.append(certify_time(device, "resnet110", 100_000, 3))
    else:
        rows += processes(100_000, 2 if a.quick else 5)
    if a.json:
        data.atomic_write(a.json, json.dumps(dict(info, rows=rows), indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
