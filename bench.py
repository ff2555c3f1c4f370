"""Speed of this MACER implementation, as ratios measured in one run on one device.

1. Loss overhead: one MACER training step (n = 64 inputs x k = 16 Gaussian copies -> model ->
   macer_loss -> backward -> SGD) over one cross-entropy step on the same 1024 noisy images, same
   model. LeNet (Fashion-MNIST shapes) and ResNet-110 (CIFAR-10 shapes; ResNet-20 with --quick on CPU).
2. Certification throughput: noisy forward passes per second of certify.Smooth.certify against a
   naive Cohen-style loop (batch 400, fp32, predictions counted one by one in Python), LeNet.
3. GPU only: (a) a ResNet-110 MACER epoch on 50,000 CIFAR-size images, eager fp32 against the fast
   path (bf16 autocast, channels_last, cudnn.benchmark, data on the GPU with crop_flip); (b) the
   time to certify 500 CIFAR-size inputs at n = 100,000 (bf16). Both time a few steps or inputs
   and extrapolate.

A and B are timed alternately (A, B, A, B, ...) after a warm-up, so drift in the machine's speed
reaches both alike and cancels in the ratio; each figure is a median.

    python bench.py --quick                       # CPU-sized: under 3 minutes on 2 cores
    python bench.py --json results/bench.json     # full sizes, on the GPU if there is one
    python bench.py --compile                     # torch.compile the trained models (1 and 3a)
"""
import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import certify
import models
from macer import macer_loss, noisy_copies
from train import crop_flip

SIGMA, N, K = 0.25, 64, 16  # noise level; inputs per step; Gaussian copies per input
LBD, GAMMA, BETA = 16.0, 8.0, 16.0  # the MNIST recipe's loss settings
N0, ALPHA, CERT_BATCH = 100, 0.001, 1000  # certify.py's defaults
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


def compare(fn_a, fn_b, device, repeats):
    """Median seconds of fn_a and of fn_b: one warm-up call each, then A, B, A, B, ..."""
    fn_a()
    fn_b()
    times = [(clock(fn_a, device), clock(fn_b, device)) for _ in range(repeats)]
    return statistics.median(a for a, _ in times), statistics.median(b for _, b in times)


def row(name, a, b, unit, target, note=""):
    ratio = a / b if a is not None and b is not None else None
    return dict(name=name, a=a, b=b, unit=unit, ratio=ratio, target=target, note=note)


# ---------------------------------------------------------------- 1. loss overhead
def train_step(model, opt, x, y, loss, fast, noise=None, targets=None):
    """One step on the K noisy copies of each of the len(x) inputs. No .item(): nothing in a step
    waits for the device. targets: y repeated per copy, for the cross-entropy step."""
    x_noisy = noisy_copies(x, K, SIGMA, noise)  # (n*K, C, H, W)
    if fast:
        x_noisy = x_noisy.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=fast):
        logits = model(x_noisy)
    if loss == "macer":  # macer_loss computes in float32 whatever autocast chose
        l = macer_loss(logits.view(len(x), K, -1), y, SIGMA, LBD, GAMMA, BETA)[0]
    else:
        l = F.cross_entropy(logits.float(), targets)
    opt.zero_grad(set_to_none=True)
    l.backward()
    opt.step()


def loss_overhead(label, dataset, arch, device, repeats, iters, compile, note=""):
    """Seconds per MACER step (A) and per cross-entropy step (B), `iters` steps per timing."""
    torch.manual_seed(0)
    fast = device.type == "cuda"  # train.py's default path on each device
    torch.backends.cudnn.benchmark = fast
    model = models.get_model(dataset, arch=arch).to(device)
    model = model.to(memory_format=torch.channels_last) if fast else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net = torch.compile(model) if compile else model
    x = torch.rand(N, *models.INPUT_SHAPE[dataset], device=device)
    y = torch.randint(0, 10, (N,), device=device)
    # One noise draw for both steps: the same 1024 noisy images, and the ratio isolates the loss.
    noise = torch.randn(N * K, *x.shape[1:], device=device)
    targets = y.repeat_interleave(K)  # copies of input i sit in rows i*K .. i*K+K-1
    macer = lambda: [train_step(net, opt, x, y, "macer", fast, noise) for _ in range(iters)]
    ce = lambda: [train_step(net, opt, x, y, "ce", fast, noise, targets) for _ in range(iters)]
    t_macer, t_ce = compare(macer, ce, device, repeats)
    return row(f"1. {label} step: MACER / CE", t_macer / iters, t_ce / iters, "s", "<= 1.05x", note=note)


# ---------------------------------------------------------------- 2. certification throughput
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
def certification(device, n, repeats):
    torch.manual_seed(0)
    model = models.get_model("fashion-mnist").to(device).eval()
    x = torch.rand(models.INPUT_SHAPE["fashion-mnist"], device=device)
    smooth = certify.Smooth(model, 10, SIGMA)  # bf16 autocast on CUDA, fp32 on CPU
    t_smooth, t_naive = compare(lambda: smooth.certify(x, N0, n, ALPHA, CERT_BATCH),
                                lambda: naive_certify(model, x, N0, n, ALPHA), device, repeats)
    passes = N0 + n
    cuda = device.type == "cuda"
    return row(f"2. LeNet certify n={n:,}: Smooth / naive", passes / t_smooth, passes / t_naive, "/s",
               ">= 5x" if cuda else ">= 1.0x", note="Smooth in bf16, naive in fp32" if cuda else "")


