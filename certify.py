"""Randomized smoothing: Hard-RS (Cohen et al., 2019) and Soft-RS (MACER, Appendix A, Algorithm 2).

The smoothed classifier g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), is certified
around x with radius sigma * PhiInv(p_A_low), where p_A_low is a 1 - alpha lower confidence bound
on the top class's probability (Theorem 1, or Eq. 20 for Soft-RS with z = softmax(beta * u)).

As a library:   Smooth(model, num_classes=10, sigma=0.25).certify(x, n0=100, n=100_000, alpha=0.001)
As a tool:      python certify.py CHECKPOINT [--n 100000] [--bound bernstein] [--out results.tsv]
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from scipy.stats import beta as beta_dist, binomtest, norm

RADII = [0.25 * i for i in range(10)]  # the paper's grid r = 0, 0.25, ..., 2.25


# ---------------------------------------------------------------- lower confidence bounds on p_A
def clopper_pearson_lower(n_A, n, alpha):
    """One-sided 1 - alpha Clopper-Pearson lower bound on a binomial p from n_A of n (Theorem 1)."""
    return 0.0 if n_A == 0 else float(beta_dist.ppf(alpha, n_A, n - n_A + 1))


def hoeffding_lower(z_hat_A, n, alpha):
    """Eq. 23: z_A_low = z_hat_A - sqrt(-log(alpha) / (2n)), for n samples in [0, 1]."""
    return z_hat_A - math.sqrt(-math.log(alpha) / (2 * n))


def bernstein_lower(z_hat_A, S2_A, n, alpha):
    """Eq. 26 (Maurer & Pontil 2009, Theorem 4): the last term sits outside the square root."""
    log_term = math.log(2 / alpha)
    return z_hat_A - math.sqrt(2 * S2_A * log_term / n) - 7 * log_term / (3 * (n - 1))


def radius(p_A_low, sigma, p_B_up=None):
    """Theorem 1 (Eq. 8; Eq. 16 for Soft-RS): R = sigma/2 * (PhiInv(p_A_low) - PhiInv(p_B_up)).
    Without p_B_up, p_B_up = 1 - p_A_low (Cohen et al.; Eq. 20) and R = sigma * PhiInv(p_A_low).
    None means abstain: the bounds do not separate class A from the rest."""
    if p_B_up is None:
        return sigma * float(norm.ppf(p_A_low)) if p_A_low > 0.5 else None
    return sigma / 2 * float(norm.ppf(p_A_low) - norm.ppf(p_B_up)) if p_A_low > p_B_up else None


# ---------------------------------------------------------------- the smoothed classifier
class Smooth:
    """A smoothed classifier around `base_classifier`, which maps (b, *D) inputs in [0, 1] pixel
    space to (b, num_classes) logits. beta is the Soft-RS inverse temperature. On CUDA the base
    classifier runs under bf16 autocast unless amp=False; a bf16 base classifier is a valid base
    classifier, but not the fp32 one."""

    ABSTAIN = -1

    def __init__(self, base_classifier, num_classes, sigma, beta=1.0, amp=True):
        self.base_classifier, self.num_classes, self.sigma, self.beta = base_classifier, num_classes, sigma, beta
        self.amp = amp

    @torch.inference_mode()
    def _sample(self, x, num, batch_size, soft=False):
        """SAMPLEUNDERNOISE, on the classifier's device. Hard: counts (K,) of argmax_c u^c(x + eta).
        Soft (Algorithm 2, lines 21-28): A (2, K), the sums of z and z^2 with z = softmax(beta * u),
        in float64. The noise is drawn and the counting done on the device; nothing comes back to
        the host here, so a whole CERTIFY makes one host transfer."""
        device = next(self.base_classifier.parameters()).device
        x = x.to(device)
        K = self.num_classes
        acc = torch.zeros((2, K) if soft else (K,), dtype=torch.float64 if soft else torch.long, device=device)
        amp = torch.autocast("cuda", torch.bfloat16, enabled=self.amp and device.type == "cuda")
        remaining = num
        while remaining > 0:
            b = min(batch_size, remaining)
            remaining -= b
            batch = x.unsqueeze(0).expand(b, *x.shape)  # (b, *D), a view: no copy until the noise
            batch = batch + self.sigma * torch.randn(batch.shape, device=device, dtype=x.dtype)
            with amp:
                logits = self.base_classifier(batch).float()  # (b, K)
            if soft:
                z = F.softmax(self.beta * logits, dim=1).double()
                acc[0] += z.sum(0)
                acc[1] += (z * z).sum(0)
            else:
                acc += torch.bincount(logits.argmax(1), minlength=K)
        return acc

    def predict(self, x, n, alpha, batch_size):
        """Cohen et al.'s PREDICT: the top class of n samples, or ABSTAIN unless a two-sided
        binomial test says the top two counts differ at level alpha."""
        self.base_classifier.eval()
        top2 = self._sample(x, n, batch_size).topk(2)
        (c_1, c_2), (c_top, _) = top2.values.tolist(), top2.indices.tolist()  # the one host transfer
        if binomtest(c_1, c_1 + c_2, 0.5).pvalue > alpha:
            return Smooth.ABSTAIN
        return c_top

    def certify(self, x, n0, n, alpha, batch_size, bound="clopper-pearson"):
        """CERTIFY. Returns (c_A, radius) or (ABSTAIN, 0.0). c_A is chosen from n0 selection
        samples; its probability is bounded from n fresh estimation samples, so the bound holds.
        bound: "clopper-pearson" (Hard-RS, Theorem 1), "hoeffding" (Eq. 23) or "bernstein"
        (Eq. 26), the last two on Soft-RS's z = softmax(beta * u) (Algorithm 2)."""
        self.base_classifier.eval()
        if bound == "clopper-pearson":
            c_A = self._sample(x, n0, batch_size).argmax()  # selection: n0 samples, kept on the device
            c_A, n_A = torch.stack([c_A, self._sample(x, n, batch_size)[c_A]]).tolist()  # estimation: n fresh
            p_A_low = clopper_pearson_lower(n_A, n, alpha)
        elif bound in ("hoeffding", "bernstein"):
            c_A = self._sample(x, n0, batch_size, soft=True)[0].argmax()  # Algorithm 2, lines 3-4
            A = self._sample(x, n, batch_size, soft=True)[:, c_A]  # lines 5 and 14: sums of z_A and z_A^2
            c_A, A_1, A_2 = torch.cat([c_A.double().view(1), A]).tolist()  # the one host transfer
            c_A = int(c_A)
            z_hat_A = A_1 / n
            if bound == "hoeffding":
                p_A_low = hoeffding_lower(z_hat_A, n, alpha)
            else:
                S2_A = max((A_2 - A_1 ** 2 / n) / (n - 1), 0.0)  # Eq. 25; max: float64 rounding
                p_A_low = bernstein_lower(z_hat_A, S2_A, n, alpha)
        else:
            raise ValueError(f"unknown bound {bound!r}: use clopper-pearson, hoeffding or bernstein")
        R = radius(p_A_low, self.sigma)
        return (Smooth.ABSTAIN, 0.0) if R is None else (c_A, R)


