"""Progressive Growing of GANs for Improved Quality, Stability, and Variation (ProGAN) — Karras, Aila, Laine,
Lehtinen, 2017. arXiv:1710.10196.

The idea (Fig. 1): start G and D at 4x4 and add layers that double the resolution as training goes on,
so that the nets first learn the large-scale structure and then ever finer detail. A new block is faded in
(Fig. 2): during a fade-in phase its output is blended with the upsampled (G) / downsampled (D) output of
the previous resolution with a weight α that grows linearly from 0 to 1, then a stabilisation phase
trains the grown nets. The real images D sees are cross-faded between the two resolutions in the same way
(the official code's process_reals). Three further ideas (Sec. 3–4): a minibatch standard deviation
feature map in D's last block (variation), an equalized learning rate (weights N(0, 1) scaled at run time
by He's constant √(2 / fan_in), so that Adam's per-weight step sizes act alike on every layer) and a
pixelwise feature vector normalisation after each conv of G.

    Fig. 2 (fade-in, G):  x_r = (1 − α) · upsample(toRGB_{r/2}(h_{r/2})) + α · toRGB_r(block_r(h_{r/2}))
           (fade-in, D):  h_{r/2} = (1 − α) · fromRGB_{r/2}(avgpool(x)) + α · block_r(fromRGB_r(x))
    Eq. (Sec. 4.2):       b_{x,y} = a_{x,y} / √(mean_j (a^j_{x,y})² + ε),  ε = 1e-8          (pixel norm)
    Sec. 4.1:             ŵ_i = w_i · √(2 / fan_in), weights stored as w ~ N(0, 1)           (equalized lr)
                          (the paper's ŵ_i = w_i / c, with c = √(fan_in / 2) the reciprocal of He's std)
    Loss (Sec. A.1):      L_D = E D(G(z)) − E D(x) + λ/γ² E (‖∇_x̂ D(x̂)‖ − γ)² + ε_drift E D(x)²
                          L_G = −E D(G(z)),    λ = 10, ε_drift = 0.001

Architecture (Table 2; the official code's networks.py G_paper / D_paper, "fmap" = min(fmap_base / 2^s, fmap_max)
channels at stage s = log2(resolution) − 1):
    G: z (pixel-normalised) → dense to 4x4 (gain √2/4) → conv3 → [nearest ×2, conv3, conv3] per doubling;
       LeakyReLU 0.2 and pixel norm after every layer; toRGB = 1x1 conv (gain 1, linear) at each resolution.
    D: fromRGB = 1x1 conv + LeakyReLU at each resolution → [conv3, conv3, 2x2 average pool] per halving →
       minibatch stddev (group 4) → conv3 → dense (the paper's 4x4 conv) → dense 1 (gain 1). LeakyReLU 0.2.
    Biases are separate from the scaled weights and start at 0.

The schedule (train.py TrainingSchedule): each resolution gets a round of a stabilisation phase (stable_kimg
images) and a fade-in phase of the next resolution (fade_kimg images). With n images seen, k = floor(n /
(stable + fade)) rounds done and n_k = n − k (stable + fade) images into the current one, the level of detail
is lod = log2(target / initial) − k − max(n_k − stable, 0) / fade, and the nets run at resolution
target / 2^floor(lod) with α = 1 − frac(lod). It is re-evaluated every
minibatch_repeats = 4 minibatches; Adam's state (moments and step count) is reset whenever floor(lod) or
ceil(lod) changes, i.e. at the start of each fade-in and of each stabilisation. The minibatch size and
learning rate may depend on the resolution (--batch-schedule, --lr-schedule).

Defaults: the sizes of the paper's CIFAR-10 run (Sec. 6.5, Table 3: unsupervised IS 8.80 ± 0.05), from the
original release's config.py (Theano version, block "Section 6.5: CIFAR10 inception scores"): fmap_base
4096, fmap_max 128, latent 128, 400k images per stabilisation and per fade-in, minibatch 16 at all
resolutions, no learning-rate ramp-up, no mirroring, 20M images in total, and the WGAN-GP target γ = 750
(iwass_target; 1 elsewhere). Common to both config.py versions: Adam lr 1e-3, β = (0, 0.99), ε = 1e-8,
n_critic 1, λ 10, ε_drift 0.001, G EMA 0.999 (G_smoothing) used for samples and evaluation, Adam reset per
level of detail. The training mechanics are the TensorFlow release's (train.py, networks.py, loss.py):
alternating D and G steps, minibatch stddev over groups of 4, the schedule re-evaluated every 4 minibatches
(minibatch_repeats); the Theano CIFAR-10 run differed there (see the differences below). The TensorFlow
release's CelebA-HQ schedule (1 GPU): --stable-kimg 600 --fade-kimg 600 --batch-size 4
--batch-schedule 4:128,8:128,16:128,32:64,64:32,128:16,256:8,512:4 --lr-schedule 1024:0.0015
--fmap-base 8192 --fmap-max 512 --z-dim 512 --gp-target 1, with mirrored reals (--flip, the default on
celeba).

One step is one D update and one G update on one minibatch (D_repeats 1). --steps counts steps; the
schedule itself is in images seen (kimg, the papers' unit), logged as progress/kimg. The default
--steps 1250000 is the paper's 20000 kimg at minibatch 16.

Usage:
    python progan.py --cuda                                   # CIFAR-10, 4 → 32 (Table 3 setting)
    python progan.py --dataset celeba --image-size 128 --cuda --stable-kimg 600 --fade-kimg 600 \\
        --batch-size 4 --batch-schedule 4:128,8:128,16:128,32:64,64:32,128:16 --z-dim 512 \\
        --fmap-base 8192 --fmap-max 512 --gp-target 1 --steps 400000
    # a CPU run: MNIST grown 4 → 32 in ~15 minutes on one core (phases of 10k images, 100 kimg; a short EMA for
    # a short run), scored with the digit classifier every 10k images (classifier FID at the end of each stable
    # phase 1190 at 4 px, 657 at 8, 318 at 16; 93 at 32 px after its 10k-image fade-in and 40k stable images;
    # all ten digits from 16 px on):
    python progan.py --dataset mnist --image-size 32 --fmap-base 256 --fmap-max 32 --z-dim 32 --batch-size 16 \\
        --stable-kimg 10 --fade-kimg 10 --gp-target 1 --ema 0.99 --steps 6250 --metrics cfid --eval-every 625 \\
        --eval-samples 2000
    python progan.py --sample runs/progan/cifar10-.../ckpt.pt [--eval]   # at the resolution the run reached

Differences from the paper:
- The paper's phases are 800k images (CelebA-HQ, LSUN); the CIFAR-10 configuration of the authors' code
  uses 400k, the TensorFlow release 600k. Default here: 400k (the CIFAR-10 configuration).
- The CIFAR-10 run of Table 3 (the Theano code, separate_funcs=False) updated G and D simultaneously: one
  function computed both gradients on the same minibatch and fakes, with D's weights before its update, and
  applied both updates; its minibatch stddev was one value over the whole minibatch (mbstat_avg='all'), and
  the schedule was re-evaluated at every minibatch. Here, as in the TensorFlow release: a D step, then a G
  step on fresh latents against the updated D, the stddev over groups of 4, the schedule every 4 minibatches
  (--mbstd-group 16 --minibatch-repeats 1 give the Theano run's stddev and schedule; the simultaneous update
  is not offered).
- The nets run at the current resolution; the official code always worked at the target resolution
  (nearest-upscaled images, box-downscaled again inside D). The images D sees are identical; the one place
  where the size matters is the gradient penalty, whose norm is taken with respect to the target-resolution
  image as in the code: ‖∇‖ at resolution r times r / target (nearest upscaling by f divides the norm by f).
- Lower-resolution real images are box-filtered in float from the --image-size images; the code's
  dataset_tool stored each level rounded to uint8.
- Mirroring (--flip): on by default for celeba, as the CelebA-HQ and CelebA configs; the LSUN configs
  mirrored the 100k-image category subsets (TensorFlow release) but not the full bedroom and dog sets the
  Theano code used: off here unless --flip is given.
- The EMA of G is updated after each G step (the code updated it together with each D step, i.e. one step
  later; the same sequence of averages).
- G's upsampling + conv is written unfused (the TensorFlow release fuses them into one transposed conv,
  the same function). D's conv + downsampling follows the paper's Theano network (and the TensorFlow
  release's fused_scale=False): conv3, bias, LeakyReLU, then the 2x2 average pool. The TensorFlow release's
  default fused conv (fused_scale=True) pools before the bias and LeakyReLU, lrelu(avgpool(conv(x)) + b),
  which is a different function (the nonlinearity does not commute with the pool).
- --compile: α and the level are Python numbers, so torch.compile specialises on them and recompiles during
  fade-ins (falling back to eager at its recompile limit); the penalty's double backward runs uncompiled.
  Under torchrun the nets are wrapped with find_unused_parameters (the blocks not grown yet get no gradient).
- Evaluation: FID and IS through common.metrics on --eval-samples samples at the target resolution (the
  paper's Table 3 IS is over 50k samples: `--sample CKPT --eval`).
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "progan"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Progressive Growing of GANs (Karras et al. 2017)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--z-dim", type=int, default=128, help="latent size (CIFAR-10 config; 512 in the TF release)")
    p.add_argument("--fmap-base", type=int, default=4096, help="channels at stage s: min(fmap_base / 2^s, fmap_max)")
    p.add_argument("--fmap-max", type=int, default=128, help="maximum channels of any layer (512 in the TF release)")
    p.add_argument("--initial-resolution", type=int, default=4, help="resolution the growth starts at")
    p.add_argument("--stable-kimg", type=float, default=400, help="thousands of images per stabilisation phase")
    p.add_argument("--fade-kimg", type=float, default=400, help="thousands of images per fade-in phase")
    p.add_argument("--batch-schedule", default="",
                   help="per-resolution minibatch 'res:batch,...'; --batch-size elsewhere (config.py minibatch_dict)")
    p.add_argument("--lr-schedule", default="", help="per-resolution learning rate 'res:lr,...' (config.py G_lrate_dict)")
    p.add_argument("--minibatch-repeats", type=int, default=4, help="minibatches between schedule updates (train.py)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (G and D)")
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.99, help="Adam beta2")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    p.add_argument("--gp-lambda", type=float, default=10.0, help="WGAN-GP weight λ")
    p.add_argument("--gp-target", type=float, default=750.0,
                   help="WGAN-GP target gradient norm γ (750 in the CIFAR-10 config, 1 otherwise)")
    p.add_argument("--eps-drift", type=float, default=0.001, help="drift penalty ε_drift · E D(x)²")
    p.add_argument("--mbstd-group", type=int, default=4, help="minibatch standard deviation group size")
    p.add_argument("--ema", type=float, default=0.999, help="G EMA decay (G_smoothing)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror each real image left-right with probability 1/2 (the configs' mirror_augment) "
                        "(None: on for celeba as the CelebA(-HQ) configs, off otherwise)")
    runlib.add_args(p, dataset="cifar10", image_size=32, batch_size=16, steps=1_250_000, log_every=1000,
                    sample_every=10000, ckpt_every=10000, eval_every=0, eval_samples=10000, digits=True, metrics="fid,is")
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 16, "z_dim": 16, "fmap_base": 64, "fmap_max": 8, "steps": 6,
        "stable_kimg": 0.008, "fade_kimg": 0.016, "minibatch_repeats": 1, "gp_target": 1.0},
        defaults=lambda a: {"flip": a.dataset == "celeba"})
    try:
        args.batch_dict = parse_schedule(args.batch_schedule, int)
        args.lr_dict = parse_schedule(args.lr_schedule, float)
    except ValueError as e:
        raise runlib.UsageError(str(e)) from None
    return args


def parse_schedule(text, kind):
    """'4:128,8:64' → {4: 128, 8: 64}."""
    out = {}
    for item in filter(None, text.split(",")):
        try:
            res, value = item.split(":")
            out[int(res)] = kind(value)
        except ValueError:
            raise ValueError(f"a schedule is 'resolution:value,...', got {text!r}") from None
    return out


# ------------------------------------------------------------------------------------------------
# Building blocks (Sec. 4)
# ------------------------------------------------------------------------------------------------

class EqualizedLinear(nn.Module):
    """Sec. 4.1: weights stored as N(0, 1), multiplied at run time by He's constant gain / √fan_in."""

    def __init__(self, fan_in, out, gain=math.sqrt(2), bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, fan_in))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None
        self.scale = gain / math.sqrt(fan_in)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualizedConv2d(nn.Module):
    """A k×k 'same' convolution with the equalized learning rate of Sec. 4.1 (fan_in = in_channels · k²)."""

    def __init__(self, cin, cout, kernel, gain=math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = gain / math.sqrt(cin * kernel * kernel)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


def pixel_norm(x, eps=1e-8):
    """Sec. 4.2: b = a / √(mean over channels of a² + ε), at every pixel."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def minibatch_stddev(x, group_size=4):
    """Sec. 3: the standard deviation of each feature at each pixel over a group of samples, averaged over
    features and pixels, appended as one constant feature map. As networks.py, group g holds the samples
    n ≡ m (mod N / G) (the minibatch viewed as G × M)."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"the minibatch ({n}) must be divisible by the stddev group size ({g})")
    y = x.float().view(g, -1, c, h, w)
    y = (y - y.mean(0)).pow(2).mean(0).add(1e-8).sqrt()          # (M, C, H, W) std over the group
    y = y.mean(dim=(1, 2, 3)).to(x.dtype).view(-1, 1, 1, 1)      # (M, 1, 1, 1)
    return torch.cat([x, y.repeat(g, 1, h, w)], dim=1)


def upscale(x, factor=2):
    """Nearest-neighbour upsampling (networks.py upscale2d)."""
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def downscale(x, factor=2):
    """Box-filter downsampling (networks.py downscale2d)."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def lrelu(x):
    return F.leaky_relu(x, 0.2)


def num_levels(resolution, initial=4):
    """Blocks of the grown nets: 1 for 4x4, +1 per doubling. ValueError if not a power of two ≥ 4."""
    log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
    if resolution < 4 or 2 ** log2 != resolution:
        raise ValueError(f"the resolution must be a power of two, at least 4 (4, 8, ..., 1024); got {resolution}")
    if initial < 4 or 2 ** int(round(math.log2(initial))) != initial or initial > resolution:
        raise ValueError(f"the initial resolution must be a power of two between 4 and {resolution}; got {initial}")
    return log2 - 1


def feature_maps(resolution, fmap_base, fmap_max):
    """nf[k]: the channels of the layers at level k (resolution 4·2^k), min(fmap_base / 2^(k + 1), fmap_max)
    (Table 2; the code's nf(stage) at stage k + 1)."""
    return [min(int(fmap_base / 2 ** (k + 1)), fmap_max) for k in range(num_levels(resolution))]


# ------------------------------------------------------------------------------------------------
# Models (Fig. 1, Table 2)
# ------------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """G of Table 2, one block per resolution 4, 8, ..., resolution. forward(z, level, alpha) runs the
    blocks up to `level` (0 = 4x4) and fades the newest one in with weight alpha (Fig. 2)."""

    def __init__(self, z_dim, resolution, channels=3, fmap_base=8192, fmap_max=512):
        super().__init__()
        nf = feature_maps(resolution, fmap_base, fmap_max)
        self.z_dim, self.nf = z_dim, nf
        # 4x4: a dense layer (the paper's 4x4 "conv" on a 1x1 input; gain √2/4 as the code) + conv3
        self.dense = EqualizedLinear(z_dim, nf[0] * 16, gain=math.sqrt(2) / 4, bias=False)
        self.dense_bias = nn.Parameter(torch.zeros(nf[0]))
        self.blocks = nn.ModuleList([nn.ModuleList([EqualizedConv2d(nf[0], nf[0], 3)])])
        for k in range(1, len(nf)):  # [upsample, conv3, conv3] per doubling
            self.blocks.append(nn.ModuleList([EqualizedConv2d(nf[k - 1], nf[k], 3), EqualizedConv2d(nf[k], nf[k], 3)]))
        self.to_rgb = nn.ModuleList([EqualizedConv2d(c, channels, 1, gain=1) for c in nf])

    def features(self, z, level):
        """Hidden features at resolution 4·2^level (pixel norm after every layer, Sec. 4.2)."""
        x = self.dense(pixel_norm(z)).view(-1, self.nf[0], 4, 4) + self.dense_bias.view(1, -1, 1, 1)
        x = pixel_norm(lrelu(x))
        for k in range(level + 1):
            if k > 0:
                x = upscale(x)
            for conv in self.blocks[k]:
                x = pixel_norm(lrelu(conv(x)))
        return x

    def forward(self, z, level, alpha=1.0):
        if level == 0 or alpha >= 1:
            return self.to_rgb[level](self.features(z, level))
        h = self.features(z, level - 1)
        old = upscale(self.to_rgb[level - 1](h))
        x = upscale(h)
        for conv in self.blocks[level]:
            x = pixel_norm(lrelu(conv(x)))
        return torch.lerp(old, self.to_rgb[level](x), alpha)   # Fig. 2: (1 − α)·old + α·new


class Discriminator(nn.Module):
    """D of Table 2, mirroring G. forward(x, level, alpha) takes images at resolution 4·2^level."""

    def __init__(self, resolution, channels=3, fmap_base=8192, fmap_max=512, mbstd_group=4):
        super().__init__()
        nf = feature_maps(resolution, fmap_base, fmap_max)
        self.mbstd_group = mbstd_group
        self.from_rgb = nn.ModuleList([EqualizedConv2d(channels, c, 1) for c in nf])
        self.blocks = nn.ModuleList([nn.ModuleList()])  # level 0 is the final block below
        for k in range(1, len(nf)):  # [conv3, conv3, 2x2 average pool] per halving
            self.blocks.append(nn.ModuleList([EqualizedConv2d(nf[k], nf[k], 3), EqualizedConv2d(nf[k], nf[k - 1], 3)]))
        extra = 1 if mbstd_group > 1 else 0
        self.final_conv = EqualizedConv2d(nf[0] + extra, nf[0], 3)
        dense = min(fmap_base, fmap_max)                               # the code's nf(0)
        self.final_dense = EqualizedLinear(nf[0] * 16, dense)          # the paper's 4x4 conv
        self.out = EqualizedLinear(dense, 1, gain=1)

    def block(self, x, k):
        for conv in self.blocks[k]:
            x = lrelu(conv(x))
        return downscale(x)

    def forward(self, img, level, alpha=1.0):
        x = lrelu(self.from_rgb[level](img))
        if level > 0:
            x = self.block(x, level)
            if alpha < 1:  # Fig. 2: (1 − α)·fromRGB(avgpool(x)) + α·block(fromRGB(x))
                x = torch.lerp(lrelu(self.from_rgb[level - 1](downscale(img))), x, alpha)
        for k in range(level - 1, 0, -1):
            x = self.block(x, k)
        if self.mbstd_group > 1:
            x = minibatch_stddev(x, self.mbstd_group)
        x = lrelu(self.final_conv(x))
        x = lrelu(self.final_dense(x.flatten(1)))
        return self.out(x).squeeze(1)


def sample_noise(n, z_dim, device, generator=None):
    """z ~ N(0, I) (pixel-normalised inside G, i.e. on the unit hypersphere scaled by √z_dim)."""
    return torch.randn(n, z_dim, device=device, generator=generator)


# ------------------------------------------------------------------------------------------------
# The progressive schedule (train.py: TrainingSchedule, process_reals)
# ------------------------------------------------------------------------------------------------

def level_of_detail(nimg, resolution, initial, stable_img, fade_img):
    """lod after nimg images: log2(resolution / initial) at the start, −1 per round (a stabilisation phase
    then a fade-in phase), falling linearly during the fade-in phase; 0 at the target."""
    round_img = stable_img + fade_img
    rounds = nimg // round_img if round_img > 0 else 0
    lod = math.log2(resolution) - math.log2(initial) - rounds
    if fade_img > 0:
        lod -= max(nimg - rounds * round_img - stable_img, 0) / fade_img
    return max(lod, 0.0)


def nets_at(lod, resolution):
    """(level, resolution r of the nets, α) for a level of detail: r = target / 2^floor(lod), α = 1 − frac."""
    r = resolution >> int(math.floor(lod))
    return int(math.log2(r)) - 2, r, 1.0 - (lod - math.floor(lod))


def mirror(x):
    """mirror_augment: each image flipped left-right with probability ½."""
    flipped = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flipped, x.flip(3), x)


def process_reals(x, resolution, alpha):
    """Real images at the nets' resolution, cross-faded exactly as G's output (process_reals): box-filter
    the target-resolution x down to `resolution`, then (1 − α)·upsample(avgpool(x_r)) + α·x_r."""
    x = downscale(x, x.shape[-1] // resolution)
    if alpha < 1:
        x = torch.lerp(upscale(downscale(x)), x, alpha)
    return x


# ------------------------------------------------------------------------------------------------
# Losses (WGAN-GP + drift, Sec. A.1 and loss.py D_wgangp_acgan)
# ------------------------------------------------------------------------------------------------

def gradient_penalty(D, real, fake, level, alpha, lam, target, norm_scale=1.0):
    """λ/γ² E (‖∇_x̂ D(x̂)‖ − γ)², x̂ = real + u·(fake − real), u ~ U[0, 1] per sample. norm_scale = r / target
    resolution turns the gradient norm at resolution r into the code's norm at the target resolution."""
    u = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    mixed = torch.lerp(real.detach().float(), fake.detach().float(), u).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(mixed, level, alpha).sum(), mixed, create_graph=True)
    norm = grad.float().flatten(1).norm(dim=1) * norm_scale
    return lam / target ** 2 * (norm - target).pow(2).mean()


def d_loss(real_scores, fake_scores, penalty, eps_drift):
    """L_D = E D(G(z)) − E D(x) + penalty + ε_drift · E D(x)²."""
    return fake_scores.mean() - real_scores.mean() + penalty + eps_drift * real_scores.pow(2).mean()


def g_loss(fake_scores):
    """L_G = −E D(G(z))."""
    return -fake_scores.mean()


@torch.no_grad()
def update_average(avg, model, beta):
    """G EMA: θ̄ ← β θ̄ + (1 − β) θ (non-trainable buffers are copied)."""
    for a, p in zip(avg.parameters(), model.parameters()):
        a.lerp_(p, 1 - beta)
    for a, b in zip(avg.buffers(), model.buffers()):
        a.copy_(b)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, shape):
    G = Generator(args.z_dim, shape[1], shape[0], args.fmap_base, args.fmap_max)
    D = Discriminator(shape[1], shape[0], args.fmap_base, args.fmap_max, args.mbstd_group)
    return G, D


