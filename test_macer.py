"""Tests: each compares the code with something trusted (a closed form, a naive loop, float64 or
exact quadrature) and each can fail. Run: python -m pytest -q test_macer.py"""
import gzip
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.stats import binom, norm

import certify
import models
import train
from certify import Smooth
from macer import macer_loss, noisy_copies, robust_hinge

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ================================================================ exact 1-D smoothing
def smoothed_1d(x, edges, values, sigma):
    """E f(x + eta), eta ~ N(0, sigma^2), for the piecewise-constant f equal to values[j] (a
    scalar or a vector) on [edges[j-1], edges[j]), edges[-1] = -inf and edges[m] = +inf: a sum of
    Phi terms, exact. x: (P,) points. Returns (P,) or (P, K)."""
    t = np.concatenate([[-np.inf], np.sort(edges), [np.inf]])
    cdf = norm.cdf((t[None, :] - x[:, None]) / sigma)  # (P, m + 2)
    mass = np.diff(cdf, axis=1)  # (P, m + 1): P(x + eta lands in interval j)
    return mass @ np.asarray(values, dtype=np.float64)


piecewise = st.integers(1, 6).flatmap(lambda m: st.tuples(
    st.lists(st.floats(-2, 2), min_size=m, max_size=m, unique=True),
    st.lists(st.sampled_from([0.0, 1.0]) | st.floats(0, 1), min_size=m + 1, max_size=m + 1)))


@FAST
@given(f=piecewise, sigma=st.floats(0.1, 1.0), x=st.floats(-2, 2), delta=st.floats(-1, 1))
def test_lemma1_phi_inv_of_smoothed_function_is_1_over_sigma_lipschitz(f, sigma, x, delta):
    """Lemma 1: for f with values in [0, 1], x -> PhiInv(E f(x + eta)) is 1/sigma-Lipschitz."""
    edges, values = f
    g = smoothed_1d(np.array([x, x + delta]), edges, values, sigma)
    if not (1e-12 < g).all() or not (g < 1 - 1e-12).all():
        return  # PhiInv is infinite at 0 and 1; inside, the property is exact
    assert abs(norm.ppf(g[1]) - norm.ppf(g[0])) <= abs(delta) / sigma + 1e-7


classifier_1d = st.tuples(st.integers(2, 5), st.integers(1, 8)).flatmap(lambda Km: st.tuples(
    st.just(Km[0]), st.lists(st.floats(-2, 2), min_size=Km[1], max_size=Km[1], unique=True),
    st.lists(st.integers(0, Km[0] - 1), min_size=Km[1] + 1, max_size=Km[1] + 1),
    st.lists(st.lists(st.floats(0.01, 1), min_size=Km[0], max_size=Km[0]), min_size=Km[1] + 1, max_size=Km[1] + 1)))


@FAST
@given(c=classifier_1d, sigma=st.floats(0.1, 1.0), x0=st.floats(-2, 2), soft=st.booleans(),
       two_sided=st.booleans())
def test_theorems_1_and_2_prediction_constant_within_certified_radius(c, sigma, x0, soft, two_sided):
    """Theorem 1 (Hard-RS, one-hot f) and Theorem 2 (Soft-RS, z in the simplex): the exactly
    smoothed prediction stays class A everywhere within the radius that certify.radius computes
    from the exact probabilities, either as sigma * PhiInv(p_A) or sigma/2 (PhiInv p_A - PhiInv p_B)."""
    K, edges, labels, weights = c
    values = (np.array(weights) / np.sum(weights, 1, keepdims=True) if soft
              else np.eye(K)[labels])  # (m + 1, K): the value of f (hard) or z (soft) on each interval
    p = smoothed_1d(np.array([x0]), edges, values, sigma)[0]
    order = np.argsort(-p)
    A, p_A, p_B = order[0], p[order[0]], p[order[1]]
    R = certify.radius(p_A, sigma, p_B if two_sided else None)
    if R is None or not np.isfinite(R) or R < 1e-6:
        return
    xs = x0 + np.linspace(-R, R, 201) * (1 - 1e-9)
    P = smoothed_1d(xs, edges, values, sigma)  # (201, K)
    others = np.delete(P, A, axis=1).max(1)
    assert (P[:, A] >= others - 1e-9).all()


