"""Randomized smoothing: Hard-RS (Cohen et al., 2019) and Soft-RS (MACER, Appendix A, Algorithm 2).

The smoothed classifier g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), is certified
around x with radius sigma * PhiInv(p_A_low), where p_A_low is a 1 - alpha lower confidence bound
on the top class's probability (Theorem 1, or Eq. 20 for Soft-RS with z = softmax(beta * u)).

As a library:   Smooth(model, num_classes=10, sigma=0.25).certify(x, n0=100, n=100_000, alpha=0.001, batch_size=400)
As a tool:      python certify.py CHECKPOINT [--n 100000] [--bound bernstein] [--out results.tsv]
                python certify.py --compare A.tsv B.tsv
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta as beta_dist, binomtest, norm

import data

RADII = [0.25 * i for i in range(10)]  # the paper's grid r = 0, 0.25, ..., 2.25
BOUNDS = ("clopper-pearson", "hoeffding", "bernstein")


# ---------------------------------------------------------------- lower confidence bounds on p_A
def clopper_pearson_lower(n_A, n, alpha):
    """One-sided 1 - alpha Clopper-Pearson lower bound on a binomial p from n_A of n (Theorem 1)."""
    return 0.0 if n_A == 0 else float(beta_dist.ppf(alpha, n_A, n - n_A + 1))


def hoeffding_lower(z_hat_A, n, alpha):
    """Eq. 23: z_A_low = z_hat_A - sqrt(-log(alpha) / (2n)), for n samples in [0, 1]."""
    return z_hat_A - math.sqrt(-math.log(alpha) / (2 * n))


def sample_variance(A_1, A_2, n):
    """Eq. 25: S^2 = 1/(n-1) sum_i (z_i - z_hat)^2, from A_1 = sum z_i and A_2 = sum z_i^2."""
    return max((A_2 - A_1 * A_1 / n) / (n - 1), 0.0)  # max: float64 rounding of a zero variance


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
    space to (b, num_classes) logits. beta is the Soft-RS inverse temperature. The noise is drawn
    on `device` (default: the classifier's, else the input's). Batches go in channels_last;
    bf16=True runs the classifier under bf16 autocast: the certificate is then about that bf16
    classifier, a valid base classifier of its own. A sample whose logits are not all finite votes
    for no class."""

    ABSTAIN = -1

    def __init__(self, base_classifier, num_classes, sigma, beta=1.0, device=None, bf16=False):
        for name, v in (("sigma", sigma), ("beta", beta)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, not {v!r}")
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"num_classes must be an integer >= 2, not {num_classes!r}")
        self.base_classifier, self.num_classes, self.sigma, self.beta = base_classifier, num_classes, sigma, beta
        tensors = [*base_classifier.parameters(), *base_classifier.buffers()] if hasattr(base_classifier, "parameters") else []
        self.device = torch.device(device) if device is not None else tensors[0].device if tensors else None
        self.bf16 = bf16

    def _noisy_logits(self, x, num, batch_size):
        """SAMPLEUNDERNOISE in batches: the logits (b, K) of f at x + eta, eta ~ N(0, sigma^2 I)."""
        hint = (f"pass one input x without a batch dimension (x has shape {tuple(x.shape)}), and num_classes "
                "equal to the classifier's number of outputs")
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            batch = x.unsqueeze(0).expand(b, *x.shape)  # (b, *D), a view: no copy until the noise
            batch = batch + self.sigma * torch.randn(batch.shape, device=x.device, dtype=x.dtype)
            if batch.dim() == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
            try:
                with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
                    logits = self.base_classifier(batch).float()
            except RuntimeError as e:  # most networks reject the extra dimension deep inside
                raise ValueError(f"the base classifier failed on a batch of shape {tuple(batch.shape)}: {hint}") from e
            if logits.shape != (b, self.num_classes):
                raise ValueError(f"the base classifier gave logits of shape {tuple(logits.shape)} for {b} inputs, "
                                 f"not ({b}, {self.num_classes}): {hint}")
            yield logits

    @torch.inference_mode()
    def _counts(self, x, num, batch_size):
        """Hard-RS: (K + 1,) counts of argmax_c u^c(x + eta) over num samples, kept on the device;
        the last entry counts the samples with non-finite logits, which vote for no class."""
        K = self.num_classes
        counts = torch.zeros(K + 1, dtype=torch.long, device=x.device)
        for logits in self._noisy_logits(x, num, batch_size):
            vote = logits.argmax(1).masked_fill(~torch.isfinite(logits).all(1), K)  # (b,)
            counts += torch.bincount(vote, minlength=K + 1)
        return counts

    @torch.inference_mode()
    def _moments(self, x, num, batch_size):
        """Soft-RS (Algorithm 2, lines 21-28): (3, K) float64 sums over num samples of z and z^2,
        z = softmax(beta * u(x + eta)), and in row 2 the count of non-finite samples, whose z is 0."""
        sums = torch.zeros(3, self.num_classes, dtype=torch.float64, device=x.device)
        for logits in self._noisy_logits(x, num, batch_size):
            finite = torch.isfinite(logits).all(1, keepdim=True)  # (b, 1)
            z = F.softmax(self.beta * logits, dim=1).double().where(finite, 0.0)
            sums[0] += z.sum(0)
            sums[1] += (z * z).sum(0)
            sums[2] += (~finite).sum()
        return sums

    def _prepare(self, x, batch_size, alpha, **counts):
        """Check the arguments; put x on the device and the classifier in eval mode."""
        if not (isinstance(alpha, float) and 0 < alpha < 1):
            raise ValueError(f"alpha must lie strictly between 0 and 1, not {alpha!r}")
        for name, v in dict(counts, batch_size=batch_size).items():
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, not {v!r}")
        if isinstance(self.base_classifier, torch.nn.Module):
            self.base_classifier.eval()
        return x.to(self.device) if self.device is not None else x

    def _warn_nonfinite(self, bad, num):
        if bad:
            warnings.warn(f"{bad} of {num} noisy samples gave non-finite logits; they voted for no class")

    def predict(self, x, n, alpha, batch_size):
        """Cohen et al.'s PREDICT: the top class of n samples, or ABSTAIN unless a two-sided
        binomial test says the top two counts differ at level alpha."""
        x = self._prepare(x, batch_size, alpha, n=n)
        counts = self._counts(x, n, batch_size).tolist()
        self._warn_nonfinite(counts.pop(), n)
        c_1, c_2 = sorted(counts)[-2:][::-1]
        if c_1 == 0 or binomtest(c_1, c_1 + c_2, 0.5).pvalue > alpha:
            return Smooth.ABSTAIN
        return counts.index(c_1)

    def certify(self, x, n0, n, alpha, batch_size, bound="clopper-pearson"):
        """CERTIFY. Returns (c_A, radius) or (ABSTAIN, 0.0). c_A is chosen from n0 selection
        samples; its probability is bounded from n fresh estimation samples, so the bound holds.
        bound: "clopper-pearson" (Hard-RS, Theorem 1), "hoeffding" (Eq. 23) or "bernstein"
        (Eq. 26), the last two on Soft-RS's z = softmax(beta * u) (Algorithm 2)."""
        x = self._prepare(x, batch_size, alpha, n0=n0, n=n)
        if bound not in BOUNDS:
            raise ValueError(f"unknown bound {bound!r}: use clopper-pearson, hoeffding or bernstein")
        if bound == "bernstein" and n < 2:
            raise ValueError("the Bernstein bound needs n >= 2 samples (Eq. 25 divides by n - 1)")
        K = self.num_classes
        if bound == "clopper-pearson":
            c_A = int(self._counts(x, n0, batch_size)[:K].argmax())  # selection: n0 samples
            counts = self._counts(x, n, batch_size)  # estimation: n fresh samples
            n_A, bad = counts[[c_A, K]].tolist()
            p_A_low = clopper_pearson_lower(n_A, n, alpha)
        else:
            c_A = int(self._moments(x, n0, batch_size)[0].argmax())  # Algorithm 2, lines 3-4
            A_1, A_2, bad = self._moments(x, n, batch_size)[:, c_A].tolist()  # lines 5 and 14
            z_hat_A = A_1 / n
            if bound == "hoeffding":
                p_A_low = hoeffding_lower(z_hat_A, n, alpha)
            else:
                p_A_low = bernstein_lower(z_hat_A, sample_variance(A_1, A_2, n), n, alpha)
        self._warn_nonfinite(int(bad), n)
        R = radius(p_A_low, self.sigma)
        return (Smooth.ABSTAIN, 0.0) if R is None else (c_A, R)


