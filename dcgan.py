"""Unsupervised Representation Learning with Deep Convolutional Generative Adversarial Networks (DCGAN) —
Radford, Metz, Chintala, 2015. arXiv:1511.06434.

The idea: a set of architecture rules under which GANs of all-convolutional networks train stably
(Sec. 3): strided convolutions instead of pooling (fractionally-strided in G), batch normalisation in
both nets (except G's output and D's input layer), no fully connected hidden layers, ReLU in G with tanh
on the output, LeakyReLU (slope 0.2) in D. The loss is the GAN game of Goodfellow et al. (2014):

    D minimises  −E_x[log D(x)] − E_z[log(1 − D(G(z)))]     (binary cross-entropy, targets 1 / 0)
    G minimises  −E_z[log D(G(z))]                          (the non-saturating generator loss)

The paper's 64x64 nets (Fig. 1; the official code's faces/train_uncond_dcgan.py):
    G: z (100) ~ U[−1, 1] → project & reshape 4x4x1024 (BN, ReLU) → 8x8x512 → 16x16x256 → 32x32x128
       (fractionally-strided 5x5 convs, stride 2, BN, ReLU) → 64x64xC (tanh, no BN)
    D: 64x64xC → 32x32x128 (strided 5x5 conv, LeakyReLU 0.2, no BN) → 16x16x256 → 8x8x512 → 4x4x1024
       (BN, LeakyReLU) → flatten → 1 logit (D(x) = sigmoid(logit))
    Weights ~ N(0, 0.02), BN scales ~ N(1, 0.02); no biases (BN's shift replaces them).
    Adam lr 2e-4, β = (0.5, 0.999), batch 128, weight decay 1e-5 (official code).
Other image sizes 2^k (k ≥ 4) add or remove up/down layers: G starts at 4x4 with
width · 2^(n − 1) channels for n = log2(size) − 2 up-sampling layers (size 32 → 4x4x512).

Default data: CIFAR-10 upscaled to 64x64 (the paper trained on LSUN bedrooms, Imagenet-1k and a faces
set; it reports CIFAR-10 only as a feature-extraction benchmark). One step is one D update and one G
update on a batch of 128; --steps 9750 = 25 epochs of CIFAR-10's 390 full batches, the official
faces run's length (niter = 25).

Evaluation: the paper scores DCGAN only through its features (Tables 1–2). Logged here: FID and
Inception Score on --eval-samples samples (common.metrics, `--metrics`, needs the FID Inception weights;
`--metrics none` trains without them); others report for DCGAN on CIFAR-10 at 32x32 IS 6.16 ± .07
(WGAN-GP, Table 3) and FID ≈ 48 (StudioGAN). The scores are computed at the training resolution:
at the default 64x64 they are NOT comparable with those 32x32 numbers (Inception sees upsampled
64x64 images); train with `--image-size 32` (the same nets with one layer fewer) to compare.
`--sample CKPT --eval` scores 50k samples, the cited numbers' count. And the official code's nearest-neighbour distance
(metric/nnd, lower is better, no weights needed): the mean Euclidean distance in [−1, 1] pixel space
from each of --eval-samples held-out real images (the test split when the dataset has one, else the
first training images, as the code did) to the closest of --eval-samples generated images.

Usage:
    python dcgan.py --cuda                                    # CIFAR-10 at 64x64 (downloads CIFAR-10)
    python dcgan.py --dataset celeba --cuda                   # faces, 64x64
    # a quick CPU run (digit-like samples after a few minutes on one core), without Inception metrics:
    python dcgan.py --dataset mnist --image-size 32 --g-width 32 --d-width 32 --batch-size 64 --steps 600 --metrics none
    python dcgan.py --sample runs/dcgan/cifar10-.../ckpt.pt [--eval]   # a grid, latent walks (FID / IS)

Differences from the paper:
- Data: CIFAR-10 resized from 32x32 to 64x64 by default instead of LSUN / Imagenet-1k / faces (all
  three work via --dataset lsun:bedroom, an image folder, or celeba).
- Training length: the paper gives none for these sets; --steps defaults to 25 epochs of CIFAR-10
  (the official faces run's niter = 25).
- D and G are updated in turn on every step (D first), each with its own noise batch; the official code
  alternated whole minibatches between them (one update per minibatch, k = 1).
- Weight decay 1e-5 on all parameters (the official code's L2 regulariser, not in the paper text).
- Batch norm uses PyTorch's ε = 1e-5 (official 1e-8). Samples and the evaluation use G in eval mode
  (BN running averages); the official code always normalised with the statistics of the current batch.
- --kernel-size 4 (padding 1) gives the 4x4 kernels of common PyTorch ports; the default 5 (padding 2,
  output padding 1 in G) is the paper's Fig. 1 and the official code.
- The paper's own evaluations (L2-SVM on D's features, Tables 1–2; vector arithmetic, Sec. 6) are not
  reproduced; FID / IS and the official code's nearest-neighbour distance are logged instead.
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

SCRIPT = "dcgan"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DCGAN (Radford, Metz, Chintala 2015)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--z-dim", type=int, default=100, help="noise dimension, z ~ U[-1, 1]")
    p.add_argument("--g-width", type=int, default=128,
                   help="channels of G's last hidden layer; doubled per layer towards the 4x4 start")
    p.add_argument("--d-width", type=int, default=128, help="channels of D's first layer; doubled per layer")
    p.add_argument("--kernel-size", type=int, choices=[4, 5], default=5,
                   help="(fractionally-)strided conv kernel: 5 as in the paper, 4 as in many ports")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (G and D)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="L2 penalty on all weights (official code)")
    runlib.add_args(p, dataset="cifar10", image_size=64, batch_size=128, steps=9750, log_every=100,
                    sample_every=500, ckpt_every=1000, eval_every=0, eval_samples=10000, metrics="fid,is",
                    digits=True)
    return runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 16, "g_width": 8, "d_width": 8},
        defaults=lambda a: {"eval_samples": 50000} if a.sample and a.eval else {})   # --sample --eval: the 50k samples of the IS / FID numbers cited


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def num_layers(image_size):
    """Number of stride-2 layers between 4x4 and image_size (4 for 64x64); ValueError if impossible."""
    n = int(round(math.log2(image_size))) - 2 if image_size > 0 else -1
    if image_size < 16 or 2 ** (n + 2) != image_size:
        raise ValueError(f"dcgan.py makes square images whose side is a power of two, at least 16 "
                         f"(16, 32, 64, 128, ...); got --image-size {image_size}")
    return n


def _padding(kernel):
    """Padding (and G's output padding) that make a stride-2 conv exactly halve / double the size."""
    return (kernel - 1) // 2, kernel % 2


def init_weights(module):
    """Sec. 4: weights ~ N(0, 0.02); BN scales ~ N(1, 0.02) and shifts 0 (official code)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z → project & reshape to 4x4 → n fractionally-strided convs, each doubling the size (Fig. 1)."""

    def __init__(self, z_dim, width, shape, kernel=5):
        super().__init__()
        channels, size = shape[0], shape[1]
        n = num_layers(size)
        c = width * 2 ** (n - 1)  # 1024 at 4x4 for 64x64 images and width 128
        self.start = (c, 4, 4)
        # "project and reshape": a linear map without bias, batch-normalised per unit (official code)
        self.project = nn.Sequential(nn.Linear(z_dim, c * 16, bias=False), nn.BatchNorm1d(c * 16), nn.ReLU())
        pad, out_pad = _padding(kernel)
        layers = []
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, kernel, 2, pad, out_pad, bias=False),
                       nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, kernel, 2, pad, out_pad, bias=False), nn.Tanh()]  # no BN
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z):
        return self.net(self.project(z).view(-1, *self.start))


