"""Randomized smoothing: Hard-RS (Cohen et al., 2019) and Soft-RS (MACER, Appendix A, Algorithm 2).

The smoothed classifier g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), is certified
around x with radius sigma * PhiInv(p_A_low), where p_A_low is a 1 - alpha lower confidence bound
on the top class's probability (Theorem 1; Eq. 20 for Soft-RS, with z = softmax(beta * u)).

    smooth = Smooth(model, num_classes=10, sigma=0.25)
    label, radius = smooth.certify(x, n0=100, n=100_000, alpha=0.001, batch_size=400)

The paper ends at summarize(); Smooth's checks and the command line (--help) follow it.
"""

import argparse
import contextlib
import datetime
import math
import numbers
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm

import data

RADII = [0.25 * i for i in range(10)]  # the paper's grid r = 0, 0.25, ..., 2.25
BOUNDS = ("clopper-pearson", "hoeffding", "bernstein")


# ---------------------------------------------------------------- lower confidence bounds on p_A
def clopper_pearson_lower(n_A, n, alpha):
    """LOWERCONFBOUND of Cohen et al.'s CERTIFY: the one-sided 1 - alpha Clopper-Pearson lower
    bound on a binomial p from n_A successes in n trials."""
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
    """Theorem 1 (Eq. 8) and Theorem 2 (Eq. 16): R = sigma/2 * (PhiInv(p_A_low) - PhiInv(p_B_up)).
    Without p_B_up, p_B_up = 1 - p_A_low (Cohen et al.; Eq. 20) and R = sigma * PhiInv(p_A_low).
    None means abstain: the bounds do not separate class A from the rest."""
    if p_B_up is None:
        return sigma * float(norm.ppf(p_A_low)) if p_A_low > 0.5 else None
    return sigma / 2 * float(norm.ppf(p_A_low) - norm.ppf(p_B_up)) if p_A_low > p_B_up else None