def check(args):
    """Start-up checks (before anything is read or written)."""
    try:
        num_levels(args.image_size, args.initial_resolution)
    except ValueError as e:
        raise runlib.UsageError(f"--image-size/--initial-resolution: {e}") from None
    for name in ("fmap_base", "fmap_max", "z_dim", "minibatch_repeats", "mbstd_group"):
        if getattr(args, name) < 1:
            raise runlib.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.stable_kimg < 0 or args.fade_kimg < 0:
        raise runlib.UsageError("--stable-kimg and --fade-kimg must be >= 0")
    if any(r > args.image_size or r < 4 or r & (r - 1) for r in {**args.batch_dict, **args.lr_dict}):
        raise runlib.UsageError("--batch-schedule/--lr-schedule name resolutions 4, 8, ... up to --image-size")
    for b in {args.batch_size, *args.batch_dict.values()}:
        g = min(args.mbstd_group, b)
        if b % g:
            raise runlib.UsageError(f"minibatch {b} is not divisible by the stddev group size {g}")
    native = datasets.native_side(args.dataset)
    if native and args.image_size > 2 ** math.ceil(math.log2(native)):
        what = (f"{args.dataset} images are {native}x{native}" if args.dataset in datasets.NATIVE_SIDE else
                f"the images in {args.dataset} are {native} pixels on their shorter side")
        raise runlib.UsageError(f"{what}: growing to {args.image_size} would only learn upsampled images "
                                f"(use --image-size {2 ** math.ceil(math.log2(native))})")


