"""Randomized smoothing: Hard-RS (Cohen et al., 2019) and Soft-RS (MACER, Appendix A, Algorithm 2).

g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), is certified around x with radius
sigma * PhiInv(p_A_low), p_A_low a 1 - alpha lower confidence bound on the top class's probability
(Theorem 1; Eq. 20 for Soft-RS). The paper's procedures end at summarize(); the checks follow.

    label, radius = Smooth(model, 10, sigma=0.25).certify(x, 100, 100_000, 0.001, batch_size=400)
"""

import argparse
import contextlib
import math
import numbers
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

import data
import records

RADII = [0.25 * i for i in range(10)]  # the paper's grid r = 0, 0.25, ..., 2.25
BOUNDS = ("clopper-pearson", "hoeffding", "bernstein")


# ---------------------------------------------------------------- lower confidence bounds on p_A
def clopper_pearson_lower(n_A, n, alpha):
    """LOWERCONFBOUND of Cohen et al.'s CERTIFY: one-sided 1 - alpha Clopper-Pearson, on p."""
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
    """Theorem 1 (Eq. 8) and Theorem 2 (Eq. 16): R = sigma/2 * (PhiInv(p_A_low) - PhiInv(p_B_up)),
    p_B_up = 1 - p_A_low by default (Eq. 20): R = sigma * PhiInv(p_A_low). None: abstain."""
    if p_B_up is None:
        return sigma * float(norm.ppf(p_A_low)) if p_A_low > 0.5 else None
    return sigma / 2 * float(norm.ppf(p_A_low) - norm.ppf(p_B_up)) if p_A_low > p_B_up else None