class Discriminator(nn.Module):
    """n strided convs, each halving the size, down to 4x4; then one linear output. Returns the logit
    of D(x) (the sigmoid lives in the loss, binary_cross_entropy_with_logits)."""

    def __init__(self, width, shape, kernel=5):
        super().__init__()
        channels, size = shape[0], shape[1]
        n = num_layers(size)
        pad, _ = _padding(kernel)
        c = width
        layers = [nn.Conv2d(channels, c, kernel, 2, pad, bias=False), nn.LeakyReLU(0.2)]  # no BN on the input layer
        for _ in range(n - 1):
            layers += [nn.Conv2d(c, c * 2, kernel, 2, pad, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(c * 16, 1, bias=False)  # the 4x4xc features → 1, no hidden FC layer
        init_weights(self)

    def forward(self, x):
        return self.out(self.net(x).flatten(1)).squeeze(1)


def sample_noise(n, z_dim, device, generator=None):
    """z ~ U[−1, 1]^z_dim (Fig. 1: "a 100 dimensional uniform distribution Z")."""
    return torch.rand(n, z_dim, device=device, generator=generator) * 2 - 1


# ------------------------------------------------------------------------------------------------
# Losses (on D's logits l, D = sigmoid(l))
# ------------------------------------------------------------------------------------------------

def d_loss(real_logits, fake_logits):
    """Binary cross-entropy, data labelled 1 and samples 0: −E log D(x) − E log(1 − D(G(z)))."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits):
    """Non-saturating generator loss: samples labelled 1, i.e. −E log D(G(z))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

def held_out_images(args, data, n):
    """Up to n real images (uint8 or [0, 1] float, CPU) to compare samples with: the test split of an
    in-memory dataset, else the first training images (as the official code's validation set)."""
    if args.dataset in datasets.IN_MEMORY:
        return datasets.load(args, split="test").images[:n]
    if data.images is not None:
        return data.images[:n]
    return torch.stack([data.dataset[i][0] for i in range(min(n, len(data.dataset)))])


def to_unit_range(images):
    """uint8 [0, 255] or float [0, 1] images → float in [−1, 1], the range of G's tanh."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return x * 2 - 1


@torch.no_grad()
def nearest_neighbour_distance(real, fake, batch=500):
    """Mean over the real images of the Euclidean distance to the closest fake one (official nnd_score)."""
    real, fake = real.flatten(1).float(), fake.flatten(1).float()
    return torch.cat([torch.cdist(real[i:i + batch], fake).amin(1) for i in range(0, len(real), batch)]).mean()


@torch.no_grad()
def generate(G, n, args, device, batch=500, generator=None):
    return torch.cat([G(sample_noise(min(batch, n - i), args.z_dim, device, generator)) for i in range(0, n, batch)])


def evaluate(G, args, device, held, real_stats, data=None, clf=None):
    G.eval()
    fake = generate(G, args.eval_samples, args, device)
    out = {"metric/nnd": nearest_neighbour_distance(to_unit_range(held).to(device), fake)}
    if clf is not None:  # --metrics cfid, modes: on a digit classifier (common/digits.py)
        out.update(digits.score(clf, fake, data, args.digit_metrics))
    if args.metrics:
        out.update(metrics.evaluate(lambda b: G(sample_noise(b, args.z_dim, device)), args.eval_samples,
                                    real_stats, device, metrics=args.metrics, weights=args.inception_weights))
    G.train()
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, shape):
    return (Generator(args.z_dim, args.g_width, shape, args.kernel_size),
            Discriminator(args.d_width, shape, args.kernel_size))


def train(args):
    with runlib.as_usage_error():
        num_layers(args.image_size)  # an impossible size fails before any data is read
    data = datasets.load(args)
    if data.kind != "image":
        raise runlib.UsageError(f"dcgan.py trains convolutional nets on images; {args.dataset} is 2D toy data "
                                "(try gan.py or wgan_gp.py)")
    held = held_out_images(args, data, args.eval_samples)
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    real_stats = None
    if args.metrics:  # Inception statistics of the training images (computed once, cached under --data-root)
        real_stats = metrics.reference_stats(data, args.data_root, device, weights=args.inception_weights)

    # channels-last on the CPU as well (on CUDA prepare does it): oneDNN's NHWC kernels take 2-12% less time
    # per step for these nets, measured at 32 and 64 px
    G, D = (m.to(memory_format=torch.channels_last) for m in build(args, data.shape))
    G, D = r.prepare(G, channels_last=True), r.prepare(D, channels_last=True)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay, foreach=True)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)

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
        # D step: ascend log D(x) + log(1 − D(G(z)))
        x, _ = next(batches)
        with r.autocast():
            with torch.no_grad():
                fake = G(sample_noise(b, args.z_dim, device))
            loss_d = d_loss(D(x), D(fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # G step: ascend log D(G(z))
        with r.autocast():
            loss_g = g_loss(D(G(sample_noise(b, args.z_dim, device))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        if r.end_step(step, {"loss/D": loss_d, "loss/G": loss_g}, samples=samples, state=state,
                      evaluate=lambda: evaluate(g_raw, args, device, held, real_stats, data, clf)):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G = Generator(targs.z_dim, targs.g_width, state["data_shape"], targs.kernel_size)
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    grid = G(sample_noise(100, targs.z_dim, "cpu", g).to(device))
    # walks in the latent space (Sec. 6.1, Fig. 4): 8 rows, each a straight line between two random z
    line = runlib.latent_walks(lambda n: sample_noise(n, targs.z_dim, "cpu", g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": G(line)})
    result = dict(paths)
    # --eval: FID / IS (50k samples unless --eval-samples) and the digit metrics of the checkpoint
    result.update(metrics.score(args, targs, lambda n: G(sample_noise(n, targs.z_dim, device)), device, out=out, step=step))
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
