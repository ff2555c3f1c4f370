"""MACER: robust training by MAximizing the CErtified Radius (Zhai et al., ICLR 2020).

A smoothed classifier g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), is certified
within the radius sigma/2 (PhiInv(p_A) - PhiInv(p_B)) (Theorem 1; PhiInv is the inverse of the
standard normal CDF). MACER trains the base network f so that this radius is large, through a
differentiable estimate of it from k noisy copies of each input: the soft smoothed classifier
g_tilde(x) = argmax_c E softmax(beta * u(x + eta))^c (Definition 2, Eq. 14; its radius is Eq. 16),
estimated from the copies. Here u are the network's logits over K classes, lbd is lambda, and
Algorithm 1 runs on a batch of n inputs:

    line 4:  x_ij = x_i + eta_ij, eta_ij ~ N(0, sigma^2 I), j = 1..k
    line 5:  z_hat_beta(x_i) = (1/k) sum_j softmax(beta * u(x_ij)), the mean softmax of the copies
    line 6:  G = {i : y_i = argmax_c z_hat_beta^c(x_i)}, the inputs g_tilde classifies correctly
    line 7:  y_hat_i = argmax_{c != y_i} z_hat_beta^c(x_i), the runner-up
    line 8:  xi_hat_i = PhiInv(z_hat_beta^{y_i}(x_i)) - PhiInv(z_hat_beta^{y_hat_i}(x_i))
    line 9:  one step on Eq. 17, with z_hat_1, the mean softmax at beta = 1, in its first term:
             l = -(1/n) sum_i log z_hat_1^{y_i}(x_i)
                 + (lambda sigma / 2n) sum_{i in G} max(gamma - xi_hat_i, 0)

xi_hat_i is a probit margin, and sigma * xi_hat_i / 2 input i's Soft-RS radius (Eq. 16) as k
samples estimate it: the hinge pushes it up to gamma * sigma / 2, then stops. Eq. 17 as printed has
one z_hat in both terms; Section 5.3 and the authors' code take beta = 1 in the classification term
and beta in the robustness term, as here. With k = 1 and lambda = 0 the loss is cross-entropy on
one noisy copy: Cohen et al. (2019).

    x_noisy = noisy_copies(x, k, sigma)            # (n*k, C, H, W)
    logits = model(x_noisy).view(len(x), k, -1)    # (n*k, K) -> (n, k, K)
    loss, loss_cls, loss_rob = macer_loss(logits, y, sigma, lbd=12.0, gamma=8.0, beta=16.0)

Needs torch only: paste this file into your project. This file trains; certify.py certifies.
"""

import math

import torch
import torch.nn.functional as F


def noisy_copies(x, k, sigma, noise=None):
    """Algorithm 1, line 4: k i.i.d. Gaussian copies x_ij = x_i + eta_ij, eta_ij ~ N(0, sigma^2 I).

    x is (n, *D) in pixel space. Returns (n*k, *D), the k copies of x_i in rows i*k .. i*k+k-1,
    so that `model(copies).view(n, k, K)` groups the copies of one input. `noise`, if given, is
    standard normal of shape (n, k, *D) or (n*k, *D) (it is scaled by sigma here); by default it
    is drawn on x's device.
    """
    check_copies(k, sigma)
    n, D = x.shape[0], x.shape[1:]
    x_rep = x.unsqueeze(1).expand(n, k, *D).reshape(n * k, *D)  # (n, k, *D) -> (n*k, *D)
    noise = torch.randn_like(x_rep) if noise is None else noise.reshape(n * k, *D)  # (n*k, *D)
    return x_rep + sigma * noise  # x_ij = x_i + eta_ij, eta_ij = sigma * noise_ij


