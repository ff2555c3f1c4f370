"""MACER: robust training by MAximizing the CErtified Radius (Zhai et al., ICLR 2020).

The loss of Eq. 17 / Algorithm 1 on a batch of n inputs, each seen through k Gaussian copies:

    l = -(1/n) sum_i log z_hat^{y_i}(x_i)                                   (classification, beta = 1)
        + (lambda * sigma / (2n)) sum_{i in G} max(gamma - xi_hat_i, 0)     (robustness, beta > 0)

    z_hat(x_i)  = (1/k) sum_j softmax(beta * u(x_i + eta_ij)),   eta_ij ~ N(0, sigma^2 I)   (line 5)
    G           = {i : argmax_c z_hat^c(x_i) = y_i}    (line 6; a tie for the top counts as in G)
    y_hat_i     = argmax_{c != y_i} z_hat^c(x_i)                                             (line 7)
    xi_hat_i    = PhiInv(z_hat^{y_i}(x_i)) - PhiInv(z_hat^{y_hat_i}(x_i))                    (line 8)

sigma/2 * xi_hat is a k-sample estimate of the Soft-RS radius of Eq. 16, not a certified radius
(certify.py certifies), and the hinge pushes it towards sigma/2 * gamma. This file imports torch
only: paste it into any project.

    x_noisy = noisy_copies(x, k, sigma)                      # (n*k, C, H, W)
    logits = model(x_noisy).view(len(x), k, -1)              # (n*k, K) -> (n, k, K)
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
    sigma: the noise level of the copies (> 0); lbd: trade-off lambda (>= 0); gamma: hinge factor
    (> 0); beta: inverse temperature (> 0). All finite.

    Two traps when copying this into another loop:
    - the k copies of input i must be rows i*k .. i*k+k-1 of the network's batch, as noisy_copies
      makes them; `x.repeat(k, 1, 1, 1)` puts them n rows apart, and `.view(n, k, K)` then silently
      groups copies of different inputs under one label;
    - sigma only scales lambda here (lambda * sigma / 2); it must still be the sigma of the noise,
      or the robustness term has another weight than the paper's.

    The loss is computed in float32 (float64 if the logits are float64), whatever autocast chose
    for the network. No finite logits produce NaN or inf in the value or the gradient, and an empty
    batch (n = 0) gives zeros.
    """
    if logits.dim() != 3 or logits.shape[1] == 0:
        raise ValueError(
            f"macer_loss takes logits of shape (n, k, K), n inputs x k >= 1 noisy copies x K classes; "
            f"got {tuple(logits.shape)}: reshape with logits.view(n, k, -1)"
        )
    for name, v, lo in (
        ("sigma", sigma, 0),
        ("lbd", lbd, None),
        ("gamma", gamma, 0),
        ("beta", beta, 0),
    ):
        if not math.isfinite(v) or v < 0 or (lo == 0 and v == 0):
            raise ValueError(
                f"{name} must be finite and {'>= 0' if lo is None else '> 0'}, not {v}"
            )
    if logits.dtype != torch.float64:
        logits = logits.float()
    n, k, K = logits.shape
    if n == 0:  # an empty shard or filtered batch: zeros, still attached to the graph
        zero = logits.sum() * 0
        return zero, zero, zero

    # Line 5 at beta = 1, for the classification term (Section 5.3 and the authors' code apply
    # beta to the robustness term only, for stable training):
    # log z_hat^c = log (1/k) sum_j softmax(u_ij)^c = logsumexp_j log_softmax(u_ij)^c - log k.
    log_z_hat = torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(k)  # (n, K)
    loss_cls = F.nll_loss(log_z_hat, targets)  # -(1/n) sum_i log z_hat^{y_i}(x_i)
    if lbd == 0:
        return loss_cls, loss_cls, torch.zeros_like(loss_cls)

    # Line 5 again, with inverse temperature beta, for the robustness term.
    z_hat_beta = F.softmax(beta * logits, dim=2).mean(dim=1)  # (n, K)
    is_y = F.one_hot(targets, K).bool()
    z_y = z_hat_beta.gather(1, targets[:, None]).squeeze(1)  # (n, 1) -> (n,)
    z_runner_up = z_hat_beta.masked_fill(is_y, -1.0).max(dim=1).values  # line 7: max over c != y_i
    in_G = z_y >= z_runner_up  # line 6: y_i = argmax_c z_hat^c(x_i)
    # 1 - z_y, summed from the other classes: in float32, z_y rounds to 1.0 once xi_hat passes about
    # 10.6-11.5 (K = 2 to 1000, beta = 16), and PhiInv(z_y) = -PhiInv(1 - z_y) keeps the digits.
    one_minus_z_y = z_hat_beta.masked_fill(is_y, 0.0).sum(dim=1)  # (n,)

    hinge = robust_hinge(one_minus_z_y, z_runner_up, in_G, gamma)  # line 8 and the hinge, (n,)
    # Line 9: both terms are divided by n, the whole batch, not by |G|.
    loss_rob = lbd * sigma / 2 * hinge.sum() / n
    return loss_cls + loss_rob, loss_cls, loss_rob


def robust_hinge(one_minus_z_y, z_runner_up, in_G, gamma):
    """Algorithm 1, line 8, and the hinge of Eq. 17: max(gamma - xi_hat, 0) on the inputs in G,
    0 elsewhere, with xi_hat = PhiInv(z_y) - PhiInv(z_runner_up) = -PhiInv(1 - z_y) - PhiInv(z_runner_up).
    All arguments are (n,) tensors. Inside the hinge region Proposition 1 bounds PhiInv'."""

    def xi_hat(
        where,
    ):  # line 8 on the inputs `where`; the others see PhiInv(1/2) = 0, which is finite
        half = torch.full_like(z_runner_up, 0.5)
        return -torch.special.ndtri(torch.where(where, one_minus_z_y, half)) - torch.special.ndtri(
            torch.where(where, z_runner_up, half)
        )

    # 1. xi_hat is finite for inputs in G whose two PhiInv arguments lie strictly inside (0, 1).
    finite = (
        in_G & (0 < one_minus_z_y) & (one_minus_z_y < 1) & (0 < z_runner_up) & (z_runner_up < 1)
    )
    # 2. xi_hat without gradients finds the hinge region, xi_hat < gamma.
    with torch.no_grad():
        active = finite & (xi_hat(finite) < gamma)
    # 3. xi_hat again, with gradients, on the active inputs only. Differentiating PhiInv at every input
    # would give PhiInv'(p) = 1 / phi(PhiInv(p)) = inf far outside the region, and the zero gradient
    # that the hinge sends there would become 0 * inf = NaN.
    return torch.where(active, gamma - xi_hat(active), torch.zeros_like(z_runner_up))