# ---------------------------------------------------------------- the smoothed classifier
class Smooth:
    """g around the base classifier f: (b, *D) inputs in [0, 1] pixel space -> (b, num_classes)
    logits; beta is Soft-RS's inverse temperature. The noise is drawn on `device` (default: f's,
    else the input's), from `generator` (default: torch's). A sample with a non-finite logit votes
    for no class. Each call restores f's train/eval modes; bad arguments raise ValueError."""

    ABSTAIN = -1

    def __init__(self, base_classifier, num_classes, sigma, beta=1.0, device=None):
        check_smooth(num_classes, sigma, beta)
        self.base_classifier, self.num_classes = base_classifier, num_classes
        self.sigma, self.beta = float(sigma), float(beta)
        self.device = torch.device(device) if device is not None else device_of(base_classifier)

    def predict(self, x, n, alpha, batch_size, generator=None):
        """Cohen et al.'s PREDICT: the top class of n samples, or ABSTAIN unless a two-sided
        binomial test says the top two counts differ at level alpha."""
        with check_call(self, x, alpha, batch_size, n=n) as x:
            counts = self._counts(x, n, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n, sigma)
        warn_nonfinite(int(counts[-1]), n)  # the samples that voted for no class
        (n_A, n_B), (c_A, _) = (t.tolist() for t in counts[:-1].topk(2))  # the top two counts
        if n_A > 0 and binomtest(n_A, n_A + n_B, 0.5).pvalue <= alpha:  # BINOMPVALUE <= alpha
            return c_A
        return Smooth.ABSTAIN

    def certify(self, x, n0, n, alpha, batch_size, bound="clopper-pearson", generator=None):
        """Returns (c_A, radius) or (ABSTAIN, 0.0). bound: "clopper-pearson" is Hard-RS, Cohen et
        al.'s CERTIFY (Theorem 1); "hoeffding" (Eq. 23) and "bernstein" (Eq. 26) are Soft-RS,
        Algorithm 2, on z = softmax(beta * u). c_A is chosen from n0 selection samples; its
        probability is bounded from n fresh estimation samples, so the bound holds."""
        with check_call(self, x, alpha, batch_size, n0=n0, n=n, bound=bound) as x:
            if bound == "clopper-pearson":  # Cohen et al.'s CERTIFY
                counts0 = self._counts(x, n0, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n0)
                c_A = int(counts0[:-1].argmax())  # c_A <- top index in counts0
                counts = self._counts(x, n, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n)
                n_A, bad = counts[[c_A, -1]].tolist()  # the count of c_A; of non-finite samples
                p_A_low = clopper_pearson_lower(n_A, n, alpha)  # LOWERCONFBOUND(n_A, n, 1 - alpha)
                R = radius(p_A_low, self.sigma)  # sigma * PhiInv(p_A_low) if above 1/2, else None
            else:  # Algorithm 2's CERTIFYHOEFFDING and CERTIFYBERNSTEIN
                z_hat_0 = self._moments(x, n0, batch_size, generator)[0] / n0  # SAMPLEUNDERNOISE
                c_A = int(z_hat_0.argmax())  # c_A <- argmax_c z_hat_0^c
                A = self._moments(x, n, batch_size, generator)  # A <- SAMPLEUNDERNOISE(z, x, n)
                A_1, A_2, bad = A[:, c_A].tolist()  # A[1, c_A], A[2, c_A]; non-finite samples
                z_hat_A = A_1 / n  # z_hat_A <- A[1, c_A] / n
                if bound == "hoeffding":
                    z_A_low = hoeffding_lower(z_hat_A, n, alpha)  # Eq. 23
                else:
                    z_A_low = bernstein_lower(z_hat_A, sample_variance(A_1, A_2, n), n, alpha)
                R = radius(z_A_low, self.sigma)  # Eq. 20: sigma * PhiInv(z_A_low) if above 1/2
        warn_nonfinite(bad, n)
        return (Smooth.ABSTAIN, 0.0) if R is None else (c_A, R)

    @torch.inference_mode()
    def _counts(self, x, num, batch_size, generator):
        """Hard-RS's SAMPLEUNDERNOISE: (K + 1,) counts of argmax_c u^c(x + eta) over num samples,
        on the device; the last entry counts the samples with non-finite logits, no class's vote."""
        K = self.num_classes
        counts = torch.zeros(K + 1, dtype=torch.long, device=x.device)
        for logits in self._noisy_logits(x, num, batch_size, generator):
            vote = logits.argmax(1).masked_fill(~torch.isfinite(logits).all(1), K)  # (b,)
            counts += torch.bincount(vote, minlength=K + 1)
        return counts

    @torch.inference_mode()
    def _moments(self, x, num, batch_size, generator):
        """Algorithm 2's SAMPLEUNDERNOISE: (3, K) float64 sums over num samples of z and of z^2,
        z = softmax(beta * u(x + eta)), and in the third the count of non-finite samples (z = 0)."""
        sums = torch.zeros(3, self.num_classes, dtype=torch.float64, device=x.device)
        for logits in self._noisy_logits(x, num, batch_size, generator):
            finite = torch.isfinite(logits).all(1, keepdim=True)  # (b, 1)
            gaps = logits - logits.amax(1, keepdim=True)  # <= 0: beta * gaps cannot overflow
            z = F.softmax(self.beta * gaps, dim=1).double().where(finite, 0.0)
            sums[0] += z.sum(0)
            sums[1] += (z * z).sum(0)
            sums[2] += (~finite).sum()
        return sums

    def _noisy_logits(self, x, num, batch_size, generator):
        """The logits (b, K) of f at x + eta, eta ~ N(0, sigma^2 I), in batches of batch_size."""
        like_x = dict(device=x.device, dtype=x.dtype, generator=generator)
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            with explained_errors(x):  # out of memory, or a network that rejects x's shape
                eta = torch.randn((b, *x.shape), **like_x)
                logits = self.base_classifier(x + self.sigma * eta).float()  # x broadcast: (b, *D)
            yield check_logits(logits, b, self.num_classes, x)


# ---------------------------------------------------------------- the metrics of Section 5
def summarize(rows, grid=RADII):
    """Approximate certified accuracy at each r in grid (correct and radius >= r) and the ACR (mean
    radius, 0 for a wrong or abstained input) over rows, dicts of label, predict and radius."""
    credit = [(r["predict"] == r["label"], r["radius"]) for r in rows]
    n = max(len(rows), 1)
    cert_acc = {g: sum(c and R >= g for c, R in credit) / n for g in grid}
    return {"n": len(rows), "cert_acc": cert_acc, "acr": sum(c * R for c, R in credit) / n}


