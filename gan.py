"""Generative Adversarial Nets — Goodfellow, Pouget-Abadie, Mirza, Xu, Warde-Farley, Ozair, Courville,
Bengio, 2014. arXiv:1406.2661.

The idea: a generator G maps noise z to data space; a discriminator D outputs the probability that its
input came from the data rather than from G. The two play the minimax game (Eq. 1)

    min_G max_D V(D, G) = E_x[log D(x)] + E_z[log(1 − D(G(z)))].

Algorithm 1 alternates k steps of ascent on V for D with one step for G. Early in training
log(1 − D(G(z))) saturates, so G instead maximises log D(G(z)) (Sec. 3, the "non-saturating" loss,
our default; `--g-loss minimax` uses Eq. 1 as written). At the optimum p_G = p_data and D = ½.

The paper's MNIST model (the official pylearn2 configuration mnist.yaml):
    G: z (100) → 1200 ReLU → 1200 ReLU → 784 sigmoid
    D: maxout 240 units × 5 pieces → maxout 240 × 5 → 1 sigmoid, dropout on D's inputs
       (keep 0.8 on the image, 0.5 on the hidden layers)
    z ~ U[−√3, √3]^100 (mnist.yaml's `noise: 'uniform'` in the repository's final version; unit variance;
    `--noise gaussian` gives the Generator's default N(0, I)).
    SGD, batch 100, lr 0.1 divided by 1.000004 every update (floor 1e-6), momentum 0.5 → 0.7 by epoch 250.
    Train on the first 50k MNIST training images; the last 10k are the validation split.

Evaluation (Sec. 5): a Gaussian Parzen window fitted to 10k samples of G; its σ is picked on the
first 1,000 images of the validation split (the official parzen_ll.py's --limit_size 1000) from
logspace(−1, 0, 10); we report the mean log-likelihood of the test set
± its standard error (Table 1: MNIST 225 ± 2 nats).

Usage:
    python gan.py                                   # the paper's MNIST run (downloads MNIST)
    python gan.py --steps 5000 --eval-every 1000    # a quick CPU run
    python gan.py --dataset ring8 --steps 20000     # the 8-Gaussian ring (mode collapse experiment)
    python gan.py --sample runs/gan/mnist-.../ckpt.pt

Differences from the paper:
- Updates follow the official code, which produced Table 1: D's and G's gradients come from the same
  minibatch of samples and both nets step at once. `--update alternating --k K` is Algorithm 1 as printed.
  On 2000 steps of the MNIST test digits the code's way gave recognisable digits while Algorithm 1's let
  D win outright (D loss ~1e-3) and G's samples stayed noise.
- D's cost carries the official code's factor ½ (it scales D's gradient, which matters with SGD at lr 0.1).
- PyTorch's SGD momentum (v ← m v + g; θ ← θ − lr v) differs slightly from pylearn2's
  (v ← m v − lr g; θ ← θ + v) while the learning rate changes.
- Training length: the official configuration has no stopping criterion; `--steps` defaults to 150k
  updates (300 epochs of 50k images), past the epoch-250 end of the momentum ramp.
- Sample grids, toy-data support and mode-coverage metrics are additions. On 2D points G's output layer
  is linear and D has no input dropout (dropping one of two coordinates destroys the point), and training
  uses Adam (lr 1e-4, β1 0.8, the PacGAN protocol's optimizer): SGD at lr 0.1 makes the linear output diverge.
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

SCRIPT = "gan"
TOYS = ("ring8", "grid25")
PARZEN_SIGMA_IMAGES = 1000   # validation images that pick the Parzen window's sigma (parzen_ll.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generative Adversarial Nets (Goodfellow et al. 2014)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--z-dim", type=int, default=100, help="noise dimension")
    p.add_argument("--noise", choices=["uniform", "gaussian"], default="uniform",
                   help="z ~ U[-sqrt3, sqrt3] (the official mnist.yaml) or N(0, I)")
    p.add_argument("--g-hidden", type=int, default=1200, help="units in each of G's two ReLU layers")
    p.add_argument("--d-units", type=int, default=240, help="maxout units in each of D's two layers")
    p.add_argument("--d-pieces", type=int, default=5, help="pieces per maxout unit")
    p.add_argument("--d-input-dropout", type=float, default=0.2,
                   help="dropout on D's input (keep 0.8); 0 on the 2D toys, where dropping one of two coordinates "
                        "destroys the point")
    p.add_argument("--d-hidden-dropout", type=float, default=0.5, help="dropout on D's hidden layers")
    p.add_argument("--g-loss", choices=["nonsaturating", "minimax"], default="nonsaturating",
                   help="G maximises log D(G(z)) (Sec. 3) or minimises log(1 - D(G(z))) (Eq. 1)")
    p.add_argument("--update", choices=["simultaneous", "alternating"], default="simultaneous",
                   help="simultaneous: D and G step together on gradients from one minibatch of samples (the "
                        "official code); alternating: k D steps, then one G step (Algorithm 1)")
    p.add_argument("--k", type=int, default=1, help="D steps per G step with --update alternating")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd as the paper's code; the 2D toys default to adam (lr 1e-4, beta1 0.8, the PacGAN "
                        "protocol's settings), as SGD at lr 0.1 diverges there")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (adam: 1e-4)")
    p.add_argument("--lr-decay", type=float, default=1.000004, help="lr is divided by this every update")
    p.add_argument("--min-lr", type=float, default=1e-6, help="floor of the decayed learning rate")
    p.add_argument("--momentum", type=float, default=0.5, help="initial momentum")
    p.add_argument("--final-momentum", type=float, default=0.7, help="momentum reached at --momentum-epochs")
    p.add_argument("--momentum-epochs", type=float, default=250, help="epoch at which momentum saturates")
    p.add_argument("--valid-size", type=int, default=10000,
                   help="training images held out as the validation split (Parzen sigma selection)")
    runlib.add_args(p, dataset="mnist", image_size=28, batch_size=100, steps=150_000,
                    log_every=500, sample_every=5000, ckpt_every=5000, eval_every=10000, eval_samples=10000,
                    metrics="none", inception=False, digits=True)
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 8, "g_hidden": 32, "d_units": 16, "valid_size": 32},
        defaults=lambda a: {"optimizer": "adam" if a.dataset in TOYS else "sgd",
                            "lr": 0.1 if a.optimizer == "sgd" else 1e-4,
                            "d_input_dropout": 0.0 if a.dataset in TOYS else 0.2})
    sgd_only = {"lr_decay", "min_lr", "momentum", "final_momentum", "momentum_epochs"} & set(args.explicit)
    if args.optimizer == "adam" and sgd_only:
        raise runlib.UsageError(f"--{sorted(sgd_only)[0].replace('_', '-')} sets the SGD schedule, but this run "
                                "uses Adam (give --optimizer sgd)")
    return args


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

class Maxout(nn.Module):
    """h_i = max_j (x W_ij + b_ij): a linear layer with `pieces` outputs per unit, reduced by max."""

    def __init__(self, d_in, units, pieces):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(d_in, units * pieces)

    def forward(self, x):
        return self.linear(x).unflatten(1, (self.units, self.pieces)).amax(2)


class Generator(nn.Module):
    def __init__(self, z_dim, hidden, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.images = len(self.shape) == 3
        out = math.prod(self.shape)
        layers = [nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out)]
        if self.images:
            layers.append(nn.Sigmoid())  # pixels in [0, 1]; 2D toy points are unbounded
        self.net = nn.Sequential(*layers)
        for m in self.net:  # official init: U(-0.05, 0.05) weights ("irange"), zero biases
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.05, 0.05)
                nn.init.zeros_(m.bias)

    def init_output_bias(self, mean_image):
        """Start the sigmoid layer at the data's pixel marginals: bias = logit(mean pixel)."""
        with torch.no_grad():
            self.net[4].bias.copy_(torch.logit(mean_image.flatten().clamp(1e-3, 1 - 1e-3)))

    def forward(self, z):
        return self.net(z).view(-1, *self.shape)


