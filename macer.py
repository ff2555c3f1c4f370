"""MACER: robust training by MAximizing the CErtified Radius (Zhai et al., ICLR 2020).

The loss of Eq. 17 / Algorithm 1 on a batch of n inputs, each seen through k Gaussian copies:

    l = -(1/n) sum_i log z_hat^{y_i}(x_i)                                   (classification, beta = 1)
        + (lambda * sigma / (2n)) sum_{i in G} max(gamma - xi_hat_i, 0)     (robustness, beta > 0)

    z_hat(x_i)  = (1/k) sum_j softmax(beta * u(x_i + eta_ij)),   eta_ij ~ N(0, sigma^2 I)
                  (with beta = 1 in the classification term)
    G           = {i : argmax_c z_hat^c(x_i) = y_i}          (a tie for the top counts as in G)
    y_hat_i     = argmax_{c != y_i} z_hat^c(x_i)
    xi_hat_i    = PhiInv(z_hat^{y_i}(x_i)) - PhiInv(z_hat^{y_hat_i}(x_i))

so sigma/2 * xi_hat is the Soft-RS certified radius (Eq. 16) of the smoothed classifier, and the
hinge pushes it towards sigma/2 * gamma. This file imports torch only: paste it into any project.

    x_noisy = noisy_copies(x, k, sigma)                      # (n*k, C, H, W)
    logits = model(x_noisy).view(len(x), k, -1)              # (n, k, K)
    loss, loss_cls, loss_rob = macer_loss(logits, y, sigma, lbd=12.0, gamma=8.0, beta=16.0)

With k = 1 and lbd = 0 the loss is exactly cross-entropy on one noisy copy: Cohen et al. (2019).
"""
import math

import torch
import torch.nn.functional as F


def noisy_copies(x, k, sigma, noise=None):
    """Algorithm 1, line 4: k i.i.d. Gaussian copies x_ij = x_i + eta_ij, eta_ij ~ N(0, sigma^2 I).

    x is (n, *D) in pixel space. Returns (n*k, *D), the k copies of x_i in rows i*k .. i*k+k-1,
    so that `model(copies).view(n, k, K)` groups the copies of one input. `noise`, if given, is
    standard normal of shape (n, k, *D) or (n*k, *D) (it is scaled by sigma here); by default it is
    drawn on x's device.
    """
    n, D = x.shape[0], x.shape[1:]
    x_rep = x.unsqueeze(1).expand(n, k, *D).reshape(n * k, *D)  # (n, k, *D) -> (n*k, *D)
    if noise is None:
        noise = torch.randn_like(x_rep)
    return x_rep + sigma * noise.reshape(n * k, *D)  # noise (n, k, *D) -> (n*k, *D)


def macer_loss(logits, targets, sigma, lbd, gamma, beta):
    """Eq. 17 / Algorithm 1, lines 5-9. Returns (loss, loss_cls, loss_rob), scalars.

    logits:  (n, k, K) network outputs u(x_ij) on the k noisy copies of each of n inputs.
    targets: (n,) class indices y_i.
    sigma: noise level; lbd: trade-off lambda; gamma: hinge factor; beta: inverse temperature.

    The loss is computed in float32 (float64 if the logits are float64), whatever autocast chose
    for the network. No input can produce NaN or inf in the value or the gradient: inputs outside
    the hinge region, or whose beta-smoothed probabilities saturate to 0 or 1, are replaced by a
    harmless 0.5 *before* PhiInv runs, so they get an exact zero gradient.
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    n, k, K = logits.shape

    # Line 5 and the classification term, at beta = 1:
    # log z_hat^c = log (1/k) sum_j softmax(u_ij)^c = logsumexp_j log_softmax(u_ij)^c - log k.
    log_z_hat = torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(k)  # (n, K)
    loss_cls = F.nll_loss(log_z_hat, targets)  # -(1/n) sum_i log z_hat^{y_i}(x_i)
    if lbd == 0:
        return loss_cls, loss_cls, torch.zeros_like(loss_cls)

    # Line 5 again with inverse temperature beta, for the robustness term only (Section 5.3).
    z_hat = F.softmax(beta * logits, dim=2).mean(dim=1)  # (n, K)
    z_y = z_hat.gather(1, targets[:, None]).squeeze(1)  # (n, 1) -> (n,)
    is_y = F.one_hot(targets, K).bool()
    z_y_hat = z_hat.masked_fill(is_y, -1.0).max(dim=1).values  # line 7: max over c != y_i
    in_G = z_y >= z_y_hat  # line 6: y_i = argmax_c z_hat^c(x_i) (a tie counts as in G)

    hinge = robust_hinge(z_y, z_y_hat, in_G, gamma)  # line 8 and the hinge, (n,)
    # Line 9: both terms are divided by n, the whole batch, not by |G|.
    loss_rob = lbd * sigma / 2 * hinge.sum() / n
    return loss_cls + loss_rob, loss_cls, loss_rob


def robust_hinge(z_y, z_y_hat, in_G, gamma):
    """Algorithm 1, line 8, and the hinge of Eq. 17: max(gamma - xi_hat, 0) for inputs in G, else 0,
    with xi_hat = PhiInv(z_y) - PhiInv(z_y_hat). All arguments are (n,) tensors.

    PhiInv runs only where its argument lies strictly inside (0, 1): a saturated input has
    xi_hat = +inf and no hinge anyway. A first, gradient-free pass finds the hinge region
    xi_hat < gamma; the second runs PhiInv with gradients on those inputs alone, the rest seeing a
    harmless 0.5. Outside the region PhiInv'(p) = 1 / phi(PhiInv(p)) can overflow to inf, and
    0 * inf would put NaN into the backward pass; inside it Proposition 1 bounds PhiInv'.
    """
    half = torch.full_like(z_y, 0.5)
    finite = in_G & (z_y < 1) & (z_y_hat > 0)
    with torch.no_grad():
        xi_hat = torch.special.ndtri(torch.where(finite, z_y, half)) - torch.special.ndtri(
            torch.where(finite, z_y_hat, half))
        active = finite & (xi_hat < gamma)
    xi_hat = torch.special.ndtri(torch.where(active, z_y, half)) - torch.special.ndtri(
        torch.where(active, z_y_hat, half))
    return torch.where(active, gamma - xi_hat, torch.zeros_like(xi_hat))
