"""The paper's properties, grouped by result: Algorithm 1 and Eq. 17, Cohen et al. as the special
case, Lemma 1, Theorems 1 and 2, Proposition 1, the soundness of every bound and of CERTIFY, and an
exact oracle in 2-D. Each test runs the project's code against something trusted (a closed form, a
naive loop, float64, finite differences or exact quadrature) and fails for the kind of bug its
docstring names. The tests marked with a device run on the CPU and on CUDA where there is a GPU.
Run: python -m pytest -q test_macer.py test_tools.py"""

import copy
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from scipy.stats import beta as beta_dist
from scipy.stats import binom, binomtest, kstest, norm

import certify
import models
import train
from certify import Smooth
from conftest import DEVICES
from macer import macer_loss, noisy_copies

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ================================================================ Algorithm 1 and Eq. 17 (macer.py)
@pytest.mark.parametrize("device", DEVICES)
def test_noisy_copies_layout_groups_the_copies_of_one_input(device):
    """Line 4: the k copies of x_i sit in rows i*k .. i*k+k-1, x_i + sigma * eta_ij."""
    x = torch.arange(3.0, device=device).view(3, 1, 1, 1)  # (n, C, H, W)
    noise = torch.randn(3, 4, 1, 1, 1, device=device)  # (n, k, C, H, W)
    copies = noisy_copies(x, 4, 0.5, noise)
    assert copies.shape == (12, 1, 1, 1)
    torch.testing.assert_close(copies.view(3, 4), x.view(3, 1) + 0.5 * noise.view(3, 4))


def assert_iid_normal(eta, sigma):
    """eta (m, D), m noise vectors of D entries, is i.i.d. N(0, sigma^2): the mean and the variance
    within 6.1 standard deviations of their estimates (each fails with probability 1e-9), normal by
    a Kolmogorov-Smirnov p-value above 1e-7 (fails with probability 1e-7), and no two of the m
    vectors correlated beyond t: for independent directions on the sphere S^{D-1},
    P(|cos| >= t) <= 2 exp(-D t^2 / 2), and t is set so that the m^2 / 2 pairs fail with
    probability at most 1e-7 in all. Together below 3e-7 per call for correct noise."""
    m, D = eta.shape
    N, e = m * D, eta.double()
    assert abs(e.mean().item()) <= 6.1 * sigma / math.sqrt(N)
    assert abs(e.var().item() / sigma**2 - 1) <= 6.1 * math.sqrt(2 / N)
    assert kstest(e.flatten().numpy() / sigma, "norm").pvalue > 1e-7
    u = F.normalize(e, dim=1)
    cos = (u @ u.T - torch.eye(m, dtype=torch.float64)).abs().max().item()
    assert cos <= math.sqrt(2 * math.log(m * m / 1e-7) / D)


@pytest.mark.parametrize("device", DEVICES)
def test_noisy_copies_are_iid_gaussian_around_each_input(device):
    """Line 4: x_ij - x_i ~ N(0, sigma^2 I), independent across the copies j and the inputs i
    (assert_iid_normal). Catches uniform noise, noise scaled by sigma twice, copies that share
    their noise, and copies placed around the wrong input."""
    n, k, sigma = 8, 8, 0.37
    x = torch.rand(n, 3, 16, 16, device=device)
    eta = noisy_copies(x, k, sigma).view(n, k, -1) - x.view(n, 1, -1)  # (n*k, C, H, W) -> (n, k, D)
    assert eta.device.type == device  # drawn where x lives
    eta = eta.cpu()
    assert eta.shape == (n, k, 3 * 16 * 16)
    assert_iid_normal(eta.view(n * k, -1), sigma)  # (n, k, D) -> (n*k, D)