# ---------------------------------------------------------------- Smooth's checks
def largest_radius(sigma, n, alpha, bound):
    """The radius CERTIFY gives when all n samples agree (z_A = 1 for Soft-RS); None when even that
    abstains, so that no input can be certified with this n and alpha."""
    p_A_low = {
        "clopper-pearson": lambda: clopper_pearson_lower(n, n, alpha),
        "hoeffding": lambda: hoeffding_lower(1.0, n, alpha),
        "bernstein": lambda: bernstein_lower(1.0, 0.0, n, alpha) if n >= 2 else 0.0,
    }[bound]()
    return radius(p_A_low, sigma)


def check_smooth(num_classes, sigma, beta):
    for name, v in (("sigma", sigma), ("beta", beta)):
        if isinstance(v, torch.Tensor):  # a real number: a 0-d tensor's, Python's or numpy's
            real = v.dim() == 0 and not (v.dtype.is_complex or v.dtype == torch.bool)
        else:
            real = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
        if not (real and math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name} must be a finite number > 0, not {v!r}")
    if not (
        isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2
    ):
        raise ValueError(f"num_classes must be an integer >= 2, not {num_classes!r}")


def device_of(module):
    tensors = [*module.parameters(), *module.buffers()] if hasattr(module, "parameters") else []
    return tensors[0].device if tensors else None


@contextlib.contextmanager
def check_call(smooth, x, alpha, batch_size, bound="clopper-pearson", **counts):
    """Check a call's arguments, put x on the device and the classifier in eval mode, and restore
    each module's mode afterwards (certifying inside a training loop must not freeze BatchNorm)."""
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}: use clopper-pearson, hoeffding or bernstein")
    if bound == "bernstein" and counts["n"] < 2:
        raise ValueError("the Bernstein bound needs n >= 2 samples (Eq. 25 divides by n - 1)")
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise ValueError(f"alpha must be a float strictly between 0 and 1, not {alpha!r}")
    for name, v in dict(counts, batch_size=batch_size).items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, not {v!r}")
    f = smooth.base_classifier
    modes = [(m, m.training) for m in f.modules()] if isinstance(f, torch.nn.Module) else []
    for m, _ in modes:
        m.training = False
    try:
        yield x.to(smooth.device) if smooth.device is not None else x
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def explained_errors(x):
    """A RuntimeError from drawing the noise or from the base classifier, with what to do: lower
    the batch when out of memory, check the input's shape when the network rejected it."""
    try:
        yield
    except RuntimeError as e:
        if out_of_memory(e):
            raise MemoryError("out of memory on a batch of noisy samples: lower batch_size") from e
        if any(w in str(e).lower() for w in ("shape", "size", "dimension", "expected")):
            first = str(e).strip().splitlines()[0][:200]
            raise ValueError(f"the base classifier failed ({first}): {shape_hint(x)}") from e
        raise


def check_logits(logits, b, K, x):
    if logits.shape != (b, K):
        raise ValueError(f"the base classifier gave logits {tuple(logits.shape)}: {shape_hint(x)}")
    return logits


def shape_hint(x):
    return (
        f"pass one input x without a batch dimension (x has shape {tuple(x.shape)}), and "
        "num_classes equal to the classifier's number of outputs"
    )


def warn_nonfinite(bad, num):
    if bad:
        message = f"{int(bad)} of {num} noisy samples gave non-finite logits, a vote for no class"
        warnings.warn(message, stacklevel=3)


def out_of_memory(error):
    """Whether a RuntimeError from torch is an allocation failure (CUDA's or the CPU's)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


# ---------------------------------------------------------------- results files: rows, tables, plot
def cap_of(settings):
    """The largest radius a results file's settings record allows (inf without a record)."""
    if settings is None:
        return math.inf
    try:
        return largest_radius(*[settings[k] for k in ("sigma", "n", "alpha", "bound")]) or 0.0
    except (KeyError, TypeError, ValueError, ArithmeticError):
        raise ValueError(
            "a settings record lacks a valid sigma, n, alpha or bound: restore it, or --overwrite"
        ) from None


def read_rows(path):
    """A results TSV's rows, each radius checked against the largest its settings record allows."""
    return records.read_tsv(path, records.row_check(cap_of(records.read_settings(path))))


CERTIFY_ARGS = ("n0", "n", "alpha", "batch", "bound")  # Smooth.certify's, from the settings


