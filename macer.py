"""MACER: robust training by MAximizing the CErtified Radius (Zhai et al., ICLR 2020).

The loss of Eq. 17 / Algorithm 1 on a batch of n inputs, each seen through k Gaussian copies:

    l = -(1/n) sum_i log z_hat^{y_i}(x_i)                                      (classification)
        + (lambda * sigma / (2n)) sum_{i in G} max(gamma - xi_hat_i, 0)        (robustness)

    z_hat(x_i)      = (1/k) sum_j softmax(u(x_i + eta_ij)),  eta_ij ~ N(0, sigma^2 I)   (line 5)
    z_hat_beta(x_i) = (1/k) sum_j softmax(beta * u(x_i + eta_ij))          (line 5, with beta)
    G               = {i : argmax_c z_hat_beta^c(x_i) = y_i}       (line 6; a tie counts as in G)
    y_hat_i         = argmax_{c != y_i} z_hat_beta^c(x_i)                               (line 7)
    xi_hat_i        = PhiInv(z_hat_beta^{y_i}(x_i)) - PhiInv(z_hat_beta^{y_hat_i}(x_i)) (line 8)

Eq. 17 as printed has one z_hat in both terms; Section 5.3 and the authors' code apply beta to the
robustness term only, as here. sigma/2 * xi_hat estimates Eq. 16's Soft-RS radius from k samples;
it is not certified (certify.py certifies). Needs torch only: paste it, or macer_loss alone.

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
    standard normal of shape (n, k, *D) or (n*k, *D) (it is scaled by sigma here); by default it
    is drawn on x's device.
    """
    if not (isinstance(k, int) and k >= 1 and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noisy_copies needs an integer k >= 1 and a finite sigma > 0: {k, sigma}")
    n, D = x.shape[0], x.shape[1:]
    x_rep = x.unsqueeze(1).expand(n, k, *D).reshape(n * k, *D)  # (n, k, *D) -> (n*k, *D)
    if noise is None:
        noise = torch.randn_like(x_rep)
    return x_rep + sigma * noise.reshape(n * k, *D)  # noise (n, k, *D) -> (n*k, *D)


def macer_loss(logits, targets, sigma, lbd, gamma, beta):
    """Eq. 17 / Algorithm 1, lines 5-9. Returns (loss, loss_cls, loss_rob), scalars.

    logits: (n, k, K) network outputs u(x_ij) on the k noisy copies of each of n inputs, the
    copies of input i in rows i*k .. i*k+k-1 of the network's batch (as noisy_copies makes them;
    `x.repeat(k, 1, 1, 1)` would put them n rows apart, and the view would then group copies of
    different inputs). targets: (n,) int64 class indices. sigma: the noise level of the copies
    (it scales lambda only, but must be the noise's); lbd >= 0; gamma > 0; beta > 0.

    Through the hinge each logit's gradient grows with lambda * sigma * beta (Proposition 1 bounds
    it), far above cross-entropy's: the paper trains CIFAR-10, SVHN and MNIST at lr 0.01 (lambda
    4-16, beta 16), not at the 0.1 usual for cross-entropy (ImageNet: 0.1, with k 2, lambda 3-6).

    The loss is float32 (float64 for float64 logits), whatever autocast chose for the network. The
    gradient is exactly 0 outside G and beyond gamma, and never NaN while the logits' gaps are
    finite (float32: below 3.4e38). The hinge is exact for gamma up to 25 (float64: 74): beyond, an
    input whose probabilities fall below the smallest normal number leaves it. An empty batch: 0.
    """
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
    n, k, K = logits.shape
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if n == 0:  # an empty shard or filtered batch: zeros, still attached to the graph
        return (logits.sum() * 0,) * 3

    # Line 5 at beta = 1, for the classification term:
    # log z_hat^c = log (1/k) sum_j softmax(u_ij)^c = logsumexp_j log_softmax(u_ij)^c - log k.
    log_z_hat = torch.logsumexp(F.log_softmax(logits, dim=2), dim=1) - math.log(k)  # (n, K)
    loss_cls = F.nll_loss(log_z_hat, targets)  # -(1/n) sum_i log z_hat^{y_i}(x_i)
    if lbd == 0:
        return loss_cls, loss_cls, torch.zeros_like(loss_cls)

    # Line 5 with beta, for the robustness term; the top logit is subtracted first, so that beta
    # multiplies gaps <= 0 and no finite logit overflows to inf.
    gaps = logits - logits.amax(dim=2, keepdim=True).detach()  # (n, k, K)
    z_hat_beta = F.softmax(beta * gaps, dim=2).mean(dim=1)  # (n, K)
    is_y = F.one_hot(targets, K).bool()
    z_y = z_hat_beta.gather(1, targets[:, None]).squeeze(1)  # (n, 1) -> (n,)
    z_runner_up = z_hat_beta.masked_fill(is_y, -1.0).amax(dim=1)  # line 7: max over c != y_i
    in_G = z_y >= z_runner_up  # line 6
    # 1 - z_y from the other classes: in float32 z_y rounds to 1.0 once xi_hat passes 10.6-11.5
    # (K = 2 to 1000), where PhiInv(z_y) = -PhiInv(1 - z_y) keeps its digits, for gamma above it.
    one_minus_z_y = z_hat_beta.masked_fill(is_y, 0.0).sum(dim=1)  # (n,)

    def xi_hat(where):  # line 8 on the inputs `where`; the others see PhiInv(1/2) = 0, finite
        PhiInv = lambda p: torch.special.ndtri(torch.where(where, p, 0.5))
        return -PhiInv(one_minus_z_y) - PhiInv(z_runner_up)

    # The hinge max(gamma - xi_hat, 0) on the inputs of G where PhiInv' = 1 / phi(PhiInv) is
    # finite: below the smallest normal number it overflows, and the hinge's zero gradient there
    # (xi_hat > 25 in float32) would become 0 * inf = NaN.
    tiny = torch.finfo(z_hat_beta.dtype).tiny
    inside = lambda p: (tiny <= p) & (p < 1)
    defined = in_G & inside(one_minus_z_y) & inside(z_runner_up)
    hinge = torch.where(defined, (gamma - xi_hat(defined)).clamp(min=0), 0.0)  # (n,)
    # Line 9 / Eq. 17: both terms are divided by n, the whole batch, not by |G|.
    loss_rob = lbd * sigma / 2 * hinge.sum() / n
    return loss_cls + loss_rob, loss_cls, loss_rob