def naive_eq17(logits, y, sigma, lbd, gamma, beta):
    """Eq. 17 / Algorithm 1 lines 5-9 as this project reads them, one input at a time, in float64
    with scipy's PhiInv: beta = 1 in the classification term and beta in the robustness term
    (Section 5.3 and the authors' code; Eq. 17 as printed has one z_hat for both)."""
    n, k, K = logits.shape
    total_cls, total_rob = 0.0, 0.0
    for i in range(n):
        z_hat = np.mean(
            [np.exp(u - u.max()) / np.exp(u - u.max()).sum() for u in logits[i]], axis=0
        )
        total_cls -= math.log(z_hat[y[i]])
        z_hat_b = np.mean(
            [np.exp(u - u.max()) / np.exp(u - u.max()).sum() for u in beta * logits[i]], axis=0
        )
        z_runner_up = np.max(np.delete(z_hat_b, y[i]))
        if z_hat_b[y[i]] < z_runner_up:
            continue  # not in G
        with np.errstate(divide="ignore"):
            xi = norm.ppf(z_hat_b[y[i]]) - norm.ppf(z_runner_up)
        total_rob += max(gamma - xi, 0.0)
    return (
        total_cls / n + lbd * sigma / (2 * n) * total_rob,
        total_cls / n,
        lbd * sigma / (2 * n) * total_rob,
    )


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(
    n=st.integers(1, 10),
    k=st.integers(1, 8),
    K=st.integers(2, 10),
    scale=st.floats(0.01, 5),
    sigma=st.floats(0.1, 1.0),
    lbd=st.floats(0, 20),
    gamma=st.floats(0.5, 10),
    beta=st.floats(0.5, 20),
    seed=st.integers(0, 2**31),
)
def test_macer_loss_equals_naive_per_input_loop(
    device, n, k, K, scale, sigma, lbd, gamma, beta, seed
):
    """Catches: a hinge not clipped at gamma, division by |G|, beta in the classification term,
    the mean of logits instead of the mean of softmaxes (k > 1 in nearly every example)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, K, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, K, (n,), generator=g)
    y[: n // 2] = (beta * logits[: n // 2]).softmax(-1).mean(1).argmax(-1)  # half of them in G
    got = macer_loss(logits.to(device), y.to(device), sigma, lbd, gamma, beta)
    want = naive_eq17(logits.numpy(), y.numpy(), sigma, lbd, gamma, beta)
    for a, b in zip(got, want, strict=True):
        assert a.item() == pytest.approx(b, rel=1e-9, abs=1e-9)


def test_a_tie_for_the_top_counts_as_in_G():
    """Line 6 with z_y = z_runner_up: the input is in G, xi_hat = 0, and the hinge is gamma."""
    logits = torch.tensor(
        [[[0.0, 0.0, -5.0]]], dtype=torch.float64
    )  # (n=1, k=1, K=3): classes 0 and 1 tie
    loss_rob = macer_loss(logits, torch.tensor([0]), sigma=0.5, lbd=2.0, gamma=3.0, beta=1.0)[2]
    assert loss_rob.item() == pytest.approx(2.0 * 0.5 / 2 * 3.0)


@pytest.mark.parametrize("device", DEVICES)
def test_macer_loss_gradient_equals_finite_differences(device):
    """torch.autograd.gradcheck in float64, inside the hinge region and away from its kinks."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 3, 5, dtype=torch.float64) * 0.3).to(device).requires_grad_()
    y = (2 * logits.detach()).softmax(-1).mean(1).argmax(-1)
    y[0] = (y[0] + 1) % 5  # one input outside G
    assert torch.autograd.gradcheck(lambda u: macer_loss(u, y, 0.25, 12.0, 8.0, 2.0)[0], (logits,))
    assert macer_loss(logits, y, 0.25, 12.0, 8.0, 2.0)[2] > 0


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(
    K=st.integers(2, 20),
    margin=st.floats(0.0, 2.5),
    gamma=st.floats(0.5, 16.0),
    beta=st.sampled_from([1.0, 4.0, 16.0, 64.0]),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**31),
)
def test_float32_agrees_with_float64_wherever_float64_is_finite(
    device, K, margin, gamma, beta, k, seed
):
    """Up to gamma = 16, beyond where float32's z_y rounds to 1.0 (xi_hat about 10.6-11.5): with
    PhiInv(z_y) computed as -PhiInv(1 - z_y), 1 - z_y summed from the other classes, float32 keeps
    every input of the hinge region. Catches PhiInv(z_y) computed directly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, k, K, generator=g, dtype=torch.float64) * 0.05
    logits[:, :, 0] += torch.tensor([margin, margin / 2, 2 * margin], dtype=torch.float64).view(
        3, 1
    )
    logits, y = logits.to(device), torch.zeros(3, dtype=torch.long, device=device)
    want = macer_loss(logits, y, 0.5, 16.0, gamma, beta)[2].item()
    got = macer_loss(logits.float(), y, 0.5, 16.0, gamma, beta)[2].item()
    assert math.isfinite(want) and got == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_float32_complement_keeps_the_digits_of_a_z_y_near_one():
    """K = 10, beta = 16, margin 1.3: float64 gives 1 - z_y = 8.3e-9, under half of float32's
    spacing below 1 (2.98e-8), so every float32 softmax kernel within an ulp gives z_y = 1.0 or
    1 - 6e-8: PhiInv(z_y) taken directly gives xi_hat = inf or at most 11.31, against float64's
    11.654. The complement summed from the other classes keeps the digits, and at gamma = 14 the
    hinge sees it. Catches PhiInv(z_y) computed directly."""
    logits = torch.zeros(1, 1, 10)
    logits[0, 0, 3] = 1.3
    z_hat = F.softmax(16.0 * logits, dim=2).mean(1)[0]  # (10,)
    naive_xi = (torch.special.ndtri(z_hat[3]) - torch.special.ndtri(z_hat[0])).item()
    got = macer_loss(logits, torch.tensor([3]), 0.5, 16.0, 14.0, 16.0)[2].item()
    want = macer_loss(logits.double(), torch.tensor([3]), 0.5, 16.0, 14.0, 16.0)[2].item()
    assert naive_xi == math.inf or naive_xi < 11.4  # the premise, on every kernel
    assert 16.0 * 0.5 / 2 * (14.0 - 11.654) == pytest.approx(want, abs=1e-2)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_hinge_gradient_is_exactly_zero_outside_G_or_beyond_gamma(device):
    torch.manual_seed(1)
    n, k, K, beta, gamma = 60, 4, 10, 16.0, 2.0
    logits = torch.randn(n, k, K, dtype=torch.float64) * torch.logspace(
        -2, 0.5, n, dtype=torch.float64
    ).view(n, 1, 1)
    logits.requires_grad_()
    z_hat = (beta * logits.detach()).softmax(-1).mean(1)  # (n, K)
    y = z_hat.argmax(-1)
    y[::3] = (y[::3] + 1) % K  # every third input leaves G
    u = logits.to(device)
    (grad,) = torch.autograd.grad(macer_loss(u, y.to(device), 0.25, 1.0, gamma, beta)[2], logits)
    top2 = z_hat.topk(2).values
    xi = torch.tensor(norm.ppf(top2[:, 0].numpy()) - norm.ppf(top2[:, 1].numpy()))
    in_G = z_hat.argmax(-1) == y
    dead, alive = ~in_G | (xi >= gamma), in_G & (xi < gamma)
    assert dead.sum() > 10 and alive.sum() > 10  # both kinds are there
    assert (grad[dead] == 0).all()
    assert (grad[alive].abs().sum((1, 2)) > 0).all()


def test_subnormal_probabilities_leave_the_hinge_an_unmasked_pass_gives_nan():
    """An input deep in G (1 - z_y about 2e-42 in float32, subnormal; xi_hat about 27 > gamma):
    PhiInv' overflows there, so an unmasked hinge's zero gradient becomes 0 * inf = NaN;
    macer_loss's is 0."""
    logits = torch.tensor(
        [[[6.0, 0.0]]], requires_grad=True
    )  # beta * margin = 96: exp(-96) is subnormal
    loss = macer_loss(logits, torch.tensor([0]), 0.5, 16.0, 8.0, 16.0)[0]
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()

    z_hat = F.softmax(16.0 * logits, dim=2).mean(1)  # (1, 2)
    one_minus_z_y, z_runner_up = z_hat[:, 1], z_hat[:, 1]
    assert 0 < one_minus_z_y.item() < 1e-38
    xi = -torch.special.ndtri(one_minus_z_y) - torch.special.ndtri(z_runner_up)
    single = torch.where(xi < 8.0, 8.0 - xi, torch.zeros_like(xi))
    (grad_single,) = torch.autograd.grad(single.sum(), logits)
    assert torch.isnan(grad_single).any()
    torch.testing.assert_close(grad, F.softmax(logits, 2) - torch.tensor([1.0, 0.0]))  # CE's alone