def prepare(r, model, args):
    """r.prepare, except that under torchrun DDP must be told that the blocks not grown yet get no gradient."""
    model = r.prepare(model, channels_last=True, compile=False, ddp=False)
    if r.distributed:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[r.device] if r.cuda else None, find_unused_parameters=True)
    return torch.compile(model) if args.compile else model


def train(args):
    check(args)
    data = datasets.load(args)
    if data.kind != "image":
        raise runlib.UsageError(f"progan.py trains on images; {args.dataset} is 2D toy data")
    R, initial = args.image_size, args.initial_resolution
    largest = max([args.batch_size, *args.batch_dict.values()])
    if len(data) < largest:
        raise runlib.UsageError(f"{args.dataset} holds {len(data)} images, fewer than one minibatch ({largest})")
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    real_stats = None
    if args.metrics and "fid" in args.metrics:
        real_stats = metrics.reference_stats(data, args.data_root, device, weights=args.inception_weights)

    G, D = build(args, data.shape)
    Gs = copy.deepcopy(G).requires_grad_(False)   # the EMA of G: samples and evaluation
    G, D = prepare(r, G, args), prepare(r, D, args)
    Gs = Gs.to(device)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    d_penalty = getattr(D, "_orig_mod", D)   # the penalty's double backward runs uncompiled

    def adam(model):  # created afresh at each new level of detail (train.py reset_opt_for_new_lod)
        return torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                eps=args.adam_eps, foreach=True)
    opt_g, opt_d = adam(G), adam(D)

    stable_img, fade_img = round(args.stable_kimg * 1000), round(args.fade_kimg * 1000)
    nimg, lod, prev_lod = 0, None, -1.0
    start = r.resume({"G": g_raw, "D": d_raw, "Gs": Gs}, {"G": opt_g, "D": opt_d})
    if start:
        schedule = r.resume_state["schedule"]
        nimg, lod, prev_lod = schedule["nimg"], schedule["lod"], schedule["prev_lod"]
    iterators = {}

    def batches(b):  # one infinite iterator per minibatch size of the schedule
        if b not in iterators:
            iterators[b] = datasets.iterate(data, b // r.world_size, device, rank=r.rank,
                                            world_size=r.world_size, workers=args.workers)
        return iterators[b]
    fixed_z = sample_noise(64, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    r.restore_rng()

    def snapshot(tag, level, res, alpha, step, to_target=True):
        with r.side_rng(), torch.no_grad():
            x = Gs(fixed_z, level, alpha)
            r.images(tag, upscale(x, R // res) if to_target else x, step, nrow=8)

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict(), "Gs": Gs.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                "schedule": {"nimg": nimg, "lod": lod, "prev_lod": prev_lod, "level": level,
                          "resolution": res, "alpha": alpha},
                "data_shape": list(data.shape)}

    step = start
    for step in range(start + 1, args.steps + 1):
        if (step - 1) % args.minibatch_repeats == 0 or lod is None:   # train.py: the schedule, every 4 minibatches
            lod = level_of_detail(nimg, R, initial, stable_img, fade_img)
            if math.floor(lod) != math.floor(prev_lod) or math.ceil(lod) != math.ceil(prev_lod):
                if prev_lod >= 0 and prev_lod == math.floor(prev_lod):  # a stabilisation phase ends
                    pl, pres, _ = nets_at(prev_lod, R)
                    snapshot(f"res{pres}", pl, pres, 1.0, step - 1, to_target=False)
                opt_g, opt_d = adam(G), adam(D)                         # reset Adam at each new lod
            prev_lod = lod
        level, res, alpha = nets_at(lod, R)
        b = args.batch_dict.get(res, args.batch_size)
        lr = args.lr_dict.get(res, args.lr)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        bl = b // r.world_size

        # D step: L_D = E D(G(z)) − E D(x) + λ/γ² (‖∇D(x̂)‖ − γ)² + ε_drift D(x)²
        x, _ = next(batches(b))
        x = process_reals(mirror(x) if args.flip else x, res, alpha)
        with r.autocast():
            with torch.no_grad():
                fake = G(sample_noise(bl, args.z_dim, device), level, alpha)
            real_scores, fake_scores = D(x, level, alpha), D(fake, level, alpha)
            penalty = gradient_penalty(d_penalty, x, fake, level, alpha, args.gp_lambda, args.gp_target, res / R)
            loss_d = d_loss(real_scores, fake_scores, penalty, args.eps_drift)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        nimg += b

        # G step: L_G = −E D(G(z))
        with r.autocast():
            loss_g = g_loss(D(G(sample_noise(bl, args.z_dim, device), level, alpha), level, alpha))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        update_average(Gs, g_raw, args.ema)

        scalars = {"loss/D": loss_d, "loss/G": loss_g, "loss/gp": penalty,
                   "train/wasserstein": real_scores.mean() - fake_scores.mean(), "progress/kimg": nimg / 1000,
                   "progress/resolution": res, "progress/alpha": alpha, "progress/lod": lod, "progress/batch": b}
        if r.end_step(step, scalars, samples=lambda: snapshot("samples", level, res, alpha, step), state=state,
                      evaluate=(lambda: evaluate(Gs, level, res, alpha, R, args, device, real_stats, data, clf))
                      if args.metrics or clf is not None else None):
            break
    level, res, alpha = nets_at(lod, R)
    return r.finish(step, kimg=nimg / 1000, resolution=res, alpha=alpha)


def evaluate(Gs, level, res, alpha, R, args, device, real_stats, data=None, clf=None):
    """FID / IS of the EMA generator's samples, nearest-upscaled to the target resolution as the code did."""
    def generate(n):
        return upscale(Gs(sample_noise(n, args.z_dim, device), level, alpha), R // res)
    scores = {}
    if args.metrics:
        scores = metrics.evaluate(generate, args.eval_samples, real_stats, device, metrics=args.metrics,
                                  weights=args.inception_weights)
    if clf is not None:   # --metrics cfid: on digits, the classifier of common/digits.py
        scores.update(digits.evaluate(clf, generate, args.eval_samples, data, args.digit_metrics))
    return scores


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    shape = state["data_shape"]
    Gs = Generator(targs.z_dim, shape[1], shape[0], targs.fmap_base, targs.fmap_max)
    Gs.load_state_dict(state["models"]["Gs"])
    Gs.to(device).eval()
    schedule = state["schedule"]
    level, res, alpha = schedule["level"], schedule["resolution"], schedule["alpha"]
    print(f"checkpoint at {schedule['nimg'] / 1000:g} kimg: {res}x{res}, alpha {alpha:.3f}")
    g = torch.Generator().manual_seed(args.seed)
    grid = Gs(sample_noise(100, targs.z_dim, "cpu", g).to(device), level, alpha)
    ends = sample_noise(16, targs.z_dim, "cpu", g).view(8, 2, -1)
    t = torch.linspace(0, 1, 10)[None, :, None]
    line = (ends[:, :1] * (1 - t) + ends[:, 1:] * t).flatten(0, 1).to(device)   # straight lines in z
    result = dict(runlib.write_samples(out, state["step"], {"samples": grid, "interpolation": Gs(line, level, alpha)}))
    result.update(resolution=res, alpha=alpha)
    R = shape[1]   # --eval: samples at the checkpoint's resolution, upscaled to the data's
    result.update(metrics.score(args, targs, lambda n: upscale(Gs(sample_noise(n, targs.z_dim, device), level, alpha),
                                                               R // res), device, out=out, step=state["step"]))
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