def macer_loss(logits, targets, sigma, lbd, gamma, beta):
    """Eq. 17: Algorithm 1's lines 5-8 and the objective of line 9. Returns (loss, loss_cls,
    loss_rob), scalars.

    logits: (n, k, K), the network's outputs u(x_ij) on the k noisy copies of each of n inputs,
    grouped as noisy_copies groups them. targets: (n,) int64 class indices. sigma: the noise level
    of the copies; lbd >= 0 (lambda); gamma > 0; beta > 0. The loss is float32 whatever autocast
    chose for the network (float64 for float64 logits); the robustness term's gradient is exactly 0
    outside G and beyond gamma, and the gradient is never NaN for finite logits. An empty batch
    gives 0.
    """
    check_loss_args(logits, targets, sigma, lbd, gamma, beta)
    n = len(logits)
    if n == 0:  # an empty shard or filtered batch: zeros, still attached to the graph
        return (logits.sum() * 0.0,) * 3
    y = targets[:, None]  # (n,) -> (n, 1), to pick each input's own class
    # Line 5: z_hat(x_i), the mean softmax over the k copies: at beta = 1 for the classification
    # term (its log), at beta for the robustness term (Section 5.3).
    log_z_hat = mean_softmax(logits, beta=1.0, log=True)  # (n, k, K) -> (n, K)
    z_hat_beta = mean_softmax(logits, beta)  # (n, k, K) -> (n, K)
    z_y = z_hat_beta.gather(1, y).squeeze(1)  # z_hat_beta^{y_i}(x_i), (n, 1) -> (n,)
    in_G = z_y == z_hat_beta.amax(dim=1)  # line 6, (n,): y_i is the top class (a tie is in G)
    z_runner_up = z_hat_beta.scatter(1, y, -1.0).amax(dim=1)  # line 7, (n,): the top class but y_i
    # Line 8, (n,); `defined` is False where a probability underflows (xi_hat > 25: see below).
    xi_hat, defined = probit_margin(z_hat_beta, y, z_runner_up)
    # Line 9, Eq. 17: both terms are divided by n, the whole batch, not by |G|.
    loss_cls = -log_z_hat.gather(1, y).mean()  # -(1/n) sum_i log z_hat^{y_i}(x_i)
    hinge = torch.where(in_G & defined, (gamma - xi_hat).clamp(min=0), 0.0)  # (n,)
    loss_rob = lbd * sigma / 2 * hinge.sum() / n  # (lambda sigma / 2n) sum_G max(gamma - xi_hat, 0)
    return loss_cls + loss_rob, loss_cls, loss_rob


# ---------------------------------------------------------------- numerical care, and the checks
def mean_softmax(logits, beta, log=False):
    """(1/k) sum_j softmax(beta * u_ij) over the k copies j: (n, k, K) -> (n, K), in float32
    (float64 for float64 logits) whatever autocast chose; with log=True, its log.

    The log is taken as logsumexp_j log_softmax(u_ij) - log k: the log of the mean itself is -inf
    once a probability underflows, and the authors' log(mean + 1e-10) is off for probabilities
    below about 1e-6. The top logit is subtracted before beta multiplies: beta * u overflows to inf
    for finite logits beyond 3.4e38 / beta, and softmax then gives NaN."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    gaps = logits - logits.amax(dim=2, keepdim=True).detach()  # <= 0, the same softmax
    k = logits.shape[1]
    if log:  # (n, k, K) -> (n, K)
        return torch.logsumexp(F.log_softmax(beta * gaps, dim=2), dim=1) - math.log(k)
    return F.softmax(beta * gaps, dim=2).mean(dim=1)  # (n, k, K) -> (n, K)


def probit_margin(z_hat_beta, y, z_runner_up):
    """(xi_hat, defined): xi_hat = PhiInv(z_y) - PhiInv(z_runner_up) where `defined`, else 0, with
    z_y = z_hat_beta^y.

    Two things go wrong when PhiInv is taken directly. In float32, z_y rounds to 1.0 once
    xi_hat passes about 11 (PhiInv(1) = inf), while gamma may lie beyond: PhiInv(z_y) is taken
    as -PhiInv(1 - z_y), with 1 - z_y summed from the other classes, which keeps its digits.
    And PhiInv' = 1 / phi(PhiInv) overflows where a probability falls deep into the subnormal
    floats (about 2e-40 in float32), and the hinge's zero gradient there would be 0 * inf = NaN:
    with a margin, every input with a probability below the smallest normal float (1.2e-38;
    xi_hat above 25 in float32, 74 in float64) is left out (defined is False) before PhiInv runs,
    so that its gradient never sees them; for gamma up to 25 they lie beyond the hinge anyway."""
    one_minus_z_y = z_hat_beta.scatter(1, y, 0.0).sum(dim=1)  # (n,)
    tiny = torch.finfo(z_hat_beta.dtype).tiny
    inside = lambda p: (tiny <= p) & (p < 1)
    defined = inside(one_minus_z_y) & inside(z_runner_up)
    PhiInv = lambda p: torch.special.ndtri(torch.where(defined, p, 0.5))  # PhiInv(1/2) = 0
    return -PhiInv(one_minus_z_y) - PhiInv(z_runner_up), defined


def check_copies(k, sigma):
    if not (isinstance(k, int) and k >= 1 and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noisy_copies needs an integer k >= 1 and a finite sigma > 0: {k, sigma}")


def check_loss_args(logits, targets, sigma, lbd, gamma, beta):
    """ValueError unless logits are (n, k >= 1, K), targets (n,) int64, and the numbers in range."""
    if logits.dim() != 3 or logits.shape[1] == 0 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits (n, k >= 1, K) and targets (n,): {logits.shape, targets.shape}"
        )
    finite = all(map(math.isfinite, (sigma, lbd, gamma, beta)))
    if targets.dtype != torch.long or not (finite and min(sigma, gamma, beta) > 0 and lbd >= 0):
        raise ValueError(
            f"need int64 targets, finite sigma, gamma, beta > 0, lbd >= 0: {targets.dtype}, "
            f"{sigma=}, {gamma=}, {beta=}, {lbd=}"
        )