def test_finite_logits_with_finite_gaps_give_a_finite_loss_and_gradient():
    """Float32 logits up to 1e38 apart (beta * gap would overflow without the top logit taken
    out first): value and gradient finite, whichever class is the target."""
    for big in (2.2e37, 5e37):
        logits = torch.tensor([[[big, 0.0, -big]]], requires_grad=True)
        for y in range(3):
            loss = macer_loss(logits, torch.tensor([y]), 0.25, 16.0, 8.0, 16.0)[0]
            (grad,) = torch.autograd.grad(loss, logits)
            assert math.isfinite(loss.item()) and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 8),
    k=st.integers(1, 6),
    K=st.integers(2, 12),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]),
    beta=st.sampled_from([1.0, 16.0, 64.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    in_G=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_macer_loss_value_and_gradient_finite_for_extreme_logits(
    device, n, k, K, scale, beta, dtype, in_G, seed
):
    """No NaN or inf, in value or gradient, for any finite logits (|u| up to 1e4, beta up to 64)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, K, generator=g, dtype=dtype) * scale).requires_grad_()
    y = (
        logits.detach().softmax(-1).mean(1).argmax(-1)
        if in_G
        else torch.randint(0, K, (n,), generator=g)
    )
    u, y = logits.to(device), y.to(device)
    loss, loss_cls, loss_rob = macer_loss(u, y, sigma=0.5, lbd=16.0, gamma=8.0, beta=beta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(loss_cls) and torch.isfinite(loss_rob)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_loss_under_bf16_autocast_is_computed_in_float32(device):
    """bf16 logits give the float64 loss on the same values to float32 precision (a bf16 loss
    would be off by about 1e-2); and under bf16 autocast the network's logits are float32
    (models.LogitLinear), its last layer applied in float32 to the bf16 network's features."""
    torch.manual_seed(0)
    logits = (torch.randn(8, 4, 10) * 3).to(
        torch.bfloat16
    )  # (n, k, K), spread so that both terms matter
    y = (4 * logits.float()).softmax(-1).mean(1).argmax(-1)  # all in G
    with torch.autocast(device, torch.bfloat16):
        got = macer_loss(logits.to(device), y.to(device), 0.25, 12.0, 8.0, 4.0)
    assert got[0].dtype == torch.float32 and got[2] > 0
    want = macer_loss(logits.double(), y, 0.25, 12.0, 8.0, 4.0)
    for a, b in zip(got, want, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-6)
    net = models.get_model("fashion-mnist").to(device)
    x = torch.rand(16, 1, 28, 28, device=device)
    features = {}
    net.fc2.register_forward_hook(lambda m, inputs, out: features.update(x=inputs[0]))
    with torch.autocast(device, torch.bfloat16):
        u = net(x)
    assert features["x"].dtype == torch.bfloat16 and u.dtype == torch.float32
    torch.testing.assert_close(
        u, F.linear(features["x"].float(), net.fc2.weight, net.fc2.bias), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("device", DEVICES)
def test_the_hinge_is_exact_up_to_gamma_25_in_float32_and_never_nan_beyond(device):
    """K = 2, gaps d from 4 to 7 (beta = 16: runner-up probabilities 1.6e-28 to 2.3e-49, through
    float32's smallest normal number 1.2e-38). At gamma = 25 float32's loss and gradient equal
    float64's; at gamma = 30, where float64 still has a hinge, the gradient is finite (a
    subnormal probability would make PhiInv' infinite and the gradient NaN)."""
    d = torch.linspace(4, 7, 61, device=device)
    u = torch.stack([d, torch.zeros_like(d)], 1)[:, None, :]  # (n, 1, 2)
    y = torch.zeros(len(d), dtype=torch.long, device=device)
    for gamma in (25.0, 30.0):
        got = {}
        for dtype in (torch.float32, torch.float64):
            logits = u.to(dtype).detach().clone().requires_grad_()
            _, _, loss_rob = macer_loss(logits, y, 0.25, 16.0, gamma, 16.0)
            loss_rob.backward()
            got[dtype] = (loss_rob.detach(), logits.grad)
        assert torch.isfinite(got[torch.float32][1]).all()
        if gamma == 25.0:
            for a, b in zip(got[torch.float32], got[torch.float64], strict=True):  # loss, grad
                torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-5)


def test_macer_loss_rejects_bad_arguments_and_takes_an_empty_batch():
    y = torch.zeros(2, dtype=torch.long)
    for bad_logits in (torch.randn(2, 10), torch.randn(2, 0, 10)):  # no k axis; k = 0
        with pytest.raises(ValueError, match=r"\(n, k >= 1, K\)"):
            macer_loss(bad_logits, y, 0.25, 1.0, 8.0, 16.0)
    for bad_y in (y.int(), y.view(2, 1), y.float()):  # int32, (n, 1), float targets: one line
        with pytest.raises(ValueError, match="need .*int64 targets|targets \\(n,\\)"):
            macer_loss(torch.randn(2, 3, 10), bad_y, 0.25, 1.0, 8.0, 16.0)
    for k, sigma in ((0, 0.25), (-1, 0.25), (2, math.nan), (2, 0.0)):
        with pytest.raises(ValueError, match="noisy_copies needs"):
            noisy_copies(torch.zeros(2, 1, 2, 2), k, sigma)
    for bad in (
        dict(beta=math.inf),
        dict(beta=0.0),
        dict(lbd=-1.0),
        dict(sigma=-0.25),
        dict(gamma=math.nan),
    ):
        with pytest.raises(ValueError):
            macer_loss(
                torch.randn(2, 3, 10),
                y,
                **{**dict(sigma=0.25, lbd=1.0, gamma=8.0, beta=16.0), **bad},
            )
    empty = torch.zeros(0, 4, 10, requires_grad=True)
    values = macer_loss(empty, torch.zeros(0, dtype=torch.long), 0.25, 12.0, 8.0, 16.0)
    assert all(v.item() == 0.0 for v in values)
    values[0].backward()
    assert empty.grad.shape == empty.shape


# ================================================================ Cohen et al. as k = 1, lambda = 0
@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(
    n=st.integers(1, 16),
    K=st.integers(2, 12),
    sigma=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_cohen_is_the_special_case_k1_lambda0(device, n, K, sigma, seed):
    """k = 1, lambda = 0, end to end: macer_loss on a model's logits for noisy_copies(x, 1, sigma)
    equals F.cross_entropy on the same noisy batch, in value and in the gradient with respect to
    the model's parameters. Catches beta applied to the classification term. (At k = 1 the mean
    logit and the mean softmax coincide: test_macer_loss_equals_naive_per_input_loop, at k > 1,
    catches a loss on the mean logit.)"""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, K)).double()
    model = model.to(device)
    x = torch.rand(n, 3, 2, 2, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, K, (n,), generator=g).to(device)
    noise = torch.randn(n, 1, 3, 2, 2, generator=g, dtype=torch.float64)  # (n, k=1, C, H, W)
    noise = noise.to(device)
    loss = macer_loss(
        model(noisy_copies(x, 1, sigma, noise)).view(n, 1, K),
        y,
        sigma,
        lbd=0.0,
        gamma=8.0,
        beta=16.0,
    )[0]
    ce = F.cross_entropy(
        model(x + sigma * noise.view(n, 3, 2, 2)), y
    )  # (n, 1, C, H, W) -> (n, C, H, W)
    torch.testing.assert_close(loss, ce, rtol=1e-12, atol=1e-12)
    for g_macer, g_ce in zip(
        torch.autograd.grad(loss, list(model.parameters())),
        torch.autograd.grad(ce, list(model.parameters())),
        strict=True,
    ):
        torch.testing.assert_close(g_macer, g_ce, rtol=1e-11, atol=1e-13)


def test_the_cohen_recipe_is_k1_lambda0():
    cohen = train.recipe("cifar10", 0.25, "cohen")
    assert cohen.k == 1 and cohen.lbd == 0 and not cohen.dynamic_lbd
    cfg = train.recipe("cifar10", 0.5, "macer")
    assert not cfg.dynamic_lbd and train.epoch_lambda(cfg, 0) == 4


@FAST
@given(
    milestones=st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True).map(sorted),
    epochs=st.integers(1, 15),
)
def test_footnote5_lambda_is_zero_exactly_until_the_schedulers_first_decay(milestones, epochs):
    """Footnote 5 against the scheduler train.py steps: lambda is 0 in exactly the epochs that run
    at the initial lr. Catches lambda switching at another milestone than the first decay."""
    cfg = dataclasses.replace(
        train.recipe("cifar10", 1.0, "macer"), milestones=milestones, epochs=epochs
    )
    train.check_config(cfg)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = train.lr_schedule(opt, cfg.milestones)
    for epoch in range(epochs):
        at_initial_lr = opt.param_groups[0]["lr"] == cfg.lr
        assert train.epoch_lambda(cfg, epoch) == (0.0 if at_initial_lr else cfg.lbd)
        opt.step()  # no gradient: nothing moves, but the scheduler sees the order it expects
        sched.step()


def test_footnote5_refuses_milestones_it_would_read_in_another_order():
    """Milestones out of order, or dynamic lambda without any, are refused rather than read in
    another order than the scheduler's."""
    cfg = train.recipe("cifar10", 1.0, "macer")
    with pytest.raises(ValueError, match="--milestones must be increasing"):
        train.check_config(dataclasses.replace(cfg, milestones=[400, 200]))
    with pytest.raises(ValueError, match="--dynamic-lbd 1 waits"):
        train.check_config(dataclasses.replace(cfg, milestones=[]))


@pytest.mark.parametrize("device", DEVICES)
def test_one_step_of_train_one_epoch_is_algorithm_1_written_out(device):
    """Algorithm 1, lines 3-9, once: train_one_epoch's step against the step written out input by
    input (noise eta_ij drawn as (n, k, C, H, W), x_i + sigma * eta_ij, z_hat_i from its own k
    copies, Eq. 17, SGD), from the same initialisation and the same noise, in float64: the
    parameters agree after the step. Catches the copies of one input grouped with another's
    (x.repeat(k, ...)), the noise scaled otherwise, or the loss taken on other copies."""
    n, k, K, sigma, lbd, gamma, beta = 6, 4, 5, 0.5, 3.0, 8.0, 2.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, K)).double()
    model = model.to(device)
    reference = copy.deepcopy(model)
    x = torch.rand(n, 1, 6, 6, dtype=torch.float64, device=device)
    y = torch.randint(0, K, (n,), device=device)
    sgd = dict(lr=0.5, momentum=0.9, weight_decay=5e-4)
    before = copy.deepcopy(model)
    torch.manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), **sgd)
    steps = []  # what train_one_epoch's log sees: (logits, y, loss_cls, loss_rob) per step
    train.train_one_epoch(model, opt, [(x, y)], k, sigma, lbd, gamma, beta, log=steps.append)

    torch.manual_seed(7)
    eta = torch.randn(n, k, 1, 6, 6, dtype=torch.float64, device=device)  # line 4: N(0, I)
    loss = 0.0
    for i in range(n):
        u = reference(x[i] + sigma * eta[i])  # (k, K): the logits of input i's k copies
        loss = loss - u.softmax(1).mean(0)[y[i]].log() / n  # line 5 at beta = 1, classification
        z_hat = (beta * u).softmax(1).mean(0)  # line 5 with beta
        z_runner_up = torch.cat([z_hat[: y[i]], z_hat[y[i] + 1 :]]).max()  # line 7
        if z_hat[y[i]] >= z_runner_up:  # line 6: i in G
            xi = torch.special.ndtri(z_hat[y[i]]) - torch.special.ndtri(z_runner_up)  # line 8
            loss = loss + lbd * sigma / (2 * n) * torch.clamp(gamma - xi, min=0)
    ((logits, y_seen, loss_cls, loss_rob),) = steps
    assert (loss_cls + loss_rob).item() == pytest.approx(loss.item(), rel=1e-12)
    assert logits.shape == (n, k, K) and torch.equal(y_seen, y)
    opt = torch.optim.SGD(reference.parameters(), **sgd)
    opt.zero_grad()
    loss.backward()  # line 9
    opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(model[0].weight, before[0].weight)  # the step moved the parameters


