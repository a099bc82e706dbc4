"""Spectral Normalization for Generative Adversarial Networks — Miyato, Kataoka, Koyama, Yoshida, 2018.
arXiv:1802.05957.

The idea: bound the Lipschitz constant of the discriminator by dividing every weight matrix by its
largest singular value (Eq. 8),

    W̄_SN(W) = W / σ(W),        σ(W) = max_{‖h‖₂ ≤ 1} ‖W h‖₂,

so each linear layer is 1-Lipschitz, and with 1-Lipschitz activations so is all of D. σ(W) is estimated
by power iteration, one step per update, with the vector u kept from one update to the next
(Algorithm 1: ṽ ← Wᵀũ / ‖Wᵀũ‖, ũ ← Wṽ / ‖Wṽ‖, σ ≈ ũᵀWṽ). A convolution's kernel is treated as the
matrix (out, in·kh·kw). torch.nn.utils.parametrizations.spectral_norm implements exactly this.

Losses (the paper's Table 2 compares both):

    hinge (default):   L_D = E max(0, 1 − D(x)) + E max(0, 1 + D(G(z))),     L_G = −E D(G(z))
    non-saturating:    L_D = −E log σ(D(x)) − E log(1 − σ(D(G(z)))),         L_G = −E log σ(D(G(z)))

Networks (`--arch`), z ∈ R^128 ~ N(0, I), batch 64, Adam, 100k G updates:
    resnet (default)  Table 4 (CIFAR-10): G dense → 4x4x256, 3 up-sampling ResBlocks of 256 channels,
                      BN, ReLU, conv3x3, tanh; D 2 down-sampling + 2 plain ResBlocks of 128 channels,
                      ReLU, global sum pooling, dense → 1. lr 2e-4, β = (0, 0.9), n_dis = 5.
                      At 48x48 (STL-10) the Table 5 nets: G dense → 6x6x512, up-blocks 256, 128, 64;
                      D down-blocks 64, 128, 256, 512, a plain block of 1024, sum pooling, dense → 1.
    cnn               Table 3 ("standard CNN"): G dense → Mg x Mg x 512, 4x4 stride-2 deconvs 256, 128, 64
                      (BN, ReLU), conv3x3 → 3, tanh; D conv3 64, conv4/s2 64, conv3 128, conv4/s2 128,
                      conv3 256, conv4/s2 256, conv3 512 (LeakyReLU 0.1), dense → 1. Mg = size / 8
                      (4 for CIFAR-10, 6 for STL-10). Setting C: lr 2e-4, β = (0.5, 0.999), n_dis = 1.
`--dataset stl10` trains at 48x48 (the paper's STL-10 size) unless --image-size says otherwise.

Evaluation (`--metrics`, the paper's protocol, Table 2): Inception score over 5k samples in 10 splits;
FID between 5k samples and 10k real images. Table 2 (CIFAR-10): standard CNN + hinge IS 7.58, FID 25.5;
ResNet + hinge IS 8.22 ± .05, FID 21.7. These need the FID Inception weights (see common/metrics.py);
`--metrics none` trains without them.

Usage:
    python sngan.py --cuda                                  # ResNet, hinge, CIFAR-10 32x32
    python sngan.py --arch cnn --cuda                       # the standard CNN (setting C)
    python sngan.py --dataset stl10 --cuda                  # STL-10 at 48x48 (Table 5 ResNet)
    python sngan.py --arch cnn --no-sn --lr 1e-3 ...        # ablation: the same D without SN
    python sngan.py --sample runs/sngan/cifar10-.../ckpt.pt [--eval]     # grids (and IS / FID, Table 2 protocol)

Differences from the paper:
- One power iteration per D update: D scores the real and the generated batch in one forward pass, and
  G's step reads σ from that update's iteration (D in eval mode) instead of iterating again. The
  official chainer code iterates at every D forward pass (real, fake and G's step).
- D's update comes before G's within an iteration (the official updater updates G first).
- Standard CNN: the official chainer-gan-lib net widens earlier (D 64, 128, 128, 256, 256, 512, 512),
  uses LeakyReLU 0.2, and draws z ~ U[−1, 1]; we follow Table 3 (64, 64, 128, 128, 256, 256, 512;
  slope 0.1; z ~ N(0, I)). The dense layer of G is followed by BN and ReLU as in that code.
- ResNet: initialisation follows the authors' sngan_projection code (Glorot-uniform, gain √2 in the
  residual branches, 1 on shortcuts and dense layers; D's last dense layer has no bias). That code's
  CIFAR-10 config also uses 128 samples per G step and decays the lr linearly to 0; we use the batch
  size (64) and a constant lr (`--lr-decay linear` gives the decay).
- Other image sizes (multiples of 8) scale G's start (size / 8) with the Table 3 / Table 4 nets.
- FID's 10k real images are a fixed random subset of the training set. Samples and evaluations use G
  in eval mode (BatchNorm running averages).
- --no-sn (no spectral normalisation) is an ablation flag, not a method of the paper.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "sngan"

# per-architecture defaults: Table 3 + setting C (cnn), Table 4 / 5 + the ResNet optimizer (resnet)
ARCH_DEFAULTS = {
    "cnn": {"beta1": 0.5, "beta2": 0.999, "n_dis": 1},
    "resnet": {"beta1": 0.0, "beta2": 0.9, "n_dis": 5},
}
WIDTHS = {"cnn": (512, 64), "resnet": (256, 128), "resnet48": (512, 64)}   # (g_width, d_width)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Spectral Normalization for GANs (Miyato et al. 2018)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=["resnet", "cnn"], default="resnet",
                   help="ResNet (Tables 4/5) or the standard CNN (Table 3)")
    p.add_argument("--loss", choices=["hinge", "nonsaturating"], default="hinge", help="adversarial loss")
    p.add_argument("--sn", action=argparse.BooleanOptionalAction, default=True,
                   help="spectral normalisation on every D layer (--no-sn: the unnormalised ablation)")
    p.add_argument("--z-dim", type=int, default=128, help="noise dimension, z ~ N(0, I)")
    p.add_argument("--g-width", type=int, default=WIDTHS["resnet"][0],
                   help="G's channels: every ResNet block (at 48x48 the first, halving after: 512), the cnn's "
                        "first feature map (512)")
    p.add_argument("--d-width", type=int, default=WIDTHS["resnet"][1],
                   help="D's channels: every ResNet block (at 48x48 the first, doubling after: 64), the cnn's "
                        "first conv (64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (G and D)")
    p.add_argument("--beta1", type=float, default=ARCH_DEFAULTS["resnet"]["beta1"], help="Adam beta1 (cnn: 0.5)")
    p.add_argument("--beta2", type=float, default=ARCH_DEFAULTS["resnet"]["beta2"], help="Adam beta2 (cnn: 0.999)")
    p.add_argument("--n-dis", type=int, default=ARCH_DEFAULTS["resnet"]["n_dis"], help="D updates per G update (cnn: 1)")
    p.add_argument("--lr-decay", choices=["none", "linear"], default="none",
                   help="linear: lr decays to 0 over --steps (the sngan_projection config)")
    runlib.add_args(p, dataset="cifar10", image_size=32, batch_size=64, steps=100_000, log_every=100,
                    sample_every=1000, ckpt_every=5000, eval_every=10000, eval_samples=5000, metrics="fid,is",
                    digits=True, image_size_help="32; 48 on stl10")
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 16, "g_width": 16, "d_width": 8, "z_dim": 16}, defaults=config_defaults)
    if args.n_dis < 1:
        raise runlib.UsageError("--n-dis must be >= 1")
    return args


def config_defaults(a):
    """The defaults of the chosen configuration: the architecture's optimizer settings and widths, and STL-10
    at 48x48 with the Table 5 widths (dry runs keep their small sizes)."""
    sizes = {}
    if not a.dry_run:
        sizes = {"image_size": 48 if a.dataset == "stl10" else 32,
                 **dict(zip(("g_width", "d_width"), WIDTHS[width_key(a.arch, a.image_size)]))}
    return {**ARCH_DEFAULTS[a.arch], **sizes}


def width_key(arch, size):
    return "resnet48" if arch == "resnet" and size == 48 else arch


# ------------------------------------------------------------------------------------------------
# Standard CNN (Table 3)
# ------------------------------------------------------------------------------------------------

class CNNGenerator(nn.Module):
    def __init__(self, z_dim, channels, size, g_ch):
        super().__init__()
        self.start = (g_ch, size // 8, size // 8)
        units = math.prod(self.start)
        self.dense = nn.Sequential(nn.Linear(z_dim, units), nn.BatchNorm1d(units), nn.ReLU())
        layers, c = [], g_ch
        for _ in range(3):   # 4x4, stride 2 deconvs: 512 → 256 → 128 → 64, BN, ReLU
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.Conv2d(c, channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        normal_init_(self)

    def forward(self, z):
        return self.net(self.dense(z).view(-1, *self.start))


class CNNDiscriminator(nn.Module):
    def __init__(self, channels, size, d_ch):
        super().__init__()
        widths = [d_ch, d_ch, 2 * d_ch, 2 * d_ch, 4 * d_ch, 4 * d_ch, 8 * d_ch]   # 64, 64, 128, ..., 512
        layers, c = [], channels
        for i, w in enumerate(widths):   # alternating 3x3 stride 1 and 4x4 stride 2 convs
            layers += [nn.Conv2d(c, w, 3, 1, 1) if i % 2 == 0 else nn.Conv2d(c, w, 4, 2, 1), nn.LeakyReLU(0.1)]
            c = w
        self.features = nn.Sequential(*layers)
        self.dense = nn.Linear(c * (size // 8) ** 2, 1)
        normal_init_(self)

    def forward(self, x):
        return self.dense(self.features(x).flatten(1)).squeeze(1)


def normal_init_(module):
    """The authors' chainer-gan-lib: every weight ~ N(0, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# ResNet (Table 4; Table 5 at 48x48)
