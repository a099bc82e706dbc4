"""Wasserstein GAN — Arjovsky, Chintala, Bottou, 2017. arXiv:1701.07875.

The idea: train G to minimise the Earth-Mover (Wasserstein-1) distance between the data and the model.
By the Kantorovich-Rubinstein duality (Eq. 2)

    W(P_r, P_θ) = sup_{‖f‖_L ≤ 1}  E_{x~P_r}[f(x)] − E_{x~P_θ}[f(x)],

so a "critic" f_w (a discriminator without the sigmoid) is trained to maximise E f(x) − E f(G(z)) and G
to maximise E f(G(z)). Clipping every critic weight to [−c, c] after each update keeps f_w in a set of
K-Lipschitz functions for some K, which gives W up to the factor K (Eq. 3). Algorithm 1 as losses:

    critic:  L_D = E_z f(G(z)) − E_x f(x)          (then w ← clip(w, −c, c))
    G:       L_G = −E_z f(G(z))

−L_D is the critic's estimate of W. Sec. 4.2 reports that it falls as the samples get better; it is
logged as `loss/W_estimate` (the paper's curves are this value, median-filtered).

Algorithm 1: RMSProp lr 5e-5, c = 0.01, batch 64, n_critic = 5. The official code also trains the
critic for 100 steps instead of 5 during the first 25 G iterations and at every 500th G iteration, so
the critic starts each stretch near its optimum (on by default, `--no-boost-critic` turns it off).

Networks (the official code; `--arch`):
    dcgan   DCGAN G and critic at 64x64 (Sec. 4, Fig. 5): G z100 ~ N(0, I) → 4x4x512 → 8x8x256 → 16x16x128
            → 32x32x64 → 64x64x3 tanh (transposed convs, BN, ReLU); critic: strided 4x4 convs 64 → 128 →
            256 → 512 (BN except the first, LeakyReLU 0.2) → 4x4 conv to one score, no sigmoid
    nobn    the same G without BatchNorm (Fig. 6; official --noBN), DCGAN critic
    mlp-g   G a 4-layer ReLU MLP with 512 units (Fig. 7; official --mlp_G --ngf 512), DCGAN critic
    mlp     MLP G and MLP critic (official --mlp_G --mlp_D); the 2D toys ring8 / grid25 use these

Usage:
    python wgan.py                                     # CIFAR-10 at 64x64 with the DCGAN nets
    python wgan.py --dataset lsun:bedroom              # the paper's LSUN bedrooms (LSUN files needed)
    python wgan.py --arch mlp-g                        # robustness experiment: MLP generator
    python wgan.py --dataset ring8 --steps 20000       # 8 Gaussians with the MLP nets (a CPU run)
    python wgan.py --sample runs/wgan/cifar10-.../ckpt.pt [--eval]
FID / IS (`--metrics`) need the FID Inception weights (see common/metrics.py); `--metrics none` trains
without them. The paper reports no FID / IS; the WGAN numbers others publish for CIFAR-10 (e.g. the
weight-clipping curves of WGAN-GP's Fig. 3) are at 32x32: scores at the default 64x64 are NOT
comparable with them (Inception sees upsampled images); use `--image-size 32` to compare.
`--sample CKPT --eval` scores 50k samples.

Differences from the paper:
- Default data: CIFAR-10 resized to 64x64 (the official code's `cifar10` option); the paper trains on
  LSUN bedrooms, which torchvision cannot download (`--dataset lsun:bedroom` with the LSUN files).
- Training length: the official code runs 25 passes over the data (about 230k G iterations on LSUN
  bedrooms, 3.4k on CIFAR-10); `--steps` counts G iterations and defaults to 100k, the budget of the
  SN-GAN paper's CIFAR-10 comparison, whose weight-clipping numbers are the ones usually quoted.
- Clipping: Algorithm 1 clips after each critic update; the official code clamps before each critic
  update instead. We clip after every update and once at initialisation (so the critic never sees the
  N(0, 0.02) initial weights unclipped, as in the official code); the only difference left is that the
  official G step sees the last critic update unclipped. BatchNorm's scale and shift are clipped too,
  as the official code clips all critic parameters.
- "4-layer ReLU-MLP with 512 hidden units" is read as the official MLP_G: four linear layers, i.e.
  three hidden ReLU layers of 512 units, linear output. The MLP critic uses the same width
  (`--mlp-units`); the official MLP_D takes its width from --ndf (64 unless given; our --d-width).
- The critic scores each example and the losses average them (the official nets average inside
  forward); same gradients.
- `--arch nobn` drops BatchNorm from G only (official main.py); the critic keeps it. The paper's Fig. 6
  G also keeps a constant number of filters per layer; the official code, and we, keep the DCGAN widths.
- The official critic loss is written with the opposite sign convention (f high on samples); the
  W estimate it plots, −Loss_D, is the same quantity as ours.
- Samples and evaluations use G in eval mode (BatchNorm running averages); the official code always
  normalised with the current batch.
- FID/IS evaluation, 2D toy support with mode-coverage metrics, and the sample grids are additions.
"""
import argparse
import math