# ---------------------------------------------------------------- 3. GPU: epoch and certification
def epoch_time(device, arch, steps, repeats, compile):
    """A MACER epoch on 50,000 synthetic CIFAR-size images, extrapolated from `steps` steps. A:
    eager fp32, data on the host, augmented there and copied each step. B: the fast path."""
    torch.manual_seed(0)
    data = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50_000,))
    data_dev, labels_dev = data.to(device), labels.to(device)
    model_a = models.get_model("cifar10", arch=arch).to(device)
    model_b = copy.deepcopy(model_a).to(memory_format=torch.channels_last)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                    for m in (model_a, model_b))
    net_b = torch.compile(model_b) if compile else model_b

    def eager_fp32():
        torch.backends.cudnn.benchmark = False
        for _ in range(steps):
            idx = torch.randint(0, len(data), (N,))
            x = crop_flip(data[idx].float() / 255).to(device)
            train_step(model_a, opt_a, x, labels[idx].to(device), "macer", fast=False)

    def fast():
        torch.backends.cudnn.benchmark = True  # autotuned in the warm-up call
        for _ in range(steps):
            idx = torch.randint(0, len(data), (N,), device=device)
            x = crop_flip(data_dev[idx].float() / 255)
            train_step(net_b, opt_b, x, labels_dev[idx], "macer", fast=True)

    t_a, t_b = compare(eager_fp32, fast, device, repeats)
    return row(f"3a. {arch} epoch: fp32 / fast", t_a / steps * STEPS_PER_EPOCH, t_b / steps * STEPS_PER_EPOCH,
               "s", "B <= 15 s (H100)", note=f"{steps} steps timed x{repeats}, extrapolated to {STEPS_PER_EPOCH}")


@torch.inference_mode()
def certify_time(device, arch, n, inputs):
    """The time to certify 500 CIFAR-size inputs with Smooth (bf16), from `inputs` of them."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = models.get_model("cifar10", arch=arch).to(device).eval().to(memory_format=torch.channels_last)
    smooth = certify.Smooth(model, 10, SIGMA)
    xs = torch.rand(inputs, 3, 32, 32, device=device)
    smooth.certify(xs[0], N0, CERT_BATCH * 10, ALPHA, CERT_BATCH)  # warm-up
    seconds = statistics.median(clock(lambda: smooth.certify(x, N0, n, ALPHA, CERT_BATCH), device) for x in xs)
    return row(f"3b. {arch} certify 500 @ n={n:,}", None, seconds * 500, "s", "B <= 300 s (H100)",
               note=f"{inputs} inputs timed, extrapolated to 500")


# ---------------------------------------------------------------- report
def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "/s":
        return f"{v:,.0f} /s"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.1f} s"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes; ResNet-20 on CPU")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the models trained in 1 and 3a")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    repeats = 3 if a.quick else 5
    # A ResNet-110 step (1,024 images, forward and backward) takes about 20 s on 2 idle CPU cores and
    # a ResNet-20 step about 4 s, so --quick there uses ResNet-20, and stays under 3 minutes.
    small = a.quick and not cuda
    resnet, resnet_repeats = ("resnet20", 5) if small else ("resnet110", repeats)
    info = dict(device=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
                date=datetime.datetime.now().isoformat(timespec="seconds"), quick=a.quick, compile=a.compile)
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    rows = []
    print("1. loss overhead", flush=True)
    # LeNet steps are cheap, so they get two more repeats; on a GPU one timing spans several steps.
    rows.append(loss_overhead("LeNet", "fashion-mnist", None, device, repeats + 2, 20 if cuda else 1, a.compile))
    rows.append(loss_overhead(resnet, "cifar10", resnet, device, resnet_repeats, 5 if cuda else 1, a.compile,
                              note="ResNet-20 stands in for ResNet-110 (--quick on CPU)" if small else ""))
    print("2. certification throughput", flush=True)
    rows.append(certification(device, 100_000 if cuda else 5_000 if a.quick else 10_000, repeats))
    if cuda:
        print("3. ResNet-110 epoch and certification", flush=True)
        rows.append(epoch_time(device, "resnet110", 20, repeats, a.compile))
        rows.append(certify_time(device, "resnet110", 100_000, 3))
    else:
        rows.append(row("3. resnet110 epoch, certify 500", None, None, "s", "-", note="not measured: no GPU"))

    print(f"\n{'name':<40} {'A':>14} {'B':>14} {'ratio':>7}  target")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(f"{r['name']:<40} {fmt(r['a'], r['unit']):>14} {fmt(r['b'], r['unit']):>14} {ratio:>7}  {r['target']}"
              + (f"   [{r['note']}]" if r["note"] else ""))
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(info, rows=rows), f, indent=1)
        os.replace(tmp, a.json)  # atomic: a reader never sees half a file
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
