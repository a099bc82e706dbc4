"""Improved Training of Wasserstein GANs (WGAN-GP) — Gulrajani, Ahmed, Arjovsky, Dumoulin, Courville, 2017.
arXiv:1704.00028.

The idea: for E_x D(x) − E_x̃ D(x̃) to estimate the Wasserstein-1 distance between the data and G's
samples, the critic D must be 1-Lipschitz. WGAN enforced this by clipping weights, which underuses the
critic's capacity and makes gradients explode or vanish. The optimal critic has gradient norm 1 almost
everywhere on straight lines between coupled real and generated points, so WGAN-GP penalises the
deviation of ‖∇D‖ from 1 at random points x̂ on lines between real and fake samples (Eq. 3):

    L_D = E_x̃[D(x̃)] − E_x[D(x)] + λ E_x̂[(‖∇_x̂ D(x̂)‖₂ − 1)²],   x̂ = ε x + (1 − ε) x̃,  ε ~ U[0, 1]
    L_G = −E_z[D(G(z))]

Algorithm 1: n_critic = 5 critic steps per generator step, λ = 10, Adam α = 1e-4, β = (0, 0.9).
The critic has no batch normalisation: the penalty is a per-example constraint, and BN would make D's
output for one example depend on the rest of the batch.

Two configurations of the official code (igul222/improved_wgan_training), chosen by the dataset:
- Images: the CIFAR-10 ResNet of gan_cifar_resnet.py (Table 3, unsupervised, IS 7.86 ± .07), width 128:
    G: z (128) ~ N(0, I) → linear → 4x4x128 → 3 up-blocks [BN, ReLU, nearest ×2, conv3, BN, ReLU, conv3;
       shortcut: nearest ×2, conv1] → BN, ReLU, conv3 → 32x32xC, tanh
    D: first block [conv3, ReLU, conv3, mean-pool; shortcut: mean-pool, conv1] → 16x16;
       down-block [ReLU, conv3, ReLU, conv3, mean-pool; shortcut: conv1, mean-pool] → 8x8;
       2 plain blocks [ReLU, conv3, ReLU, conv3; identity shortcut]; ReLU, global mean pool, linear → 1
    Adam lr 2e-4 decayed linearly to 0 over the 100k G iterations, β = (0, 0.9); critic batch 64,
    generator batch 128 (2 × 64); λ = 10; n_critic = 5. Initialisation as the code: uniform with
    std √(4 / (fan_in + fan_out)) for the residual convs, Glorot for shortcuts, output conv and linears.
- 2D toys ring8 / grid25: gan_toy.py's MLPs, G: z (2) ~ N(0, I) → 3 × 512 ReLU → 2,
  D: 2 → 3 × 512 ReLU → 1; Adam lr 1e-4, β = (0.5, 0.9), batch 256, λ = 0.1, n_critic = 5, 100k iterations.
One step is one generator iteration (n_critic critic updates, then one G update).

Logged: loss/D (Eq. 3), loss/G, loss/gp (the penalty term), train/wasserstein (E D(x) − E D(x̃) on the
last critic batch, the negative critic loss without the penalty, which the paper plots), train/grad_norm
(mean ‖∇_x̂ D(x̂)‖). Evaluation: the Inception Score over 50k samples in 10 splits (Table 3's protocol:
CIFAR-10 unsupervised ResNet 7.86 ± .07) and FID against the 50k training images (others report ≈ 22 for
this model), both from common.metrics (`--metrics`, needs the FID Inception weights; `--metrics none`
trains without them); the Wasserstein estimate E D(x) − E D(G(z)) on --eval-samples training and test
images (metric/w_train, metric/w_test: the official code's dev cost, which shows the critic
overfitting); modes captured and % high-quality samples for the toys.

Usage:
    python wgan_gp.py --cuda                                    # CIFAR-10 ResNet, 100k G iterations
    python wgan_gp.py --dataset ring8 --steps 20000             # 8 Gaussians, gan_toy.py's nets (CPU)
    python wgan_gp.py --dataset mnist --steps 2000 --g-width 64 --d-width 64    # a quick CPU image run (28 → 32 pixels)
    python wgan_gp.py --sample runs/wgan_gp/cifar10-.../ckpt.pt [--eval]   # grids (and IS / FID on 50k)

Differences from the paper:
- Algorithm 1 lists Adam lr 1e-4, β = (0, 0.9); we use each official configuration's settings
  (ResNet: 2e-4 with linear decay; toys: 1e-4, β = (0.5, 0.9)). --lr 1e-4 --lr-decay none --beta1 0
  gives Algorithm 1.
- The official loop updates G at the start of every iteration but the first, with that iteration's
  learning rate; we update the critic n_critic times and then G. The sequence of updates is the same;
  G's decayed learning rate lags by one iteration (a relative difference of 1e-5).
- Real images are not dequantised (the official code added U(0, 1/128) noise to them).
- G's batch norm uses the statistics of the whole batch (the official code split each batch over two
  GPUs); samples and evaluations use G in eval mode (BN running averages), where the official code
  used batch statistics.
- The toys are the PacGAN-protocol mixtures of common.data (ring8: radius 1, σ 0.01; grid25: spacing 2,
  σ 0.05); gan_toy.py rescaled its mixtures (ring radius ≈ 1.41, σ ≈ 0.014; grid spacing ≈ 0.71, σ ≈ 0.018).
- Image sizes other than 32 (a power of two ≥ 16) are an extension: G gains or loses up-blocks and D
  down-blocks, D's two plain blocks staying at 8x8.
- --compile compiles G and the critic's plain forward passes, but the penalty runs through the
  uncompiled critic: torch.compile does not support the double backward that the penalty needs.
- The official code computed the Inception Score every 1000 iterations; --eval-every defaults to 10000.
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

SCRIPT = "wgan_gp"
TOYS = ("ring8", "grid25")

# gan_toy.py's settings, the defaults whenever --dataset is a 2D toy (explicit flags still win)
TOY_DEFAULTS = {"z_dim": 2, "g_width": 512, "d_width": 512, "lr": 1e-4, "beta1": 0.5, "lr_decay": "none", "gp_lambda": 0.1,
                "g_batch_mult": 1, "batch_size": 256, "metrics": "none"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="WGAN-GP (Gulrajani et al. 2017)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--z-dim", type=int, default=128, help="noise dimension, z ~ N(0, I) (toys: 2)")
    p.add_argument("--g-width", type=int, default=128, help="G's ResNet channels, DIM of the code (toys: MLP width 512)")
    p.add_argument("--d-width", type=int, default=128, help="D's ResNet channels, DIM of the code (toys: MLP width 512)")
    p.add_argument("--gp-lambda", type=float, default=10.0, help="gradient penalty weight lambda (toys: 0.1)")
    p.add_argument("--n-critic", type=int, default=5, help="critic updates per generator update")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G and D (toys: 1e-4)")
    p.add_argument("--lr-decay", choices=["linear", "none"], default="linear",
                   help="decay the learning rate linearly to 0 over --steps (toys: none)")
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 (toys: 0.5)")
    p.add_argument("--beta2", type=float, default=0.9, help="Adam beta2")
    p.add_argument("--g-batch-mult", type=int, default=2,
                   help="G's batch is this multiple of the critic's --batch-size (toys: 1)")
    runlib.add_args(p, dataset="cifar10", image_size=32, batch_size=64, steps=100_000, log_every=100,
                    sample_every=1000, ckpt_every=1000, eval_every=10000, eval_samples=50000, metrics="is,fid",
                    digits=True)
    return runlib.parse(p, argv, dry_run_defaults={"dataset": "fake", "g_width": 16, "d_width": 16},
                        defaults=lambda a: TOY_DEFAULTS if a.dataset in TOYS else {})


# ------------------------------------------------------------------------------------------------
# Models: the CIFAR-10 ResNet (gan_cifar_resnet.py)
# ------------------------------------------------------------------------------------------------

def conv(c_in, c_out, kernel, he=True):
    """A 'same' convolution with the official initialisation: uniform with std √(2g / (fan_in + fan_out)),
    g = 2 ("he_init", residual-branch convs) or g = 1 (Glorot: shortcuts, output); zero bias."""
    m = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2) if he else 1.0)
    nn.init.zeros_(m.bias)
    return m


def linear(d_in, d_out, he=False):
    """A linear layer initialised as the official code: Glorot uniform, or He uniform (std √(2 / fan_in))
    for the toy MLPs' ReLU layers; zero bias."""
    m = nn.Linear(d_in, d_out)
    if he:
        nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
    else:
        nn.init.xavier_uniform_(m.weight)
    nn.init.zeros_(m.bias)
    return m