# ================================================================ Proposition 1
def phi_inv_derivative_bound(lo, hi):
    """max of PhiInv'(p) = 1 / phi(PhiInv(p)) over [lo, hi]: it grows with |PhiInv(p)|."""
    z = max(abs(norm.ppf(lo)), abs(norm.ppf(hi)))
    return math.sqrt(2 * math.pi) * math.exp(z * z / 2)


@FAST
@given(K=st.integers(2, 1000), log_w=st.lists(st.floats(-60, 0), min_size=2, max_size=50),
       gamma=st.floats(0.5, 8.0), seed=st.integers(0, 2 ** 31))
def test_proposition1_bounded_gradient_of_clipped_xi(K, log_w, gamma, seed):
    """Proposition 1: d min(PhiInv(p1) - PhiInv(p2), gamma) / d(p1, p2) is finite and within the
    bound that Appendix B's intervals give: 1/K <= p1 <= p*, (1 - p*)/(K - 1) <= p2 <= 1 - p*,
    PhiInv(p*) = gamma. It is exactly zero where xi > gamma."""
    rng = np.random.default_rng(seed)
    w = np.exp(np.resize(np.array(log_w), K) + rng.uniform(-1, 1, K) * (rng.random() < 0.5))
    p = np.sort(w / w.sum())[::-1]
    p1 = torch.tensor([p[0]], dtype=torch.float64, requires_grad=True)
    p2 = torch.tensor([p[1]], dtype=torch.float64, requires_grad=True)
    clipped_xi = gamma - robust_hinge(p1, p2, torch.tensor([True]), gamma)  # min(xi, gamma)
    g1, g2 = torch.autograd.grad(clipped_xi.sum(), [p1, p2])
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    xi = norm.ppf(p[0]) - norm.ppf(p[1])
    if xi > gamma:
        assert g1.item() == 0.0 and g2.item() == 0.0
    else:
        p_star = norm.cdf(gamma)
        assert 0 < g1.item() <= phi_inv_derivative_bound(1 / K, p_star) * (1 + 1e-9)
        assert 0 < -g2.item() <= phi_inv_derivative_bound((1 - p_star) / (K - 1), 1 - p_star) * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), k=st.integers(1, 6), K=st.integers(2, 12), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]),
       beta=st.sampled_from([1.0, 16.0, 64.0]), dtype=st.sampled_from([torch.float32, torch.float64]),
       in_G=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_macer_loss_value_and_gradient_finite_for_extreme_logits(n, k, K, scale, beta, dtype, in_G, seed):
    """No NaN or inf, in value or gradient, for any finite logits (|u| up to 1e4, beta up to 64)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, K, generator=g, dtype=dtype) * scale).requires_grad_()
    y = (logits.detach().softmax(-1).mean(1).argmax(-1) if in_G else torch.randint(0, K, (n,), generator=g))
    loss, loss_cls, loss_rob = macer_loss(logits, y, sigma=0.5, lbd=16.0, gamma=8.0, beta=beta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(loss_cls) and torch.isfinite(loss_rob)
    assert torch.isfinite(logits.grad).all()


def test_macer_loss_float32_under_bf16_autocast():
    logits = torch.randn(4, 3, 10).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        loss = macer_loss(logits, torch.zeros(4, dtype=torch.long), 0.25, 12.0, 8.0, 16.0)[0]
    assert loss.dtype == torch.float32


# ================================================================ Cohen et al. as the special case
def test_k1_lambda0_equals_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(32, 1, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (32,))
    loss = macer_loss(logits, y, sigma=0.25, lbd=0.0, gamma=8.0, beta=16.0)[0]
    ce = F.cross_entropy(logits.view(32, 10), y)  # (n, 1, K) -> (n, K)
    g_macer, = torch.autograd.grad(loss, logits)
    g_ce, = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(loss, ce, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_macer, g_ce, rtol=1e-12, atol=1e-14)


def test_k1_lambda0_sgd_step_equals_cohen_gaussian_augmentation():
    """One SGD step with macer_loss(k=1, lbd=0) and one with cross-entropy on the same noisy
    copies, from the same start, give the same parameters."""
    torch.manual_seed(0)
    net_a = models.get_model("fashion-mnist").double()
    net_b = models.get_model("fashion-mnist").double()
    net_b.load_state_dict(net_a.state_dict())
    x, y = torch.rand(16, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (16,))
    noise = torch.randn(16, 1, 1, 28, 28, dtype=torch.float64)  # (n, k, C, H, W)
    x_noisy = noisy_copies(x, 1, 0.25, noise)
    torch.testing.assert_close(x_noisy, x + 0.25 * noise[:, 0])
    for net, loss_fn in ((net_a, lambda out: macer_loss(out.view(16, 1, 10), y, 0.25, 0.0, 8.0, 16.0)[0]),
                         (net_b, lambda out: F.cross_entropy(out, y))):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        loss_fn(net(x_noisy)).backward()
        opt.step()
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_noisy_copies_layout_groups_the_copies_of_one_input():
    x = torch.arange(3.0).view(3, 1, 1, 1)  # (n, C, H, W)
    noise = torch.randn(3, 4, 1, 1, 1)  # (n, k, C, H, W)
    copies = noisy_copies(x, 4, 0.5, noise)
    assert copies.shape == (12, 1, 1, 1)
    torch.testing.assert_close(copies.view(3, 4), x.view(3, 1) + 0.5 * noise.view(3, 4))


# ================================================================ the loss against Eq. 17 written out
def naive_eq17(logits, y, sigma, lbd, gamma, beta):
    """Eq. 17 / Algorithm 1 line 9, one input at a time, in float64 with scipy's PhiInv."""
    n, k, K = logits.shape
    total_cls, total_rob = 0.0, 0.0
    for i in range(n):
        z_hat = np.mean([np.exp(u - u.max()) / np.exp(u - u.max()).sum() for u in logits[i]], axis=0)
        total_cls -= math.log(z_hat[y[i]])
        u_beta = beta * logits[i]
        z_hat_b = np.mean([np.exp(u - u.max()) / np.exp(u - u.max()).sum() for u in u_beta], axis=0)
        z_runner_up = np.max(np.delete(z_hat_b, y[i]))
        if z_hat_b[y[i]] < z_runner_up:
            continue  # not in G
        with np.errstate(divide="ignore"):
            xi = norm.ppf(z_hat_b[y[i]]) - norm.ppf(z_runner_up)
        total_rob += max(gamma - xi, 0.0)
    return total_cls / n + lbd * sigma / (2 * n) * total_rob, total_cls / n, lbd * sigma / (2 * n) * total_rob


