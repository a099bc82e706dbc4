"""Implicit Maximum Likelihood Estimation — Ke Li, Jitendra Malik, 2018. arXiv:1809.09087.

The idea: instead of making every sample look like some data point (a GAN's discriminator does that and
may ignore whole modes), make every data point have a sample nearby. Algorithm 1, for a generator
x̃ = G_θ(z), z ~ N(0, I):

    repeat
        draw m samples x̃_j = G_θ(z_j)
        for every data point x_i: σ(i) = argmin_j ‖x_i − x̃_j‖²            (nearest-neighbour search)
        for L steps: pick a random minibatch S̃ of data points and update
            θ ← θ − η ∇_θ Σ_{i ∈ S̃} ‖x_i − G_θ(z_σ(i))‖²

The paper shows that under some conditions this maximises the likelihood without ever writing it
down. No data point can be dropped: each one pulls its own nearest sample towards itself.

The reference setup (the authors' code, MNIST):
    G: z (64) ~ N(0, I) → transposed convs 1024@1x1 (the fully connected layer) → 128@7x7 → 64@14x14 →
       1@28x28 sigmoid; BatchNorm + ReLU between, no biases.
    Adam lr 1e-3, β (0.5, 0.999), weight decay 1e-5, batch 64, loss = mean squared error.
    Every `staleness` = 5 epochs: m = 10 × dataset size samples, drawn in batches of 64 with G in training
    mode; every data point gets the z of its nearest sample, plus N(0, 0.01²) jitter; then 5 epochs over
    (data point, matched z) pairs. 100 epochs.
The paper finds the nearest neighbours with DCI (approximate); here the search is exact: batched
torch.cdist on the training device, streamed over blocks of samples (`nearest_samples`, `match`), so no
data x samples distance matrix larger than `--nn-chunk`² ever exists.

Usage:
    python imle.py                                  # MNIST (downloads MNIST)
    python imle.py --steps 3000 --eval-every 1500   # a quick CPU run
    python imle.py --dataset grid25 --steps 4000    # 2D mixture (mode coverage)
    python imle.py --sample runs/imle/mnist-.../ckpt.pt

Differences from the paper (and the reference code):
- Exact nearest neighbours (batched cdist) instead of DCI's approximate search.
- Algorithm 1 picks random minibatches; the reference code shuffles the data once and then walks it in
  the same order every epoch. We draw a fresh permutation of the (data point, matched z) pairs every
  epoch; each epoch uses N // batch minibatches (the reference truncates the data once instead).
- The reference code re-creates Adam every 25 epochs (its learning-rate decay hook, with decay rate 1,
  so only the moment estimates are reset); we keep one optimiser throughout.
- `--valid-size` training images are held out (fixed seed) to choose the Parzen window's width;
  the Parzen log-likelihood (the paper's MNIST/TFD table) uses G in eval mode (BatchNorm running
  statistics), as do sample grids. `--steps` defaults to 100 epochs of the remaining 55k images.
- 2D toys, sample grids and mode-coverage metrics are additions. A toy's training set is a fixed draw
  of `--toy-points` points; z is 2-d and Adam's lr 1e-2 as in the reference code's toy script (with
  64-d z the random samples do not reach the modes), G a 128-128-128 ReLU MLP with a linear output
  (that script: 16-16-16 tanh, on a 2-cluster toy).
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "imle"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Implicit Maximum Likelihood Estimation (Li & Malik 2018)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--z-dim", type=int, default=None,
                   help="dimension of z ~ N(0, I) (default: 64 for images; 2 for the 2D toys, as the reference "
                        "toy code)")
    p.add_argument("--g-widths", type=int, nargs=3, default=[1024, 128, 64],
                   help="channels of G's 1x1, 7x7 and 14x14 feature maps (images)")
    p.add_argument("--mlp-hidden", type=int, nargs="+", default=[128, 128, 128], help="G's ReLU layers (2D toys)")
    p.add_argument("--staleness", type=int, default=5, help="epochs between nearest-neighbour searches")
    p.add_argument("--factor", type=int, default=10, help="samples per search = factor x dataset size")
    p.add_argument("--jitter", type=float, default=0.01, help="std of the noise added to the matched z's")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: 1e-3 for images; 1e-2 for the 2D toys, as the reference "
                        "toy code)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="Adam's L2 weight decay")
    p.add_argument("--nn-chunk", type=int, default=4096,
                   help="rows of data and of samples per block of the exact nearest-neighbour search")
    p.add_argument("--toy-points", type=int, default=2000, help="size of the training set drawn from a 2D toy")
    p.add_argument("--valid-size", type=int, default=5000,
                   help="training images held out as the validation split (Parzen sigma selection)")
    runlib.add_args(p, dataset="mnist", image_size=28, batch_size=64, steps=85_900, streamed=False,
                    log_every=100, sample_every=2000, ckpt_every=2000, eval_every=10_000, eval_samples=10_000,
                    metrics="none", inception=False, digits=True)
    return runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "g_widths": [32, 16, 8], "mlp_hidden": [16, 16], "factor": 2, "z_dim": 8,
        "toy_points": 64, "valid_size": 32})


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

class ConvGenerator(nn.Module):
    """z → 1024@1x1 → 128@7x7 → 64@14x14 → C@28x28 with transposed convolutions (the first one is the
    fully connected layer), BatchNorm + ReLU, sigmoid output; no biases (reference code)."""

    def __init__(self, z_dim, widths, channels):
        super().__init__()
        w1, w2, w3 = widths
        self.z_dim, self.images = z_dim, True
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, w1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(),
            nn.ConvTranspose2d(w1, w2, 7, bias=False), nn.BatchNorm2d(w2), nn.ReLU(),
            nn.ConvTranspose2d(w2, w3, 4, 2, 1, bias=False), nn.BatchNorm2d(w3), nn.ReLU(),
            nn.ConvTranspose2d(w3, channels, 4, 2, 1, bias=False), nn.Sigmoid())

    def forward(self, z):
        return self.net(z[:, :, None, None])


class MLPGenerator(nn.Module):
    """z → ReLU layers → 2D point (toys)."""

    def __init__(self, z_dim, hidden, out=2):
        super().__init__()
        self.z_dim, self.images = z_dim, False
        layers, d = [], z_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.net = nn.Sequential(*layers, nn.Linear(d, out))

    def forward(self, z):
        return self.net(z)


# ------------------------------------------------------------------------------------------------
# Algorithm 1: nearest-neighbour matching and the loss
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def nearest_samples(data, samples, chunk=4096):
    """Exact nearest neighbour of every row of `data` (N, D) among the rows of `samples` (M, D):
    returns (distance (N,), index (N,)). Distances are computed by torch.cdist on `chunk` x `chunk`
    blocks, so memory stays bounded whatever N and M are; ties go to the lower index."""
    n = len(data)
    best_dist = torch.full((n,), math.inf, device=data.device, dtype=data.dtype)
    best_idx = torch.zeros(n, dtype=torch.long, device=data.device)
    for i in range(0, n, chunk):
        x = data[i:i + chunk]
        for j in range(0, len(samples), chunk):
            dist, idx = torch.cdist(x, samples[j:j + chunk]).min(1)
            closer = dist < best_dist[i:i + chunk]
            best_dist[i:i + chunk] = torch.where(closer, dist, best_dist[i:i + chunk])
            best_idx[i:i + chunk] = torch.where(closer, idx + j, best_idx[i:i + chunk])
    return best_dist, best_idx


@torch.no_grad()
def match(G, data, m, batch, chunk, jitter):
    """Algorithm 1's search: draw m samples G(z) (in batches of `batch`, as the model trains) and give
    every data point the z of its nearest sample, plus N(0, jitter²) noise. The samples are streamed in
    blocks of about `chunk`, keeping only each data point's best z so far: memory is O(N + chunk).
    Returns (matched z (N, z_dim), distance of each data point to its nearest sample (N,))."""
    flat = data.flatten(1)
    n, device = len(flat), flat.device
    best_dist = torch.full((n,), math.inf, device=device)
    best_z = torch.zeros(n, G.z_dim, device=device)
    block = max(chunk // batch, 1) * batch
    for start in range(0, m, block):
        z = torch.randn(min(block, m - start), G.z_dim, device=device)
        samples = torch.cat([G(z[k:k + batch]) for k in range(0, len(z), batch)]).flatten(1).float()
        dist, idx = nearest_samples(flat, samples, chunk)
        closer = dist < best_dist
        best_dist = torch.where(closer, dist, best_dist)
        best_z[closer] = z[idx[closer]]
    return best_z + jitter * torch.randn_like(best_z), best_dist


def imle_loss(samples, data):
    """‖x_i − G(z_σ(i))‖² averaged over pixels and minibatch (the reference code's nn.MSELoss)."""
    return F.mse_loss(samples.float(), data.float())


# ------------------------------------------------------------------------------------------------
# Data and evaluation
# ------------------------------------------------------------------------------------------------

def training_set(args, data, device):
    """The finite training set {x_i} of Algorithm 1 on the device: images in [0, 1], or a fixed draw of
    `toy_points` points from a 2D mixture."""
    if data.kind == "toy":
        g = torch.Generator().manual_seed(args.seed)
        y = torch.randint(len(data.centers), (args.toy_points,), generator=g)
        return (data.centers[y] + data.std * torch.randn(args.toy_points, 2, generator=g)).to(device)
    return data.images.to(device).float() / 255


@torch.no_grad()
def generate(G, n, device, batch=1000, generator=None):
    return torch.cat([G(torch.randn(min(batch, n - i), G.z_dim, generator=generator).to(device))
                      for i in range(0, n, batch)])


def evaluate(G, args, device, data, valid, test, clf=None):
    """Parzen log-likelihood for images, mode coverage for the 2D toys (G in eval mode); the digit metrics
    of --metrics (common/digits.py) with their classifier `clf`."""
    G.eval()
    if data.kind == "toy":
        result = metrics.mode_coverage(generate(G, 2500, device), data.centers, data.std)
        out = {"metric/modes": result["modes"], "metric/hq": result["hq"]}
    else:
        samples = generate(G, args.eval_samples, device)
        as_unit = lambda u8: u8.to(device).float() / 255  # noqa: E731
        result = metrics.parzen_evaluate(samples, as_unit(valid), as_unit(test))
        out = {"metric/parzen_ll": result["ll"], "metric/parzen_se": result["se"], "metric/parzen_sigma": result["sigma"]}
        if clf is not None:
            out.update(digits.score(clf, samples, data, args.digit_metrics, value_range=(0, 1)))
    G.train()
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, shape, kind):
    if kind == "toy":
        return MLPGenerator(args.z_dim, args.mlp_hidden)
    return ConvGenerator(args.z_dim, args.g_widths, shape[0])


