"""Tests, in the paper's order, then the tools. Each compares the code with something trusted (a
closed form, a naive loop, float64, finite differences or exact quadrature) and each can fail.
Run: python -m pytest -q test_macer.py"""
import gzip
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.stats import beta as beta_dist, binom, norm

import certify
import data
import models
import train
from certify import Smooth
from macer import macer_loss, noisy_copies, robust_hinge

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUIET = lambda *a, **k: None


# ================================================================ Algorithm 1 and Eq. 17 (macer.py)
def test_noisy_copies_layout_groups_the_copies_of_one_input():
    """Line 4: the k copies of x_i sit in rows i*k .. i*k+k-1, x_i + sigma * eta_ij."""
    x = torch.arange(3.0).view(3, 1, 1, 1)  # (n, C, H, W)
    noise = torch.randn(3, 4, 1, 1, 1)  # (n, k, C, H, W)
    copies = noisy_copies(x, 4, 0.5, noise)
    assert copies.shape == (12, 1, 1, 1)
    torch.testing.assert_close(copies.view(3, 4), x.view(3, 1) + 0.5 * noise.view(3, 4))


def naive_eq17(logits, y, sigma, lbd, gamma, beta):
    """Eq. 17 / Algorithm 1 lines 5-9, one input at a time, in float64 with scipy's PhiInv."""
    n, k, K = logits.shape
    total_cls, total_rob = 0.0, 0.0
    for i in range(n):
        z_hat = np.mean([np.exp(u - u.max()) / np.exp(u - u.max()).sum() for u in logits[i]], axis=0)
        total_cls -= math.log(z_hat[y[i]])
        z_hat_b = np.mean([np.exp(u - u.max()) / np.exp(u - u.max()).sum() for u in beta * logits[i]], axis=0)
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


def test_a_tie_for_the_top_counts_as_in_G():
    """Line 6 with z_y = z_runner_up: the input is in G, xi_hat = 0, and the hinge is gamma."""
    logits = torch.tensor([[[0.0, 0.0, -5.0]]], dtype=torch.float64)  # (n=1, k=1, K=3): classes 0 and 1 tie
    loss_rob = macer_loss(logits, torch.tensor([0]), sigma=0.5, lbd=2.0, gamma=3.0, beta=1.0)[2]
    assert loss_rob.item() == pytest.approx(2.0 * 0.5 / 2 * 3.0)


def test_macer_loss_gradient_equals_finite_differences():
    """torch.autograd.gradcheck in float64, inside the hinge region and away from its kinks."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 3, 5, dtype=torch.float64) * 0.3).requires_grad_()
    y = (2 * logits.detach()).softmax(-1).mean(1).argmax(-1)
    y[0] = (y[0] + 1) % 5  # one input outside G
    assert torch.autograd.gradcheck(lambda u: macer_loss(u, y, 0.25, 12.0, 8.0, 2.0)[0], (logits,))
    assert macer_loss(logits, y, 0.25, 12.0, 8.0, 2.0)[2] > 0


@FAST
@given(K=st.integers(2, 20), margin=st.floats(0.0, 2.5), gamma=st.floats(0.5, 16.0),
       beta=st.sampled_from([1.0, 4.0, 16.0, 64.0]), k=st.integers(1, 8), seed=st.integers(0, 2 ** 31))
def test_float32_agrees_with_float64_wherever_float64_is_finite(K, margin, gamma, beta, k, seed):
    """In float32, z_y rounds to 1.0 long before xi_hat reaches 16; computing PhiInv(z_y) as
    -PhiInv(1 - z_y), 1 - z_y summed from the other classes, keeps every input in the hinge."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, k, K, generator=g, dtype=torch.float64) * 0.05
    logits[:, :, 0] += torch.tensor([margin, margin / 2, 2 * margin], dtype=torch.float64).view(3, 1)
    y = torch.zeros(3, dtype=torch.long)
    want = macer_loss(logits, y, 0.5, 16.0, gamma, beta)[2].item()
    got = macer_loss(logits.float(), y, 0.5, 16.0, gamma, beta)[2].item()
    assert math.isfinite(want) and got == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_float32_keeps_an_input_whose_z_y_rounds_to_one():
    """K = 10, beta = 16, margin 1.1, gamma = 14: z_y is 1.0 in float32, but xi_hat is about 10.5."""
    logits = torch.zeros(1, 1, 10)
    logits[0, 0, 3] = 1.1
    got = macer_loss(logits, torch.tensor([3]), 0.5, 16.0, 14.0, 16.0)[2].item()
    want = macer_loss(logits.double(), torch.tensor([3]), 0.5, 16.0, 14.0, 16.0)[2].item()
    assert want > 5 and got == pytest.approx(want, rel=1e-4)


def test_hinge_gradient_is_exactly_zero_outside_G_or_beyond_gamma():
    torch.manual_seed(1)
    n, k, K, beta, gamma = 60, 4, 10, 16.0, 2.0
    logits = (torch.randn(n, k, K, dtype=torch.float64) * torch.logspace(-2, 0.5, n, dtype=torch.float64).view(n, 1, 1))
    logits.requires_grad_()
    z_hat = (beta * logits.detach()).softmax(-1).mean(1)  # (n, K)
    y = z_hat.argmax(-1)
    y[::3] = (y[::3] + 1) % K  # every third input leaves G
    grad, = torch.autograd.grad(macer_loss(logits, y, 0.25, 1.0, gamma, beta)[2], logits)
    top2 = z_hat.topk(2).values
    xi = torch.tensor(norm.ppf(top2[:, 0].numpy()) - norm.ppf(top2[:, 1].numpy()))
    in_G = z_hat.argmax(-1) == y
    dead, alive = ~in_G | (xi >= gamma), in_G & (xi < gamma)
    assert dead.sum() > 10 and alive.sum() > 10  # both kinds are there
    assert (grad[dead] == 0).all()
    assert (grad[alive].abs().sum((1, 2)) > 0).all()


