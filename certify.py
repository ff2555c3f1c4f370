"""Randomized smoothing: Hard-RS (Cohen et al., 2019) and Soft-RS (MACER, Appendix A, Algorithm 2).

The smoothed classifier g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), predicts the
class A that the base classifier f returns with the largest probability p_A under the noise.
Theorem 1: g predicts A everywhere within the l2 radius sigma * PhiInv(p_A) of x (with p_B <=
1 - p_A). p_A is not known, so CERTIFY samples the noise and
uses p_A_low, a lower confidence bound that holds with probability 1 - alpha: a certificate is
wrong with probability at most alpha. For example, p_A_low = 0.98 gives 2.05 sigma. Soft-RS
(Eq. 20) does the same for the mean softmax z_A = E softmax(beta * u(x + eta))^A.

    label, radius = Smooth(model, 10, sigma=0.25).certify(x, 100, 100_000, 0.001, batch_size=400)

Everything down to summarize() is the paper; below it come the checks (and noisy_logits, which
draws the noise and calls f), then the command line. Smooth needs torch and
scipy only: copy this file with macer.py. The guarantee assumes exact Gaussian noise; sampled in
floating point, it can fail near an adversarial input (Voracek and Hein, ICLR 2023).
"""

import argparse
import contextlib
import math
import numbers
import os
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

CERT = dict(n0=100, n=100_000, alpha=0.001)  # Cohen et al.'s protocol, and the paper's
RADII = [0.25 * i for i in range(10)]  # the paper's grid r = 0, 0.25, ..., 2.25


# ---------------------------------------------------------------- lower confidence bounds on p_A
def clopper_pearson_lower(n_A, n, alpha):
    """LOWERCONFBOUND of Cohen et al.'s CERTIFY: one-sided 1 - alpha Clopper-Pearson, on p."""
    return 0.0 if n_A == 0 else float(beta_dist.ppf(alpha, n_A, n - n_A + 1))