def upsample(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlock(nn.Module):
    """Pre-activation residual block: [norm, ReLU, conv3] × 2 plus a shortcut; resample None, "up"
    (nearest ×2 before the first conv) or "down" (mean-pool after the second conv). G's blocks use
    batch norm, the critic's none."""

    def __init__(self, c_in, c_out, resample=None, batchnorm=False):
        super().__init__()
        self.resample = resample
        c_mid = c_in if resample == "down" else c_out
        self.norm1 = nn.BatchNorm2d(c_in) if batchnorm else nn.Identity()
        self.conv1 = conv(c_in, c_mid, 3)
        self.norm2 = nn.BatchNorm2d(c_mid) if batchnorm else nn.Identity()
        self.conv2 = conv(c_mid, c_out, 3)
        self.shortcut = conv(c_in, c_out, 1, he=False) if resample or c_in != c_out else nn.Identity()

    def forward(self, x):
        h = F.relu(self.norm1(x))
        if self.resample == "up":
            h, x = upsample(h), upsample(x)
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        s = self.shortcut(x)
        if self.resample == "down":
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return s + h


class FirstCriticBlock(nn.Module):
    """The critic's first, down-sampling block ("OptimizedResBlockDisc1"): no activation before the
    first conv (it sees the image), shortcut = mean-pool then conv1."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1, self.conv2 = conv(c_in, c_out, 3), conv(c_out, c_out, 3)
        self.shortcut = conv(c_in, c_out, 1, he=False)

    def forward(self, x):
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return self.shortcut(F.avg_pool2d(x, 2)) + h


def resnet_depth(image_size):
    """Up-blocks of G (3 for 32x32); ValueError if the ResNet cannot make this size."""
    n = int(round(math.log2(image_size))) - 2 if image_size > 0 else -1
    if image_size < 16 or 2 ** (n + 2) != image_size:
        raise ValueError(f"wgan_gp.py's ResNet makes square images whose side is a power of two, "
                         f"at least 16 (the paper's CIFAR-10 model: 32); got --image-size {image_size}")
    return n


class ResNetGenerator(nn.Module):
    def __init__(self, z_dim, dim, shape):
        super().__init__()
        channels, size = shape[0], shape[1]
        self.dim = dim
        self.input = linear(z_dim, 4 * 4 * dim)
        self.blocks = nn.Sequential(*[ResBlock(dim, dim, "up", batchnorm=True) for _ in range(resnet_depth(size))])
        self.output = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(), conv(dim, channels, 3, he=False), nn.Tanh())

    def forward(self, z):
        return self.output(self.blocks(self.input(z).view(-1, self.dim, 4, 4)))


class ResNetCritic(nn.Module):
    """No normalisation anywhere (Sec. 4: no batch norm in the critic). Returns D(x), unbounded."""

    def __init__(self, dim, shape):
        super().__init__()
        channels, size = shape[0], shape[1]
        n_down = resnet_depth(size) - 2  # down-blocks after the first one, to reach 8x8 (1 for 32x32)
        self.blocks = nn.Sequential(FirstCriticBlock(channels, dim),
                                    *[ResBlock(dim, dim, "down") for _ in range(n_down)],
                                    ResBlock(dim, dim), ResBlock(dim, dim))
        self.output = linear(dim, 1)

    def forward(self, x):
        h = F.relu(self.blocks(x)).mean((2, 3))  # global mean pool
        return self.output(h).squeeze(1)


# ------------------------------------------------------------------------------------------------
# Models: the 2D toys (gan_toy.py)
# ------------------------------------------------------------------------------------------------

def mlp(d_in, d_out, width, hidden_layers=3):
    layers, d = [], d_in
    for _ in range(hidden_layers):
        layers += [linear(d, width, he=True), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, linear(d, d_out))


class ToyGenerator(nn.Module):
    def __init__(self, z_dim, width):
        super().__init__()
        self.net = mlp(z_dim, 2, width)

    def forward(self, z):
        return self.net(z)


class ToyCritic(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = mlp(2, 1, width)

    def forward(self, x):
        return self.net(x).squeeze(1)


def build(args, shape):
    """(G, D) for the data: the toy MLPs for 2D points, the ResNet for images."""
    if len(shape) == 1:
        return ToyGenerator(args.z_dim, args.g_width), ToyCritic(args.d_width)
    return ResNetGenerator(args.z_dim, args.g_width, shape), ResNetCritic(args.d_width, shape)


def sample_noise(n, z_dim, device, generator=None):
    return torch.randn(n, z_dim, device=device, generator=generator)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def gradient_penalty(critic, real, fake, lam):
    """The penalty of Eq. 3: λ E_x̂ (‖∇_x̂ D(x̂)‖₂ − 1)², x̂ = ε x + (1 − ε) x̃, one ε ~ U[0, 1] per example.
    Returns (penalty, per-example gradient norms). The gradient is taken with create_graph=True so that
    the penalty itself can be differentiated with respect to the critic's weights."""
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).norm(dim=1)
    return lam * ((norm - 1) ** 2).mean(), norm