def test_two_passes_are_needed_a_single_masked_pass_gives_nan():
    """An input deep in G (1 - z_y about 2e-42 in float32, xi_hat about 27 > gamma): PhiInv' overflows
    there, so a single pass's zero hinge gradient becomes 0 * inf = NaN; robust_hinge gives 0."""
    logits = torch.tensor([[[6.0, 0.0]]], requires_grad=True)  # beta * margin = 96: exp(-96) is subnormal
    loss = macer_loss(logits, torch.tensor([0]), 0.5, 16.0, 8.0, 16.0)[0]
    grad, = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()

    z_hat = F.softmax(16.0 * logits, dim=2).mean(1)  # (1, 2)
    one_minus_z_y, z_runner_up = z_hat[:, 1], z_hat[:, 1]
    assert 0 < one_minus_z_y.item() < 1e-38
    xi = -torch.special.ndtri(one_minus_z_y) - torch.special.ndtri(z_runner_up)
    single = torch.where(xi < 8.0, 8.0 - xi, torch.zeros_like(xi))
    grad_single, = torch.autograd.grad(single.sum(), logits)
    assert torch.isnan(grad_single).any()
    assert robust_hinge(one_minus_z_y, z_runner_up, torch.tensor([True]), 8.0).item() == 0.0


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


def test_loss_under_bf16_autocast_is_computed_in_float32():
    """The network runs in bf16, but the loss on its logits equals the float64 loss on the same
    logits to float32 precision (a bf16 loss would be off by about 1e-2), and the bf16 network's
    logits stay close to the fp32 network's."""
    torch.manual_seed(0)
    net = models.get_model("fashion-mnist")
    x_noisy = noisy_copies(torch.rand(8, 1, 28, 28), 4, 0.25)  # (32, 1, 28, 28)
    with torch.autocast("cpu", torch.bfloat16):
        logits = net(x_noisy).view(8, 4, -1)  # (32, K) -> (8, 4, K)
        scaled = logits * 3  # spread, so that both terms matter
        y = (4 * scaled.float()).softmax(-1).mean(1).argmax(-1)  # all in G
        got = macer_loss(scaled, y, 0.25, 12.0, 8.0, 4.0)
    assert scaled.dtype == torch.bfloat16 and got[0].dtype == torch.float32 and got[2] > 0
    want = macer_loss(scaled.double(), y, 0.25, 12.0, 8.0, 4.0)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(logits.float(), net(x_noisy).view(8, 4, -1), rtol=0.05, atol=0.02)


def test_macer_loss_rejects_bad_arguments_and_takes_an_empty_batch():
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(n, k, K\)"):
        macer_loss(torch.randn(2, 10), y, 0.25, 1.0, 8.0, 16.0)
    for bad in (dict(beta=math.inf), dict(beta=0.0), dict(lbd=-1.0), dict(sigma=-0.25), dict(gamma=math.nan)):
        with pytest.raises(ValueError):
            macer_loss(torch.randn(2, 3, 10), y, **{**dict(sigma=0.25, lbd=1.0, gamma=8.0, beta=16.0), **bad})
    empty = torch.zeros(0, 4, 10, requires_grad=True)
    values = macer_loss(empty, torch.zeros(0, dtype=torch.long), 0.25, 12.0, 8.0, 16.0)
    assert all(v.item() == 0.0 for v in values)
    values[0].backward()
    assert empty.grad.shape == empty.shape


def test_cohen_is_the_special_case_k1_lambda0():
    """k = 1, lambda = 0: exactly cross-entropy on one noisy copy, in value and gradient."""
    torch.manual_seed(0)
    logits = torch.randn(32, 1, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (32,))
    loss = macer_loss(logits, y, sigma=0.25, lbd=0.0, gamma=8.0, beta=16.0)[0]
    ce = F.cross_entropy(logits.view(32, 10), y)  # (n, 1, K) -> (n, K)
    g_macer, = torch.autograd.grad(loss, logits)
    g_ce, = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(loss, ce, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_macer, g_ce, rtol=1e-12, atol=1e-14)
    assert train.recipe("cifar10", 0.25, "cohen").k == 1 and train.recipe("cifar10", 0.25, "cohen").lbd == 0


def test_footnote5_lambda_is_zero_until_the_first_decay():
    cfg = train.recipe("cifar10", 1.0, "macer")
    assert cfg.dynamic_lbd and [train.epoch_lambda(cfg, e) for e in (0, 199, 200, 439)] == [0.0, 0.0, 12, 12]
    cfg = train.recipe("cifar10", 0.5, "macer")
    assert not cfg.dynamic_lbd and train.epoch_lambda(cfg, 0) == 4


# ================================================================ Lemma 1, Theorems 1 and 2 (certify.radius)
def smoothed_1d(x, edges, values, sigma):
    """E f(x + eta), eta ~ N(0, sigma^2), for the piecewise-constant f equal to values[j] (a
    scalar or a vector) on [edges[j-1], edges[j]), edges[-1] = -inf and edges[m] = +inf: a sum of
    Phi terms, exact. x: (P,) points. Returns (P,) or (P, K)."""
    t = np.concatenate([[-np.inf], np.sort(edges), [np.inf]])
    cdf = norm.cdf((t[None, :] - x[:, None]) / sigma)  # (P, m + 2)
    mass = np.diff(cdf, axis=1)  # (P, m + 1): P(x + eta lands in interval j)
    return mass @ np.asarray(values, dtype=np.float64)


def phi_inv_rounding(p):
    """How far sigma = 1 * PhiInv(p) can move when p carries float64 rounding (a few ulps of 1)."""
    return 4e-16 / max(norm.pdf(norm.ppf(min(max(p, 1e-300), 1 - 1e-16))), 1e-300)


piecewise = st.integers(1, 6).flatmap(lambda m: st.tuples(
    st.lists(st.floats(-2, 2), min_size=m, max_size=m, unique=True),
    st.lists(st.sampled_from([0.0, 1.0]) | st.floats(0, 1), min_size=m + 1, max_size=m + 1)))