# ---------------------------------------------------------------- the smoothed classifier
class Smooth:
    """g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), around the base classifier f,
    which maps (b, *D) inputs in [0, 1] pixel space to (b, num_classes) logits; beta is Soft-RS's
    inverse temperature. The noise is drawn on `device` (default: the classifier's, else the
    input's), from `generator` where a method takes one (default: torch's global one). A sample
    whose logits are not all finite votes for no class. Each call restores the classifier's
    train/eval modes; bad arguments raise ValueError (check_call)."""

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
        *counts, bad = counts.tolist()
        warn_nonfinite(bad, n)
        c_A, c_B = sorted(range(self.num_classes), key=lambda c: -counts[c])[:2]  # top two
        n_A, n_B = counts[c_A], counts[c_B]
        if n_A > 0 and binomtest(n_A, n_A + n_B, 0.5).pvalue <= alpha:  # BINOMPVALUE <= alpha
            return c_A
        return Smooth.ABSTAIN

    def certify(self, x, n0, n, alpha, batch_size, bound="clopper-pearson", generator=None):
        """Returns (c_A, radius) or (ABSTAIN, 0.0). bound: "clopper-pearson" is Hard-RS, Cohen et
        al.'s CERTIFY (Theorem 1); "hoeffding" (Eq. 23) and "bernstein" (Eq. 26) are Soft-RS,
        Algorithm 2, on z = softmax(beta * u). c_A is chosen from n0 selection samples; its
        probability is bounded from n fresh estimation samples, so the bound holds."""
        with check_call(self, x, alpha, batch_size, n0=n0, n=n, bound=bound) as x:
            if bound == "clopper-pearson":
                c_A, p_A_low, bad = self._certify_hard(x, n0, n, alpha, batch_size, generator)
            else:
                c_A, p_A_low, bad = self._certify_soft(
                    x, n0, n, alpha, batch_size, generator, bound
                )
        warn_nonfinite(bad, n)
        R = radius(p_A_low, self.sigma)  # sigma * PhiInv(p_A_low) if p_A_low > 1/2, else abstain
        return (Smooth.ABSTAIN, 0.0) if R is None else (c_A, R)

    def _certify_hard(self, x, n0, n, alpha, batch_size, generator):
        """Cohen et al.'s CERTIFY(f, sigma, x, n0, n, alpha) up to the radius: (c_A, p_A_low,
        bad)."""
        counts0 = self._counts(x, n0, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n0, sigma)
        c_A = int(counts0[:-1].argmax())  # c_A <- top index in counts0
        counts = self._counts(x, n, batch_size, generator)  # SAMPLEUNDERNOISE(f, x, n, sigma)
        n_A, bad = counts[[c_A, -1]].tolist()
        return c_A, clopper_pearson_lower(n_A, n, alpha), bad  # LOWERCONFBOUND(n_A, n, 1 - alpha)

    def _certify_soft(self, x, n0, n, alpha, batch_size, generator, bound):
        """Algorithm 2's CERTIFYHOEFFDING and CERTIFYBERNSTEIN(z, sigma^2, x, n0, n, alpha) up to
        the radius: (c_A, z_A_low, bad)."""
        z_hat_0 = self._moments(x, n0, batch_size, generator)[0] / n0  # SAMPLEUNDERNOISE[1, :] / n0
        c_A = int(z_hat_0.argmax())  # c_A <- argmax_c z_hat_0^c
        A = self._moments(x, n, batch_size, generator)  # A <- SAMPLEUNDERNOISE(z, x, n, sigma^2)
        A_1, A_2, bad = A[:, c_A].tolist()
        z_hat_A = A_1 / n  # z_hat_A <- A[1, c_A] / n
        if bound == "hoeffding":
            return c_A, hoeffding_lower(z_hat_A, n, alpha), bad  # Eq. 23
        S2_A = sample_variance(A_1, A_2, n)  # Eq. 25
        return c_A, bernstein_lower(z_hat_A, S2_A, n, alpha), bad  # Eq. 26

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
        z = softmax(beta * u(x + eta)), and in row 2 the count of non-finite samples (z = 0)."""
        sums = torch.zeros(3, self.num_classes, dtype=torch.float64, device=x.device)
        for logits in self._noisy_logits(x, num, batch_size, generator):
            finite = torch.isfinite(logits).all(1, keepdim=True)  # (b, 1)
            z = F.softmax(self.beta * logits, dim=1).double().where(finite, 0.0)
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
    """Approximate certified accuracy at each r in grid (correct and radius >= r) and the ACR
    (mean radius, 0 for a wrong or abstained input), over the rows (dicts of label, predict,
    radius)."""
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


def is_number(v):
    """A real number: Python's, numpy's or a 0-d tensor's; never a bool."""
    return (
        not isinstance(v, bool)
        and isinstance(v, (int, float, numbers.Real))
        or (
            isinstance(v, torch.Tensor)
            and v.dim() == 0
            and not v.dtype.is_complex
            and v.dtype != torch.bool
        )
    )


def check_smooth(num_classes, sigma, beta):
    for name, v in (("sigma", sigma), ("beta", beta)):
        if not (is_number(v) and math.isfinite(float(v)) and float(v) > 0):
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
    modules = list(f.modules()) if isinstance(f, torch.nn.Module) else []
    modes = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield x.to(smooth.device) if smooth.device is not None else x
    finally:
        for m, mode in zip(modules, modes, strict=True):
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
        warnings.warn(
            f"{int(bad)} of {num} noisy samples gave non-finite logits; they voted for no class",
            stacklevel=3,
        )