@FAST
@given(n=st.integers(1, 10), k=st.integers(1, 8), K=st.integers(2, 10), scale=st.floats(0.01, 5),
       sigma=st.floats(0.1, 1.0), lbd=st.floats(0, 20), gamma=st.floats(0.5, 10), beta=st.floats(0.5, 20),
       seed=st.integers(0, 2 ** 31))
def test_macer_loss_equals_naive_per_input_loop(n, k, K, scale, sigma, lbd, gamma, beta, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, K, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, K, (n,), generator=g)
    y[: n // 2] = (beta * logits[: n // 2]).softmax(-1).mean(1).argmax(-1)  # half of them in G
    got = macer_loss(logits, y, sigma, lbd, gamma, beta)
    want = naive_eq17(logits.numpy(), y.numpy(), sigma, lbd, gamma, beta)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b, rel=1e-9, abs=1e-9)


def test_hinge_gradient_is_exactly_zero_outside_G_or_beyond_gamma():
    torch.manual_seed(1)
    n, k, K, beta, gamma = 60, 4, 10, 16.0, 2.0
    logits = (torch.randn(n, k, K, dtype=torch.float64) * torch.logspace(-2, 0.5, n, dtype=torch.float64).view(n, 1, 1))
    logits.requires_grad_()
    z_hat = (beta * logits.detach()).softmax(-1).mean(1)  # (n, K)
    y = z_hat.argmax(-1)
    y[::3] = (y[::3] + 1) % K  # every third input leaves G
    loss_rob = macer_loss(logits, y, 0.25, 1.0, gamma, beta)[2]
    grad, = torch.autograd.grad(loss_rob, logits)
    top2 = z_hat.topk(2).values
    xi = torch.tensor(norm.ppf(top2[:, 0].numpy()) - norm.ppf(top2[:, 1].numpy()))
    in_G = z_hat.argmax(-1) == y
    dead = ~in_G | (xi >= gamma)
    alive = in_G & (xi < gamma)
    assert dead.sum() > 10 and alive.sum() > 10  # both kinds are there
    assert (grad[dead] == 0).all()
    assert (grad[alive].abs().sum((1, 2)) > 0).all()