@FAST
@given(f=piecewise, sigma=st.floats(0.1, 1.0), x=st.floats(-2, 2), delta=st.floats(-1, 1))
def test_lemma1_the_radius_function_is_1_lipschitz(f, sigma, x, delta):
    """Lemma 1: for f with values in [0, 1], x -> PhiInv(E f(x + eta)) is 1/sigma-Lipschitz, so the
    one-sided radius certify.radius(E f(x + eta), sigma) moves by at most |delta|."""
    edges, values = f
    g = smoothed_1d(np.array([x, x + delta]), edges, values, sigma)
    if not ((1e-12 < g) & (g < 1 - 1e-12)).all():
        return  # PhiInv is infinite at 0 and 1
    slack = 1e-7 + sigma * (phi_inv_rounding(g[0]) + phi_inv_rounding(g[1]))
    assert abs(norm.ppf(g[1]) - norm.ppf(g[0])) <= abs(delta) / sigma + slack / sigma
    if (g > 0.5).all():
        assert abs(certify.radius(g[1], sigma) - certify.radius(g[0], sigma)) <= abs(delta) + slack


classifier_1d = st.tuples(st.integers(2, 5), st.integers(1, 8)).flatmap(lambda Km: st.tuples(
    st.just(Km[0]), st.lists(st.floats(-2, 2), min_size=Km[1], max_size=Km[1], unique=True),
    st.lists(st.integers(0, Km[0] - 1), min_size=Km[1] + 1, max_size=Km[1] + 1),
    st.lists(st.lists(st.floats(0.01, 1), min_size=Km[0], max_size=Km[0]), min_size=Km[1] + 1, max_size=Km[1] + 1)))


@FAST
@given(c=classifier_1d, sigma=st.floats(0.1, 1.0), x0=st.floats(-2, 2), soft=st.booleans(), two_sided=st.booleans())
def test_theorems_1_and_2_prediction_constant_within_certified_radius(c, sigma, x0, soft, two_sided):
    """Theorem 1 (Hard-RS, one-hot f) and Theorem 2 (Soft-RS, z in the simplex): the exactly
    smoothed prediction stays class A everywhere within the radius that certify.radius computes
    from the exact probabilities, either as sigma * PhiInv(p_A) or sigma/2 (PhiInv p_A - PhiInv p_B).
    The radius is shrunk by what float64 rounding of p_A and p_B can add to it (p_A = 1 - 3e-14
    moves PhiInv by 1e-3), and the margin at the checked points allows the same rounding."""
    K, edges, labels, weights = c
    values = (np.array(weights) / np.sum(weights, 1, keepdims=True) if soft
              else np.eye(K)[labels])  # (m + 1, K): the value of f (hard) or z (soft) on each interval
    p = smoothed_1d(np.array([x0]), edges, values, sigma)[0]
    order = np.argsort(-p)
    A, p_A, p_B = order[0], p[order[0]], p[order[1]]
    R = certify.radius(p_A, sigma, p_B if two_sided else None)
    if R is None or not np.isfinite(R):
        return
    R -= sigma * (phi_inv_rounding(p_A) + phi_inv_rounding(p_B if two_sided else 1 - p_A))
    if R < 1e-6:
        return
    xs = x0 + np.linspace(-R, R, 201)
    P = smoothed_1d(xs, edges, values, sigma)  # (201, K)
    others = np.delete(P, A, axis=1).max(1)
    assert (P[:, A] >= others - 1e-12).all()


@FAST
@given(edge=st.floats(-2, 2), x0=st.floats(-2, 2), sigma=st.floats(0.1, 1.0))
def test_the_radius_is_exact_for_a_half_space(edge, x0, sigma):
    """For f = 1[x >= edge] (Cohen's linear case) both forms of the radius equal the distance to the
    edge: sigma * PhiInv(p_A) = sigma/2 (PhiInv p_A - PhiInv(1 - p_A)) = |x0 - edge|."""
    p_A = norm.cdf(abs(x0 - edge) / sigma)
    if not 0.5 + 1e-9 < p_A < 1 - 1e-9:
        return
    assert certify.radius(p_A, sigma) == pytest.approx(abs(x0 - edge), rel=1e-6)
    assert certify.radius(p_A, sigma, 1 - p_A) == pytest.approx(abs(x0 - edge), rel=1e-6)


def test_two_sided_radius_formula():
    """Eq. 8 / Eq. 16 with a p_B below 1 - p_A: sigma/2 (PhiInv 0.8 - PhiInv 0.1); abstain if p_A <= p_B."""
    assert certify.radius(0.8, 0.5, 0.1) == pytest.approx(0.25 * (0.8416212335729143 + 1.2815515655446004))
    assert certify.radius(0.3, 0.5, 0.3) is None and certify.radius(0.5, 0.5) is None


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
    clipped_xi = gamma - robust_hinge(1 - p1, p2, torch.tensor([True]), gamma)  # min(xi, gamma)
    g1, g2 = torch.autograd.grad(clipped_xi.sum(), [p1, p2])
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    xi = norm.ppf(p[0]) - norm.ppf(p[1])
    if xi > gamma:
        assert g1.item() == 0.0 and g2.item() == 0.0
    else:
        p_star = norm.cdf(gamma)
        assert 0 < g1.item() <= phi_inv_derivative_bound(1 / K, p_star) * (1 + 1e-9)
        assert 0 < -g2.item() <= phi_inv_derivative_bound((1 - p_star) / (K - 1), 1 - p_star) * (1 + 1e-9)


# ================================================================ certification (certify.py)
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


@settings(max_examples=30, deadline=None)
@given(z=st.lists(st.floats(0, 1), min_size=2, max_size=200))
def test_eq25_sample_variance_and_eq23_eq26_bounds(z):
    """Eq. 25 against numpy's var(ddof=1); Eq. 23 and Eq. 26 (the 7 log(2/alpha) / (3(n-1)) term
    outside the square root) written out."""
    z, n, alpha = np.array(z), len(z), 0.001
    S2 = certify.sample_variance(z.sum(), (z * z).sum(), n)
    assert S2 == pytest.approx(np.var(z, ddof=1), rel=1e-9, abs=1e-12)
    want = z.mean() - math.sqrt(2 * np.var(z, ddof=1) * math.log(2 / alpha) / n) - 7 * math.log(2 / alpha) / (3 * (n - 1))
    assert certify.bernstein_lower(z.mean(), S2, n, alpha) == pytest.approx(want, rel=1e-9, abs=1e-7)
    assert certify.hoeffding_lower(z.mean(), n, alpha) == pytest.approx(z.mean() - math.sqrt(math.log(1 / alpha) / (2 * n)))