# ---------------------------------------------------------------- summaries
def summarize(rows, grid=RADII):
    """Approximate certified accuracy at each r in grid (correct and radius >= r) and the ACR
    (mean radius, 0 for a wrong or abstained input), over the rows (dicts of label, predict, radius)."""
    credit = [(r["predict"] == r["label"], r["radius"]) for r in rows]
    n = max(len(rows), 1)
    cert_acc = {g: sum(c and R >= g for c, R in credit) / n for g in grid}
    return {"n": len(rows), "cert_acc": cert_acc, "acr": sum(c * R for c, R in credit) / n}


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
    data.atomic_write(os.path.splitext(tsv_path)[0] + "_table.txt", lambda p: open(p, "w").write(table + "\n"))
    return table


def compare(path_a, path_b, resamples=10_000, seed=0):
    """A paired comparison of two results files on the inputs they share: ACR of each, the
    difference B - A with a 95% paired-bootstrap interval (resampling the inputs), and the
    certified-accuracy difference at each radius of the grid."""
    a, b = ({r["idx"]: r for r in read_tsv(p)} for p in (path_a, path_b))
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"{path_a} and {path_b} share no inputs; compare results on the same test images")
    s_a, s_b = summarize([a[i] for i in common]), summarize([b[i] for i in common])
    credit = lambda rows: np.array([rows[i]["radius"] * (rows[i]["predict"] == rows[i]["label"]) for i in common])
    d = credit(b) - credit(a)  # (m,) per-input difference of the ACR's terms
    boot = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)  # (resamples,)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(n=len(common), acr_a=s_a["acr"], acr_b=s_b["acr"], diff=float(d.mean()), ci=(float(lo), float(hi)),
                cert_acc_diff={r: s_b["cert_acc"][r] - s_a["cert_acc"][r] for r in RADII})