# ================================================================ soundness of the certificates
class Linear2(nn.Module):
    """f(x) = 1[w.x + b > 0] as two logits; with scale s, softmax(beta u) = sigmoid(beta s (w.x + b))."""

    def __init__(self, w, b, scale=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64), requires_grad=False)
        self.b, self.scale = b, scale

    def forward(self, x):
        t = self.scale * (x.flatten(1) @ self.w + self.b)  # (batch, d) -> (batch,)
        return torch.stack([torch.zeros_like(t), t], dim=1)


def soft_z_A_exact(margin_w, norm_w, sigma, beta_s):
    """E sigmoid(beta s t), t ~ N(w.x + b, (sigma |w|)^2), by 200-node Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    t = margin_w + sigma * norm_w * nodes
    return float(np.sum(weights / np.sqrt(2 * np.pi) / (1 + np.exp(-beta_s * t))))


LINEAR = dict(w=[0.6, -0.8, 0.0], x=torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), sigma=0.5)


@pytest.mark.parametrize("where", ["inside", "boundary"])
@pytest.mark.parametrize("bound", ["clopper-pearson", "hoeffding", "bernstein"])
def test_certificate_exceeds_the_truth_at_most_alpha_of_the_time(bound, where):
    """Soundness (Theorem 1 with Clopper-Pearson; Eq. 20 with Eq. 23 or Eq. 26): over 2,000
    repeats at n = 100 and alpha = 0.1, CERTIFY overclaims in at most an alpha fraction of runs, up
    to binomial slack. The truth is a closed form: for Hard-RS the radius is the margin (p_A =
    Phi(margin / sigma)); for Soft-RS it is sigma * PhiInv(E z_A), E z_A by quadrature. On the
    decision boundary the truth is radius 0 for both classes, so any certificate overclaims; that
    also catches reusing the n0 selection samples for the estimate."""
    torch.manual_seed(0)
    alpha, n, repeats, sigma, x = 0.1, 100, 2000, LINEAR["sigma"], LINEAR["x"]
    w = torch.tensor(LINEAR["w"], dtype=torch.float64)  # |w| = 1
    b = 0.1 if where == "inside" else -float(x @ w)
    margin = float(x @ w) + b
    soft = bound != "clopper-pearson"
    scale, beta = (5.0, 4.0) if soft else (1.0, 1.0)  # z = sigmoid(20 t): near 0/1, so high variance
    smooth = Smooth(Linear2(w, b, scale), 2, sigma, beta=beta)
    true_R = sigma * norm.ppf(soft_z_A_exact(margin, 1.0, sigma, beta * scale)) if soft else margin
    if not soft:  # the closed form itself, against sampling
        assert norm.cdf(margin / sigma) == pytest.approx(smooth._sample(x, 200_000, 200_000)[1].item() / 200_000, abs=0.005)
    results = [smooth.certify(x, 20, n, alpha, n, bound) for _ in range(repeats)]
    over = sum(c != Smooth.ABSTAIN and (R > true_R + 1e-12 or c != 1) for c, R in results)
    assert over <= binom.ppf(0.999, repeats, alpha), f"{over}/{repeats} certificates exceed the truth"
    if where == "inside":  # with many samples the certificate comes close to the truth from below
        c_A, R = smooth.certify(x, 100, 200_000, 0.001, 100_000, bound)
        assert c_A == 1 and true_R - 0.02 < R <= true_R + 1e-3


def test_predict_at_the_decision_boundary_abstains_except_with_probability_alpha():
    torch.manual_seed(0)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    smooth = Smooth(Linear2(w, 0.0), 2, 0.5)
    x, alpha, repeats = torch.zeros(2, dtype=torch.float64), 0.1, 2000
    answered = sum(smooth.predict(x, 100, alpha, 100) != Smooth.ABSTAIN for _ in range(repeats))  # 0.5 vs 0.5
    assert answered <= binom.ppf(0.999, repeats, alpha)
    far = torch.tensor([2.0, 0.0], dtype=torch.float64)
    assert smooth.predict(far, 100, alpha, 100) == 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2000), frac=st.floats(0, 1), alpha=st.floats(1e-4, 0.5))
def test_clopper_pearson_lower_bound_is_the_exact_binomial_tail(n, frac, alpha):
    """p_low solves P(Bin(n, p_low) >= n_A) = alpha: the exact one-sided Clopper-Pearson bound."""
    n_A = int(round(frac * n))
    p_low = certify.clopper_pearson_lower(n_A, n, alpha)
    if n_A == 0:
        assert p_low == 0.0
    else:
        assert binom.sf(n_A - 1, n, p_low) == pytest.approx(alpha, rel=1e-5)


def test_bernstein_and_hoeffding_formulas():
    """Eq. 23 and Eq. 26 (the 7 log(2/alpha) / (3(n-1)) term outside the square root)."""
    assert certify.hoeffding_lower(0.9, 1000, 0.001) == pytest.approx(0.9 - math.sqrt(math.log(1000) / 2000))
    want = 0.9 - math.sqrt(2 * 0.01 * math.log(2000) / 1000) - 7 * math.log(2000) / (3 * 999)
    assert certify.bernstein_lower(0.9, 0.01, 1000, 0.001) == pytest.approx(want)
    assert certify.bernstein_lower(0.9, 0.0, 10 ** 6, 0.001) > certify.hoeffding_lower(0.9, 10 ** 6, 0.001)


# ================================================================ summaries and results files
def test_summary_matches_definitions():
    labels, preds, radii = [0, 1, 2, 3], [0, 1, -1, 0], [0.3, 1.2, 0.0, 0.9]
    s = certify.summarize(labels, preds, radii)
    assert s["acr"] == pytest.approx((0.3 + 1.2) / 4)  # wrong and abstained count 0
    assert s["cert_acc"][0.0] == 0.5 and s["cert_acc"][0.25] == 0.5 and s["cert_acc"][0.5] == 0.25
    assert s["cert_acc"][1.25] == 0.0
    assert "over 4 inputs" in certify.format_table(s)


class Stub(nn.Module):
    """Always class 1: certify returns (1, sigma * PhiInv(alpha^(1/n)))."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)