# ---------------------------------------------------------------- summaries and results files
def summarize(labels, predictions, radii, grid=RADII):
    """Approximate certified accuracy at each r in grid (correct and radius >= r) and the ACR
    (mean radius, 0 for a wrong or abstained input), over all inputs given."""
    correct = [int(p == l) for l, p in zip(labels, predictions)]
    n = max(len(correct), 1)
    cert_acc = {r: sum(c for c, R in zip(correct, radii) if R >= r) / n for r in grid}
    acr = sum(c * R for c, R in zip(correct, radii)) / n
    return {"n": len(correct), "cert_acc": cert_acc, "acr": acr}


def format_table(summary, title=""):
    """The paper's Table 1 layout: certified accuracy at each radius, then ACR."""
    grid = list(summary["cert_acc"])
    head = f"{'':<20}" + "".join(f"{r:>7.2f}" for r in grid) + f"{'ACR':>8}"
    row = f"{title[:20]:<20}" + "".join(f"{a:>7.3f}" for a in summary["cert_acc"].values())
    row += f"{summary['acr']:>8.3f}"
    return f"certified accuracy at radius r, over {summary['n']} inputs\n{head}\n{row}"


def save_table(summary, tsv_path, title=""):
    """Write format_table's text beside the TSV (as <name>_table.txt, atomically) and return it."""
    table = format_table(summary, title)
    path = os.path.splitext(tsv_path)[0] + "_table.txt"
    with open(path + ".tmp", "w") as f:
        f.write(table + "\n")
    os.replace(path + ".tmp", path)
    return table


TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def read_tsv(path):
    """The rows of a results TSV (Cohen et al.'s columns) as a list of dicts; [] if absent."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [l.rstrip("\n").split("\t") for l in f if l.strip()]
    if not lines or "\t".join(lines[0]) != TSV_HEADER:
        raise SystemExit(f"error: {path} is not a results file of this tool; choose another --out.")
    return [dict(idx=int(r[0]), label=int(r[1]), predict=int(r[2]), radius=float(r[3]),
                 correct=int(r[4]), time=float(r[5])) for r in lines[1:] if len(r) == 6]


def certify_dataset(smooth, dataset, indices, out, n0, n, alpha, batch_size, bound, log=print):
    """Certify dataset[i] for i in indices, appending one flushed TSV row per input to `out`, so an
    interrupted run keeps its rows; a rerun on the same file skips the indices already there.
    Returns the summary over every row of `out` among `indices`."""
    done = {r["idx"] for r in read_tsv(out)}
    todo = [i for i in indices if i not in done]
    new_file = not os.path.exists(out) or os.path.getsize(out) == 0
    if done:
        log(f"resuming {out}: {len(done)} inputs done, {len(todo)} to go")
    t_start = time.time()
    with open(out, "a") as f:
        if new_file:
            f.write(TSV_HEADER + "\n")
        for j, i in enumerate(todo):
            x, label = dataset[i]
            t0 = time.time()
            prediction, R = smooth.certify(x, n0, n, alpha, batch_size, bound)
            dt = time.time() - t0
            correct = int(prediction == int(label))
            R_floor = math.floor(R * 1e5) / 1e5  # rounded down: a written radius never overclaims
            f.write(f"{i}\t{int(label)}\t{prediction}\t{R_floor:.5f}\t{correct}\t{dt:.3f}\n")
            f.flush()
            eta = (time.time() - t_start) / (j + 1) * (len(todo) - j - 1)
            log(f"[{j + 1:>4}/{len(todo)}] idx {i:>5}  label {int(label)}  predict {prediction:>2}  "
                f"radius {R:.3f}  {'correct' if correct else 'wrong  '}  {dt:.2f}s  ETA {eta / 60:.1f} min")
    rows = [r for r in read_tsv(out) if r["idx"] in set(indices)]
    return summarize([r["label"] for r in rows], [r["predict"] for r in rows], [r["radius"] for r in rows])


def plot_curve(tsv_paths, labels=None, png_path="curve.png"):
    """Figure 1: approximate certified accuracy against radius, one curve per TSV."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib")
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for path, label in zip(tsv_paths, labels or tsv_paths):
        rows = read_tsv(path)
        grid = [i * 0.01 for i in range(int(max([r["radius"] for r in rows] + [0.5]) * 100) + 2)]
        s = summarize([r["label"] for r in rows], [r["predict"] for r in rows], [r["radius"] for r in rows], grid)
        ax.plot(grid, list(s["cert_acc"].values()), label=label)
    ax.set_xlabel("radius r (l2, pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, png_path)
    plt.close(fig)
    return True


def default_batch(dataset, device):
    """Large batches where they fit: a GPU certifies fastest with thousands of samples per pass."""
    return 400 if dataset == "imagenet" else 10_000 if str(device).startswith("cuda") else 1000


# ---------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(description="Certify a smoothed classifier on a test set (Cohen's protocol).")
    p.add_argument("checkpoint", help="this project's checkpoint, the MACER authors' or Cohen et al.'s")
    p.add_argument("--dataset", help="mnist, fashion-mnist, cifar10, svhn or imagenet (read from the checkpoint if there)")
    p.add_argument("--arch", help="lenet, resnet110, resnet20, ..., resnet50 (read from the checkpoint if there)")
    p.add_argument("--sigma", type=float, help="noise level (read from the checkpoint if there)")
    p.add_argument("--no-normalize", action="store_true", help="the checkpoint was trained without in-model normalisation (the authors' and Cohen's were normalised outside)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=None, help="noisy samples per forward pass (default: 1000 on CPU, "
                   "10000 on CUDA, 400 for ImageNet)")
    p.add_argument("--skip", type=int, default=20, help="certify every skip-th test image")
    p.add_argument("--max", type=int, default=500, help="at most this many images")
    p.add_argument("--bound", default="clopper-pearson", choices=["clopper-pearson", "hoeffding", "bernstein"])
    p.add_argument("--beta", type=float, default=None, help="Soft-RS inverse temperature (default: the checkpoint's, else 1)")
    p.add_argument("--out", default=None, help="results TSV (default: beside the checkpoint)")
    p.add_argument("--plot", action="store_true", help="also write the radius-accuracy curve as PNG")
    p.add_argument("--summary", help="add this run to a JSON list of runs (and with --plot, plot them all)")
    p.add_argument("--name", help="the run's name in --summary (default: the checkpoint's folder)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)

    import models, train  # the networks and the data; imported here so the library needs neither
    if not 0 < a.alpha < 1:
        sys.exit("error: --alpha must lie strictly between 0 and 1.")
    if a.n0 < 1 or a.n < 1 or (a.batch or 1) < 1 or a.skip < 1 or a.max < 1:
        sys.exit("error: --n0, --n, --batch, --skip and --max must be at least 1.")
    if (a.sigma is not None and a.sigma <= 0) or (a.beta is not None and a.beta <= 0):
        sys.exit("error: --sigma and --beta must be > 0.")
    model, cfg = models.load_checkpoint(a.checkpoint, dataset=a.dataset, arch=a.arch,
                                        normalize=False if a.no_normalize else None)
    sigma = a.sigma if a.sigma is not None else cfg.get("sigma")
    if sigma is None or sigma <= 0:
        sys.exit("error: the checkpoint does not say its sigma; pass --sigma (> 0).")
    beta = a.beta if a.beta is not None else cfg.get("beta", 1.0)
    model = model.to(a.device).eval()
    if a.device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    test_set = train.load_dataset(cfg["dataset"], a.data_dir, train=False)
    indices = list(range(0, len(test_set), a.skip))[: a.max]
    out = a.out or os.path.splitext(a.checkpoint)[0] + f"_{a.bound}_n{a.n}.tsv"
    print(f"certifying {len(indices)} {cfg['dataset']} test images: {cfg['arch']}, sigma {sigma}, "
          f"n0 {a.n0}, n {a.n}, alpha {a.alpha}, {a.bound} -> {out}")
    smooth = Smooth(model, models.NUM_CLASSES[cfg["dataset"]], sigma, beta, amp=not a.fp32)
    batch = a.batch or default_batch(cfg["dataset"], a.device)
    summary = certify_dataset(smooth, test_set, indices, out, a.n0, a.n, a.alpha, batch, a.bound)
    print(save_table(summary, out, f"{cfg['dataset']} s={sigma}"))
    if a.bound == "clopper-pearson":  # the radius when all n samples agree
        print(f"max certifiable radius at this n: {sigma * norm.ppf(a.alpha ** (1 / a.n)):.3f}")
    curves = [(out, f"{cfg['dataset']} s={sigma} {a.bound}")]
    if a.summary:
        runs = add_to_summary(a.summary, dict(
            name=a.name or os.path.basename(os.path.dirname(os.path.abspath(a.checkpoint))), dataset=cfg["dataset"],
            sigma=sigma, method=cfg.get("method"), k=cfg.get("k"), lbd=cfg.get("lbd"), gamma=cfg.get("gamma"),
            beta=beta, epochs=cfg.get("epochs_done"), bound=a.bound, n0=a.n0, n=a.n, alpha=a.alpha,
            acr=round(summary["acr"], 4), cert_acc={f"{r:.2f}": round(v, 4) for r, v in summary["cert_acc"].items()},
            certified=summary["n"], train_seconds=cfg.get("train_seconds") and round(cfg["train_seconds"], 1),
            device=cfg.get("device_name", cfg.get("device")), checkpoint=a.checkpoint, tsv=out))
        curves = [(r["tsv"], r["name"]) for r in runs]
    if a.plot:
        png = os.path.splitext(a.summary or out)[0] + ".png"
        if plot_curve(*zip(*curves), png_path=png):
            print(f"wrote {png}")


def add_to_summary(path, run):
    """Insert or replace (by name) one run in the JSON file {"runs": [...]}, written atomically."""
    runs = json.load(open(path))["runs"] if os.path.exists(path) else []
    runs = [r for r in runs if r["name"] != run["name"]] + [run]
    with open(path + ".tmp", "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    os.replace(path + ".tmp", path)
    return runs


if __name__ == "__main__":
    main()