import torch
import torch.nn as nn

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "wgan"
TOYS = ("ring8", "grid25")
CONV_ARCHS = ("dcgan", "nobn", "mlp-g")
BOOST_ITERS, BOOST_FIRST, BOOST_EVERY = 100, 25, 500   # official main.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Wasserstein GAN (Arjovsky et al. 2017)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=["dcgan", "nobn", "mlp-g", "mlp"], default="dcgan",
                   help="networks (see the docstring); the 2D toys ring8 / grid25 default to mlp")
    p.add_argument("--z-dim", type=int, default=100, help="noise dimension, z ~ N(0, I)")
    p.add_argument("--g-width", type=int, default=64, help="DCGAN G width (G starts at g_width * image_size / 8 channels; official --ngf)")
    p.add_argument("--d-width", type=int, default=64, help="DCGAN critic width (first layer; official --ndf)")
    p.add_argument("--mlp-units", type=int, default=512, help="units in each hidden layer of the MLP nets")
    p.add_argument("--clip", type=float, default=0.01, help="c: critic weights are clipped to [-c, c]")
    p.add_argument("--n-critic", type=int, default=5, help="critic steps per G iteration (Algorithm 1)")
    p.add_argument("--boost-critic", action=argparse.BooleanOptionalAction, default=True,
                   help=f"{BOOST_ITERS} critic steps for the first {BOOST_FIRST} G iterations and every "
                        f"{BOOST_EVERY}th (official code)")
    p.add_argument("--lr", type=float, default=5e-5, help="RMSProp learning rate (critic and G)")
    runlib.add_args(p, dataset="cifar10", image_size=64, batch_size=64, steps=100_000, log_every=100,
                    sample_every=1000, ckpt_every=5000, eval_every=10000, eval_samples=10000, metrics="fid,is",
                    digits=True)
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 8, "g_width": 4, "d_width": 4, "mlp_units": 16, "z_dim": 8,
        "boost_critic": False}, defaults=lambda a: {
            **({"arch": "mlp"} if a.dataset in TOYS else {}),
            **({"eval_samples": 50000} if a.sample and a.eval else {})})   # --sample --eval: 50k samples
    if args.clip <= 0 or args.n_critic < 1:
        raise runlib.UsageError("--clip must be > 0 and --n-critic >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Models (official models/dcgan.py and models/mlp.py)
# ------------------------------------------------------------------------------------------------

class DCGANGenerator(nn.Module):
    """z → 4x4 (ngf·size/8 channels) → ... → size x size, halving the channels at each doubling."""

    def __init__(self, z_dim, channels, size, ngf, batchnorm=True):
        super().__init__()
        width = ngf * size // 8
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        layers = [nn.ConvTranspose2d(z_dim, width, 4, 1, 0, bias=False), norm(width), nn.ReLU()]
        res = 4
        while res < size // 2:
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), norm(width // 2), nn.ReLU()]
            width, res = width // 2, res * 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z[:, :, None, None])


class DCGANCritic(nn.Module):
    """size x size → strided 4x4 convs doubling the channels down to 4x4 → 4x4 conv → one score."""

    def __init__(self, channels, size, ndf):
        super().__init__()
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        width, res = ndf, size // 2
        while res > 4:
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2)]
            width, res = width * 2, res // 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))   # no sigmoid: f(x) is any real number
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