def certify_each(out, fd, smooth, dataset, indices, settings, who, log):
    """Certify dataset[i] for each i into the open file fd: a row and a log line per input."""
    t_start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for j, i in enumerate(indices):
            x, label = dataset[i]
            t0 = time.time()
            generator = records.input_generator(settings["seed"], i, smooth.device or x.device)
            prediction, R = smooth.certify(x, *[settings[k] for k in CERTIFY_ARGS], generator)
            dt = time.time() - t0
            try:
                records.append_line(fd, records.row_line(i, int(label), prediction, R, dt))
            except OSError as e:
                raise ValueError(
                    f"cannot write {out} ({e.strerror}); make room and rerun"
                ) from None
            remaining = (time.time() - t_start) / (j + 1) * (len(indices) - j - 1)
            note = "".join(f"  ({w.message})" for w in caught)
            caught.clear()
            log(
                f"{who}[{j + 1:>4}/{len(indices)}] idx {i:>5}  label {int(label)}  predict "
                f"{prediction:>2}  radius {R:.3f}  "
                f"{'correct' if prediction == int(label) else 'wrong  '}  {dt:.2f}s  ETA "
                f"{remaining / 60:.1f} min{note}",
                flush=True,
            )


def from_rank0(value):
    """value as rank 0 has it, in every process of a torchrun launch."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def certify_into(out, smooth, dataset, indices, settings, overwrite, rank=0, world=1, log=print):
    """Certify dataset[i] for i in indices into `out`, process `rank` of `world` taking every
    world-th input still missing; on rank 0, return these rows' summary, with their `seconds`."""
    check = records.row_check(cap_of(settings), data.labels(dataset), smooth.num_classes)
    f, todo = None, None
    if rank == 0:
        try:
            f, _, todo = records.open_results(out, settings, indices, check, overwrite, log)
        except ValueError as e:
            todo = str(e)
    todo = from_rank0(todo)  # rank 0's verdict (the inputs to do, or why not) binds every process
    if isinstance(todo, str):
        raise ValueError(todo)
    fd = f.fileno() if f is not None else os.open(out, os.O_WRONLY | os.O_APPEND)
    who = f"rank {rank}: " if world > 1 else ""
    try:
        certify_each(out, fd, smooth, dataset, todo[rank::world], settings, who, log)
        if world > 1:  # rank 0 holds the lock until every process has written its rows
            dist.barrier()
    finally:
        os.close(fd) if f is None else f.close()
    if rank != 0:
        return None
    wanted = set(indices)
    kept = [r for r in records.read_tsv(out, check) if r["idx"] in wanted]
    return dict(summarize(kept), seconds=sum(r["time"] for r in kept))


# ---------------------------------------------------------------- the table, the summary, the plot
def format_table(summary, title=""):
    """The paper's Table 1 layout: certified accuracy at each radius, then ACR."""
    width = max(20, len(title) + 1)
    head = f"{'':<{width}}" + "".join(f"{r:>7.2f}" for r in summary["cert_acc"]) + f"{'ACR':>8}"
    accs = "".join(f"{a:>7.3f}" for a in summary["cert_acc"].values())
    row = f"{title:<{width}}{accs}{summary['acr']:>8.3f}"
    return f"certified accuracy at radius r, over {summary['n']} inputs\n{head}\n{row}"