def critic_loss(real_scores, fake_scores, penalty):
    """Eq. 3: E D(x̃) − E D(x) + the gradient penalty."""
    return fake_scores.mean() - real_scores.mean() + penalty


def generator_loss(fake_scores):
    """G minimises −E D(G(z))."""
    return -fake_scores.mean()


def learning_rate(step, args):
    """The official schedule: lr · max(0, 1 − iteration / iterations), iteration = step − 1."""
    if args.lr_decay == "none":
        return args.lr
    return args.lr * max(0.0, 1.0 - (step - 1) / args.steps)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(G, n, args, device, batch=500, generator=None):
    return torch.cat([G(sample_noise(min(batch, n - i), args.z_dim, device, generator)) for i in range(0, n, batch)])


@torch.no_grad()
def mean_score(D, x, batch=500):
    return torch.cat([D(x[i:i + batch]) for i in range(0, len(x), batch)]).float().mean()


def evaluate(G, D, args, device, data, test, real_stats, clf=None):
    """Toys: modes captured and % high-quality samples (PacGAN protocol) on 2500 samples. Images: the
    Wasserstein estimate E D(x) − E D(G(z)) on training and test images, the Inception metrics, and on digits
    those of common/digits.py (--metrics cfid, modes) with their classifier `clf`."""
    G.eval()
    if data.kind == "toy":
        result = metrics.mode_coverage(generate(G, 2500, args, device), data.centers, data.std)
        G.train()
        return {"metric/modes": result["modes"], "metric/hq": result["hq"]}
    fake_score = mean_score(D, generate(G, args.eval_samples, args, device))
    out = {}
    for name, images in (("train", data.images), ("test", test)):
        if images is not None:
            x = datasets.to_range(images[:args.eval_samples].to(device), (-1, 1), from_uint8=True)
            out[f"metric/w_{name}"] = mean_score(D, x) - fake_score
    if args.metrics:
        out.update(metrics.evaluate(lambda b: G(sample_noise(b, args.z_dim, device)), args.eval_samples,
                                    real_stats, device, metrics=args.metrics, weights=args.inception_weights))
    if clf is not None:
        out.update(digits.evaluate(clf, lambda b: G(sample_noise(b, args.z_dim, device)), args.eval_samples,
                                   data, args.digit_metrics))
    G.train()
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train(args):
    if args.dataset not in TOYS:
        with runlib.as_usage_error():
            resnet_depth(args.image_size)  # an impossible size fails before any data is read
    data = datasets.load(args)
    test = datasets.load(args, split="test").images if args.dataset in datasets.IN_MEMORY else None
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    real_stats = None
    if args.metrics:  # Inception statistics of the training images (computed once, cached under --data-root)
        real_stats = metrics.reference_stats(data, args.data_root, device, weights=args.inception_weights)

    images = data.kind == "image"
    G, D = build(args, data.shape)
    G, D = r.prepare(G, channels_last=images), r.prepare(D, channels_last=images)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    # torch.compile cannot differentiate twice: the penalty uses the critic without the compile wrapper
    # (still wrapped in DistributedDataParallel under torchrun).
    d_penalty = getattr(D, "_orig_mod", D)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=betas, foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=betas, foreach=True)

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    b = args.batch_size // r.world_size
    batches = datasets.iterate(data, b, device, rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed_z = sample_noise(100, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            if data.kind != "toy":
                return {"samples": g_raw(fixed_z)}
            r.scatter("samples", generate(g_raw, 2500, args, device), step,
                      real=data.centers, lim=data.centers.abs().max().item() * 1.5)

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()}, "data_shape": list(data.shape)}

    step = start
    for step in range(start + 1, args.steps + 1):
        lr = learning_rate(step, args)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

        # n_critic critic updates (Algorithm 1, lines 2-9)
        for _ in range(args.n_critic):
            real, _ = next(batches)
            with r.autocast():
                with torch.no_grad():
                    fake = G(sample_noise(b, args.z_dim, device))
                real_scores, fake_scores = D(real), D(fake)
                penalty, grad_norm = gradient_penalty(d_penalty, real, fake, args.gp_lambda)
                loss_d = critic_loss(real_scores, fake_scores, penalty)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        # one generator update (lines 10-11)
        with r.autocast():
            loss_g = generator_loss(D(G(sample_noise(args.g_batch_mult * b, args.z_dim, device))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        scalars = {"loss/D": loss_d, "loss/G": loss_g, "loss/gp": penalty,
                   "train/wasserstein": real_scores.float().mean() - fake_scores.float().mean(),
                   "train/grad_norm": grad_norm.mean(), "train/lr": lr}
        if r.end_step(step, scalars, samples=samples, state=state,
                      evaluate=lambda: evaluate(g_raw, d_raw, args, device, data, test, real_stats, clf)):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G, _ = build(targs, state["data_shape"])
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    if len(state["data_shape"]) == 1:
        points = G(sample_noise(2500, targs.z_dim, "cpu", g).to(device))
        centers, _ = datasets.toy_mixture(targs.dataset)
        img = runlib.scatter_image(points, real=centers, lim=centers.abs().max().item() * 1.5)
        return runlib.write_samples(out, step, {"samples": img[None]}, (0, 1), nrow=1)
    grid = G(sample_noise(100, targs.z_dim, "cpu", g).to(device))
    # interpolation strip: 8 rows, each a straight line in z between two random codes
    line = runlib.latent_walks(lambda n: sample_noise(n, targs.z_dim, "cpu", g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": G(line)})
    result = dict(paths)
    # --eval: IS / FID (50k samples unless --eval-samples) and the digit metrics of the checkpoint
    result.update(metrics.score(args, targs, lambda n: G(sample_noise(n, targs.z_dim, device)), device, out=out, step=step))
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