class Linear2(nn.Module):
    """f(x) = 1[w.x + b > 0] as two logits; with scale s, softmax(beta u) = sigmoid(beta s (w.x + b))."""

    def __init__(self, w, b, scale=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64), requires_grad=False)
        self.b, self.scale = b, scale

    def forward(self, x):
        t = self.scale * (x.flatten(1) @ self.w + self.b)  # (batch, d) -> (batch,)
        return torch.stack([torch.zeros_like(t), t], dim=1)


@pytest.mark.parametrize("bound", certify.BOUNDS)
def test_certify_equals_cohens_steps_written_out(bound):
    """CERTIFY against a naive rewrite on the same noise: selection from n0 samples, then the bound
    from n fresh ones, counted and averaged in numpy (S^2 by numpy's var(ddof=1))."""
    model, sigma, beta, n0, n, alpha, bs = Linear2([0.6, -0.8], 0.05, 3.0), 0.5, 2.0, 50, 3000, 0.01, 700
    x = torch.tensor([0.1, 0.05], dtype=torch.float64)
    torch.manual_seed(5)
    c_A, R = Smooth(model, 2, sigma, beta).certify(x, n0, n, alpha, bs, bound)
    torch.manual_seed(5)
    draw = lambda num: torch.cat([x + sigma * torch.randn(min(bs, num - s), 2, dtype=torch.float64)
                                  for s in range(0, num, bs)])  # (num, 2), in certify's batches
    u0, u = model(draw(n0)).numpy(), model(draw(n)).numpy()
    if bound == "clopper-pearson":
        want_c = np.bincount(u0.argmax(1), minlength=2).argmax()
        n_A = int((u.argmax(1) == want_c).sum())
        p_low = beta_dist.ppf(alpha, n_A, n - n_A + 1)
    else:
        z0, z = (np.exp(beta * v) / np.exp(beta * v).sum(1, keepdims=True) for v in (u0, u))
        want_c = z0.sum(0).argmax()
        z_A = z[:, want_c]
        p_low = (z_A.mean() - math.sqrt(math.log(1 / alpha) / (2 * n)) if bound == "hoeffding" else
                 z_A.mean() - math.sqrt(2 * np.var(z_A, ddof=1) * math.log(2 / alpha) / n) - 7 * math.log(2 / alpha) / (3 * (n - 1)))
    assert p_low > 0.5 and c_A == want_c
    assert R == pytest.approx(sigma * norm.ppf(p_low), rel=1e-6)  # certify's softmax runs in float32


def soft_z_A_exact(margin_w, norm_w, sigma, beta_s):
    """E sigmoid(beta s t), t ~ N(w.x + b, (sigma |w|)^2), by 200-node Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    t = margin_w + sigma * norm_w * nodes
    return float(np.sum(weights / np.sqrt(2 * np.pi) / (1 + np.exp(-beta_s * t))))


LINEAR = dict(w=[0.6, -0.8, 0.0], x=torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), sigma=0.5)


@pytest.mark.parametrize("where", ["inside", "boundary"])
@pytest.mark.parametrize("bound", certify.BOUNDS)
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
        assert norm.cdf(margin / sigma) == pytest.approx(smooth._counts(x, 200_000, 200_000)[1].item() / 200_000, abs=0.005)
    results = [smooth.certify(x, 20, n, alpha, n, bound) for _ in range(repeats)]
    over = sum(c != Smooth.ABSTAIN and (R > true_R + 1e-12 or c != 1) for c, R in results)
    assert over <= binom.ppf(0.999, repeats, alpha), f"{over}/{repeats} certificates exceed the truth"
    if where == "inside":  # with many samples the certificate comes close to the truth from below
        c_A, R = smooth.certify(x, 100, 200_000, 0.001, 100_000, bound)
        assert c_A == 1 and true_R - 0.02 < R <= true_R + 1e-3


def test_predict_at_the_decision_boundary_abstains_except_with_probability_alpha():
    torch.manual_seed(0)
    smooth = Smooth(Linear2([1.0, 0.0], 0.0), 2, 0.5)
    x, alpha, repeats = torch.zeros(2, dtype=torch.float64), 0.1, 2000
    answered = sum(smooth.predict(x, 100, alpha, 100) != Smooth.ABSTAIN for _ in range(repeats))  # 0.5 vs 0.5
    assert answered <= binom.ppf(0.999, repeats, alpha)
    assert smooth.predict(torch.tensor([2.0, 0.0], dtype=torch.float64), 100, alpha, 100) == 1


class NaNWhere(nn.Module):
    """Class 1 everywhere, but NaN logits where x[0] > threshold (no parameters: a fixed function)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        out = torch.tensor([0.0, 1.0], dtype=x.dtype).expand(len(x), 2).clone()
        out[x[:, 0] > self.threshold] = math.nan
        return out