def dcgan_init_(module):
    """Official weights_init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class MLPGenerator(nn.Module):
    """z → 3 hidden ReLU layers → data (linear output), i.e. four linear layers."""

    def __init__(self, z_dim, shape, units):
        super().__init__()
        self.shape = tuple(shape)
        self.net = nn.Sequential(nn.Linear(z_dim, units), nn.ReLU(), nn.Linear(units, units), nn.ReLU(),
                                 nn.Linear(units, units), nn.ReLU(), nn.Linear(units, math.prod(self.shape)))

    def forward(self, z):
        return self.net(z).view(-1, *self.shape)


class MLPCritic(nn.Module):
    def __init__(self, shape, units):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), units), nn.ReLU(),
                                 nn.Linear(units, units), nn.ReLU(), nn.Linear(units, units), nn.ReLU(),
                                 nn.Linear(units, 1))

    def forward(self, x):
        return self.net(x).flatten()


def check_shape(arch, shape):
    """UsageError for network/data combinations that cannot be built."""
    if len(shape) == 1 and arch != "mlp":
        raise runlib.UsageError(f"--arch {arch} needs images; the 2D toys use --arch mlp")
    if len(shape) == 3 and arch in CONV_ARCHS:
        size = shape[-1]
        if size < 8 or size & (size - 1) or shape[-2] != size:
            raise runlib.UsageError(f"the DCGAN nets need a square power-of-two image size >= 8, got --image-size {size}")


def build_generator(args, shape):
    if args.arch in ("mlp-g", "mlp"):
        return MLPGenerator(args.z_dim, shape, args.mlp_units)
    G = DCGANGenerator(args.z_dim, shape[0], shape[-1], args.g_width, batchnorm=args.arch != "nobn")
    dcgan_init_(G)
    return G


def build_critic(args, shape):
    if args.arch == "mlp":
        D = MLPCritic(shape, args.mlp_units)      # official: default (PyTorch) init for the MLP critic
    else:
        D = DCGANCritic(shape[0], shape[-1], args.d_width)
        dcgan_init_(D)
    clip_weights_(D, args.clip)
    return D


def sample_noise(n, z_dim, device, generator=None):
    return torch.randn(n, z_dim, device=device, generator=generator)


# ------------------------------------------------------------------------------------------------
# Losses and the Lipschitz constraint
# ------------------------------------------------------------------------------------------------

def critic_loss(real_scores, fake_scores):
    """Algorithm 1, line 5, as a loss to minimise: E f(G(z)) − E f(x). Its negative, E f(x) − E f(G(z)),
    is the critic's estimate of W(P_r, P_θ) (times the Lipschitz constant K)."""
    return fake_scores.mean() - real_scores.mean()


def generator_loss(fake_scores):
    """Algorithm 1, lines 10-11: G descends −E f(G(z))."""
    return -fake_scores.mean()


@torch.no_grad()
def clip_weights_(critic, c):
    """Algorithm 1, line 7: w ← clip(w, −c, c) for every critic parameter."""
    for p in critic.parameters():
        p.clamp_(-c, c)


def critic_iters(step, args):
    """Critic steps before G iteration `step` (1-based). The official code counts finished G iterations
    (gen_iterations = step − 1) and uses 100 while it is < 25 or a multiple of 500."""
    done = step - 1
    if args.boost_critic and (done < BOOST_FIRST or done % BOOST_EVERY == 0):
        return BOOST_ITERS
    return args.n_critic


def critic_step(G, D, d_raw, opt_d, x, z, clip, autocast):
    """One critic update followed by weight clipping. Returns the critic loss (a tensor)."""
    with autocast:
        with torch.no_grad():
            fake = G(z)
        loss = critic_loss(D(x), D(fake))
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    clip_weights_(d_raw, clip)
    return loss


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(G, n, z_dim, device, batch=500, generator=None):
    return torch.cat([G(sample_noise(min(batch, n - i), z_dim, device, generator)) for i in range(0, n, batch)])