def plot_curve(tsv, title, png_path):
    """Figure 1 for one results file: approximate certified accuracy against radius r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(tsv)
    grid = [i / 100 for i in range(int(max([r["radius"] for r in rows] + [0.5]) * 100) + 2)]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot(grid, list(summarize(rows, grid)["cert_acc"].values()))
    ax.set(title=title, xlabel="radius r (l2, pixel space)", ylabel="certified accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    data.atomic_write(png_path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------- paired comparison
def bootstrap_means(d, resamples, rng, block=2**22):
    """(resamples,) means of d resampled with replacement, drawn in blocks of about `block` indices
    (50,000 inputs x 10,000 resamples at once would need 4 GB)."""
    out = np.empty(resamples)
    per = max(1, block // len(d))
    for s in range(0, resamples, per):
        r = min(per, resamples - s)
        picks = rng.integers(0, len(d), (r, len(d)))  # (r, m) indices
        out[s : s + r] = d[picks].mean(1)  # (r, m) -> (r,) means
    return out


COMPARED = ("sigma", "n0", "n", "alpha", "bound", "precision", "normalize")


def differences(path_a, path_b):
    """What the settings records of two results files say differently, as notes; ValueError where
    they hold other test sets, whose images cannot be paired."""
    a, b = records.read_settings(path_a, strict=False), records.read_settings(path_b, strict=False)
    if a is None or b is None:
        missing = [p for p, s in ((path_a, a), (path_b, b)) if s is None]
        return [f"no settings record beside {', '.join(missing)}: its settings are unknown"]
    for key in ("dataset", "test_set_sha256"):
        if a.get(key) != b.get(key):
            raise ValueError(f"{path_a} and {path_b} were certified on other test sets ({key})")
    differ = [key for key in COMPARED if a.get(key) != b.get(key)]
    return [f"A and B differ in {key}: {a.get(key)} against {b.get(key)}" for key in differ]


def compare(paths, resamples=10_000, seed=0):
    """Pairs (A, B) of results files, each compared on the inputs both hold: ACR of each, B - A with
    a 95% paired-bootstrap interval (inputs resampled), the certified-accuracy difference at each r.
    With several pairs (one per training seed): their mean difference with a two-level bootstrap
    interval (pairs resampled, then inputs within each), and the spread of A's and B's ACR."""
    rng = np.random.default_rng(seed)
    pairs, diffs = [], []
    for path_a, path_b in zip(paths[::2], paths[1::2], strict=True):
        a, b = ({r["idx"]: r for r in read_rows(p)} for p in (path_a, path_b))
        common = sorted(set(a) & set(b))
        if not common:
            raise ValueError(
                f"{path_a} and {path_b} share no inputs; compare them on the same images"
            )
        i = next((i for i in common if a[i]["label"] != b[i]["label"]), None)
        if i is not None:
            raise ValueError(
                f"{path_a} and {path_b} disagree on the label of input {i}: they were not "
                "certified on the same test set"
            )
        s_a, s_b = (summarize([rows[i] for i in common]) for rows in (a, b))
        credit = [np.array([r[i]["radius"] * r[i]["correct"] for i in common]) for r in (a, b)]
        d = credit[1] - credit[0]  # (m,) per-input difference of the ACR's terms
        lo, hi = np.percentile(bootstrap_means(d, resamples, rng), [2.5, 97.5])
        diffs.append(d)
        pairs.append(dict(a=path_a, b=path_b, n=len(common), acr_a=s_a["acr"], acr_b=s_b["acr"]))
        pairs[-1].update(diff=float(d.mean()), ci=(float(lo), float(hi)))
        pairs[-1].update(notes=differences(path_a, path_b))
        pairs[-1]["cert_acc_diff"] = {r: s_b["cert_acc"][r] - s_a["cert_acc"][r] for r in RADII}
    result = dict(pairs=pairs, seed=seed)
    if len(pairs) > 1:
        m = len(pairs)
        pick = rng.integers(0, m, (resamples, m))  # the pairs, resampled
        inner = np.stack(
            [bootstrap_means(d, resamples * m, rng).reshape(resamples, m) for d in diffs]
        )  # (m, resamples, m)
        rows, cols = np.arange(resamples)[:, None], np.arange(m)[None, :]
        two_level = inner[pick, rows, cols].mean(1)  # (resamples, m) -> (resamples,)
        lo, hi = np.percentile(two_level, [2.5, 97.5])
        result.update(diff=float(np.mean([p["diff"] for p in pairs])), ci=(float(lo), float(hi)))
        for key in ("acr_a", "acr_b"):
            v = [p[key] for p in pairs]
            result[key] = dict(mean=np.mean(v), sd=np.std(v, ddof=1), min=min(v), max=max(v))
    return result


def format_comparison(c):
    several = len(c["pairs"]) > 1
    lines = []
    for j, p in enumerate(c["pairs"], start=1):
        lines += [
            f"{f'pair {j}: ' * several}on the {p['n']} inputs both hold: ACR {p['acr_a']:.3f} (A, "
            f"{p['a']}), {p['acr_b']:.3f} (B, {p['b']})\nACR difference B - A: {p['diff']:+.3f}, "
            f"95% paired-bootstrap interval [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] (seed "
            f"{c['seed']})\ncertified accuracy difference B - A at radius r",
            "".join(f"{r:>7.2f}" for r in p["cert_acc_diff"]),
            "".join(f"{v:>+7.3f}" for v in p["cert_acc_diff"].values()),
            *(f"note: {note}" for note in p["notes"]),
        ]
    if several:
        coarse = "; with under 5 pairs the pair level is coarse" * (len(c["pairs"]) < 5)
        lines.append(
            f"over the {len(c['pairs'])} pairs: mean ACR difference B - A {c['diff']:+.3f}, 95% "
            f"two-level bootstrap interval [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] (pairs "
            f"resampled, then inputs within each{coarse})"
        )
        lines += [
            f"ACR of {side} over the pairs: mean {s['mean']:.3f}, SD {s['sd']:.3f}, range "
            f"{s['min']:.3f} to {s['max']:.3f}"
            for side, s in (("A", c["acr_a"]), ("B", c["acr_b"]))
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line
def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Certify a smoothed classifier on a test set (Cohen et al.'s protocol), "
        "or compare results files. Under torchrun, each process certifies its share of the "
        "test images into the one results file; put -- before certify.py, or torchrun reads "
        "--n, --max and --start as abbreviations of its own options."
    )
    add = p.add_argument
    add("checkpoint", nargs="?", help="this project's checkpoint, the MACER authors' or Cohen's")
    add("--compare", nargs="+", metavar="TSV", help="A B, or A1 B1 A2 B2 ... (a pair per seed)")
    add("--dataset", help="mnist, fashion-mnist, cifar10, svhn, imagenet (default: the model's)")
    add("--arch", help="lenet, resnet110, resnet20, ..., resnet50 (default: the checkpoint's)")
    add("--sigma", type=float, help="noise level (default: the checkpoint's)")
    add("--no-normalize", action="store_true", help="the network takes [0, 1] inputs, as MACER's")
    add("--data-dir", default="data")
    add("--n0", type=int, default=data.CERT["n0"], help="selection samples")
    add("--n", type=int, default=data.CERT["n"], help="estimation samples")
    add("--alpha", type=float, default=data.CERT["alpha"], help="failure probability")
    add(
        "--batch", type=int, help="noisy samples per forward pass (default: 400 on CPU, 10,000 GPU)"
    )
    add("--start", type=int, default=0, help="the first test image (the MACER authors' code: 500)")
    add("--skip", type=int, help="certify every skip-th test image (default: the protocol's)")
    add("--max", type=int, help="at most this many images (default: the protocol's)")
    add("--bound", default="clopper-pearson", choices=BOUNDS)
    add("--beta", type=float, help="Soft-RS's inverse temperature (default: the checkpoint's, 1)")
    add("--out", help="results TSV (default: beside the checkpoint)")
    add("--overwrite", action="store_true", help="start --out afresh if it cannot be continued")
    add("--plot", action="store_true", help="also draw --out's radius-accuracy curve as OUT.png")
    add("--fp32", action="store_true", help="fp32, even where bf16 measures faster")
    add("--bf16", action="store_true", help="bf16, even where it measures slower")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--seed", type=int, default=0, help="noise seed: input i's noise depends on (seed, i) only")
    a = p.parse_args(argv)
    if a.compare is None and a.checkpoint is None:
        p.error("give a CHECKPOINT to certify, or --compare A.tsv B.tsv")
    check_args(a)
    return a


def check_args(a):
    """Raise ValueError naming the first flag out of range (NaN included), before any work."""
    given = [v for v in (a.batch, a.skip, a.max) if v is not None]  # None: the default
    rules = [  # (whether it holds, what to do if not)
        (a.compare is None or len(a.compare) % 2 == 0, "--compare takes pairs of results files"),
        (a.sigma is None or 0 < a.sigma < math.inf, f"--sigma must be finite, > 0: {a.sigma}"),
        (a.beta is None or 0 < a.beta < math.inf, f"--beta must be finite, > 0: {a.beta}"),
        (0 < a.alpha < 1, f"--alpha must lie strictly between 0 and 1, not {a.alpha}"),
        (min(a.n0, a.n, *given) >= 1, "--n0, --n, --batch, --skip and --max must be at least 1"),
        (a.start >= 0, "--start must be at least 0"),
        (a.bound != "bernstein" or a.n >= 2, "the Bernstein bound needs --n 2 or more"),
        (0 <= a.seed < 2**32, f"--seed must be an integer in [0, 2^32), not {a.seed}"),
        (not (a.fp32 and a.bf16), "--fp32 and --bf16 contradict each other; give at most one"),
    ]
    for holds, message in rules:
        if not holds:
            raise ValueError(message)
    if largest_radius(1.0, a.n, a.alpha, a.bound) is None:
        raise ValueError(
            f"no input can be certified with --n {a.n} and --alpha {a.alpha} ({a.bound}): even if "
            "every sample agreed, the bound would stay at or below 1/2; raise --n or --alpha"
        )
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (a broken install is refused too, before any work)
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install it, or drop --plot") from None


def main(argv=None):
    try:
        run(parse_args(argv))
    except ValueError as e:
        sys.exit(f"error: {str(e).rstrip('.')}.")
    except MemoryError as e:
        sys.exit(f"error: {e} (--batch).")
    except BrokenPipeError:  # `certify.py --compare A B | head -1`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def run(a):
    import models  # the tools: the library above needs no torchvision

    if a.compare:
        print(format_comparison(compare(a.compare)))
        return
    device, rank, world, own_group = models.join_processes(a.device)
    try:
        normalize = False if a.no_normalize else None  # None: the checkpoint's
        model, cfg = models.load_checkpoint(a.checkpoint, a.dataset, a.arch, normalize)
        sigma = a.sigma if a.sigma is not None else cfg.get("sigma")
        if sigma is None:
            raise ValueError("the checkpoint does not say its sigma; pass --sigma")
        beta = a.beta if a.beta is not None else cfg.get("beta", 1.0)
        facts = data.dataset_facts(cfg["dataset"])
        test_set = data.load_dataset(cfg["dataset"], a.data_dir, train=False)
        indices = list(range(a.start, len(test_set), a.skip or facts.skip))[: a.max or facts.max]
        if not indices:
            raise ValueError(f"--start {a.start} is past the {len(test_set)} test images; lower it")
        out = a.out or os.path.splitext(a.checkpoint)[0] + f"_{a.bound}_n{a.n}.tsv"
        batch = a.batch or models.default_batch(cfg["arch"], device)
        saved = {} if a.overwrite else records.read_settings(out, strict=False) or {}
        work = len(indices) * (a.n0 + a.n) / batch  # in batches; a resumed file goes on as it began
        args = (a, saved.get("precision"), work, model, device, (batch, *facts.shape), False)
        precision = from_rank0(models.pick_precision(*args))  # every process certifies in rank 0's
        model = models.fast_path(model.to(device).eval(), precision)
        smooth = Smooth(model, facts.classes, sigma, beta, device=device)
        # The record of this run: what its rows mean (records.MEANING), how the noise was drawn
        # (records.DRAW), and, to inform only, the machine where the file began.
        settings = dict(checkpoint_sha256=cfg["sha256"], test_set_sha256=data.fingerprint(test_set))
        settings.update(dataset=cfg["dataset"], normalize=bool(cfg["normalize"]), sigma=sigma)
        settings.update({k: getattr(a, k) for k in ("n0", "n", "alpha", "bound", "seed")})
        settings.update(beta=beta if a.bound != "clopper-pearson" else None, precision=precision)
        settings.update(noise=records.NOISE, batch=batch, noise_device=device.type)
        settings["machine"] = models.device_name(device)
        if rank == 0:
            print(
                f"certifying {len(indices)} {cfg['dataset']} test images: {cfg['arch']}, sigma "
                f"{sigma}, n0 {a.n0}, n {a.n}, alpha {a.alpha}, {a.bound}, {device} {precision}, "
                f"{world} process(es) -> {out}",
                flush=True,
            )
        summary = certify_into(out, smooth, test_set, indices, settings, a.overwrite, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()
    if rank != 0:
        return
    print(format_table(summary, f"{cfg['dataset']} s={sigma}"))
    cap = largest_radius(sigma, a.n, a.alpha, a.bound)
    print(f"largest radius at this n and alpha ({a.bound}, every sample agreeing): {cap:.3f}")
    if a.plot:
        png = os.path.splitext(out)[0] + ".png"
        plot_curve(out, f"{cfg['dataset']}, sigma = {sigma}, {a.bound}", png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