# ================================================================ Lemma 1, Theorems 1 and 2
# (certify.radius)
def smoothed_1d(x, edges, values, sigma):
    """E f(x + eta), eta ~ N(0, sigma^2), for the piecewise-constant f equal to values[j] (a
    scalar or a vector) on [edges[j-1], edges[j]), edges[-1] = -inf and edges[m] = +inf: a sum of
    Phi terms, exact. x: (P,) points. Returns (P,) or (P, K)."""
    t = np.concatenate([[-np.inf], np.sort(edges), [np.inf]])
    cdf = norm.cdf((t[None, :] - np.asarray(x)[:, None]) / sigma)  # (P, m + 2)
    mass = np.diff(cdf, axis=1)  # (P, m + 1): P(x + eta lands in interval j)
    return mass @ np.asarray(values, dtype=np.float64)


def phi_inv_rounding(p):
    """How far 1 * PhiInv(p) can move when p carries float64 rounding (a few ulps of 1)."""
    return 4e-16 / max(norm.pdf(norm.ppf(min(max(p, 1e-300), 1 - 1e-16))), 1e-300)


def radius_or_zero(p_A, sigma, two_sided):
    """certify.radius in either form (p_B = 1 - p_A, the largest p_B allows), 0 where it abstains:
    max(R, 0) is as Lipschitz as R."""
    return certify.radius(p_A, sigma, 1 - p_A if two_sided else None) or 0.0


piecewise = st.integers(1, 6).flatmap(
    lambda m: st.tuples(
        st.lists(st.floats(-2, 2), min_size=m, max_size=m, unique=True),
        st.lists(st.sampled_from([0.0, 1.0]) | st.floats(0, 1), min_size=m + 1, max_size=m + 1),
    )
)


@FAST
@given(
    f=piecewise,
    sigma=st.floats(0.1, 1.0),
    x=st.floats(-2, 2),
    delta=st.floats(-1, 1),
    two_sided=st.booleans(),
)
@example(
    f=([0.0], [0.0, 1.0]), sigma=1.0, x=0.0, delta=1.0, two_sided=False
)  # a half-space, where Lemma 1 is tight:
@example(
    f=([0.0], [0.0, 1.0]), sigma=0.5, x=0.1, delta=0.7, two_sided=True
)  # any larger radius moves faster
def test_lemma1_the_radius_moves_by_at_most_the_distance(f, sigma, x, delta, two_sided):
    """Lemma 1: for f with values in [0, 1], x -> PhiInv(E f(x + eta)) is 1/sigma-Lipschitz, so the
    radius that certify.radius gives from E f moves by at most |delta| between x and x + delta.
    Catches a radius that is too large (x1.3, or sigma/2 where the two-sided form needs it)."""
    edges, values = f
    g = smoothed_1d([x, x + delta], edges, values, sigma)
    assume(((1e-12 < g) & (g < 1 - 1e-12)).all())  # PhiInv is infinite at 0 and 1
    slack = 1e-7 + sigma * (phi_inv_rounding(g[0]) + phi_inv_rounding(g[1]))
    moved = radius_or_zero(g[1], sigma, two_sided) - radius_or_zero(g[0], sigma, two_sided)
    assert abs(moved) <= abs(delta) + slack


@FAST
@given(
    edge=st.floats(-2, 2),
    x=st.floats(-2, 2),
    delta=st.floats(-1, 1),
    sigma=st.floats(0.1, 1.0),
    two_sided=st.booleans(),
)
def test_lemma1_is_tight_for_a_half_space(edge, x, delta, sigma, two_sided):
    """For f = 1[x >= edge], E f(x + eta) = Phi((x - edge) / sigma): the radius is the distance to
    the edge, and moves by exactly delta. Catches a radius that is too small (sigma/2 * PhiInv(p_A)
    in the one-sided form, or a halved two-sided one)."""
    g = smoothed_1d([x, x + delta], [edge], [0.0, 1.0], sigma)
    assume(((0.5 + 1e-6 < g) & (g < 1 - 1e-9)).all())
    R = [radius_or_zero(p, sigma, two_sided) for p in g]
    assert R[0] == pytest.approx(x - edge, rel=1e-6, abs=1e-9)
    assert R[1] - R[0] == pytest.approx(delta, rel=1e-6, abs=1e-8)


classifier_1d = st.tuples(st.integers(2, 5), st.integers(1, 8)).flatmap(
    lambda Km: st.tuples(
        st.just(Km[0]),
        st.lists(st.floats(-2, 2), min_size=Km[1], max_size=Km[1], unique=True),
        st.lists(st.integers(0, Km[0] - 1), min_size=Km[1] + 1, max_size=Km[1] + 1),
        st.lists(
            st.lists(st.floats(0.01, 1), min_size=Km[0], max_size=Km[0]),
            min_size=Km[1] + 1,
            max_size=Km[1] + 1,
        ),
    )
)


@FAST
@given(
    c=classifier_1d,
    sigma=st.floats(0.1, 1.0),
    x0=st.floats(-2, 2),
    soft=st.booleans(),
    two_sided=st.booleans(),
)
def test_theorems_1_and_2_prediction_constant_within_certified_radius(
    c, sigma, x0, soft, two_sided
):
    """Theorem 1 (Hard-RS, one-hot f) and Theorem 2 (Soft-RS, z in the simplex): the exactly
    smoothed prediction stays class A everywhere within the radius that certify.radius computes from
    the exact probabilities, either as sigma * PhiInv(p_A) or sigma/2 (PhiInv p_A - PhiInv p_B). The
    radius is shrunk by what float64 rounding of p_A and p_B can add to it (p_A = 1 - 3e-14 moves
    PhiInv by 1e-3), and the margin at the checked points allows the same rounding."""
    K, edges, labels, weights = c
    values = (
        np.array(weights) / np.sum(weights, 1, keepdims=True) if soft else np.eye(K)[labels]
    )  # (m + 1, K): the value of f (hard) or z (soft) on each interval
    p = smoothed_1d([x0], edges, values, sigma)[0]
    order = np.argsort(-p)
    A, p_A, p_B = order[0], p[order[0]], p[order[1]]
    R = certify.radius(p_A, sigma, p_B if two_sided else None)
    assume(R is not None and np.isfinite(R))
    R -= sigma * (phi_inv_rounding(p_A) + phi_inv_rounding(p_B if two_sided else 1 - p_A))
    assume(R > 1e-6)
    xs = x0 + np.linspace(-R, R, 201)
    P = smoothed_1d(xs, edges, values, sigma)  # (201, K)
    others = np.delete(P, A, axis=1).max(1)
    assert (P[:, A] >= others - 1e-12).all()


def test_two_sided_radius_formula():
    """Eq. 8 / Eq. 16 with a p_B below 1 - p_A: sigma/2 (PhiInv 0.8 - PhiInv 0.1); abstain if p_A <=
    p_B."""
    assert certify.radius(0.8, 0.5, 0.1) == pytest.approx(
        0.25 * (0.8416212335729143 + 1.2815515655446004)
    )
    assert certify.radius(0.3, 0.5, 0.3) is None and certify.radius(0.5, 0.5) is None