@pytest.mark.parametrize("bound", certify.BOUNDS)
def test_non_finite_logits_never_vote(bound):
    """A NaN network abstains (argmax would have voted class 0); when half the samples are NaN,
    they count against c_A, so p_A is about 1/2 and it abstains; it warns each time."""
    x = torch.zeros(2, dtype=torch.float64)
    for threshold in (-math.inf, 0.0):
        with pytest.warns(UserWarning, match="non-finite"):
            assert Smooth(NaNWhere(threshold), 2, 0.5).certify(x, 50, 2000, 0.001, 500, bound) == (Smooth.ABSTAIN, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every sample is finite
        assert Smooth(NaNWhere(math.inf), 2, 0.5).certify(x, 50, 2000, 0.001, 500, bound)[0] == 1
    lenet = models.get_model("fashion-mnist")
    image = torch.rand(1, 28, 28)
    image[0, 3, 3] = math.nan  # one NaN pixel
    with pytest.warns(UserWarning, match="non-finite"):
        assert Smooth(lenet, 10, 0.25).certify(image, 10, 100, 0.001, 100, bound) == (Smooth.ABSTAIN, 0.0)
    with pytest.warns(UserWarning):
        assert Smooth(NaNWhere(-math.inf), 2, 0.5).predict(x, 100, 0.001, 100) == Smooth.ABSTAIN


def test_smooth_rejects_bad_arguments_with_a_sentence():
    model, x = Linear2([1.0, 0.0], 0.0), torch.zeros(2, dtype=torch.float64)
    good = dict(x=x, n0=10, n=100, alpha=0.001, batch_size=50, bound="clopper-pearson")
    for bad, words in [(dict(batch_size=0), "batch_size"), (dict(alpha=1.0), "alpha"), (dict(alpha=1.5), "alpha"),
                       (dict(n=0), "n must"), (dict(n=1, bound="bernstein"), "n >= 2"), (dict(bound="wald"), "bound"),
                       (dict(x=x.view(1, 2)), "without a batch dimension")]:  # nn.Linear keeps the extra dimension
        with pytest.raises(ValueError, match=words):
            Smooth(nn.Linear(2, 2).double(), 2, 0.5).certify(**{**good, **bad})
    for args, words in [((model, 2, -0.5), "sigma"), ((model, 2, 0.5, -1.0), "beta"), ((model, 1, 0.5), "num_classes")]:
        with pytest.raises(ValueError, match=words):
            Smooth(*args)
    with pytest.raises(ValueError, match="num_classes"):  # a 10-class network certified as 2 classes
        Smooth(models.get_model("mnist"), 2, 0.5).certify(torch.rand(1, 28, 28), 10, 100, 0.001, 50)
    assert Smooth(NaNWhere(math.inf), 2, 0.5).certify(x, 10, 100, 0.001, 50)[0] == 1  # no parameters at all


# ================================================================ summaries, results files, comparison
def test_summary_matches_definitions():
    rows = [dict(label=l, predict=p, radius=R) for l, p, R in zip([0, 1, 2, 3], [0, 1, -1, 0], [0.3, 1.2, 0.0, 0.9])]
    s = certify.summarize(rows)
    assert s["acr"] == pytest.approx((0.3 + 1.2) / 4)  # wrong and abstained count 0
    assert s["cert_acc"][0.0] == 0.5 and s["cert_acc"][0.25] == 0.5 and s["cert_acc"][0.5] == 0.25
    assert s["cert_acc"][1.25] == 0.0
    assert "over 4 inputs" in certify.format_table(s)


class Stub(nn.Module):
    """Always class 1: certify returns (1, sigma * PhiInv(alpha^(1/n)))."""

    def forward(self, x):
        return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)


def cert(out, indices, sigma=0.25, log=QUIET, **kw):
    data_ = [(torch.zeros(3), i % 2) for i in range(6)]
    return certify.certify_dataset(Smooth(Stub(), 2, sigma), data_, indices, str(out), 10, 100, 0.001, 50,
                                   "clopper-pearson", log=log, **kw)


def test_results_tsv_is_appended_and_resumed(tmp_path):
    out = tmp_path / "r.tsv"
    s1 = cert(out, [0, 2])
    lines = []
    s2 = cert(out, [0, 2, 4, 5], log=lines.append)
    rows = certify.read_tsv(str(out))
    assert [r["idx"] for r in rows] == [0, 2, 4, 5] and "2 inputs done" in lines[0]
    assert open(out).readline().strip() == certify.TSV_HEADER
    R = 0.25 * norm.ppf(0.001 ** (1 / 100))
    assert rows[0]["radius"] == pytest.approx(R, rel=1e-3) and rows[3]["correct"] == 1 and rows[0]["correct"] == 0
    assert s1["n"] == 2 and s2["n"] == 4 and s2["acr"] == pytest.approx(R / 4, rel=1e-3)  # only idx 5 is correct
    assert s2["seconds"] == pytest.approx(sum(r["time"] for r in rows), abs=0.005)  # the TSV keeps 3 decimals


def test_results_made_with_other_settings_are_never_mixed(tmp_path):
    out = tmp_path / "r.tsv"
    cert(out, [0, 1], identity=dict(checkpoint_sha256="aa"))
    for change in (dict(sigma=0.5), dict(identity=dict(checkpoint_sha256="bb"))):
        with pytest.raises(ValueError, match="other settings"):
            cert(out, [0, 1, 2], **{"identity": dict(checkpoint_sha256="aa"), **change})
    s = cert(out, [0, 1, 2], sigma=0.5, identity=dict(checkpoint_sha256="aa"), overwrite=True)
    assert s["n"] == 3 and all(r["radius"] == pytest.approx(0.5 * norm.ppf(0.001 ** 0.01), rel=1e-3)
                               for r in certify.read_tsv(str(out)))


def test_a_cut_off_last_row_is_dropped_and_certified_again(tmp_path):
    out = tmp_path / "r.tsv"
    cert(out, [0, 1, 2, 3])
    text = open(out).read()
    open(out, "w").write(text[: text.rindex("\n", 0, -1) + 1] + "3\t1\t1\t0.2")  # the last row, cut short
    lines = []
    s = cert(out, [0, 1, 2, 3, 4], log=lines.append)
    assert any("cut-off" in l for l in lines) and s["n"] == 5
    assert [r["idx"] for r in certify.read_tsv(str(out))] == [0, 1, 2, 3, 4] and open(out).read().endswith("\n")


def test_an_empty_results_file_is_started_and_a_corrupt_one_refused(tmp_path):
    out = tmp_path / "r.tsv"
    out.write_text("")  # a kill during the first image
    assert cert(out, [0, 1])["n"] == 2
    out.write_text(certify.TSV_HEADER + "\n0\t1\t1\t0.5\n1\t0\t1\t0.5\t0\t1.0\n")
    with pytest.raises(ValueError, match="line 2"):
        certify.read_tsv(str(out))


def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "r.tsv"
    f, _ = certify.open_results(str(out), {"sigma": 0.25}, log=QUIET)
    with pytest.raises(ValueError, match="another process"):
        certify.open_results(str(out), {"sigma": 0.25}, log=QUIET)
    f.close()
    certify.open_results(str(out), {"sigma": 0.25}, log=QUIET)[0].close()


def write_tsv(path, rows):
    with open(path, "w") as f:
        f.write(certify.TSV_HEADER + "\n" + "".join(f"{i}\t{l}\t{p}\t{r}\t{int(l == p)}\t0.1\n" for i, l, p, r in rows))


