"""MACER: robust training by MAximizing the CErtified Radius (Zhai et al., ICLR 2020).

The loss of Eq. 17 / Algorithm 1 on a batch of n inputs, each seen through k Gaussian copies:

    l = -(1/n) sum_i log z_hat^{y_i}(x_i)                                   (classification, beta = 1)
        + (lambda * sigma / (2n)) sum_{i in G} max(gamma - xi_hat_i, 0)     (robustness, beta > 0)

    z_hat(x_i)  = (1/k) sum_j softmax(beta * u(x_i + eta_ij)),   eta_ij ~ N(0, sigma^2 I)   (line 5)
    G           = {i : argmax_c z_hat^c(x_i) = y_i}    (line 6; a tie for the top counts as in G)
    y_hat_i     = argmax_{c != y_i} z_hat^c(x_i)                                             (line 7)
    xi_hat_i    = PhiInv(z_hat^{y_i}(x_i)) - PhiInv(z_hat^{y_hat_i}(x_i))                    (line 8)

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
    sigma: noise level (> 0); lbd: trade-off lambda (>= 0); gamma: hinge factor (> 0);
    beta: inverse temperature (> 0). All finite.

    The loss is computed in float32 (float64 if the logits are float64), whatever autocast chose
    for the network. No finite logits produce NaN or inf in the value or the gradient, and an empty
    batch (n = 0) gives zeros.
    """
    if logits.dim() != 3:
        raise ValueError(f"macer_loss takes logits of shape (n, k, K), n inputs x k noisy copies x K classes; "
                         f"got {tuple(logits.shape)}: reshape with logits.view(n, k, -1)")
    for name, v, lo in (("sigma", sigma, 0), ("lbd", lbd, None), ("gamma", gamma, 0), ("beta", beta, 0)):
        if not math.isfinite(v) or v < 0 or (lo == 0 and v == 0):
            raise ValueError(f"{name} must be finite and {'>= 0' if lo is None else '> 0'}, not {v}")
    if logits.dtype != torch.float64:
        logits = logits.float()
    n, k, K = logits.shape
    if n == 0:  # an empty shard or filtered batch: zeros, still attached to the graph
        zero = logits.sum() * 0
        return zero, zero, zero

    # Line 5 at beta = 1, for the classification term:
    # log z_hat^c = log (1/k) sum_j softmax(u_ij)^c = logsumexp_j log_softmax(u_ij)^c - log k.
    log_z_hat = torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(k)  # (n, K)
    loss_cls = F.nll_loss(log_z_hat, targets)  # -(1/n) sum_i log z_hat^{y_i}(x_i)
    if lbd == 0:
        return loss_cls, loss_cls, torch.zeros_like(loss_cls)

    # Line 5 again with inverse temperature beta, for the robustness term only (Section 5.3).
    z_hat = F.softmax(beta * logits, dim=2).mean(dim=1)  # (n, K)
    is_y = F.one_hot(targets, K).bool()
    z_y = z_hat.gather(1, targets[:, None]).squeeze(1)  # (n, 1) -> (n,)
    # z_y can round to 1.0 in float32 long before xi_hat reaches gamma; 1 - z_y, summed from the
    # other classes' small probabilities, keeps its precision, and PhiInv(z_y) = -PhiInv(1 - z_y).
    one_minus_z_y = z_hat.masked_fill(is_y, 0.0).sum(dim=1)  # (n,)
    z_runner_up = z_hat.masked_fill(is_y, -1.0).max(dim=1).values  # line 7: z_hat^{y_hat_i}, max over c != y_i
    in_G = z_y >= z_runner_up  # line 6: y_i = argmax_c z_hat^c(x_i)

    hinge = robust_hinge(one_minus_z_y, z_runner_up, in_G, gamma)  # line 8 and the hinge, (n,)
    # Line 9: both terms are divided by n, the whole batch, not by |G|.
    loss_rob = lbd * sigma / 2 * hinge.sum() / n
    return loss_cls + loss_rob, loss_cls, loss_rob


def robust_hinge(one_minus_z_y, z_runner_up, in_G, gamma):
    """Algorithm 1, line 8, and the hinge of Eq. 17: max(gamma - xi_hat, 0) for inputs in G, else 0,
    with xi_hat = PhiInv(z_y) - PhiInv(z_runner_up) = -PhiInv(1 - z_y) - PhiInv(z_runner_up).
    All arguments are (n,) tensors.

    PhiInv runs only where its argument lies strictly inside (0, 1); a saturated input has
    xi_hat = +inf and no hinge anyway. Two passes: a gradient-free one finds the hinge region
    xi_hat < gamma, then PhiInv runs with gradients on those inputs alone, the rest seeing a
    harmless 0.5. A single pass would differentiate PhiInv at every input, and far outside the
    region PhiInv'(p) = 1 / phi(PhiInv(p)) overflows to inf: the zero gradient that the hinge
    sends there becomes 0 * inf = NaN (a test shows it). Inside, Proposition 1 bounds PhiInv'.
    """
    half = torch.full_like(z_runner_up, 0.5)
    phi_inv = lambda p, mask: torch.special.ndtri(torch.where(mask, p, half))
    inside = in_G & (one_minus_z_y > 0) & (z_runner_up > 0)
    with torch.no_grad():
        active = inside & (-phi_inv(one_minus_z_y, inside) - phi_inv(z_runner_up, inside) < gamma)
    xi_hat = -phi_inv(one_minus_z_y, active) - phi_inv(z_runner_up, active)
    return torch.where(active, gamma - xi_hat, torch.zeros_like(xi_hat))