def hoeffding_lower(z_hat_A, n, alpha):
    """Eq. 23: z_A_low = z_hat_A - sqrt(-log(alpha) / (2n)), for n samples in [0, 1] (Algorithm 2's
    n; Appendix A writes k)."""
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
    """The smoothed classifier g of a base classifier f, which maps a batch (b, *D) of inputs
    (images in [0, 1], where sigma is measured) to (b, num_classes) logits; beta is Soft-RS's
    inverse temperature. The noise is drawn on
    `device` (default: f's, else the input's), from `generator` (default: torch's). A sample with a
    non-finite logit votes for no class, with a warning. Each call restores f's train/eval modes;
    bad arguments raise ValueError."""

    ABSTAIN = -1

    def __init__(self, base_classifier, num_classes, sigma, beta=1.0, device=None):
        check_smooth(num_classes, sigma, beta)
        self.base_classifier, self.num_classes = base_classifier, num_classes
        self.sigma, self.beta = float(sigma), float(beta)
        self.device = torch.device(device) if device is not None else device_of(base_classifier)

    def predict(self, x, n, alpha, batch_size, generator=None):
        """Cohen et al.'s PREDICT: the top class of n samples, or ABSTAIN unless the two-sided
        binomial test of the top two counts rejects a tie at level alpha."""
        with checked_call(self, x, alpha, batch_size, n=n) as x:
            counts = self._counts(x, n, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n, sigma)
        (n_A, n_B), (c_A, _) = (t.tolist() for t in counts.topk(2))  # the top two counts
        if n_A > 0 and binomtest(n_A, n_A + n_B, 0.5).pvalue <= alpha:  # BINOMPVALUE <= alpha
            return c_A
        return Smooth.ABSTAIN

    def certify(self, x, n0, n, alpha, batch_size, bound="clopper-pearson", generator=None):
        """Returns (c_A, radius) or (ABSTAIN, 0.0). bound: "clopper-pearson" is Hard-RS, Cohen et
        al.'s CERTIFY (Theorem 1); "hoeffding" (Eq. 23) and "bernstein" (Eq. 26) are Soft-RS,
        Algorithm 2, on z = softmax(beta * u). c_A is chosen from n0 samples; its probability is
        bounded from n fresh samples, so that the bound holds."""
        with checked_call(self, x, alpha, batch_size, n0=n0, n=n, bound=bound) as x:
            if bound == "clopper-pearson":  # Cohen et al.'s CERTIFY
                counts0 = self._counts(x, n0, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n0)
                c_A = int(counts0.argmax())  # c_A <- top index in counts0
                counts = self._counts(x, n, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n)
                p_A_low = clopper_pearson_lower(int(counts[c_A]), n, alpha)  # LOWERCONFBOUND
                R = radius(p_A_low, self.sigma)  # sigma * PhiInv(p_A_low) if above 1/2, else None
            else:  # Algorithm 2, CERTIFYHOEFFDING and CERTIFYBERNSTEIN
                z_hat_0 = self._moments(x, n0, batch_size, generator)[0] / n0  # SAMPLEUNDERNOISE
                c_A = int(z_hat_0.argmax())  # c_A <- argmax_c z_hat_0^c
                A = self._moments(x, n, batch_size, generator)  # A <- SAMPLEUNDERNOISE(z, x, n)
                A_1, A_2 = A[:, c_A].tolist()  # A[1, c_A], A[2, c_A]
                z_hat_A = A_1 / n
                if bound == "hoeffding":
                    z_A_low = hoeffding_lower(z_hat_A, n, alpha)  # Eq. 23
                else:
                    z_A_low = bernstein_lower(z_hat_A, sample_variance(A_1, A_2, n), n, alpha)
                R = radius(z_A_low, self.sigma)  # Eq. 20: sigma * PhiInv(z_A_low) if above 1/2
        return (Smooth.ABSTAIN, 0.0) if R is None else (c_A, R)

    @torch.inference_mode()
    def _counts(self, x, num, batch_size, generator):
        """Hard-RS's SAMPLEUNDERNOISE: (K,) counts of argmax_c u^c(x + eta) over num samples
        (noisy_logits draws each batch x + eta, eta ~ N(0, sigma^2 I), and returns f's logits u)."""
        counts = torch.zeros(self.num_classes, dtype=torch.float64, device=x.device)
        for u, w in noisy_logits(self, x, num, batch_size, generator):  # w: 0 for no vote
            counts += torch.bincount(u.argmax(1), w, minlength=self.num_classes)
        return counts.long()

    @torch.inference_mode()
    def _moments(self, x, num, batch_size, generator):
        """Algorithm 2's SAMPLEUNDERNOISE: (2, K) sums over num samples of z and of z^2, in
        float64, z = softmax(beta * u(x + eta))."""
        sums = torch.zeros(2, self.num_classes, dtype=torch.float64, device=x.device)
        for u, w in noisy_logits(self, x, num, batch_size, generator):  # w: 0 for no vote
            z = F.softmax(self.beta * u, dim=1).double() * w[:, None]  # (b, K)
            sums += torch.stack([z.sum(0), (z * z).sum(0)])
        return sums


# ---------------------------------------------------------------- the metrics of Section 5
def summarize(rows, grid=RADII):
    """Approximate certified accuracy at each r in grid (correct and radius >= r) and the ACR (mean
    radius, 0 for a wrong or abstained input) over rows, dicts of label, predict and radius."""
    credit = [(r["predict"] == r["label"], r["radius"]) for r in rows]
    count = max(len(rows), 1)
    cert_acc = {g: sum(c and R >= g for c, R in credit) / count for g in grid}
    return {"inputs": len(rows), "cert_acc": cert_acc, "acr": sum(c * R for c, R in credit) / count}


# ---------------------------------------------------------------- Smooth's checks
BOUNDS = ("clopper-pearson", "hoeffding", "bernstein")


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
        try:
            real = real and math.isfinite(float(v)) and float(v) > 0
        except OverflowError:  # 10**400
            real = False
        if not real:
            raise ValueError(f"{name} must be a finite number > 0, not {v!r:.40}")
    if not (
        isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2
    ):
        raise ValueError(f"num_classes must be an integer >= 2, not {num_classes!r}")