# ================================================================ Proposition 1
def phi_inv_derivative_bound(lo, hi):
    """max of PhiInv'(p) = 1 / phi(PhiInv(p)) over [lo, hi]: it grows with |PhiInv(p)|."""
    z = max(abs(norm.ppf(lo)), abs(norm.ppf(hi)))
    return math.sqrt(2 * math.pi) * math.exp(z * z / 2)


def proposition1_bounds(K, gamma):
    """Appendix B's intervals, 1/K <= p_1 <= p* and (1 - p*)/(K - 1) <= p_2 <= 1 - p* with
    PhiInv(p*) = gamma, and the largest PhiInv' on each: (B_1, B_2)."""
    p_star = norm.cdf(gamma)
    return phi_inv_derivative_bound(1 / K, p_star), phi_inv_derivative_bound(
        (1 - p_star) / (K - 1), 1 - p_star
    )


@FAST
@given(
    K=st.integers(2, 1000),
    log_w=st.lists(st.floats(-60, 0), min_size=2, max_size=50),
    gamma=st.floats(0.5, 8.0),
    seed=st.integers(0, 2**31),
)
def test_proposition1_bounded_gradient_of_clipped_xi(K, log_w, gamma, seed):
    """Proposition 1: where xi = PhiInv(p_1) - PhiInv(p_2) < gamma, min(xi, gamma) has the
    gradient g_1 = PhiInv'(p_1) = 1 / phi(PhiInv(p_1)) in p_1 and g_2 = -PhiInv'(p_2) in p_2,
    each at most the bound that the proof's intervals give (B_1, B_2); where xi > gamma it is 0.
    macer_loss's gradient in the logits u = log p (k = 1, beta = 1) equals that chain rule,
    d hinge / d u_c = -sum_{a = 1, 2} g_a p_a (delta_ac - p_c). Catches a wrong derivative
    through 1 - p_1 and a hinge active beyond gamma."""
    rng = np.random.default_rng(seed)
    w = np.exp(np.resize(np.array(log_w), K) + rng.uniform(-1, 1, K) * (rng.random() < 0.5))
    p = np.sort(w / w.sum())[::-1]
    xi = norm.ppf(p[0]) - norm.ppf(p[1])
    # At the kink float64's xi and torch's may fall on either side; a tie for the runner-up has
    # no unique gradient.
    assume(abs(xi - gamma) > 1e-9 and (K == 2 or p[1] > p[2] * (1 + 1e-9)))
    logits = torch.tensor(np.log(p), dtype=torch.float64).view(1, 1, K).requires_grad_()
    hinge = macer_loss(logits, torch.tensor([0]), sigma=1.0, lbd=2.0, gamma=gamma, beta=1.0)[2]
    (grad,) = torch.autograd.grad(hinge, logits)  # lbd * sigma / 2 = 1: loss_rob is the hinge
    if xi > gamma:
        assert (grad == 0).all()
        return
    g = np.zeros(K)
    g[0], g[1] = 1 / norm.pdf(norm.ppf(p[0])), -1 / norm.pdf(norm.ppf(p[1]))
    want = -(g * p)[:, None] * (np.eye(K) - p[None, :])  # (a, c): -g_a p_a (delta_ac - p_c)
    np.testing.assert_allclose(grad.view(K).numpy(), want.sum(0), rtol=1e-6, atol=1e-12)
    B_1, B_2 = proposition1_bounds(K, gamma)
    assert g[0] <= B_1 * (1 + 1e-9) and -g[1] <= B_2 * (1 + 1e-9)


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(
    n=st.integers(1, 8),
    k=st.integers(1, 8),
    K=st.integers(2, 12),
    scale=st.floats(0.01, 3.0),
    margin=st.floats(0.0, 8.0),
    beta=st.sampled_from([1.0, 4.0, 16.0]),
    gamma=st.floats(0.5, 8.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31),
)
@example(
    n=1, k=1, K=2, scale=0.01, margin=6.0, beta=16.0, gamma=8.0, dtype=torch.float32, seed=0
)  # 1 - z_y = 2e-42
@example(
    n=1, k=1, K=2, scale=1e-4, margin=0.0, beta=16.0, gamma=0.5, dtype=torch.float64, seed=0
)  # near a tie: 0.88 of the bound; beta twice: 14x
def test_proposition1_bounds_the_hinge_gradient_in_the_logits(
    device, n, k, K, scale, margin, beta, gamma, dtype, seed
):
    """What training relies on: through z_hat = (1/k) sum_j softmax(beta u_j), the gradient of input
    i's hinge in the logits of its copy j is bounded, |d hinge_i / d u_ij|_1 <= beta/(2k) (B_1 +
    B_2), since d z^c / d u_j = (beta/k) s_j^c (e_c - s_j) has l1 norm (beta/k) 2 s_j^c (1 - s_j^c)
    <= beta/(2k)
    and Proposition 1 bounds PhiInv' at z_y (by B_1) and at z_runner_up (by B_2). Checked through
    macer_loss, where loss_rob = lambda sigma/(2n) sum_i hinge_i, in float32 and float64, with class
    0 ahead by `margin`. Catches a NaN gradient (PhiInv differentiated outside the hinge region,
    where in float32 PhiInv' overflows) and beta applied twice."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, K, generator=g, dtype=torch.float64) * scale
    logits[:, :, 0] += margin
    logits = logits.to(device, dtype).requires_grad_()
    y = (beta * logits.detach()).softmax(-1).mean(1).argmax(-1)  # all in G
    loss_rob = macer_loss(logits, y, sigma=1.0, lbd=2.0, gamma=gamma, beta=beta)[
        2
    ]  # = sum_i hinge_i / n
    (grad,) = torch.autograd.grad(loss_rob * n, logits)
    B_1, B_2 = proposition1_bounds(K, gamma)
    assert torch.isfinite(grad).all()
    assert (grad.abs().sum(-1) <= beta / (2 * k) * (B_1 + B_2) * (1 + 1e-5)).all()


@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 8),
    K=st.integers(2, 12),
    scale=st.floats(1e-4, 5.0),
    margin=st.floats(0.0, 12.0),
    beta=st.sampled_from([1.0, 4.0, 16.0, 64.0]),
    gamma=st.floats(0.5, 25.0),
    seed=st.integers(0, 2**31),
)
def test_the_hinge_gradient_in_an_inputs_logits_is_at_most_2_sqrt_2pi_beta_whatever_gamma(
    device, n, k, K, scale, margin, beta, gamma, seed
):
    """What keeps MACER's gradients small, where the bound in Proposition 1's proof grows as
    e^(gamma^2 / 2) (2e14 at gamma = 8): through the softmax, d z^a / d u_j has l1 norm
    (2 beta / k) s_j^a (1 - s_j^a), which over the k copies sums to at most
    2 beta min(z_a, 1 - z_a); and min(z, 1 - z) PhiInv'(z) = Phi(-|t|) / phi(t) <= sqrt(pi / 2),
    the Mills ratio at t = 0. So
    the hinge of one input has a gradient in its logits, summed over its copies and classes, of l1
    norm at most 2 sqrt(2 pi) beta, whatever gamma: about 80 at beta = 16. At a two-class tie with
    k = 1 it is sqrt(2 pi) beta, half the bound, exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, K, generator=g, dtype=torch.float64) * scale
    logits[:, :, 0] += margin
    logits = logits.to(device).requires_grad_()
    y = (beta * logits.detach()).softmax(-1).mean(1).argmax(-1)  # all in G
    loss_rob = macer_loss(logits, y, sigma=1.0, lbd=2.0, gamma=gamma, beta=beta)[2]
    (grad,) = torch.autograd.grad(loss_rob * n, logits)  # lbd * sigma / 2 = 1: each hinge_i
    assert (grad.abs().sum((1, 2)) <= 2 * math.sqrt(2 * math.pi) * beta * (1 + 1e-9)).all()
    tie = torch.zeros(1, 1, 2, dtype=torch.float64, device=device, requires_grad=True)
    hinge = macer_loss(tie, torch.tensor([0], device=device), 1.0, 2.0, gamma, beta)[2]
    (grad,) = torch.autograd.grad(hinge, tie)
    assert grad.abs().sum().item() == pytest.approx(math.sqrt(2 * math.pi) * beta, rel=1e-12)


