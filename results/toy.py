"""The README's worked example, drawn (needs matplotlib).

toy.png: in 2-D, certification can be seen. The same small network is trained on two moons as
Cohen et al. (Gaussian augmentation: k = 1, lambda = 0) and as MACER, with the paper's loss and
loop (macer.py, train.train_one_epoch); certify.py then certifies test points. Each panel shows the
smoothed classifier's regions and every correctly certified test point's radius as a circle:
inside it, g cannot change its prediction. knobs.png: what gamma and beta do. noise.png: one
Fashion-MNIST test image under the noise of each sigma.

    python results/toy.py    # seconds to a minute, by the load: toy.png, knobs.png, noise.png
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import norm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import data  # noqa: E402
from certify import Smooth  # noqa: E402
from records import save_png  # noqa: E402
from train import train_one_epoch  # noqa: E402

SIGMA = 0.25  # the noise, in the data's units
METHODS = {  # k, lambda (gamma = 8, beta = 16 for both; unused by Cohen's lambda = 0)
    "Cohen et al.": dict(k=1, lbd=0.0),
    "MACER": dict(k=16, lbd=16.0),
}
CERT = dict(n0=100, n=100_000, alpha=0.001, batch_size=20_000)  # as the paper certifies


def two_moons(n, noise, generator):
    """n points of two interleaved half circles, class 0 above, class 1 below, with Gaussian noise:
    x (n, 2), y (n,)."""
    y = torch.arange(n) % 2
    t = math.pi * torch.rand(n, generator=generator)
    x = torch.stack([torch.cos(t), torch.sin(t)], 1)  # (n, 2): the upper half circle
    x[y == 1] = 1 - x[y == 1] - torch.tensor([0.0, 0.5])  # the lower one, shifted right
    return x + noise * torch.randn(n, 2, generator=generator), y


def network():
    layers = [nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)]
    return nn.Sequential(*layers)


def fit(k, lbd, x, y, epochs=60, seed=0):
    """The base classifier f, trained by Algorithm 1 (train_one_epoch) with k copies and lambda."""
    torch.manual_seed(seed)
    net = network()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        batches = [(x[i], y[i]) for i in perm.split(64)]
        train_one_epoch(net, opt, batches, k, SIGMA, lbd, gamma=8.0, beta=16.0, grad_clip=5.0)
    return net.eval()


@torch.no_grad()
def smoothed_probability(net, xs, ys):
    """p_1(x) = P(f(x + eta) = 1) on the grid xs x ys (spacing h), as the grid sum
    sum_c f(c) phi_sigma(x - c) h^2 over a grid reaching 4 sigma further: (len(ys), len(xs)). At a
    straight edge of f it is off by at most h / (2 sigma sqrt(2 pi)), 0.008 here."""
    h = float(xs[1] - xs[0])
    pad = math.ceil(4 * SIGMA / h)
    offsets = torch.arange(-pad, pad + 1) * h
    wide = lambda v: torch.cat([v[0] + offsets[:pad], v, v[-1] + offsets[pad + 1 :]])
    X, Y = torch.meshgrid(wide(xs), wide(ys), indexing="xy")  # (H + 2 pad, W + 2 pad)
    f = net(torch.stack([X, Y], -1).view(-1, 2)).argmax(1).float().view(X.shape)
    kernel = torch.exp(-(offsets**2) / (2 * SIGMA**2))
    kernel = (kernel / kernel.sum()).view(1, 1, -1)  # (1, 1, 2 pad + 1): one axis at a time
    rows = F.conv1d(f.view(-1, 1, f.shape[1]), kernel)  # along x: (H', 1, W)
    rows = rows.view(f.shape[0], -1).T.unsqueeze(1)  # (W, 1, H')
    return F.conv1d(rows, kernel).view(len(xs), len(ys)).T  # along y: (H, W)


def certify_points(net, x):
    """Smooth.certify on each test point: (predictions, radii), abstentions with radius 0."""
    smooth = Smooth(net, 2, SIGMA)
    g = torch.Generator().manual_seed(0)
    out = [smooth.certify(xi, **CERT, generator=g) for xi in x]
    return torch.tensor([c for c, _ in out]), torch.tensor([R for _, R in out])


def draw_toy(plt, png):
    """toy.png, and toy.json with each method's figures (README.md's table reads them)."""
    g = torch.Generator().manual_seed(0)
    x_train, y_train = two_moons(1000, 0.15, g)
    x_test, y_test = two_moons(40, 0.15, g)
    xs, ys = torch.linspace(-1.6, 2.6, 421), torch.linspace(-1.3, 1.8, 311)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    figures = {}
    for ax, (name, hyper) in zip(axes, METHODS.items(), strict=True):
        net = fit(**hyper, x=x_train, y=y_train)
        p = smoothed_probability(net, xs, ys)
        predict, R = certify_points(net, x_test)
        correct = predict == y_test
        credit = R * correct  # 0 for a wrong or abstained point
        acr, at = credit.mean().item(), (credit >= 0.25).float().mean().item()
        ax.contourf(xs, ys, p, levels=[-1, 0.5, 2], colors=["#cfe0f3", "#f6d5cf"])
        ax.contour(xs, ys, p, levels=[0.5], colors="k", linewidths=1)
        for xi, yi, ok, r in zip(x_test, y_test, correct, R, strict=True):
            colour = "tab:blue" if yi == 0 else "tab:red"
            if ok:
                ax.add_patch(plt.Circle(xi.tolist(), r.item(), fill=False, color=colour, lw=0.8))
            ax.plot(*xi.tolist(), "o" if ok else "x", color=colour, ms=3 if ok else 6)
        ax.set(aspect="equal", xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]))
        title = f"{name} (k = {hyper['k']}, lambda = {hyper['lbd']:g}): ACR {acr:.3f}"
        ax.set_title(f"{title}, certified accuracy at r = 0.25: {at:.3f}", fontsize=10)
        at_05 = (credit >= 0.5).float().mean().item()
        certified = dict(certified_accuracy_0=correct.float().mean().item())  # abstaining: wrong
        certified.update(certified_accuracy_025=at, certified_accuracy_05=at_05)
        figures[name] = dict(hyper, acr=acr, **certified)
        print(f"{name}: ACR {acr:.3f}, certified accuracy at r = 0.25 {at:.3f}")
    fig.suptitle(
        f"Two moons, sigma = {SIGMA}: g's regions and boundary, the certified radii of "
        f"{len(y_test)} test points (x: wrong or abstained)"
    )
    save_png(fig, png)
    facts = dict(sigma=SIGMA, test_points=len(y_test), **CERT, methods=figures)
    data.atomic_write(os.path.splitext(png)[0] + ".json", json.dumps(facts, indent=1))


def draw_knobs(plt, png, gamma=8.0, n=100_000, alpha=0.001):
    """Left: the hinge max(gamma - xi_hat, 0) against xi_hat = 2 R / sigma, with the Hard-RS cap.
    Right: z_hat_beta, the mean of softmax(beta * u) over the noise, against beta, for two classes
    whose logit gap t = u_A - u_B is N(m, 1) under the noise: E sigmoid(beta t) (a Riemann sum)
    tends to the hard vote P(t > 0) = Phi(m)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    xi = torch.linspace(0, 10, 501)
    cap = 2 * float(norm.ppf(alpha ** (1 / n)))  # Hard-RS's largest radius, as xi = 2 R / sigma
    ax1.plot(
        xi, (gamma - xi).clamp(min=0), color="k", label=f"max(gamma - xi_hat, 0), gamma = {gamma:g}"
    )
    ax1.axvline(gamma, color="tab:red", ls="--", label="gamma: target radius gamma sigma / 2")
    ax1.axvline(cap, color="tab:blue", ls=":", label=f"Hard-RS cap, n = {n:,}: {cap / 2:.2f} sigma")
    ax1.set(xlabel="xi_hat = PhiInv(z_y) - PhiInv(z_runner-up)  (radius = sigma xi_hat / 2)")
    ax1.set(ylabel="hinge", title="gamma: where the hinge stops pushing")
    ax1.legend(fontsize=8)
    betas = torch.logspace(-1, 3, 200).double()
    for m in (0.25, 1.0, 2.0):
        t = torch.linspace(m - 10, m + 10, 40_001).double()  # the logit gap, on a fine grid
        w = torch.tensor(norm.pdf(t - m)) * (t[1] - t[0])  # its N(m, 1) density, as weights
        z = (torch.sigmoid(betas[:, None] * t) * w).sum(1)  # E sigmoid(beta t), for each beta
        line = ax2.semilogx(betas, z, label=f"t ~ N({m:g}, 1): z_hat_beta")[0]
        ax2.axhline(norm.cdf(m), color=line.get_color(), ls=":", label=f"hard vote Phi({m:g})")
    ax2.axvline(16, color="gray", lw=0.8)
    ax2.set(xlabel="beta (MACER: 16)", ylabel="probability of class A", title="beta: soft to hard")
    ax2.legend(fontsize=7, ncol=2)
    save_png(fig, png)


def draw_noise(plt, png, index=0):
    """Fashion-MNIST test image `index` at sigma 0, 0.25, 0.5 and 1.0 (shown clipped to [0, 1]; the
    network sees it unclipped)."""
    x, label = data.load_dataset("fashion-mnist", "data", train=False)[index]
    g = torch.Generator().manual_seed(0)
    fig, axes = plt.subplots(1, 4, figsize=(8, 2.4))
    for ax, sigma in zip(axes, (0.0, 0.25, 0.5, 1.0), strict=True):
        noisy = x + sigma * torch.randn(x.shape, generator=g)
        ax.imshow(noisy[0].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set(title=f"sigma = {sigma:g}", xticks=[], yticks=[])
    save_png(fig, png)


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = time.time()
    draw_toy(plt, os.path.join(HERE, "toy.png"))
    draw_knobs(plt, os.path.join(HERE, "knobs.png"))
    draw_noise(plt, os.path.join(HERE, "noise.png"))
    print(f"wrote results/toy.png, toy.json, knobs.png, noise.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