def device_of(module):
    tensors = [*module.parameters(), *module.buffers()] if hasattr(module, "parameters") else []
    return tensors[0].device if tensors else None


@contextlib.contextmanager
def checked_call(smooth, x, alpha, batch_size, bound="clopper-pearson", **counts):
    """Check a call's arguments, put x on the device in the classifier's floating dtype, the
    classifier in eval mode, and restore each module's mode afterwards (certifying inside a
    training loop must not freeze BatchNorm). An image (C, H, W) outside [0, 1] draws a warning:
    sigma is measured in x's units, and the paper's sigmas in [0, 1] pixels."""
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}: use clopper-pearson, hoeffding or bernstein")
    if bound == "bernstein" and counts["n"] < 2:
        raise ValueError("the Bernstein bound needs n >= 2 samples (Eq. 25 divides by n - 1)")
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise ValueError(f"alpha must be a float strictly between 0 and 1, not {alpha!r}")
    for name, v in dict(counts, batch_size=batch_size).items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, not {v!r}")
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        raise ValueError(f"x must be a floating-point tensor (images: in [0, 1]), not {x!r:.60}")
    if x.dim() >= 2 and (x.min() < 0 or x.max() > 1):  # an image: (H, W) or (C, H, W)
        warnings.warn(
            f"x spans [{x.min():.3g}, {x.max():.3g}]: images go in [0, 1], where sigma is "
            "measured (divide 0-255 pixels by 255)",
            stacklevel=3,
        )
    f = smooth.base_classifier
    weights = (
        [p for p in f.parameters() if p.is_floating_point()] if hasattr(f, "parameters") else []
    )
    dtype = weights[0].dtype if weights else x.dtype
    if dtype not in (torch.float32, torch.float64):  # the noise would be drawn in it
        raise ValueError(
            f"the base classifier's weights are {dtype}: x and its noise would be rounded to it; "
            "keep the weights in float32 and run the classifier under torch.autocast instead"
        )
    x = x.to(smooth.device or x.device, dtype)
    modes = [(m, m.training) for m in f.modules()] if isinstance(f, torch.nn.Module) else []
    for m, _ in modes:
        m.training = False
    try:
        yield x
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def explained_errors(x):
    """A RuntimeError from drawing the noise or from the base classifier, with what to do: lower
    the batch when out of memory; when the network rejected x, check its dtype and device (Smooth
    matches them to a Module's weights, but cannot see a plain function's) or its shape."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().partition("\n")[0][:200]
        if out_of_memory(e) or "overflow" in str(e).lower():  # a batch too large to size
            raise MemoryError("out of memory on a batch of noisy samples: lower batch_size") from e
        if any(w in first for w in ("dtype", "type (", "scalar type", "device")):  # a function's
            hint = f"x is {x.dtype} on {x.device}: give x the classifier's dtype and device"
            raise ValueError(f"the base classifier failed ({first}): {hint}") from e
        if any(w in str(e).lower() for w in ("shape", "size", "dimension", "expected")):
            raise ValueError(f"the base classifier failed ({first}): {shape_hint(x)}") from e
        raise


def noisy_logits(smooth, x, num, batch_size, generator):
    """The base classifier's logits u (b, K) at x + eta, eta ~ N(0, sigma^2 I), for num samples in
    batches of batch_size, each with its weight w (b,): 0 for a sample with a non-finite logit,
    which votes for no class (argmax would count a NaN as class 0's vote), else 1. The top logit
    is subtracted (argmax and softmax unchanged), so that beta * u cannot overflow; a non-finite
    sample's logits are 0. The count of those draws one warning."""
    like_x = dict(device=x.device, dtype=x.dtype, generator=generator)
    bad = 0
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        with explained_errors(x):  # out of memory, or a network that rejects x's shape
            eta = torch.randn((b, *x.shape), **like_x)
            u = smooth.base_classifier(x + smooth.sigma * eta).float()  # x broadcast: (b, *D)
        check_logits(u, b, smooth.num_classes, x)
        finite = torch.isfinite(u).all(1)  # (b,)
        bad = bad + (~finite).sum()
        u = torch.where(finite[:, None], u - u.amax(1, keepdim=True), 0.0)
        yield u, finite.double()
    warn_nonfinite(int(bad), num)


def check_logits(logits, b, K, x):
    if logits.shape != (b, K):
        raise ValueError(f"the base classifier gave logits {tuple(logits.shape)}: {shape_hint(x)}")


def shape_hint(x):
    return (
        f"pass one input x without a batch dimension (x has shape {tuple(x.shape)}), and "
        "num_classes equal to the classifier's number of outputs"
    )


def warn_nonfinite(bad, num):
    if bad:
        message = f"{bad} of {num} noisy samples gave non-finite logits, a vote for no class"
        warnings.warn(message, stacklevel=5)


def out_of_memory(error):
    """Whether a RuntimeError from torch is an allocation failure (CUDA's or the CPU's)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


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
    add("--n0", type=int, default=CERT["n0"], help="selection samples")
    add("--n", type=int, default=CERT["n"], help="estimation samples")
    add("--alpha", type=float, default=CERT["alpha"], help="failure probability")
    add("--batch", type=int, help="noisy samples per forward pass (default: models.default_batch)")
    add("--start", type=int, default=0, help="the first test image (the MACER authors' code: 500)")
    add("--skip", type=int, help="certify every skip-th test image (default: the protocol's)")
    add("--max", type=int, help="at most this many images (default: the protocol's)")
    add("--bound", default="clopper-pearson", choices=BOUNDS)
    add("--beta", type=float, help="Soft-RS's inverse temperature (default: the checkpoint's, 1)")
    add("--out", help="results TSV (default: beside the checkpoint)")
    add("--overwrite", action="store_true", help="start --out afresh if it cannot be continued")
    add("--plot", action="store_true", help="also draw --out's radius-accuracy curve as OUT.png")
    add("--fp32", action="store_true", help="fp32 (default: on a CPU)")
    add("--bf16", action="store_true", help="bf16 autocast (default: on a GPU that has it)")
    add("--compile", action="store_true", help="torch.compile the network (bench.py, row 7)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--seed", type=int, default=0, help="noise seed: input i's noise depends on (seed, i) only")
    a = p.parse_args(argv)
    if a.compare is None and a.checkpoint is None:
        p.error("give a CHECKPOINT to certify, or --compare A.tsv B.tsv")
    check_args(a)
    return a


def check_args(a):
    """Raise ValueError naming the first flag out of range (NaN included), before any work; set
    --out's default."""
    given = [v for v in (a.batch, a.skip, a.max) if v is not None]  # None: the default
    alone = a.compare is None or (a.checkpoint is None and a.out is None and not a.plot)
    rules = [  # (whether it holds, what to do if not)
        (a.compare is None or len(a.compare) % 2 == 0, "--compare takes pairs of results files"),
        (alone, "--compare reads results files only: drop the checkpoint, --out and --plot"),
        (a.out != "", "--out needs a file name ending in .tsv"),
        (a.sigma is None or 0 < a.sigma < math.inf, f"--sigma must be finite, > 0: {a.sigma}"),
        (a.beta is None or 0 < a.beta < math.inf, f"--beta must be finite, > 0: {a.beta}"),
        (0 < a.alpha < 1, f"--alpha must lie strictly between 0 and 1, not {a.alpha}"),
        (min(a.n0, a.n, *given) >= 1, "--n0, --n, --batch, --skip and --max must be at least 1"),
        (max(a.n0, a.n) <= 2**53, "--n0 and --n must be at most 2^53, where counts stay exact"),
        (a.start >= 0, "--start must be at least 0"),
        (a.bound != "bernstein" or a.n >= 2, "the Bernstein bound needs --n 2 or more"),
        (0 <= a.seed < 2**32, f"--seed must be an integer in [0, 2^32), not {a.seed}"),
        (not (a.fp32 and a.bf16), "--fp32 and --bf16 contradict each other; give at most one"),
    ]
    for holds, message in rules:
        if not holds:
            raise ValueError(message)
    if a.out is None and a.checkpoint is not None:  # the default: beside the checkpoint
        a.out = os.path.splitext(a.checkpoint)[0] + f"_{a.bound}_n{a.n}.tsv"
    cap = largest_radius(1.0, a.n, a.alpha, a.bound)
    if cap is not None and not math.isfinite(cap):
        raise ValueError(
            f"at --n {a.n} and --alpha {a.alpha}, p_A_low rounds to 1 and the radius to infinity; "
            "lower --alpha or --n"
        )
    if cap is None:
        raise ValueError(
            f"no input can be certified with --n {a.n} and --alpha {a.alpha} ({a.bound}): even if "
            "every sample agreed, the bound would stay at or below 1/2; raise --n or --alpha"
        )
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (a broken install is refused too, before any work)
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install it, or drop --plot") from None
        import records

        records.check_png(os.path.splitext(a.out)[0] + ".png")


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
    import data  # the tools: Smooth above needs none of them
    import models
    import records

    if a.compare:
        print(records.format_comparison(records.compare(a.compare)))
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
        out = a.out
        batch = a.batch or models.default_batch(cfg["arch"], device)
        saved = {} if a.overwrite else records.read_settings(out, strict=False) or {}
        saved = saved if records.has_rows(out) else {}  # a record without rows binds nothing
        work = len(indices) * (a.n0 + a.n) / batch  # in batches; a resumed file goes on as it began
        args = (a, saved.get("precision"), work, model, device, (batch, *facts.shape), False)
        precision = models.from_rank0(models.pick_precision(*args))  # every process: rank 0's
        model = model.to(device).eval()
        model = models.fast_path(torch.compile(model) if a.compile else model, precision)
        smooth = Smooth(model, facts.classes, sigma, beta, device=device)
        # The record of this run: what its rows mean (records.MEANING), how the noise was drawn
        # (records.DRAW), and, to inform only, the machine where the file began.
        settings = dict(checkpoint_sha256=cfg["sha256"], test_set_sha256=data.fingerprint(test_set))
        settings.update(dataset=cfg["dataset"], normalize=bool(cfg["normalize"]), sigma=sigma)
        settings.update({k: getattr(a, k) for k in ("n0", "n", "alpha", "bound", "seed")})
        settings.update(beta=beta if a.bound != "clopper-pearson" else None, precision=precision)
        settings.update(noise=records.NOISE, batch=batch, noise_device=device.type)
        settings.update(machine=models.device_name(device), compile=a.compile)  # to inform
        if rank == 0:
            print(
                f"certifying {len(indices)} {cfg['dataset']} test images: {cfg['arch']}, sigma "
                f"{sigma}, n0 {a.n0}, n {a.n}, alpha {a.alpha}, {a.bound}, {device} {precision}, "
                f"{world} process(es) -> {out}",
                flush=True,
            )
        summary = records.certify_into(
            out, smooth, test_set, indices, settings, a.overwrite, rank, world
        )
    finally:
        if own_group:
            dist.destroy_process_group()
    if rank != 0:
        return
    print(records.format_table(summary, f"{cfg['dataset']} s={sigma}"))
    cap = largest_radius(sigma, a.n, a.alpha, a.bound)
    print(f"largest radius at this n and alpha ({a.bound}, every sample agreeing): {cap:.3f}")
    if a.plot:
        png = os.path.splitext(out)[0] + ".png"
        try:
            records.plot_curve(out, f"{cfg['dataset']}, sigma = {sigma}, {a.bound}", png)
        except OSError as e:
            raise ValueError(f"the rows are saved, but {png} could not be written ({e})") from None
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