# ================================================================ the bounds and CERTIFY
# (certify.py)
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


def lower_bounds(bound, n, alpha):
    """The lower bound on p that `bound` gives for each count k = 0..n of n Bernoulli samples (for
    Soft-RS: z in {0, 1}, whose mean is k / n and Eq. 25's variance k (n - k) / (n (n - 1)))."""
    if bound == "clopper-pearson":
        return np.array([certify.clopper_pearson_lower(k, n, alpha) for k in range(n + 1)])
    if bound == "hoeffding":
        return np.array([certify.hoeffding_lower(k / n, n, alpha) for k in range(n + 1)])
    S2 = [certify.sample_variance(k, k, n) for k in range(n + 1)]  # z^2 = z: A_2 = A_1 = k
    return np.array([certify.bernstein_lower(k / n, S2[k], n, alpha) for k in range(n + 1)])


@pytest.mark.parametrize("bound", certify.BOUNDS)
def test_each_bound_fails_with_probability_at_most_alpha_computed_exactly(bound):
    """The guarantee of each bound, computed rather than sampled: for n Bernoulli(p) samples,
    P(lower bound > p) is the binomial probability of the counts k whose bound exceeds p. It is at
    most alpha at every p of a grid and just below each count's bound, where it jumps up.
    Clopper-Pearson's reaches 0.99 alpha there: it is exact, not needlessly loose. Catches a bound
    that is too high: Clopper-Pearson at 2 alpha, Hoeffding's deviation halved, Bernstein's last
    term at 1/7 of Eq. 26's (Bernstein on Bernoulli samples is loose enough to survive smaller
    slips, which test_eq25_sample_variance_and_eq23_eq26_bounds catches by the formula)."""
    worst = 0.0
    for n in (1, 2, 5, 10, 37, 100, 1000)[bound == "bernstein" :]:  # Eq. 25 needs n >= 2
        for alpha in (0.001, 0.05, 0.3):
            low = lower_bounds(bound, n, alpha)
            ps = np.concatenate([np.linspace(0.001, 0.999, 999), low[low > 0] - 1e-9])
            for p in ps[(ps > 0) & (ps < 1)]:
                fails = binom.pmf(np.arange(n + 1), n, p)[low > p].sum()
                assert fails <= alpha * (1 + 1e-6) + 1e-12, (n, alpha, p, fails)
                worst = max(worst, fails / alpha)
    assert worst >= 0.99 if bound == "clopper-pearson" else worst > 0


@settings(max_examples=30, deadline=None)
@given(z=st.lists(st.floats(0, 1), min_size=2, max_size=200))
def test_eq25_sample_variance_and_eq23_eq26_bounds(z):
    """Eq. 25 against numpy's var(ddof=1); Eq. 23 and Eq. 26 (the 7 log(2/alpha) / (3(n-1)) term
    outside the square root) written out."""
    z, n, alpha = np.array(z), len(z), 0.001
    S2 = certify.sample_variance(z.sum(), (z * z).sum(), n)
    assert S2 == pytest.approx(np.var(z, ddof=1), rel=1e-9, abs=1e-12)
    want = (
        z.mean()
        - math.sqrt(2 * np.var(z, ddof=1) * math.log(2 / alpha) / n)
        - 7 * math.log(2 / alpha) / (3 * (n - 1))
    )
    assert certify.bernstein_lower(z.mean(), S2, n, alpha) == pytest.approx(
        want, rel=1e-9, abs=1e-7
    )
    assert certify.hoeffding_lower(z.mean(), n, alpha) == pytest.approx(
        z.mean() - math.sqrt(math.log(1 / alpha) / (2 * n))
    )