class Discriminator(nn.Module):
    """Outputs the logit of D(x); D(x) = sigmoid(logit) is the probability that x is real."""

    def __init__(self, shape, units, pieces, input_dropout=0.2, hidden_dropout=0.5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(input_dropout), Maxout(math.prod(shape), units, pieces),
            nn.Dropout(hidden_dropout), Maxout(units, units, pieces),
            nn.Dropout(hidden_dropout), nn.Linear(units, 1))
        for m in self.modules():  # official init: U(-0.005, 0.005), zero biases
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.005, 0.005)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x).squeeze(1)


def sample_noise(n, z_dim, kind, device, generator=None):
    if kind == "uniform":  # U[-sqrt3, sqrt3]: zero mean, unit variance
        return (torch.rand(n, z_dim, device=device, generator=generator) * 2 - 1) * math.sqrt(3)
    return torch.randn(n, z_dim, device=device, generator=generator)


# ------------------------------------------------------------------------------------------------
# Losses (on D's logits l, D = sigmoid(l); log D = −softplus(−l), log(1 − D) = −softplus(l))
# ------------------------------------------------------------------------------------------------

def d_loss(real_logits, fake_logits):
    """D ascends V (Eq. 1): minimise ½ (−E log D(x) − E log(1 − D(G(z)))), the official code's ½."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def g_loss_nonsaturating(fake_logits):
    """Sec. 3: G maximises log D(G(z)), i.e. minimises −E log D(G(z))."""
    return F.softplus(-fake_logits).mean()


def g_loss_minimax(fake_logits):
    """Eq. 1 as written: G minimises E log(1 − D(G(z)))."""
    return -F.softplus(fake_logits).mean()


def schedule(step, args, epoch_size):
    """Learning rate and momentum after `step` updates (pylearn2's ExponentialDecay and
    MomentumAdjustor(start=1, saturate=250))."""
    lr = max(args.lr / args.lr_decay ** step, args.min_lr)
    epoch = step * args.batch_size / max(epoch_size, 1)
    ramp = min(max((epoch - 1) / max(args.momentum_epochs - 1, 1e-9), 0.0), 1.0)
    return lr, args.momentum + (args.final_momentum - args.momentum) * ramp


# ------------------------------------------------------------------------------------------------
# Data splits and evaluation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(G, n, args, device, batch=1000, generator=None):
    return torch.cat([G(sample_noise(min(batch, n - i), args.z_dim, args.noise, device, generator))
                      for i in range(0, n, batch)])


def evaluate(G, args, device, data, valid, test, clf=None):
    """Parzen log-likelihood for images (Sec. 5), mode coverage for the 2D toys; the digit metrics of
    --metrics (common/digits.py) with their classifier `clf`."""
    G.eval()
    if data.kind == "toy":
        result = metrics.mode_coverage(generate(G, 2500, args, device), data.centers, data.std)
        out = {"metric/modes": result["modes"], "metric/hq": result["hq"]}
    else:
        samples = generate(G, args.eval_samples, args, device)
        as_unit = lambda u8: u8.to(device).float() / 255  # noqa: E731
        # sigma is chosen on the first 1,000 validation images (parzen_ll.py --limit_size 1000)
        result = metrics.parzen_evaluate(samples, as_unit(valid[:PARZEN_SIGMA_IMAGES]), as_unit(test))
        out = {"metric/parzen_ll": result["ll"], "metric/parzen_se": result["se"], "metric/parzen_sigma": result["sigma"]}
        if clf is not None:
            out.update(digits.score(clf, samples, data, args.digit_metrics, value_range=(0, 1)))
    G.train()
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, shape):
    D = Discriminator(shape, args.d_units, args.d_pieces, args.d_input_dropout, args.d_hidden_dropout)
    return Generator(args.z_dim, args.g_hidden, shape), D


def train(args):
    data = datasets.load(args)
    valid = test = None
    if data.kind == "image":
        data, valid, test = datasets.split_held_out(args, data, args.valid_size)
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None

    G, D = build(args, data.shape)
    if data.kind == "image":
        G.init_output_bias(data.images.float().mean(0) / 255)
    G, D = r.prepare(G), r.prepare(D)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    if args.optimizer == "sgd":
        opt_g = torch.optim.SGD(G.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
        opt_d = torch.optim.SGD(D.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
    else:
        opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.8, 0.999), foreach=True)
        opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.8, 0.999), foreach=True)
    g_loss_fn = g_loss_nonsaturating if args.g_loss == "nonsaturating" else g_loss_minimax

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    batches = datasets.iterate(data, args.batch_size // r.world_size, device, value_range=(0, 1),
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed_z = sample_noise(100, args.z_dim, args.noise, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            if data.kind != "toy":
                return {"samples": (g_raw(fixed_z), 10, (0, 1))}
            r.scatter("samples", generate(g_raw, 2500, args, device), step,
                      real=data.centers, lim=data.centers.abs().max().item() * 1.5)

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()}, "data_shape": list(data.shape)}

    b = args.batch_size // r.world_size
    step = start
    for step in range(start + 1, args.steps + 1):
        lr, momentum = schedule(step - 1, args, len(data))
        if args.optimizer == "sgd":
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = lr, momentum

        if args.update == "simultaneous":  # the official code: both gradients from one forward pass, then both steps
            x, _ = next(batches)
            with r.autocast():
                fake_logits = D(G(sample_noise(b, args.z_dim, args.noise, device)))
                loss_d, loss_g = d_loss(D(x), fake_logits), g_loss_fn(fake_logits)
            opt_d.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            loss_d.backward(inputs=list(D.parameters()), retain_graph=True)   # D's gradient of its loss only
            loss_g.backward(inputs=list(G.parameters()))                      # G's gradient of its loss only
            opt_d.step()
            opt_g.step()
        else:
            # Algorithm 1: k steps on D, ascending log D(x) + log(1 − D(G(z)))
            for _ in range(args.k):
                x, _ = next(batches)
                with r.autocast():
                    with torch.no_grad():
                        fake = G(sample_noise(b, args.z_dim, args.noise, device))
                    loss_d = d_loss(D(x), D(fake))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            # then one step on G
            with r.autocast():
                loss_g = g_loss_fn(D(G(sample_noise(b, args.z_dim, args.noise, device))))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()

        scalars = {"loss/D": loss_d, "loss/G": loss_g,
                   **({"train/lr": lr, "train/momentum": momentum} if args.optimizer == "sgd" else {})}
        if r.end_step(step, scalars, samples=samples, state=state,
                      evaluate=lambda: evaluate(g_raw, args, device, data, valid, test, clf)):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G = Generator(targs.z_dim, targs.g_hidden, state["data_shape"])
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    if not G.images:
        points = G(sample_noise(2500, targs.z_dim, targs.noise, "cpu", g).to(device))
        return runlib.write_samples(out, step, {"samples": runlib.scatter_image(points)[None]}, (0, 1), nrow=1)
    grid = G(sample_noise(100, targs.z_dim, targs.noise, "cpu", g).to(device))
    # interpolation strip: 8 rows, each a straight line in z between two random codes
    line = runlib.latent_walks(lambda n: sample_noise(n, targs.z_dim, targs.noise, "cpu", g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": G(line)}, value_range=(0, 1))
    # --eval: the digit metrics of the checkpoint
    paths.update(metrics.score(args, targs, lambda n: G(sample_noise(n, targs.z_dim, targs.noise, device)), device,
                               value_range=(0, 1), out=out, step=step))
    return paths


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