# ------------------------------------------------------------------------------------------------

def glorot_(conv, gain):
    nn.init.xavier_uniform_(conv.weight, gain)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class GBlock(nn.Module):
    """BN, ReLU, 2x nearest up-sampling, conv3x3, BN, ReLU, conv3x3; shortcut: up-sampling, conv1x1."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.b1, self.b2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.c1 = glorot_(nn.Conv2d(c_in, c_out, 3, 1, 1), math.sqrt(2))
        self.c2 = glorot_(nn.Conv2d(c_out, c_out, 3, 1, 1), math.sqrt(2))
        self.shortcut = glorot_(nn.Conv2d(c_in, c_out, 1), 1.0)

    def forward(self, x):
        h = self.c1(F.interpolate(F.relu(self.b1(x)), scale_factor=2))
        h = self.c2(F.relu(self.b2(h)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """(ReLU), conv3x3, ReLU, conv3x3, (2x2 average pooling); shortcut: conv1x1 (and pooling) when the
    shape changes. The first block of D ("optimized" in the authors' code) has no leading ReLU and
    pools its input before the shortcut conv."""

    def __init__(self, c_in, c_out, down, first=False):
        super().__init__()
        self.down, self.first = down, first
        hidden = c_out if first else c_in
        self.c1 = glorot_(nn.Conv2d(c_in, hidden, 3, 1, 1), math.sqrt(2))
        self.c2 = glorot_(nn.Conv2d(hidden, c_out, 3, 1, 1), math.sqrt(2))
        self.shortcut = glorot_(nn.Conv2d(c_in, c_out, 1), 1.0) if (first or down or c_in != c_out) else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(x if self.first else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.shortcut is None:
            return h + x
        if self.first:
            return h + self.shortcut(F.avg_pool2d(x, 2))
        s = self.shortcut(x)
        return h + (F.avg_pool2d(s, 2) if self.down else s)


class ResNetGenerator(nn.Module):
    def __init__(self, z_dim, channels, size, widths):
        super().__init__()
        self.start = (widths[0], size // 8, size // 8)
        self.dense = nn.Linear(z_dim, math.prod(self.start))
        nn.init.xavier_uniform_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)
        self.blocks = nn.Sequential(*[GBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(),
                                 glorot_(nn.Conv2d(widths[-1], channels, 3, 1, 1), 1.0), nn.Tanh())

    def forward(self, z):
        return self.out(self.blocks(self.dense(z).view(-1, *self.start)))


class ResNetDiscriminator(nn.Module):
    def __init__(self, channels, widths, downs):
        super().__init__()
        ins = [channels] + list(widths[:-1])
        self.blocks = nn.Sequential(*[DBlock(a, b, down, first=i == 0)
                                      for i, (a, b, down) in enumerate(zip(ins, widths, downs))])
        self.dense = nn.Linear(widths[-1], 1, bias=False)
        nn.init.xavier_uniform_(self.dense.weight)

    def forward(self, x):
        h = F.relu(self.blocks(x)).sum((2, 3))   # global sum pooling
        return self.dense(h).squeeze(1)


def resnet_widths(size, g_ch, d_ch):
    """(G widths, D widths, D down-sampling flags): Table 5 at 48x48, Table 4 otherwise."""
    if size == 48:
        return [g_ch, g_ch // 2, g_ch // 4, g_ch // 8], [d_ch * 2 ** i for i in range(5)], [True] * 4 + [False]
    return [g_ch] * 4, [d_ch] * 4, [True, True, False, False]


# ------------------------------------------------------------------------------------------------
# Building the nets; spectral normalisation
# ------------------------------------------------------------------------------------------------

def check_shape(shape):
    if len(shape) != 3 or shape[-1] != shape[-2] or shape[-1] % 8 or shape[-1] < 8:
        raise runlib.UsageError(f"sngan.py needs square images whose side is a multiple of 8 (32, 48, ...); "
                           f"got data of shape {tuple(shape)}")


def build_generator(args, shape):
    channels, size = shape[0], shape[-1]
    if args.arch == "cnn":
        return CNNGenerator(args.z_dim, channels, size, args.g_width)
    return ResNetGenerator(args.z_dim, channels, size, resnet_widths(size, args.g_width, args.d_width)[0])


def build_discriminator(args, shape):
    channels, size = shape[0], shape[-1]
    if args.arch == "cnn":
        D = CNNDiscriminator(channels, size, args.d_width)
    else:
        _, widths, downs = resnet_widths(size, args.g_width, args.d_width)
        D = ResNetDiscriminator(channels, widths, downs)
    return apply_spectral_norm(D) if args.sn else D


def apply_spectral_norm(module):
    """W → W / σ(W) on every conv and dense layer; σ by one power iteration per training-mode forward
    pass, u persisted in a buffer; conv kernels as (out, in·kh·kw) matrices (dim 0)."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        spectral_norm(m, n_power_iterations=1)
    return module


def sample_noise(n, z_dim, device, generator=None):
    return torch.randn(n, z_dim, device=device, generator=generator)


# ------------------------------------------------------------------------------------------------
# Losses (on D's raw outputs)
# ------------------------------------------------------------------------------------------------

def d_loss_hinge(real, fake):
    """L_D = E max(0, 1 − D(x)) + E max(0, 1 + D(G(z)))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_loss_hinge(fake):
    """L_G = −E D(G(z))."""
    return -fake.mean()


def d_loss_nonsaturating(real, fake):
    """L_D = −E log sigmoid(D(x)) − E log(1 − sigmoid(D(G(z))))."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss_nonsaturating(fake):
    """L_G = −E log sigmoid(D(G(z)))."""
    return F.softplus(-fake).mean()


LOSSES = {"hinge": (d_loss_hinge, g_loss_hinge), "nonsaturating": (d_loss_nonsaturating, g_loss_nonsaturating)}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def evaluate(G, args, device, real_stats, data=None, clf=None):
    """--metrics: the Inception ones; on digits cfid, modes with the classifier `clf` (common/digits.py)."""
    G.eval()
    scores = {}
    if args.metrics:
        scores = metrics.evaluate(lambda b: G(sample_noise(b, args.z_dim, device)), args.eval_samples,
                                  real_stats, device, metrics=args.metrics, weights=args.inception_weights)
    if clf is not None:
        scores.update(digits.evaluate(clf, lambda b: G(sample_noise(b, args.z_dim, device)), args.eval_samples,
                                      data, args.digit_metrics))
    G.train()
    return scores


def train(args):
    data = datasets.load(args)
    check_shape(data.shape)
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    real_stats = None
    if args.metrics:   # Table 2's protocol: 10k real images
        real_stats = metrics.reference_stats(data, args.data_root, device, max_images=10000,
                                             weights=args.inception_weights)

    G = r.prepare(build_generator(args, data.shape), channels_last=True)
    D = r.prepare(build_discriminator(args, data.shape), channels_last=True)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=betas, foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=betas, foreach=True)
    d_loss_fn, g_loss_fn = LOSSES[args.loss]

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    batches = datasets.iterate(data, args.batch_size // r.world_size, device,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed_z = sample_noise(100, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            return {"samples": g_raw(fixed_z)}

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()}, "data_shape": list(data.shape)}

    b = args.batch_size // r.world_size
    step = start
    for step in range(start + 1, args.steps + 1):
        lr = args.lr * (1 - (step - 1) / args.steps) if args.lr_decay == "linear" else args.lr
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

        # n_dis updates of D; real and generated batches go through D together, so each update makes
        # exactly one power iteration per layer (Algorithm 1)
        for _ in range(args.n_dis):
            x, _ = next(batches)
            with r.autocast():
                with torch.no_grad():
                    fake = G(sample_noise(b, args.z_dim, device))
                d_real, d_fake = D(torch.cat([x, fake])).split([len(x), len(fake)])
                loss_d = d_loss_fn(d_real, d_fake)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        # one update of G; D in eval mode reuses the stored u, v (no extra power iteration)
        D.eval()
        with r.autocast():
            loss_g = g_loss_fn(D(G(sample_noise(b, args.z_dim, device))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.train()

        scalars = {"loss/D": loss_d, "loss/G": loss_g, "train/D_real": d_real.mean(), "train/D_fake": d_fake.mean(),
                   "train/lr": lr}
        if r.end_step(step, scalars, samples=samples, state=state,
                      evaluate=(lambda: evaluate(g_raw, args, device, real_stats, data, clf))
                      if args.metrics or clf is not None else None):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G = build_generator(targs, state["data_shape"])
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    grid = G(sample_noise(100, targs.z_dim, "cpu", g).to(device))
    # interpolation strip: 8 rows, each a straight line in z between two random codes
    line = runlib.latent_walks(lambda n: sample_noise(n, targs.z_dim, "cpu", g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": G(line)})
    result = dict(paths)
    # --eval: Table 2's protocol, 5k samples (--eval-samples) vs 10k real images; the digit metrics
    result.update(metrics.score(args, targs, lambda n: G(sample_noise(n, targs.z_dim, device)), device,
                                max_images=10000, out=out, step=step))
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