class Linear2(nn.Module):
    """f(x) = 1[w.x + b > 0] as two logits; with scale s, softmax(beta u) = sigmoid(beta s (w.x +
    b))."""

    def __init__(self, w, b, scale=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64), requires_grad=False)
        self.b, self.scale = b, scale

    def forward(self, x):
        t = self.scale * (x.flatten(1) @ self.w + self.b)  # (batch, d) -> (batch,)
        return torch.stack([torch.zeros_like(t), t], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bound", certify.BOUNDS)
def test_certify_equals_cohens_steps_written_out(bound, device):
    """CERTIFY against a naive rewrite on the same noise: selection from n0 samples, then the bound
    from n fresh ones, counted and averaged in numpy (S^2 by numpy's var(ddof=1))."""
    model, sigma, beta, n0, n, alpha, bs = (
        Linear2([0.6, -0.8], 0.05, 3.0),
        0.5,
        2.0,
        50,
        3000,
        0.01,
        700,
    )
    x = torch.tensor([0.1, 0.05], dtype=torch.float64, device=device)
    model = model.to(device)
    c_A, R = Smooth(model, 2, sigma, beta).certify(
        x, n0, n, alpha, bs, bound, torch.Generator(device).manual_seed(5)
    )
    g = torch.Generator(device).manual_seed(5)
    like = dict(dtype=torch.float64, device=device, generator=g)
    draw = lambda num: torch.cat(
        [x + sigma * torch.randn(min(bs, num - s), 2, **like) for s in range(0, num, bs)]
    )  # (num, 2), in certify's batches
    u0, u = model(draw(n0)).cpu().numpy(), model(draw(n)).cpu().numpy()
    if bound == "clopper-pearson":
        want_c = np.bincount(u0.argmax(1), minlength=2).argmax()
        n_A = int((u.argmax(1) == want_c).sum())
        p_low = beta_dist.ppf(alpha, n_A, n - n_A + 1)
    else:
        z0, z = (np.exp(beta * v) / np.exp(beta * v).sum(1, keepdims=True) for v in (u0, u))
        want_c = z0.sum(0).argmax()
        z_A = z[:, want_c]
        p_low = (
            z_A.mean() - math.sqrt(math.log(1 / alpha) / (2 * n))
            if bound == "hoeffding"
            else z_A.mean()
            - math.sqrt(2 * np.var(z_A, ddof=1) * math.log(2 / alpha) / n)
            - 7 * math.log(2 / alpha) / (3 * (n - 1))
        )
    assert p_low > 0.5 and c_A == want_c
    assert R == pytest.approx(
        sigma * norm.ppf(p_low), rel=1e-6
    )  # certify's softmax runs in float32


class Recorder(nn.Module):
    """Records the noisy batches it is given; votes for class 0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batch):
        self.seen.append(batch.detach().cpu())
        return torch.zeros(len(batch), 2, dtype=batch.dtype, device=batch.device)


@pytest.mark.parametrize("device", DEVICES)
def test_smooth_noise_is_iid_gaussian_within_and_across_inputs(device):
    """SAMPLEUNDERNOISE: the samples are x + eta, eta ~ N(0, sigma^2 I), independent within a
    batch, across batches and across inputs (assert_iid_normal). Catches noise of another law or
    scale, noise shared across samples or inputs."""
    recorder, sigma = Recorder(), 0.6
    xs = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    for x in xs:
        Smooth(recorder, 2, sigma, device=device).predict(x, 64, 0.001, 16)
    eta = [
        b - x
        for x, batches in zip(xs, (recorder.seen[:4], recorder.seen[4:]), strict=True)
        for b in batches
    ]
    assert len(recorder.seen) == 8
    assert_iid_normal(torch.cat(eta).flatten(1), sigma)  # 8 x (16, C, H, W) -> (128, D)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12, deadline=None)
@given(
    ratio=st.floats(0.8, 2.5), sigma=st.sampled_from([0.25, 0.5, 1.0]), seed=st.integers(0, 2**31)
)
def test_certify_finds_the_distance_to_a_half_space(device, ratio, sigma, seed):
    """Cohen's linear case: f(x) = 1[w.x + b > 0] at distance d from the hyperplane has
    p_A = Phi(d / sigma), so its exact radius is d. CERTIFY on sampled counts (n = 100,000) gives
    sigma * PhiInv(CP_low(n_A)) with n_A ~ Bin(n, p_A), which lies between the radii of n_A's
    1e-9 and 1 - 1e-9 quantiles: within that slack of d. Catches a radius off by a factor, noise
    of the wrong scale, and the n0 selection samples used as the estimate.
    Failure probability for correct code: d >= 0.8 sigma keeps p_A >= Phi(0.8) = 0.79, so the
    n0 = 100 selection picks the other class (50 or fewer votes) with probability below 2e-10;
    with the two quantile tails, below 3e-9 per example and 4e-8 for the 12 examples."""
    n, alpha, d = 100_000, 0.001, ratio * sigma
    w = torch.tensor([0.6, -0.8, 0.0], dtype=torch.float64)  # |w| = 1
    x = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    smooth = Smooth(Linear2(w, d - float(x @ w)).to(device), 2, sigma)
    g = torch.Generator(device).manual_seed(seed)
    c_A, R = smooth.certify(x, 100, n, alpha, n, generator=g)
    p_A = norm.cdf(d / sigma)
    R_lo, R_hi = (
        sigma * norm.ppf(certify.clopper_pearson_lower(int(binom.ppf(q, n, p_A)), n, alpha))
        for q in (1e-9, 1 - 1e-9)
    )
    assert c_A == 1 and R_lo - 1e-9 <= R <= R_hi + 1e-9  # so d - R <= d - R_lo, the bound's slack
    assert (
        R_lo > 0.6 * d and R_hi < 1.2 * d
    )  # the window is narrow enough to see a radius off by a factor


def soft_z_A_exact(margin_w, norm_w, sigma, beta_s):
    """E sigmoid(beta s t), t ~ N(w.x + b, (sigma |w|)^2), by 200-node Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    t = margin_w + sigma * norm_w * nodes
    return float(np.sum(weights / np.sqrt(2 * np.pi) / (1 + np.exp(-beta_s * t))))


LINEAR = dict(w=[0.6, -0.8, 0.0], x=torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), sigma=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["inside", "boundary"])
@pytest.mark.parametrize("bound", certify.BOUNDS)
def test_certificate_exceeds_the_truth_at_most_alpha_of_the_time(bound, where, device):
    """Soundness (Theorem 1 with Clopper-Pearson; Eq. 20 with Eq. 23 or Eq. 26): over 2,000
    repeats at n = 100 and alpha = 0.1, CERTIFY overclaims in at most an alpha fraction of runs, up
    to binomial slack. The truth is a closed form: for Hard-RS the radius is the margin (p_A =
    Phi(margin / sigma)); for Soft-RS it is sigma * PhiInv(E z_A), E z_A by quadrature. On the
    decision boundary the truth is radius 0 for both classes, so any certificate overclaims; that
    also catches reusing the n0 selection samples for the estimate.
    Failure probability for correct code, below 1e-6 per case: the overclaims are at most
    Bin(2000, alpha), and the threshold is its 1 - 1e-7 quantile; the closed form is checked
    within 5.6 standard deviations of 200,000 samples (2e-8); the last certificate, at
    alpha = 1e-7, exceeds the truth with probability 1e-7, and at n = 10^6 falls 0.02 short only
    if its sample mean lies more than 10 standard deviations low."""
    torch.manual_seed(0)
    alpha, n, repeats, sigma, x = 0.1, 100, 2000, LINEAR["sigma"], LINEAR["x"]
    w = torch.tensor(LINEAR["w"], dtype=torch.float64)  # |w| = 1
    b = 0.1 if where == "inside" else -float(x @ w)
    margin = float(x @ w) + b
    soft = bound != "clopper-pearson"
    scale, beta = (
        (5.0, 4.0) if soft else (1.0, 1.0)
    )  # z = sigmoid(20 t): near 0/1, so high variance
    smooth = Smooth(Linear2(w, b, scale).to(device), 2, sigma, beta=beta)
    true_R = sigma * norm.ppf(soft_z_A_exact(margin, 1.0, sigma, beta * scale)) if soft else margin
    if not soft:  # the closed form itself, against sampling
        assert norm.cdf(margin / sigma) == pytest.approx(
            smooth._counts(x.to(device), 200_000, 200_000, None)[1].item() / 200_000, abs=0.005
        )
    results = [smooth.certify(x, 20, n, alpha, n, bound) for _ in range(repeats)]
    over = sum(c != Smooth.ABSTAIN and (R > true_R + 1e-12 or c != 1) for c, R in results)
    assert over <= binom.ppf(1 - 1e-7, repeats, alpha), (
        f"{over}/{repeats} certificates exceed the truth"
    )
    if where == "inside":  # with many samples the certificate comes close to the truth from below
        c_A, R = smooth.certify(x, 100, 1_000_000, 1e-7, 100_000, bound)
        assert c_A == 1 and true_R - 0.02 < R <= true_R + 1e-3


def test_predict_at_the_decision_boundary_abstains_except_with_probability_alpha():
    """On the boundary of a half-space both classes have probability 1/2: PREDICT answers (does
    not abstain) at most alpha of the time. Failure probability for correct code: the answers are
    at most Bin(2000, alpha), the threshold its 1 - 1e-7 quantile: below 1e-7."""
    torch.manual_seed(0)
    smooth = Smooth(Linear2([1.0, 0.0], 0.0), 2, 0.5)
    x, alpha, repeats = torch.zeros(2, dtype=torch.float64), 0.1, 2000
    answered = sum(
        smooth.predict(x, 100, alpha, 100) != Smooth.ABSTAIN for _ in range(repeats)
    )  # 0.5 vs 0.5
    assert answered <= binom.ppf(1 - 1e-7, repeats, alpha)  # fails with probability below 1e-7
    assert smooth.predict(torch.tensor([2.0, 0.0], dtype=torch.float64), 100, alpha, 100) == 1


class Votes(nn.Module):
    """Votes for class counts[0] times 0, then counts[1] times 1, ...: the counts of one PREDICT
    call, whatever the noise (a fixed function of the call's sample index)."""

    def __init__(self, counts):
        super().__init__()
        self.classes = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        self.seen = 0

    def forward(self, x):
        votes = self.classes[self.seen : self.seen + len(x)].to(x.device)
        self.seen += len(x)
        return F.one_hot(votes, 3).to(x.dtype)