def out_of_memory(error):
    """Whether a RuntimeError from torch is an allocation failure (CUDA's, or the CPU
    allocator's)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


# ---------------------------------------------------------------- command line
def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Certify a smoothed classifier on a test set (Cohen et al.'s protocol), "
        "or compare results files. Under torchrun, each process certifies its share of the "
        "test images into the one results file; put -- before certify.py, or torchrun reads "
        "--n, --max and --start as abbreviations of its own options."
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="this project's checkpoint, the MACER authors' or Cohen et al.'s",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="TSV",
        help="A.tsv B.tsv: the paired ACR difference B - A; "
        "several pairs A1 B1 A2 B2 ... (one per training seed): also their mean, over seeds and "
        "images",
    )
    p.add_argument(
        "--dataset",
        help="mnist, fashion-mnist, cifar10, svhn or imagenet (read from the checkpoint if there)",
    )
    p.add_argument(
        "--arch",
        help="lenet, resnet110, resnet20, ..., resnet50 (read from the checkpoint if there)",
    )
    p.add_argument("--sigma", type=float, help="noise level (read from the checkpoint if there)")
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="the network takes unnormalised [0, 1] inputs, as the "
        "MACER authors' checkpoints do (read from the checkpoint; Cohen et al.'s normalise inside "
        "the model)",
    )
    p.add_argument("--data-dir", default="data")
    p.add_argument("--n0", type=int, default=data.CERT["n0"], help="selection samples")
    p.add_argument("--n", type=int, default=data.CERT["n"], help="estimation samples")
    p.add_argument("--alpha", type=float, default=data.CERT["alpha"], help="failure probability")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="noisy samples per forward pass (default: 400 on a CPU, "
        "100 for ImageNet there; 10,000 on CUDA, 400 for ImageNet)",
    )
    p.add_argument(
        "--start", type=int, default=0, help="the first test image (the MACER authors' code: 500)"
    )
    p.add_argument(
        "--skip",
        type=int,
        help="certify every skip-th test image (default: the dataset's protocol, "
        "every 20th; ImageNet every 100th)",
    )
    p.add_argument("--max", type=int, help="at most this many images (default: the protocol's 500)")
    p.add_argument("--bound", default="clopper-pearson", choices=BOUNDS)
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="Soft-RS inverse temperature (default: the checkpoint's, else 1)",
    )
    p.add_argument("--out", default=None, help="results TSV (default: beside the checkpoint)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start --out afresh if its rows cannot be continued",
    )
    p.add_argument(
        "--plot",
        action="store_true",
        help="also draw the radius-accuracy curve of --out's rows, as OUT.png (needs matplotlib)",
    )
    p.add_argument("--fp32", action="store_true", help="fp32, even where bf16 measures faster")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16, even where it measures slower (default: the faster)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the noise: input i's noise depends on (seed, i) alone",
    )
    a = p.parse_args(argv)
    if a.compare is None and a.checkpoint is None:
        p.error("give a CHECKPOINT to certify, or --compare A.tsv B.tsv")
    check_args(a)
    return a


def check_args(a):
    """Raise ValueError naming the first flag out of range (NaN included), before any work."""
    if a.compare is not None and len(a.compare) % 2:
        raise ValueError(
            "--compare takes pairs of results files (A B, or A1 B1 A2 B2 ...), not "
            f"{len(a.compare)} files"
        )
    for name in ("sigma", "beta"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name} must be a finite number > 0, not {v}")
    if not 0 < a.alpha < 1:  # also rejects nan
        raise ValueError(f"--alpha must lie strictly between 0 and 1, not {a.alpha}")
    given = [v for v in (a.batch, a.skip, a.max) if v is not None]  # None: the default
    if min(a.n0, a.n, *given) < 1 or a.start < 0:
        raise ValueError(
            "--n0, --n, --batch, --skip and --max must be at least 1, and --start at least 0"
        )
    if a.bound == "bernstein" and a.n < 2:
        raise ValueError("the Bernstein bound needs --n 2 or more")
    if largest_radius(1.0, a.n, a.alpha, a.bound) is None:
        raise ValueError(
            f"no input can be certified with --n {a.n} and --alpha {a.alpha} ({a.bound}): even if "
            "every sample agreed, the bound would stay at or below 1/2; raise --n or --alpha"
        )
    if not 0 <= a.seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2^32), not {a.seed}")
    if a.fp32 and a.bf16:
        raise ValueError("--fp32 and --bf16 contradict each other; give at most one")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(
                "--plot needs matplotlib: pip install matplotlib, or drop --plot"
            ) from None


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
    import models  # the tools: the library above needs neither torchvision nor result files
    import records

    if a.compare:
        print(records.format_comparison(records.compare(a.compare)))
        return
    own_group = (
        "RANK" in os.environ and not dist.is_initialized()
    )  # torchrun launched certify.py itself
    if own_group:
        dist.init_process_group(
            "nccl" if a.device.startswith("cuda") else "gloo", timeout=datetime.timedelta(days=7)
        )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1 and a.device == "cuda":
        a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = models.check_device(a.device)
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    try:
        model, cfg = models.load_checkpoint(
            a.checkpoint,
            dataset=a.dataset,
            arch=a.arch,
            normalize=False if a.no_normalize else None,
        )
        sigma = a.sigma if a.sigma is not None else cfg.get("sigma")
        if sigma is None:
            raise ValueError("the checkpoint does not say its sigma; pass --sigma")
        beta = a.beta if a.beta is not None else cfg.get("beta", 1.0)
        facts = data.dataset_facts(cfg["dataset"])
        test_set = data.load_dataset(cfg["dataset"], a.data_dir, train=False)
        indices = list(range(a.start, len(test_set), a.skip or facts.skip))[: a.max or facts.max]
        out = a.out or os.path.splitext(a.checkpoint)[0] + f"_{a.bound}_n{a.n}.tsv"
        batch = a.batch or models.default_batch(cfg["arch"], device)
        precision = certify_precision(a, model, device, out, batch, len(indices), facts.shape)
        if world > 1:  # every process certifies in rank 0's precision
            choice = [precision]
            dist.broadcast_object_list(choice, src=0)
            precision = choice[0]
        model = models.fast_path(model.to(device).eval(), precision)
        smooth = Smooth(model, facts.classes, sigma, beta, device=device)
        # The record of this run: records.MEANING and records.DRAW.
        settings = dict(
            checkpoint_sha256=cfg["sha256"],
            dataset=cfg["dataset"],
            test_set_sha256=data.fingerprint(test_set),
            normalize=bool(cfg["normalize"]),
            sigma=sigma,
            beta=beta if a.bound != "clopper-pearson" else None,
            n0=a.n0,
            n=a.n,
            alpha=a.alpha,
            bound=a.bound,
            precision=precision,
            seed=a.seed,
            noise=records.NOISE,
            batch=batch,
            noise_device=device.type,
            machine=models.device_name(device),  # informative: a record of where the file began
        )
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
    if rank == 0:
        report(summary, out, a, cfg, settings)


def certify_precision(a, model, device, out, batch, images, shape):
    """--bf16 or --fp32 if given; the precision of the rows already in `out`, so that a resumed
    file continues as it began; for fewer than 50 batches of work, fp32 (measuring would cost more
    than it can save); else the faster of the two for inference on this device."""
    import models
    import records

    if a.bf16 or a.fp32:
        return "bf16" if a.bf16 else "fp32"
    saved = records.read_settings(out, strict=False) if not a.overwrite else None
    if saved is not None and saved.get("precision") in ("bf16", "fp32"):
        return saved["precision"]
    if images * (a.n0 + a.n) < 50 * batch:
        return "fp32"
    seeded = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=seeded)  # a batch of noisy samples
    return models.measure_precision(model, device, x, train=False, log=print)


def report(summary, out, a, cfg, settings):
    """Print the table of the rows, and the largest radius they could reach; draw --plot."""
    import records

    print(records.format_table(summary, f"{cfg['dataset']} s={settings['sigma']}"))
    cap = largest_radius(settings["sigma"], a.n, a.alpha, a.bound)
    print(f"largest radius at this n and alpha ({a.bound}, every sample agreeing): {cap:.3f}")
    if a.plot:
        png = os.path.splitext(out)[0] + ".png"
        name = f"{cfg['dataset']} s={settings['sigma']} {a.bound}"
        records.plot_curves([dict(tsv=out, name=name, sigma=settings["sigma"])], png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