def test_compare_against_a_hand_computed_case(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_tsv(a, [(0, 1, 1, 0.5), (1, 2, 2, 0.3), (2, 3, 0, 0.9), (7, 1, 1, 2.0)])  # idx 7 only in A
    write_tsv(b, [(0, 1, 1, 0.8), (1, 2, 2, 0.3), (2, 3, 3, 0.1)])
    c = certify.compare(str(a), str(b), resamples=4000)
    assert c["n"] == 3 and c["acr_a"] == pytest.approx(0.8 / 3) and c["acr_b"] == pytest.approx(1.2 / 3)
    assert c["diff"] == pytest.approx(0.4 / 3)  # per input: +0.3, 0, +0.1
    assert 0.0 <= c["ci"][0] <= 0.04 and 0.19 <= c["ci"][1] <= 0.3 + 1e-12  # resampled means of {0.3, 0, 0.1}
    assert [c["cert_acc_diff"][r] for r in (0.0, 0.25, 0.5, 0.75, 1.0)] == pytest.approx([1 / 3, 0, 0, 1 / 3, 0])
    assert c == certify.compare(str(a), str(b), resamples=4000)  # seeded
    c_same = certify.compare(str(a), str(a))
    assert c_same["diff"] == 0 and c_same["ci"] == (0.0, 0.0)
    write_tsv(tmp_path / "c.tsv", [(99, 1, 1, 0.5)])
    with pytest.raises(ValueError, match="share no inputs"):
        certify.compare(str(a), str(tmp_path / "c.tsv"))


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
    facts = data.DATASETS["cifar10"]
    torch.testing.assert_close(m(models.Normalize(facts.mean, facts.std)(x)), ref(x))  # it expects normalised input
    torch.testing.assert_close(m2(x), ref(x))
    with pytest.raises(ValueError, match="does not fit"):  # a library error, not an exit
        models.load_checkpoint(str(tmp_path / "authors.pth"), dataset="cifar10", arch="resnet56")


@pytest.mark.parametrize("dataset", list(data.DATASETS))
def test_forward_shapes_and_normalisation_inside_the_model(dataset):
    torch.manual_seed(0)
    facts = data.DATASETS[dataset]
    net = models.get_model(dataset).eval()
    x = torch.rand(2, *facts.shape)
    with torch.no_grad():
        out = net(x)
        raw = models.get_model(dataset, normalize=False).eval()
        raw.load_state_dict(net.state_dict())  # normalisation adds no state-dict entries
        want = raw((x - torch.tensor(facts.mean).view(1, -1, 1, 1)) / torch.tensor(facts.std).view(1, -1, 1, 1))
    assert out.shape == (2, facts.classes)
    torch.testing.assert_close(out, want)


def test_fast_path_is_chosen_from_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert models.native_bf16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)
    model, autocast, precision = models.fast_path(models.get_model("mnist"), "cpu")
    assert precision == ("bf16" if models.native_bf16("cpu") else "fp32") and autocast.fast_dtype == torch.bfloat16
    assert models.fast_path(models.get_model("mnist"), "cpu", fp32=True)[2] == "fp32"


# ================================================================ data
def test_crop_flip_is_a_padded_window_per_image():
    """data.crop_flip against a naive search: each output is one of the 9 x 9 zero-padded
    windows of its input, flipped or not, and all offsets and both flips occur."""
    torch.manual_seed(0)
    x = torch.rand(200, 3, 8, 8)
    out = data.crop_flip(x)
    x_pad = F.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        matches = [(di, dj, f) for di in range(9) for dj in range(9) for f in (0, 1)
                   if torch.equal(out[i], (lambda w: w.flip(2) if f else w)(x_pad[i, :, di:di + 8, dj:dj + 8]))]
        assert matches, f"image {i} is no padded window of its input"
        seen.update(matches)
    assert {f for _, _, f in seen} == {0, 1} and len({(di, dj) for di, dj, _ in seen}) > 60