def check(args, data):
    if data.kind == "image":
        if data.images is None:
            raise runlib.UsageError(f"{args.dataset} is streamed from disk; imle.py needs a dataset held in memory "
                                    "(mnist, fashion-mnist, cifar10, svhn, fake, a folder of idx files)")
        if data.shape[1:] != (28, 28):
            raise runlib.UsageError(f"the reference generator makes 28x28 images (7x7 -> 14x14 -> 28x28), "
                                    f"not {data.shape[1]}x{data.shape[2]}: use --image-size 28")
    for name in ("staleness", "factor", "nn_chunk", "toy_points", "z_dim"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise runlib.UsageError(f"--{name.replace('_', '-')} must be positive")


def train(args):
    data = datasets.load(args)
    check(args, data)
    valid = test = None
    if data.kind == "image":
        data, valid, test = datasets.split_held_out(args, data, args.valid_size, shuffle=True)
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    n = args.toy_points if data.kind == "toy" else len(data)
    if n < args.batch_size:
        raise runlib.UsageError(f"the training set ({n} points) is smaller than --batch-size {args.batch_size}")
    toy = data.kind == "toy"
    z_dim = args.z_dim if args.z_dim is not None else 2 if toy else 64
    lr = args.lr if args.lr is not None else 1e-2 if toy else 1e-3
    args = argparse.Namespace(**{**vars(args), "z_dim": z_dim, "lr": lr})
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    points = training_set(args, data, device)
    b = args.batch_size
    epoch_steps = n // b                  # minibatches per epoch
    m = args.factor * epoch_steps * b     # samples per search (reference: factor x the data it trains on)

    G = build(args, data.shape, data.kind)
    G = r.prepare(G, channels_last=data.kind == "image")
    g_raw = runlib.unwrap(G)
    opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                           weight_decay=args.weight_decay, foreach=True)

    z_matched, perm, nn_dist = None, None, None
    start = r.resume({"G": g_raw}, {"G": opt})
    state = r.resume_state
    if state is not None:
        z_matched, perm, nn_dist = (state["matching"][k].to(device) for k in ("z", "perm", "nn_dist"))
    fixed_z = torch.randn(100, args.z_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            if data.kind != "toy":
                return {"samples": (g_raw(fixed_z), 10, (0, 1))}
            r.scatter("samples", generate(g_raw, 2500, device), step,
                      real=data.centers, lim=data.centers.abs().max().item() * 1.5)

    def checkpoint():
        return {"models": {"G": g_raw.state_dict()}, "optimizers": {"G": opt.state_dict()},
                "matching": {"z": z_matched, "perm": perm, "nn_dist": nn_dist},
                "data_shape": list(data.shape), "data_kind": data.kind}

    step = start
    for step in range(start + 1, args.steps + 1):
        epoch, i = divmod(step - 1, epoch_steps)
        if i == 0:
            if epoch % args.staleness == 0:
                # Algorithm 1: m fresh samples; every data point gets the z of its nearest sample
                z_matched, dist = match(g_raw, points, m, b, args.nn_chunk, args.jitter)
                nn_dist = dist.mean()
            perm = torch.randperm(n, device=device)
        idx = perm[i * b:(i + 1) * b]
        with r.autocast():
            loss = imle_loss(G(z_matched[idx]), points[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        # nn_dist: mean distance from a data point to its nearest sample at the last search
        if r.end_step(step, {"loss/G": loss, "metric/nn_dist": nn_dist, "train/epoch": epoch}, samples=samples,
                      evaluate=lambda: evaluate(g_raw, args, device, data, valid, test, clf), state=checkpoint):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G = build(targs, state["data_shape"], state["data_kind"])
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    if not G.images:
        points = G(torch.randn(2500, targs.z_dim, generator=g).to(device))
        return runlib.write_samples(out, step, {"samples": runlib.scatter_image(points)[None]}, (0, 1), nrow=1)
    grid = G(torch.randn(100, targs.z_dim, generator=g).to(device))
    # interpolation strip: 8 rows, each a straight line in z between two random codes
    line = runlib.latent_walks(lambda n: torch.randn(n, targs.z_dim, generator=g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": G(line)}, value_range=(0, 1))
    # --eval: the digit metrics of the checkpoint
    paths.update(metrics.score(args, targs, lambda n: G(torch.randn(n, targs.z_dim, device=device)), device,
                               value_range=(0, 1), out=out, step=step))
    return paths


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