def evaluate(G, args, device, data, real_stats, clf=None):
    """Mode coverage (PacGAN protocol) on the 2D toys; --metrics (FID, IS, ...; on digits cfid, modes with
    the classifier `clf` of common/digits.py) on images."""
    out = {}
    G.eval()
    generate_fn = lambda b: G(sample_noise(b, args.z_dim, device)).clamp(-1, 1)  # noqa: E731
    if data.kind == "toy":
        result = metrics.mode_coverage(generate(G, 2500, args.z_dim, device), data.centers, data.std)
        out = {"metric/modes": result["modes"], "metric/hq": result["hq"]}
    elif args.metrics:
        out = metrics.evaluate(generate_fn, args.eval_samples,
                               real_stats, device, metrics=args.metrics, weights=args.inception_weights)
    if clf is not None:
        out.update(digits.evaluate(clf, generate_fn, args.eval_samples, data, args.digit_metrics))
    G.train()
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train(args):
    data = datasets.load(args)
    check_shape(args.arch, data.shape)
    if data.kind == "image" and args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    real_stats = None
    if data.kind == "image" and args.metrics:
        real_stats = metrics.reference_stats(data, args.data_root, device, weights=args.inception_weights)

    conv = args.arch != "mlp"
    G = r.prepare(build_generator(args, data.shape), channels_last=conv)
    D = r.prepare(build_critic(args, data.shape), channels_last=conv)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    opt_g = torch.optim.RMSprop(G.parameters(), lr=args.lr, foreach=True)
    opt_d = torch.optim.RMSprop(D.parameters(), lr=args.lr, foreach=True)

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    batches = datasets.iterate(data, args.batch_size // r.world_size, device,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed_z = sample_noise(64, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            if data.kind != "toy":
                return {"samples": (g_raw(fixed_z), 8)}
            r.scatter("samples", generate(g_raw, 2500, args.z_dim, device), step,
                      real=data.centers, lim=data.centers.abs().max().item() * 1.5)

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()}, "data_shape": list(data.shape)}

    b = args.batch_size // r.world_size
    step = start
    for step in range(start + 1, args.steps + 1):
        # n_critic (or 100) critic steps, each followed by clipping (Algorithm 1, lines 2-8)
        n_critic = critic_iters(step, args)
        for _ in range(n_critic):
            x, _ = next(batches)
            loss_d = critic_step(G, D, d_raw, opt_d, x, sample_noise(b, args.z_dim, device), args.clip, r.autocast())

        # one G step (lines 9-11); D's gradients from it are discarded by the next zero_grad
        with r.autocast():
            loss_g = generator_loss(D(G(sample_noise(b, args.z_dim, device))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        scalars = {"loss/D": loss_d, "loss/G": loss_g, "loss/W_estimate": -loss_d,  # W ≈ −L_D (Sec. 4.2)
                   "train/critic_iters": n_critic}
        if r.end_step(step, scalars, samples=samples, state=state,
                      evaluate=lambda: evaluate(g_raw, args, device, data, real_stats, clf)):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    shape = state["data_shape"]
    G = build_generator(targs, shape)
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    if len(shape) == 1:
        points = G(sample_noise(2500, targs.z_dim, "cpu", g).to(device))
        paths = runlib.write_samples(out, step, {"samples": runlib.scatter_image(points)[None]}, (0, 1), nrow=1)
        return {**paths, **score_checkpoint(G, args, targs, device)}
    grid = G(sample_noise(100, targs.z_dim, "cpu", g).to(device))
    # interpolation strip: 8 rows, each a straight line in z between two random codes
    line = runlib.latent_walks(lambda n: sample_noise(n, targs.z_dim, "cpu", g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": G(line)})
    paths.update(metrics.export_samples(args, out, step, lambda n: G(sample_noise(n, targs.z_dim, device))))
    return {**paths, **score_checkpoint(G, args, targs, device)}


def score_checkpoint(G, args, targs, device):
    """With --eval: the evaluation of training (mode coverage, or --metrics on --eval-samples samples)."""
    if not getattr(args, "eval", False):
        return {}
    data = datasets.load(targs)
    real = None
    if data.kind == "image" and args.metrics:
        real = metrics.reference_stats(data, targs.data_root, device, weights=args.inception_weights)
    clf = digits.prepare(args.digit_metrics, data, targs.data_root)
    eval_args = argparse.Namespace(**{**vars(targs), "metrics": args.metrics, "eval_samples": args.eval_samples,
                                      "inception_weights": args.inception_weights, "digit_metrics": args.digit_metrics})
    scores = evaluate(G, eval_args, device, data, real, clf.to(device) if clf is not None else None)
    print(" ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return scores


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