def format_compare(c, path_a, path_b, seed=0):
    return (f"on the {c['n']} inputs both hold: ACR {c['acr_a']:.3f} (A, {path_a}), {c['acr_b']:.3f} (B, {path_b})\n"
            f"ACR difference B - A: {c['diff']:+.3f}, 95% paired-bootstrap interval [{c['ci'][0]:+.3f}, "
            f"{c['ci'][1]:+.3f}] (seed {seed})\ncertified accuracy difference B - A at radius r\n"
            + "".join(f"{r:>7.2f}" for r in c["cert_acc_diff"]) + "\n"
            + "".join(f"{v:>+7.3f}" for v in c["cert_acc_diff"].values()))


# ---------------------------------------------------------------- results files
TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def parse_rows(text, path):
    """The rows of a results TSV's text (Cohen et al.'s columns) as dicts; ValueError if corrupt."""
    lines = text.splitlines()
    if not lines or lines[0] != TSV_HEADER:
        raise ValueError(f"{path} is not a results file of this tool; choose another --out")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            i, label, pred, R, correct, t = line.split("\t")
            rows.append(dict(idx=int(i), label=int(label), predict=int(pred), radius=float(R), correct=int(correct), time=float(t)))
        except ValueError:
            raise ValueError(f"line {number} of {path} is corrupt; delete that line to certify its input again") from None
    if len({r["idx"] for r in rows}) != len(rows):
        raise ValueError(f"{path} holds an input twice; delete the repeated rows")
    return rows