def test_every_rank_takes_the_same_number_of_steps():
    """257 images on 2 ranks: 128 each (DDP's all-reduce hangs when one rank takes a step more),
    disjoint, from one shuffle."""
    images = data.TensorImages(torch.zeros(257, 1, 2, 2, dtype=torch.uint8), torch.arange(257))
    shards = [[y for _, y in data.batches(images, 64, 0, 0, False, "cpu", rank, 2)] for rank in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]
    seen = [torch.cat(s) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 128 and not set(seen[0].tolist()) & set(seen[1].tolist())


def write_idx(path, array, dtype_code=0x08):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_bars(raw, sizes=(("train", 512), ("t10k", 100)), classes=10):
    """A learnable dataset in the IDX layout: class c is a bright bar in row band c."""
    rng = np.random.default_rng(0)
    for prefix, N in sizes:
        y = rng.integers(0, classes, N)
        x = rng.integers(0, 60, (N, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y)


def test_bad_idx_files_are_named(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_bars(raw, (("train", 20), ("t10k", 10)))
    assert len(data.load_dataset("fashion-mnist", str(tmp_path), train=True)) == 20
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.full(10, 12))  # labels out of range
    with pytest.raises(ValueError, match="labels outside"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(9))  # one label short
    with pytest.raises(ValueError, match="10 images .* and 9 labels"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x03" + struct.pack(">III", 10, 28, 28) + b"\0" * 100)  # cut short
    with pytest.raises(ValueError, match="t10k-images.*not a complete"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)
    os.remove(raw / "t10k-images-idx3-ubyte.gz")  # the test set missing where the training set is
    with pytest.raises(ValueError, match="lacks t10k-images"):
        data.load_dataset("fashion-mnist", str(tmp_path), train=False)


# ================================================================ train.py and certify.py end to end
@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "FashionMNIST" / "raw").mkdir(parents=True)
    write_bars(root / "FashionMNIST" / "raw")
    return str(root)


def run(*args, env=None, ok=True):
    p = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p.stdout + p.stderr


def test_train_then_certify_end_to_end_on_the_fast_path(tiny_fmnist, tmp_path):
    """Train (bf16 where the CPU has native bf16), certify at the end, resume
    with more epochs (certify.tsv is redone for the new checkpoint), then certify.py with Soft-RS."""
    out = tmp_path / "run"
    common = ("train.py", "--data-dir", tiny_fmnist, "--out-dir", str(out), "--train-subset", "0", "--k", "4",
              "--lr", "0.05", "--cert-n", "200", "--cert-skip", "10", "--cert-max", "5")
    log = run(*common, "--epochs", "1")
    precision = "bf16" if models.native_bf16("cpu") else "fp32"
    assert f"cpu {precision}" in log and "over 5 inputs" in log
    first = certify.read_tsv(str(out / "certify.tsv"))
    log = run(*common, "--epochs", "2", "--resume")
    assert "resumed" in log and "afresh" in log and "over 5 inputs" in log
    assert certify.read_tsv(str(out / "certify.tsv")) != first
    log = run("certify.py", str(out / "checkpoint.pt"), "--data-dir", tiny_fmnist, "--n", "300", "--skip", "20",
              "--out", str(tmp_path / "c.tsv"), "--bound", "bernstein", "--summary", str(tmp_path / "s.json"))
    rows = certify.read_tsv(str(tmp_path / "c.tsv"))
    assert [r["idx"] for r in rows] == [0, 20, 40, 60, 80] and "ACR" in log and "ETA" in log
    assert sum(r["correct"] for r in rows) >= 2  # chance is 0.5 of 5: the smoothed classifier learnt the bars
    assert f"{precision} ->" in log
    (entry,) = json.load(open(tmp_path / "s.json"))["runs"]
    assert entry == {**entry, **dict(name="run", dataset="fashion-mnist", sigma=0.25, method="macer", epochs=2,
                                     n0=100, n=300, alpha=0.001, bound="bernstein", precision=precision,
                                     tsv=str(tmp_path / "c.tsv"), checkpoint=str(out / "checkpoint.pt"),
                                     certified=5, acr=round(certify.summarize(rows)["acr"], 4))}
    assert entry["cert_seconds"] == pytest.approx(sum(r["time"] for r in rows), abs=0.06)


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    log = run("train.py", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path), "--method", "cohen",
              "--epochs", "1", "--train-subset", "4000", "--cert-n", "500", "--cert-max", "20", "--cert-skip", "50")
    s = certify.read_tsv(str(tmp_path / "certify.tsv"))
    assert len(s) == 20 and sum(r["correct"] for r in s) >= 8, log  # chance is 2 of 20


def test_resume_continues_exactly_and_keeps_the_saved_settings(tiny_fmnist, tmp_path):
    common = ["--data-dir", tiny_fmnist, "--k", "2", "--cert-max", "0", "--save-every", "1", "--train-subset", "192",
              "--milestones", "1", "--lr", "0.02"]
    train.main(common + ["--epochs", "2", "--out-dir", str(tmp_path / "straight")])
    train.main(common + ["--epochs", "1", "--out-dir", str(tmp_path / "split")])
    os.rename(tmp_path / "split", tmp_path / "moved")  # a run folder moved or copied elsewhere
    train.main(["--epochs", "2", "--out-dir", str(tmp_path / "moved"), "--resume", "--data-dir", tiny_fmnist])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and b["config"]["out_dir"] == str(tmp_path / "moved")
    assert b["config"]["lr"] == 0.02 and b["config"]["k"] == 2  # the saved settings, not the recipe's
    for name, v in a["model"].items():
        assert torch.equal(v, b["model"][name]), name
    train.main(["--out-dir", str(tmp_path / "moved"), "--resume", "--data-dir", tiny_fmnist])  # no --epochs: still 2
    assert torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_ddp_with_two_gloo_processes_and_uneven_shards(tiny_fmnist, tmp_path):
    log = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "train.py",
              "--data-dir", tiny_fmnist, "--out-dir", str(tmp_path), "--epochs", "1", "--k", "2",
              "--train-subset", "257", "--cert-max", "2", "--cert-n", "100", "--cert-skip", "10")
    assert "2 process(es)" in log and "over 2 inputs" in log
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])