def test_results_tsv_is_appended_and_resumed(tmp_path):
    data = [(torch.zeros(3), i % 2) for i in range(6)]
    out, smooth = str(tmp_path / "r.tsv"), Smooth(Stub(), 2, 0.25)
    s1 = certify.certify_dataset(smooth, data, [0, 2], out, 10, 100, 0.001, 50, "clopper-pearson", log=lambda *a: None)
    lines = []
    s2 = certify.certify_dataset(smooth, data, [0, 2, 4, 5], out, 10, 100, 0.001, 50, "clopper-pearson", log=lines.append)
    rows = certify.read_tsv(out)
    assert [r["idx"] for r in rows] == [0, 2, 4, 5] and "2 inputs done" in lines[0]
    assert open(out).readline().strip() == certify.TSV_HEADER
    R = 0.25 * norm.ppf(0.001 ** (1 / 100))
    assert rows[0]["radius"] == pytest.approx(R, rel=1e-3) and rows[3]["correct"] == 1 and rows[0]["correct"] == 0
    assert s1["n"] == 2 and s2["n"] == 4 and s2["acr"] == pytest.approx(R / 4, rel=1e-3)  # only idx 5 is correct


# ================================================================ models
def test_lenet_and_resnet110_state_dicts_match_the_authors_release():
    lenet = models.get_model("mnist")
    assert {k: tuple(v.shape) for k, v in lenet.state_dict().items()} == {
        "conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,), "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
        "fc1.weight": (500, 800), "fc1.bias": (500,), "fc2.weight": (10, 500), "fc2.bias": (10,)}
    bn = lambda p, c: {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,),
                       f"{p}.num_batches_tracked": ()}
    want = {"conv1.weight": (16, 3, 3, 3), **bn("bn1", 16), "fc.weight": (10, 64), "fc.bias": (10,)}
    c_in = 16
    for s, c in enumerate([16, 32, 64], start=1):
        for i in range(18):
            p = f"layer{s}.{i}"
            want.update({f"{p}.conv1.weight": (c, c_in if i == 0 else c, 3, 3), **bn(f"{p}.bn1", c),
                         f"{p}.conv2.weight": (c, c, 3, 3), **bn(f"{p}.bn2", c)})
            if i == 0 and c != c_in:
                want.update({f"{p}.downsample.0.weight": (c, c_in, 1, 1), **bn(f"{p}.downsample.1", c)})
        c_in = c
    got = {k: tuple(v.shape) for k, v in models.get_model("cifar10").state_dict().items()}
    assert got == want