def read_tsv(path):
    """The rows of a results TSV; [] if the file is absent."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return parse_rows(f.read(), path)


def settings_path(tsv_path):
    return os.path.splitext(tsv_path)[0] + "_settings.json"


def open_results(path, settings, overwrite=False, log=print):
    """Open the results TSV for appending, locked against other writers, and return (file, rows).
    The settings that made its rows sit beside it (<name>_settings.json): rows made with other
    settings are never mixed in, the call refuses unless overwrite=True starts the file afresh.
    A last row cut short by a crash is dropped, so its input is certified again."""
    f = open(path, "a+")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        pass
    except OSError:
        f.close()
        raise ValueError(f"another process is writing {path}; wait for it to finish or choose another --out") from None
    f.seek(0)
    text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        f.truncate(len(text.encode()))
        log(f"warning: dropped the cut-off last row of {path}; its input will be certified again")
    rows = parse_rows(text, path) if text else []
    saved = json.load(open(settings_path(path))) if os.path.exists(settings_path(path)) else None
    if rows and saved != settings:
        if not overwrite:
            f.close()
            differ = sorted(k for k in settings if (saved or {}).get(k) != settings[k])
            raise ValueError(f"{path} holds results made with other settings ({', '.join(differ)}); choose another "
                             "--out, or pass --overwrite to start it afresh")
        log(f"starting {path} afresh: its rows were made with other settings")
        rows, text = [], ""
        f.truncate(0)
    if not text:
        f.write(TSV_HEADER + "\n")
        f.flush()
    data.atomic_write(settings_path(path), lambda p: json.dump(settings, open(p, "w"), indent=1))
    return f, rows


def certify_dataset(smooth, dataset, indices, out, n0, n, alpha, batch_size, bound, identity=None,
                    overwrite=False, log=print):
    """Certify dataset[i] for i in indices, appending one flushed TSV row per input to `out`, so an
    interrupted run keeps its rows; a rerun with the same settings skips the indices already there.
    identity: what else the settings record (the checkpoint's hash, the seed). Returns the summary
    over the rows of `out` among `indices`, with `seconds`, the sum of their certification times."""
    settings = dict(sigma=smooth.sigma, beta=smooth.beta if bound != "clopper-pearson" else None, n0=n0, n=n,
                    alpha=alpha, bound=bound, precision="bf16" if smooth.bf16 else "fp32", **(identity or {}))
    f, rows = open_results(out, settings, overwrite, log)
    done = {r["idx"] for r in rows}
    todo = [i for i in indices if i not in done]
    if done:
        log(f"resuming {out}: {len(done)} inputs done, {len(todo)} to go")
    t_start = time.time()
    with f, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for j, i in enumerate(todo):
            x, label = dataset[i]
            t0 = time.time()
            prediction, R = smooth.certify(x, n0, n, alpha, batch_size, bound)
            dt = time.time() - t0
            correct = int(prediction == int(label))
            R_floor = math.floor(R * 1e5) / 1e5  # rounded down: a written radius never overclaims
            f.write(f"{i}\t{int(label)}\t{prediction}\t{R_floor:.5f}\t{correct}\t{dt:.3f}\n")
            f.flush()
            rows.append(dict(idx=i, label=int(label), predict=prediction, radius=R_floor, correct=correct, time=dt))
            eta = (time.time() - t_start) / (j + 1) * (len(todo) - j - 1)
            note = "".join(f"  ({w.message})" for w in caught)
            caught.clear()
            log(f"[{j + 1:>4}/{len(todo)}] idx {i:>5}  label {int(label)}  predict {prediction:>2}  "
                f"radius {R:.3f}  {'correct' if correct else 'wrong  '}  {dt:.2f}s  ETA {eta / 60:.1f} min{note}")
    wanted = set(indices)
    kept = [r for r in rows if r["idx"] in wanted]
    return dict(summarize(kept), seconds=sum(r["time"] for r in kept))


def plot_curves(runs, png_path):
    """Figure 1: approximate certified accuracy against radius, one curve per run (a dict with
    tsv, name and sigma), one panel per sigma. Returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plotting needs matplotlib: pip install matplotlib")
        return False
    sigmas = sorted({r["sigma"] for r in runs})
    fig, axes = plt.subplots(1, len(sigmas), figsize=(4.5 * len(sigmas), 3.5), squeeze=False)
    for ax, sigma in zip(axes[0], sigmas):
        for run in sorted((r for r in runs if r["sigma"] == sigma), key=lambda r: r["name"]):  # same colours
            rows = read_tsv(run["tsv"])
            grid = [i * 0.01 for i in range(int(max([r["radius"] for r in rows] + [0.5]) * 100) + 2)]
            ax.plot(grid, list(summarize(rows, grid)["cert_acc"].values()), label=run["name"])
        ax.set(title=f"sigma = {sigma}", xlabel="radius r (l2, pixel space)", ylabel="certified accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    data.atomic_write(png_path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return True


def add_to_summary(path, run):
    """Insert or replace (by name) one run in the JSON file {"runs": [...]}, written atomically."""
    runs = json.load(open(path))["runs"] if os.path.exists(path) else []
    runs = [r for r in runs if r["name"] != run["name"]] + [run]
    data.atomic_write(path, lambda p: json.dump({"runs": runs}, open(p, "w"), indent=1))
    return runs


def default_batch(arch, device):
    """Noisy samples per forward pass, the fastest that bench.py measured: thousands on a GPU, a
    few hundred on a CPU (larger batches fall out of its caches); fewer for ImageNet's ResNet-50."""
    if torch.device(device).type == "cuda":
        return 400 if arch == "resnet50" else 10_000
    return 100 if arch == "resnet50" else 400


# ---------------------------------------------------------------- command line
def parse_args(argv):
    p = argparse.ArgumentParser(description="Certify a smoothed classifier on a test set (Cohen et al.'s protocol), "
                                "or compare two results files.")
    p.add_argument("checkpoint", nargs="?", help="this project's checkpoint, the MACER authors' or Cohen et al.'s")
    p.add_argument("--compare", nargs=2, metavar=("A.tsv", "B.tsv"), help="compare two results files and exit")
    p.add_argument("--dataset", help="mnist, fashion-mnist, cifar10, svhn or imagenet (read from the checkpoint if there)")
    p.add_argument("--arch", help="lenet, resnet110, resnet20, ..., resnet50 (read from the checkpoint if there)")
    p.add_argument("--sigma", type=float, help="noise level (read from the checkpoint if there)")
    p.add_argument("--no-normalize", action="store_true", help="the network takes unnormalised [0, 1] inputs, as the "
                   "MACER authors' checkpoints do (read from the checkpoint; Cohen et al.'s normalise inside the model)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--n0", type=int, default=data.PROTOCOL["n0"], help="selection samples")
    p.add_argument("--n", type=int, default=data.PROTOCOL["n"], help="estimation samples")
    p.add_argument("--alpha", type=float, default=data.PROTOCOL["alpha"], help="failure probability")
    p.add_argument("--batch", type=int, default=None, help="noisy samples per forward pass (default: 400 on a CPU, "
                   "100 for ImageNet there; 10,000 on CUDA, 400 for ImageNet)")
    p.add_argument("--skip", type=int, default=data.PROTOCOL["skip"], help="certify every skip-th test image")
    p.add_argument("--max", type=int, default=data.PROTOCOL["max"], help="at most this many images")
    p.add_argument("--bound", default="clopper-pearson", choices=BOUNDS)
    p.add_argument("--beta", type=float, default=None, help="Soft-RS inverse temperature (default: the checkpoint's, else 1)")
    p.add_argument("--out", default=None, help="results TSV (default: beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh if its rows were made with other settings")
    p.add_argument("--plot", action="store_true", help="also write the radius-accuracy curve as PNG")
    p.add_argument("--summary", help="add this run to a JSON list of runs (and with --plot, plot them all)")
    p.add_argument("--name", help="the run's name in --summary (default: the checkpoint's folder)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast, even where the device has bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    a = p.parse_args(argv)
    if a.compare is None and a.checkpoint is None:
        p.error("give a CHECKPOINT to certify, or --compare A.tsv B.tsv")
    for name in ("sigma", "beta"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name} must be a finite number > 0, not {v}")
    if not 0 < a.alpha < 1:  # also rejects nan
        raise ValueError(f"--alpha must lie strictly between 0 and 1, not {a.alpha}")
    if min(a.n0, a.n, a.batch or 1, a.skip, a.max) < 1:
        raise ValueError("--n0, --n, --batch, --skip and --max must be at least 1")
    if a.bound == "bernstein" and a.n < 2:
        raise ValueError("the Bernstein bound needs --n 2 or more")
    return a


def main(argv=None):
    try:
        run(parse_args(argv))
    except ValueError as e:
        sys.exit(f"error: {str(e).rstrip('.')}.")


def run(a):
    if a.compare:
        c = compare(*a.compare, seed=a.seed)
        print(format_compare(c, *a.compare, seed=a.seed))
        return
    torch.manual_seed(a.seed)
    import models  # the networks; imported here so the library needs no torchvision
    model, cfg = models.load_checkpoint(a.checkpoint, dataset=a.dataset, arch=a.arch,
                                        normalize=False if a.no_normalize else None)
    sigma = a.sigma if a.sigma is not None else cfg.get("sigma")
    if sigma is None:
        raise ValueError("the checkpoint does not say its sigma; pass --sigma")
    beta = a.beta if a.beta is not None else cfg.get("beta", 1.0)
    model, _, precision = models.fast_path(model.to(a.device).eval(), a.device, a.fp32)
    test_set = data.load_dataset(cfg["dataset"], a.data_dir, train=False)
    indices = list(range(0, len(test_set), a.skip))[: a.max]
    out = a.out or os.path.splitext(a.checkpoint)[0] + f"_{a.bound}_n{a.n}.tsv"
    print(f"certifying {len(indices)} {cfg['dataset']} test images: {cfg['arch']}, sigma {sigma}, "
          f"n0 {a.n0}, n {a.n}, alpha {a.alpha}, {a.bound}, {a.device} {precision} -> {out}")
    smooth = Smooth(model, data.DATASETS[cfg["dataset"]].classes, sigma, beta, device=a.device, bf16=precision == "bf16")
    batch = a.batch or default_batch(cfg["arch"], a.device)
    summary = certify_dataset(smooth, test_set, indices, out, a.n0, a.n, a.alpha, batch, a.bound, overwrite=a.overwrite,
                              identity=dict(checkpoint_sha256=hashlib.sha256(open(a.checkpoint, "rb").read()).hexdigest(),
                                            seed=a.seed))
    print(save_table(summary, out, f"{cfg['dataset']} s={sigma}"))
    if a.bound == "clopper-pearson":  # the radius when all n samples agree
        print(f"max certifiable radius at this n: {sigma * norm.ppf(a.alpha ** (1 / a.n)):.3f}")
    runs = [dict(tsv=out, name=f"{cfg['dataset']} s={sigma} {a.bound}", sigma=sigma)]
    if a.summary:
        runs = add_to_summary(a.summary, dict(
            name=a.name or os.path.basename(os.path.dirname(os.path.abspath(a.checkpoint))), dataset=cfg["dataset"],
            sigma=sigma, method=cfg.get("method"), k=cfg.get("k"), lbd=cfg.get("lbd"), gamma=cfg.get("gamma"),
            beta=beta, epochs=cfg.get("epochs_done"), bound=a.bound, n0=a.n0, n=a.n, alpha=a.alpha, precision=precision,
            train_precision=cfg.get("precision"), acr=round(summary["acr"], 4),
            cert_acc={f"{r:.2f}": round(v, 4) for r, v in summary["cert_acc"].items()}, certified=summary["n"],
            cert_seconds=round(summary["seconds"], 1),
            train_seconds=cfg.get("train_seconds") and round(cfg["train_seconds"], 1), device=cfg.get("device_name"),
            checkpoint=a.checkpoint, tsv=out))
    png = os.path.splitext(a.summary or out)[0] + ".png"
    if a.plot and plot_curves(runs, png):
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