def write_setting(dataset, root):
    """A few images of `dataset` in its real on-disk format; class c is brighter in channel band c."""
    rng = np.random.default_rng(0)
    root.mkdir()
    def images(N, shape):
        y = rng.integers(0, 2, N)
        x = rng.integers(0, 100, (N, *shape)).astype(np.uint8)
        x[y == 1] += 100
        return x, y
    if dataset == "mnist":
        (root / "MNIST" / "raw").mkdir(parents=True)
        write_bars(root / "MNIST" / "raw", (("train", 64), ("t10k", 8)))
    elif dataset == "cifar10":
        (root / "cifar-10-batches-py").mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x, y = images(16, (3, 32, 32))
            with open(root / "cifar-10-batches-py" / name, "wb") as f:
                pickle.dump({"data": x.reshape(16, -1), "labels": y.tolist()}, f)  # (N, 3, 32, 32) -> (N, 3072)
    elif dataset == "svhn":
        import scipy.io
        for split in ("train", "test"):
            x, y = images(32, (32, 32, 3))
            scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": (y + 9)[:, None] % 10 + 1})
    else:
        from PIL import Image
        for split in ("train", "val"):
            x, y = images(8, (64, 64, 3))
            for i, (img, c) in enumerate(zip(x, y)):
                (root / split / f"n0{c}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / split / f"n0{c}" / f"{i}.JPEG")


@pytest.mark.parametrize("dataset, arch", [("mnist", "lenet"), ("cifar10", "resnet20"), ("svhn", "resnet20"),
                                           ("imagenet", "resnet50")])
def test_the_four_paper_settings_end_to_end(dataset, arch, tmp_path):
    """Each setting's reader on files in its real format, a few MACER steps, a checkpoint, and
    certify.py on two test images."""
    root = tmp_path / "data"
    write_setting(dataset, root)
    out = tmp_path / "run"
    train.main(["--dataset", dataset, "--arch", arch, "--data-dir", str(root), "--out-dir", str(out), "--epochs", "1",
                "--k", "2", "--batch", "4" if dataset == "imagenet" else "16", "--train-subset", "32", "--workers", "1",
                "--cert-max", "0"])
    tsv = tmp_path / "c.tsv"
    certify.main([str(out / "checkpoint.pt"), "--data-dir", str(root), "--n0", "4", "--n", "16", "--batch", "8",
                  "--skip", "3", "--max", "2", "--out", str(tsv)])
    rows = certify.read_tsv(str(tsv))
    assert [r["idx"] for r in rows] == [0, 3] and all(0 <= r["label"] < data.DATASETS[dataset].classes for r in rows)


# ================================================================ user mistakes: one sentence, no traceback
@pytest.fixture(scope="module")
def lenet_ckpt(tiny_fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    train.main(["--data-dir", tiny_fmnist, "--out-dir", str(out), "--epochs", "1", "--k", "1", "--train-subset", "64",
                "--cert-max", "0"])
    return str(out / "checkpoint.pt")


def one_line_error(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and msg.startswith("error:") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("flags, words", [
    (["--dataset", "cifar100"], "unknown dataset"), (["--sigma", "0"], "--sigma"), (["--sigma", "nan"], "--sigma"),
    (["--k", "0"], "--k"), (["--lbd", "-1"], "--lbd"), (["--lbd", "inf"], "--lbd"), (["--gamma", "nan"], "--gamma"),
    (["--beta", "0"], "--beta"), (["--beta", "inf"], "--beta"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--momentum", "inf"], "--momentum"), (["--weight-decay", "-1"], "--weight-decay"), (["--grad-clip", "nan"], "--grad-clip"),
    (["--train-subset", "-5"], "--train-subset"), (["--cert-alpha", "1"], "--cert-alpha"), (["--cert-n", "0"], "--cert-n"),
    (["--cert-n0", "0"], "--cert-n0"), (["--arch", "resnet110"], "does not fit"),
])
def test_train_rejects_bad_flags(flags, words):
    assert words in one_line_error(train.main, flags)


def test_train_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setitem(data.IDX, "fashion-mnist", ("FashionMNIST", str(tmp_path / "nowhere")))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download, here or anywhere
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    msg = one_line_error(train.main, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert "not found" in msg and str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg


def test_train_guards_the_run(tiny_fmnist, lenet_ckpt, tmp_path):
    """An existing checkpoint is not overwritten without --overwrite; --resume refuses settings it
    cannot honour; an unwritable out-dir fails before training; a diverging run stops with a
    sentence and keeps its last good checkpoint."""
    folder = os.path.dirname(lenet_ckpt)
    base = ["--data-dir", tiny_fmnist, "--out-dir", folder, "--k", "1", "--train-subset", "64", "--cert-max", "0"]
    assert "--overwrite" in one_line_error(train.main, base + ["--epochs", "1"])
    assert "cannot change --sigma" in one_line_error(train.main, base + ["--resume", "--sigma", "0.5"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write" in one_line_error(train.main, base[:2] + ["--out-dir", str(blocker / "sub"), "--epochs", "1"])
    good = torch.load(lenet_ckpt, weights_only=True)["model"]
    msg = one_line_error(train.main, base[:2] + ["--out-dir", str(tmp_path / "nan"), "--lr", "1e30", "--epochs", "1",
                                                 "--train-subset", "256", "--k", "2"])
    assert "non-finite" in msg and not (tmp_path / "nan" / "checkpoint.pt").exists()
    assert torch.equal(torch.load(lenet_ckpt, weights_only=True)["model"]["fc2.weight"], good["fc2.weight"])


def test_certify_rejects_bad_input(lenet_ckpt, tiny_fmnist, tmp_path):
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--out", str(tmp_path / "x.tsv")]
    assert "--alpha" in one_line_error(certify.main, base + ["--alpha", "1.5"])
    assert "--alpha" in one_line_error(certify.main, base + ["--alpha", "nan"])
    assert "--n0" in one_line_error(certify.main, base + ["--n", "0"])
    assert "--n0" in one_line_error(certify.main, base + ["--n0", "0"])
    assert "does not fit" in one_line_error(certify.main, base + ["--dataset", "cifar10"])
    assert "unknown dataset" in one_line_error(certify.main, base + ["--dataset", "cifar100"])
    assert "--sigma" in one_line_error(certify.main, base + ["--sigma", "nan"])
    assert "--beta" in one_line_error(certify.main, base + ["--beta", "-1"])
    sd = torch.load(lenet_ckpt, weights_only=True)
    sd["model"]["fc2.weight"], sd["model"]["fc2.bias"] = torch.zeros(5, 500), torch.zeros(5)  # 5 classes
    torch.save(sd, tmp_path / "k5.pt")
    assert "does not fit" in one_line_error(certify.main, [str(tmp_path / "k5.pt")] + base[1:])
    (tmp_path / "corrupt.pt").write_bytes(open(lenet_ckpt, "rb").read()[:5000])
    assert "not a readable" in one_line_error(certify.main, [str(tmp_path / "corrupt.pt")] + base[1:])
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a readable" in one_line_error(certify.main, [str(tmp_path / "notes.txt")] + base[1:])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "no state dict" in one_line_error(certify.main, [str(tmp_path / "list.pt")] + base[1:])
    assert "no checkpoint" in one_line_error(certify.main, [str(tmp_path / "absent.pt")] + base[1:])
    write_tsv(tmp_path / "a.tsv", [(0, 1, 1, 0.5)])
    write_tsv(tmp_path / "b.tsv", [(1, 1, 1, 0.5)])
    assert "share no inputs" in one_line_error(certify.main, ["--compare", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")])


def test_certify_never_mixes_rows_made_with_another_sigma(lenet_ckpt, tiny_fmnist, tmp_path):
    base = [lenet_ckpt, "--data-dir", tiny_fmnist, "--out", str(tmp_path / "s.tsv"), "--n", "50", "--n0", "10",
            "--skip", "30", "--max", "2"]
    certify.main(base)
    assert "other settings (sigma)" in one_line_error(certify.main, base + ["--sigma", "0.5"])
    assert "other settings (alpha)" in one_line_error(certify.main, base + ["--alpha", "0.4"])
    certify.main(base + ["--sigma", "0.5", "--overwrite"])
    assert len(certify.read_tsv(str(tmp_path / "s.tsv"))) == 2


def test_checkpoint_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"model": Evil(), "config": {}}, tmp_path / "evil.pt")
    one_line_error(certify.main, [str(tmp_path / "evil.pt")])
    assert not (tmp_path / "pwned").exists()