def test_predict_is_the_two_sided_binomial_test_of_the_top_two_counts():
    """PREDICT against its definition, on counts where the alternatives decide otherwise: it
    returns the top class iff the two-sided binomial test of n_A against n_A + n_B (the top two
    counts; a third class's votes count for neither) rejects p = 1/2 at level alpha, else
    ABSTAIN, wherever the top class stands. Among the cases, some would flip under a one-sided
    test, some under a test against all n samples, and some at level alpha / 2."""
    alpha = 0.05
    decide = {
        "definition": lambda a, b, c: binomtest(a, a + b, 0.5).pvalue <= alpha,
        "one-sided": lambda a, b, c: binomtest(a, a + b, 0.5, "greater").pvalue <= alpha,
        "all n": lambda a, b, c: binomtest(a, a + b + c, 0.5).pvalue <= alpha,
        "alpha / 2": lambda a, b, c: binomtest(a, a + b, 0.5).pvalue <= alpha / 2,
    }
    cases, flips = [], set()
    for a in range(1, 30):
        for b in range(0, a + 1):
            for c in {0, b // 2, b}:
                want = decide["definition"](a, b, c)
                other = {k for k, f in decide.items() if f(a, b, c) != want}
                if other:
                    cases.append((a, b, c, want))
                    flips |= other
    assert flips == {"one-sided", "all n", "alpha / 2"} and len(cases) > 100
    x = torch.zeros(2)
    for a, b, c, want in cases:
        for order in ((a, b, c), (b, c, a), (c, a, b)):  # the top class in each position
            top = order.index(a) if a > b else None
            got = Smooth(Votes(order), 3, 0.5).predict(x, a + b + c, alpha, 7)
            assert got == (top if want and top is not None else Smooth.ABSTAIN), (order, want)


class NaNWhere(nn.Module):
    """Class 1 everywhere, but NaN logits where x[0] > threshold (no parameters: a fixed
    function)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        out = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device).expand(len(x), 2).clone()
        out[x[:, 0] > self.threshold] = math.nan
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bound", certify.BOUNDS)
def test_non_finite_logits_never_vote(bound, device):
    """A NaN network abstains (argmax would have voted class 0); when 69% of the samples are NaN
    (x[0] + eta > -0.25, sigma 0.5), they count against c_A, so p_A = 0.31 and it abstains (were
    NaN a vote for class 0, class 0 would be certified); it warns each time. Failure probability
    for correct code: abstaining fails only if 1,070 or more of 2,000 samples at p = 0.31 fall in
    class 1, about 22 standard deviations out."""
    x = torch.zeros(2, dtype=torch.float64)
    nan_where = lambda threshold: Smooth(NaNWhere(threshold), 2, 0.5, device=device)
    for threshold in (-math.inf, -0.25):
        with pytest.warns(UserWarning, match="non-finite"):
            got = nan_where(threshold).certify(x, 50, 2000, 0.001, 500, bound)
            assert got == (Smooth.ABSTAIN, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every sample is finite
        assert nan_where(math.inf).certify(x, 50, 2000, 0.001, 500, bound)[0] == 1
    lenet = models.get_model("fashion-mnist").to(device)
    image = torch.rand(1, 28, 28)
    image[0, 3, 3] = math.nan  # one NaN pixel
    with pytest.warns(UserWarning, match="non-finite"):
        assert Smooth(lenet, 10, 0.25).certify(image, 10, 100, 0.001, 100, bound) == (
            Smooth.ABSTAIN,
            0.0,
        )
    with pytest.warns(UserWarning):
        assert nan_where(-math.inf).predict(x, 100, 0.001, 100) == Smooth.ABSTAIN


# ================================================================ an exact oracle in 2-D
class SineBoundary(nn.Module):
    """f(x) = 1[x_2 > a sin(w x_1)] as two logits: a nonlinear base classifier in 2-D whose
    smoothed probability is a 1-D integral, p_1(x) = E_e Phi((x_2 - a sin(w (x_1 + sigma e))) /
    sigma), e ~ N(0, 1), which p_1 below computes by 100-node Gauss-Hermite quadrature."""

    a, w = 0.5, 2.0  # the boundary's radius of curvature at a crest, 1 / (a w^2) = 0.5, is sigma's

    def forward(self, x):
        t = x[:, 1] - self.a * torch.sin(self.w * x[:, 0])
        return torch.stack([torch.zeros_like(t), t], dim=1)

    @classmethod
    def p_1(cls, points, sigma, nodes=100):
        """P(f(x + eta) = 1) at points (..., 2), exact to rounding: the integrand is smooth."""
        e, weights = np.polynomial.hermite_e.hermegauss(nodes)  # weights sum to sqrt(2 pi)
        x_1, x_2 = points[..., :1], points[..., 1:]
        inner = norm.cdf((x_2 - cls.a * np.sin(cls.w * (x_1 + sigma * e))) / sigma)
        return inner @ weights / math.sqrt(2 * math.pi)


def distance_to_boundary(x0, p_1, directions=720, reach=3.0, steps=150):
    """The distance from x0 to the boundary {p_1 = 1/2} of the smoothed classifier g, searched on a
    polar grid: along each direction, the first step that crosses it, refined by bisection. A
    minimum over some directions: never below the true distance (the nearest point lies in some
    direction), above it by a relative 1e-5 at most where the boundary is smooth (2 pi / 720)."""
    theta = np.linspace(0, 2 * np.pi, directions, endpoint=False)
    u = np.stack([np.cos(theta), np.sin(theta)], 1)  # (directions, 2)
    t = np.linspace(0, reach, steps + 1)
    side = p_1(x0) > 0.5
    crossed = (p_1(x0 + t[None, :, None] * u[:, None, :]) > 0.5) != side  # (directions, steps + 1)
    ray = crossed.any(1)
    hi = t[crossed[ray].argmax(1)]
    lo, u = hi - t[1], u[ray]
    for _ in range(50):
        mid = (lo + hi) / 2
        past = (p_1(x0 + mid[:, None] * u) > 0.5) != side
        lo, hi = np.where(past, lo, mid), np.where(past, mid, hi)
    return hi.min()


ORACLE_POINTS = np.array(
    [[0.3, 0.6], [math.pi / 4, 0.9], [-math.pi / 4, 0.0], [0.0, -1.0], [1.5, -0.3], [-1.0, 0.9]]
)


def test_theorem1_on_a_nonlinear_classifier_against_the_exact_distance():
    """Theorem 1 against an exact oracle, independent of certify.py: for the sine-boundary f, the
    radius sigma * PhiInv(p_A) from the exact p_A never exceeds the distance to g's boundary, found
    by a polar search on the exact p_1. The boundary is curved, so the radius stays below the
    distance (here 0.90-0.97 of it); close enough that a radius 1.3x too large would fail. The
    quadrature is checked against 180 nodes."""
    sigma = 0.5
    p_1 = lambda points: SineBoundary.p_1(points, sigma)
    points = ORACLE_POINTS
    assert np.abs(p_1(points) - SineBoundary.p_1(points, sigma, 180)).max() < 1e-12
    ratios = []
    for x0 in points:
        p_A = max(p_1(x0), 1 - p_1(x0))
        R = certify.radius(p_A, sigma)
        D = distance_to_boundary(x0, p_1)
        assert R <= D + 1e-9
        ratios.append(R / D)
    assert max(ratios) > 1 / 1.3 and min(ratios) < 0.97  # close, and the boundary's curve shows


@pytest.mark.parametrize("device", DEVICES)
def test_certify_on_a_nonlinear_classifier_overclaims_at_most_alpha_of_the_time(device):
    """Soundness of CERTIFY on a nonlinear classifier: over 300 certificates at each of the six
    points (n = 500, alpha = 0.1), a certificate overclaims when it names the wrong class or a
    radius above sigma * PhiInv(exact p_A), itself at most the distance to g's boundary (the test
    above): at most an alpha fraction of the 1,800 do. Catches a radius too large by a factor,
    noise of the wrong scale, and the selection samples reused for the estimate.
    Failure probability for correct code: each certificate overclaims with probability at most
    alpha, independently, so the count is at most Bin(1800, 0.1), and the threshold is its
    1 - 1e-7 quantile: below 1e-7."""
    sigma, alpha, repeats = 0.5, 0.1, 300
    smooth = Smooth(SineBoundary(), 2, sigma, device=device)
    g = torch.Generator(device).manual_seed(0)
    over = 0
    for x0 in ORACLE_POINTS:
        p = SineBoundary.p_1(x0, sigma)
        A, R_true = int(p > 0.5), sigma * norm.ppf(max(p, 1 - p))
        x = torch.tensor(x0, dtype=torch.float32)
        for _ in range(repeats):
            c, R = smooth.certify(x, 20, 500, alpha, 520, generator=g)
            over += c != Smooth.ABSTAIN and (c != A or R > R_true + 1e-6)
    assert over <= binom.ppf(1 - 1e-7, repeats * len(ORACLE_POINTS), alpha)


def test_summary_matches_definitions():
    """Section 5's metrics: approximate certified accuracy at r (correct and radius >= r) and the
    ACR, where a wrong or abstained input counts 0."""
    rows = [
        dict(label=y, predict=p, radius=R)
        for y, p, R in zip([0, 1, 2, 3], [0, 1, -1, 0], [0.3, 1.2, 0.0, 0.9], strict=True)
    ]
    s = certify.summarize(rows)
    assert s["acr"] == pytest.approx((0.3 + 1.2) / 4)
    assert s["cert_acc"][0.0] == 0.5 and s["cert_acc"][0.25] == 0.5 and s["cert_acc"][0.5] == 0.25
    assert s["cert_acc"][1.25] == 0.0 and s["inputs"] == 4