def test_foreign_checkpoints_load_strictly(tmp_path):
    ref = models.get_model("cifar10", arch="resnet20")
    sd = ref.state_dict()
    torch.save({"net": sd, "epoch": 3}, tmp_path / "authors.pth")  # the MACER authors' format
    torch.save({"arch": "cifar_resnet20", "state_dict": {"1.module." + k: v for k, v in sd.items()}},
               tmp_path / "cohen.pth.tar")  # Cohen et al.'s: Sequential(normalize, DataParallel(net))
    m, cfg = models.load_checkpoint(str(tmp_path / "authors.pth"), dataset="cifar10", arch="resnet20")
    assert cfg["normalize"] is False and isinstance(m.normalize, nn.Identity)
    m2, cfg2 = models.load_checkpoint(str(tmp_path / "cohen.pth.tar"))
    assert cfg2["dataset"] == "cifar10" and cfg2["arch"] == "resnet20" and cfg2["normalize"] is True
    x = torch.rand(2, 3, 32, 32)
    ref.eval(), m.eval(), m2.eval()
    torch.testing.assert_close(m(models.Normalize(*models.STATS["cifar10"])(x)), ref(x))  # it expects normalised input
    torch.testing.assert_close(m2(x), ref(x))


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "cifar10", "svhn", "imagenet"])
def test_forward_shapes_and_normalisation_inside_the_model(dataset):
    torch.manual_seed(0)
    net = models.get_model(dataset).eval()
    x = torch.rand(2, *models.INPUT_SHAPE[dataset])
    with torch.no_grad():
        out = net(x)
        mean, std = models.STATS[dataset]
        raw = models.get_model(dataset, normalize=False).eval()
        raw.load_state_dict(net.state_dict())  # normalisation adds no state-dict entries
        want = raw((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
    assert out.shape == (2, models.NUM_CLASSES[dataset])
    torch.testing.assert_close(out, want)


# ================================================================ train.py and certify.py end to end
def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    """A learnable 10-class dataset in torchvision's FashionMNIST/raw IDX layout: class c is a bright
    bar in row band c."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, N in (("train", 512), ("t10k", 100)):
        y = rng.integers(0, 10, N)
        x = rng.integers(0, 60, (N, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y)
    return str(root)


def run(*args, env=None):
    p = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_train_then_certify_end_to_end(tiny_fmnist, tmp_path):
    out = tmp_path / "run"
    log = run("train.py", "--data-dir", tiny_fmnist, "--out-dir", str(out), "--epochs", "2", "--train-subset", "0",
              "--k", "4", "--lr", "0.05", "--cert-n", "200", "--cert-skip", "10", "--cert-max", "5")
    assert "loss_cls" in log and "certified accuracy" in log and "over 5 inputs" in log
    log = run("certify.py", str(out / "checkpoint.pt"), "--data-dir", tiny_fmnist, "--n", "300", "--skip", "20",
              "--out", str(tmp_path / "c.tsv"), "--bound", "bernstein")
    rows = certify.read_tsv(str(tmp_path / "c.tsv"))
    assert [r["idx"] for r in rows] == [0, 20, 40, 60, 80] and "ACR" in log and "ETA" in log
    assert sum(r["correct"] for r in rows) >= 2  # chance is 0.5 of 5: the smoothed classifier learnt the bars


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    log = run("train.py", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path), "--method", "cohen",
              "--epochs", "1", "--train-subset", "4000", "--cert-n", "500", "--cert-max", "20", "--cert-skip", "50")
    s = certify.read_tsv(str(tmp_path / "certify.tsv"))
    assert len(s) == 20 and sum(r["correct"] for r in s) >= 8, log  # chance is 2 of 20


def test_resume_continues_exactly(tiny_fmnist, tmp_path):
    common = ("train.py", "--data-dir", tiny_fmnist, "--k", "2", "--cert-max", "0", "--save-every", "1",
              "--train-subset", "192", "--milestones", "1")
    run(*common, "--epochs", "2", "--out-dir", str(tmp_path / "straight"))
    run(*common, "--epochs", "1", "--out-dir", str(tmp_path / "split"))
    log = run(*common, "--epochs", "2", "--out-dir", str(tmp_path / "split"), "--resume")
    assert "resumed" in log
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for name, v in a["model"].items():
        assert torch.equal(v, b["model"][name]), name


def test_ddp_with_two_gloo_processes(tiny_fmnist, tmp_path):
    log = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "train.py",
              "--data-dir", tiny_fmnist, "--out-dir", str(tmp_path), "--epochs", "1", "--k", "2",
              "--train-subset", "256", "--cert-max", "2", "--cert-n", "100", "--cert-skip", "10")
    assert "2 process(es)" in log and "over 2 inputs" in log
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])


# ================================================================ user mistakes: one sentence, no traceback
@pytest.fixture(scope="module")
def lenet_ckpt(tiny_fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train.main(["--data-dir", tiny_fmnist, "--out-dir", str(out), "--epochs", "1", "--k", "1", "--train-subset", "64",
                "--cert-max", "0"])
    return str(out / "checkpoint.pt")


def one_line_error(fn, argv, capsys):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and msg.startswith("error:") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("flags, words", [
    (["--dataset", "cifar100"], "unknown dataset"), (["--sigma", "0"], "--sigma"), (["--sigma", "-1"], "--sigma"),
    (["--k", "0"], "--k"), (["--lbd", "-1"], "--lbd"), (["--gamma", "0"], "--gamma"), (["--beta", "0"], "--beta"),
    (["--cert-alpha", "1"], "--cert-alpha"), (["--cert-alpha", "0"], "--cert-alpha"), (["--cert-n", "0"], "--cert-n"),
    (["--cert-n0", "0"], "--cert-n0"), (["--arch", "resnet110"], "does not fit"),
])
def test_train_rejects_bad_flags(flags, words, capsys):
    assert words in one_line_error(train.main, flags, capsys)


def test_train_missing_dataset_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(train.IDX_FOLDERS, "fashion-mnist", ("FashionMNIST", str(tmp_path / "nowhere")))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download, here or anywhere
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    msg = one_line_error(train.main, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")], capsys)
    assert "not found" in msg and str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg


def test_certify_rejects_bad_input(lenet_ckpt, tiny_fmnist, tmp_path, capsys):
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--out", str(tmp_path / "x.tsv")]
    assert "--alpha" in one_line_error(certify.main, base + ["--alpha", "1.5"], capsys)
    assert "--n0" in one_line_error(certify.main, base + ["--n", "0"], capsys)
    assert "--n0" in one_line_error(certify.main, base + ["--n0", "0"], capsys)
    assert "does not fit" in one_line_error(certify.main, base + ["--dataset", "cifar10"], capsys)
    assert "unknown dataset" in one_line_error(certify.main, base + ["--dataset", "cifar100"], capsys)
    assert "--sigma" in one_line_error(certify.main, base + ["--sigma", "0"], capsys)
    assert "--beta" in one_line_error(certify.main, base + ["--beta", "-1"], capsys)
    sd = torch.load(lenet_ckpt, weights_only=True)
    sd["model"]["fc2.weight"], sd["model"]["fc2.bias"] = torch.zeros(5, 500), torch.zeros(5)  # 5 classes
    torch.save(sd, tmp_path / "k5.pt")
    assert "does not fit" in one_line_error(certify.main, [str(tmp_path / "k5.pt")] + base[1:], capsys)
    (tmp_path / "corrupt.pt").write_bytes(open(lenet_ckpt, "rb").read()[:5000])
    assert "not a readable" in one_line_error(certify.main, [str(tmp_path / "corrupt.pt")] + base[1:], capsys)
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a readable" in one_line_error(certify.main, [str(tmp_path / "notes.txt")] + base[1:], capsys)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "no state dict" in one_line_error(certify.main, [str(tmp_path / "list.pt")] + base[1:], capsys)
    assert "no checkpoint" in one_line_error(certify.main, [str(tmp_path / "absent.pt")] + base[1:], capsys)


def test_checkpoint_loading_never_runs_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"model": Evil(), "config": {}}, tmp_path / "evil.pt")
    one_line_error(certify.main, [str(tmp_path / "evil.pt")], capsys)
    assert not (tmp_path / "pwned").exists()


def test_crop_flip_is_a_padded_window_per_image():
    """train.crop_flip against a naive search: each output is one of the 9 x 9 zero-padded
    windows of its input, flipped or not, and all offsets and both flips occur."""
    torch.manual_seed(0)
    x = torch.rand(200, 3, 8, 8)
    out = train.crop_flip(x)
    x_pad = F.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        matches = [(di, dj, f) for di in range(9) for dj in range(9) for f in (0, 1)
                   if torch.equal(out[i], (lambda w: w.flip(2) if f else w)(x_pad[i, :, di:di + 8, dj:dj + 8]))]
        assert matches, f"image {i} is no padded window of its input"
        seen.update(matches)
    assert {f for _, _, f in seen} == {0, 1} and len({(di, dj) for di, dj, _ in seen}) > 60
