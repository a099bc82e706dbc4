"""A Style-Based Generator Architecture for Generative Adversarial Networks (StyleGAN) — Karras, Laine, Aila,
2018. arXiv:1812.04948.

The idea (Fig. 1b): instead of feeding the latent code to the first layer, a mapping network f turns
z ∈ Z into an intermediate latent w ∈ W, and learned affine maps A turn w into a style y = (y_s, y_b) per
layer that modulates the normalised features of the synthesis network g (adaptive instance normalisation).
g starts from a learned constant; per-pixel noise with learned per-channel scales B adds stochastic
detail (Sec. 3.2, Fig. 4). Mixing regularisation (Sec. 3.1) switches from one w to another at a random
layer during training, so that neighbouring styles are not correlated; the truncation trick (Sec. 3.4)
pulls w towards its running mean w̄ at sampling time.

    Fig. 1b:    w = f(z),  f = 8 FC layers (LeakyReLU 0.2, lr multiplier 0.01), z pixel-normalised
    Eq. 1:      AdaIN(x_i, y) = y_{s,i} (x_i − μ(x_i)) / σ(x_i) + y_{b,i},   y = A(w)
                (the code: x_i · (1 + y_{s,i}) + y_{b,i} after instance norm, so y_s = 0 is the identity)
    Sec. 3.4:   w' = w̄ + ψ (w − w̄)   (ψ = 0.7 on the coarse layers 4²–32², i.e. the first 8; sampling only)
    Sec. 3.1:   with p = 0.9: w for layers < k, w₂ = f(z₂) from layer k on, k ~ U{1, ..., layers − 1}
    Loss (Sec. 4, the FFHQ configuration of the code's training/loss.py):
                L_D = E softplus(D(G(z))) + E softplus(−D(x)) + (γ/2) E ‖∇_x D(x)‖²,  γ = 10  (R1)
                L_G = E softplus(−D(G(z)))                                          (non-saturating)

Architecture (the code's training/networks_stylegan.py G_style / G_mapping / G_synthesis / D_basic; channels
min(fmap_base / 2^s, fmap_max) at stage s = log2(resolution) − 1):
    synthesis: constant 4x4 (ones) → [noise, bias, lrelu, instance norm, style] → conv3 → [...];
               per doubling: nearest ×2 → conv3 → [1 2 1] blur → [...] → conv3 → [...];
               toRGB 1x1 (gain 1) per resolution; 2 layers (styles) per resolution.
    noise:     x + B ⊙ n, n ~ N(0, 1) one value per pixel, B a learned per-channel scale initialised to 0.
    D:         ProGAN's D (fromRGB, [conv3, blur, conv3, 2x2 average pool] per halving, minibatch stddev
               (group 4), conv3, dense, dense 1) with the [1 2 1] blur before each downsampling conv.
    Every layer uses the equalized learning rate (weights N(0, 1/lrmul²) scaled at run time by
    lrmul · gain / √fan_in; biases scaled by lrmul), lrmul = 0.01 in the mapping network, 1 elsewhere.

Training (the code's train.py and training/training_loop.py): progressive growing as ProGAN (see progan.py:
the level-of-detail schedule re-evaluated every 4 minibatches, reals cross-faded as G's output, Adam reset
at each new level of detail), starting at 8x8, 600k images per stabilisation and per fade-in; minibatch
128 at 8–16 px, 64 at 32, 32 at 64, 16 at 128, 8 at 256, 4 at 512–1024 (1 GPU); lr 1e-3, rising to 1.5e-3
at 128, 2e-3 at 256, 3e-3 at 512–1024; Adam β = (0, 0.99), ε = 1e-8; G EMA with a half-life of 10k images
(β = 0.5^(minibatch / 10⁴)); w̄ tracked as w̄ ← 0.995 w̄ + 0.005 mean_batch(w) at every training pass of G;
style mixing p 0.9 (also in D's pass); 25M images in total; the FFHQ and CelebA-HQ configs mirror the reals
(mirror_augment: each image flipped left-right with probability ½, before the level-of-detail cross-fade),
the LSUN ones do not (--flip; on by default for celeba, which stands in for them).

One step is one D update and one G update on one minibatch; --steps counts steps and the schedule is in
images seen (kimg, logged as progress/kimg). The default --steps 720312 is 25000 kimg of the default 64x64
schedule (`steps_for_kimg`).

Usage:
    python stylegan.py --dataset celeba --cuda                   # CelebA 64x64 (the default)
    python stylegan.py --dataset ~/ffhq-thumbnails --image-size 128 --flip --cuda   # any image folder
    # a CPU run: MNIST grown 8 → 32 (phases of 10k images; EMA half-life 1k images; ~25 min on one core),
    # scored with the digit classifier per phase. Without style mixing: with the paper's p = 0.9 these tiny
    # nets mode-collapsed in such a short run (3 digits at 16 px), without it they cover all ten (docs/results.md)
    python stylegan.py --dataset mnist --image-size 32 --fmap-base 256 --fmap-max 32 --z-dim 32 --w-dim 32 \\
        --batch-size 16 --batch-schedule "" --stable-kimg 10 --fade-kimg 10 --ema-kimg 1 --steps 6250 \\
        --mixing-prob 0 --metrics cfid --eval-every 625 --eval-samples 2000
    python stylegan.py --sample runs/stylegan/celeba-.../ckpt.pt [--eval]
        # ψ = 1 and ψ = 0.7 grids, a truncation sweep (Fig. 8), style-mixing tables (Fig. 3), noise (Fig. 4);
        # with --eval --metrics cfid on digits also the figures' claims as numbers (see figure_claims)

Differences from the paper:
- Data: CelebA at 64x64 by default (FFHQ 1024 is not downloadable here; any folder works via --dataset, with
  --flip to mirror it as the FFHQ config does).
- The nets run at the current resolution instead of always at the target one; the R1 norm is taken as the
  code did, with respect to the target-resolution image (the squared norm at resolution r times (r/R)²).
- G's upsampling + conv and D's conv + downsampling are unfused (the code fuses them from 128 px on; same
  function). Lower-resolution reals are box-filtered in float from the --image-size images.
- The EMA of G is updated after each G step (the code: together with each D step).
- The figures of --sample are drawn without truncation except the ψ = 0.7 grid and the sweep; the paper's
  Fig. 3 uses FFHQ sources at 1024 px where coarse/middle/fine are 4²–8², 16²–32², 64²–1024²; here the
  ranges are cut at the resolution the checkpoint reached.
- --compile: α and the level are Python numbers, so torch.compile specialises on them and recompiles during
  fade-ins (falling back to eager at its recompile limit); the penalty's double backward runs uncompiled.
  Under torchrun the nets are wrapped with find_unused_parameters (the blocks not grown yet get no gradient).
- Evaluation: FID through common.metrics on --eval-samples samples with ψ = 1 (the paper: 50k, ψ = 1).
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

SCRIPT = "stylegan"
BATCH_1GPU = "4:128,8:128,16:128,32:64,64:32,128:16,256:8,512:4"   # train.py, '-1gpu' (minibatch_base 4)
LR_SCHEDULE = "128:0.0015,256:0.002,512:0.003,1024:0.003"          # train.py, sched.G_lrate_dict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="StyleGAN (Karras, Laine, Aila 2018)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--z-dim", type=int, default=512, help="latent z size")
    p.add_argument("--w-dim", type=int, default=512, help="intermediate latent w size (also the mapping width)")
    p.add_argument("--mapping-layers", type=int, default=8, help="FC layers of the mapping network f")
    p.add_argument("--mapping-lrmul", type=float, default=0.01, help="learning-rate multiplier of f")
    p.add_argument("--fmap-base", type=int, default=8192, help="channels at stage s: min(fmap_base / 2^s, fmap_max)")
    p.add_argument("--fmap-max", type=int, default=512, help="maximum channels of any layer")
    p.add_argument("--initial-resolution", type=int, default=8, help="resolution the growth starts at (train.py)")
    p.add_argument("--stable-kimg", type=float, default=600, help="thousands of images per stabilisation phase")
    p.add_argument("--fade-kimg", type=float, default=600, help="thousands of images per fade-in phase")
    p.add_argument("--batch-schedule", default=BATCH_1GPU,
                   help="per-resolution minibatch 'res:batch,...'; --batch-size elsewhere")
    p.add_argument("--lr-schedule", default=LR_SCHEDULE, help="per-resolution learning rate 'res:lr,...'; --lr elsewhere")
    p.add_argument("--minibatch-repeats", type=int, default=4, help="minibatches between schedule updates")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (G and D) below --lr-schedule's resolutions")
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.99, help="Adam beta2")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    p.add_argument("--r1-gamma", type=float, default=10.0, help="R1 weight γ: (γ/2) E ‖∇D(x)‖²")
    p.add_argument("--mixing-prob", type=float, default=0.9, help="style mixing probability")
    p.add_argument("--w-avg-beta", type=float, default=0.995, help="EMA decay of w̄")
    p.add_argument("--psi", type=float, default=0.7, help="truncation ψ for samples")
    p.add_argument("--cutoff", type=int, default=8, help="truncation applies to layers below this index")
    p.add_argument("--ema-kimg", type=float, default=10.0, help="G EMA half-life in thousands of images")
    p.add_argument("--mbstd-group", type=int, default=4, help="minibatch standard deviation group size")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror each real image left-right with probability 1/2 (the configs' mirror_augment; "
                        "default: on for celeba, standing in for FFHQ / CelebA-HQ whose configs mirror, else off)")
    runlib.add_args(p, dataset="celeba", image_size=64, batch_size=4, steps=720312, log_every=1000,
                    sample_every=10000, ckpt_every=10000, eval_every=0, eval_samples=10000, digits=True, metrics="fid")
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 16, "z_dim": 16, "w_dim": 16, "mapping_layers": 2, "fmap_base": 64,
        "fmap_max": 8, "initial_resolution": 4, "steps": 6, "batch_size": 8, "batch_schedule": "",
        "stable_kimg": 0.008, "fade_kimg": 0.016, "minibatch_repeats": 1},
        defaults=lambda a: {"flip": a.dataset == "celeba"})
    args.batch_dict = parse_schedule(args.batch_schedule, int)
    args.lr_dict = parse_schedule(args.lr_schedule, float)
    return args


def parse_schedule(text, kind):
    """'4:128,8:64' → {4: 128, 8: 64}."""
    items = [item.split(":") for item in text.split(",") if item]
    try:
        return {int(res): kind(value) for res, value in items}
    except ValueError:
        raise runlib.UsageError(f"a schedule is 'resolution:value,...', got {text!r}") from None


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

class EqualizedLinear(nn.Module):
    """Equalized learning rate with a multiplier (networks_stylegan.py get_weight/dense/apply_bias): weights
    stored as N(0, 1/lrmul²), used as w · lrmul · gain / √fan_in; the bias is used as b · lrmul. Adam's
    steps on the stored values are therefore lrmul times smaller on the used ones."""

    def __init__(self, fan_in, out, gain=math.sqrt(2), lrmul=1.0, bias_init=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, fan_in) / lrmul)
        self.bias = nn.Parameter(torch.full((out,), float(bias_init)))
        self.scale, self.lrmul = lrmul * gain / math.sqrt(fan_in), lrmul

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias * self.lrmul)


class EqualizedConv2d(nn.Module):
    """A k×k 'same' convolution with the equalized learning rate; bias=False where the code adds it later."""

    def __init__(self, cin, cout, kernel, gain=math.sqrt(2), bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = gain / math.sqrt(cin * kernel * kernel)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


def pixel_norm(x, eps=1e-8):
    """x / √(mean over features of x² + ε) (ProGAN Sec. 4.2; applied to z)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def instance_norm(x, eps=1e-8):
    """(x − μ(x)) / σ(x) per sample and channel over the pixels (networks_stylegan.py instance_norm)."""
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(dim=(2, 3), keepdim=True) + eps)


def adain(x, style):
    """Eq. 1, AdaIN(x, y) = y_s · (x − μ(x)) / σ(x) + y_b, in the code's form: instance norm, then
    x · (1 + y_s) + y_b per channel; style = (y_s, y_b) of shape (N, 2C)."""
    ys, yb = style.view(style.shape[0], 2, -1, 1, 1).unbind(1)
    return instance_norm(x) * (ys + 1) + yb


def blur(x):
    """The [1 2 1] ⊗ [1 2 1] / 16 low-pass filter, per channel (networks_stylegan.py blur2d)."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :]) / 16
    c = x.shape[1]
    return F.conv2d(x, k.expand(c, 1, 3, 3), padding=1, groups=c)


def minibatch_stddev(x, group_size=4):
    """ProGAN Sec. 3: the std of each feature over a group of samples, averaged over features and pixels,
    appended as one feature map; group g holds samples n ≡ m (mod N / G) as the code."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"the minibatch ({n}) must be divisible by the stddev group size ({g})")
    y = x.float().view(g, -1, c, h, w)
    y = (y - y.mean(0)).pow(2).mean(0).add(1e-8).sqrt()
    y = y.mean(dim=(1, 2, 3)).to(x.dtype).view(-1, 1, 1, 1)
    return torch.cat([x, y.repeat(g, 1, h, w)], dim=1)


def upscale(x, factor=2):
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def downscale(x, factor=2):
    return x if factor == 1 else F.avg_pool2d(x, factor)


def lrelu(x):
    return F.leaky_relu(x, 0.2)


def num_levels(resolution, initial=4):
    """Resolutions 4, 8, ..., resolution: log2(resolution) − 1 of them. ValueError if impossible."""
    log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
    if resolution < 4 or 2 ** log2 != resolution:
        raise ValueError(f"the resolution must be a power of two, at least 4 (4, 8, ..., 1024); got {resolution}")
    if initial < 4 or 2 ** int(round(math.log2(initial))) != initial or initial > resolution:
        raise ValueError(f"the initial resolution must be a power of two between 4 and {resolution}; got {initial}")
    return log2 - 1


def feature_maps(resolution, fmap_base, fmap_max):
    """nf[k]: the channels of the layers at level k (resolution 4·2^k), min(fmap_base / 2^(k + 1), fmap_max)
    (the code's nf(stage) at stage k + 1)."""
    return [min(int(fmap_base / 2 ** (k + 1)), fmap_max) for k in range(num_levels(resolution))]


# ------------------------------------------------------------------------------------------------
# The networks: mapping f (Fig. 1b), truncation (Sec. 3.4), mixing (Sec. 3.1), synthesis g, discriminator
# ------------------------------------------------------------------------------------------------

class Mapping(nn.Module):
    """f: z → w, pixel norm on z then `layers` FC layers with LeakyReLU 0.2 and lr multiplier 0.01."""

    def __init__(self, z_dim, w_dim, layers=8, lrmul=0.01):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.fcs = nn.ModuleList([EqualizedLinear(a, b, lrmul=lrmul) for a, b in zip(dims, dims[1:])])

    def forward(self, z):
        x = pixel_norm(z)
        for fc in self.fcs:
            x = lrelu(fc(x))
        return x


def truncate(ws, w_avg, psi, cutoff):
    """Sec. 3.4: w' = w̄ + ψ (w − w̄) on the layers with index < cutoff. ws: (N, layers, w_dim)."""
    coefs = torch.ones(ws.shape[1], 1, device=ws.device, dtype=ws.dtype)
    coefs[:cutoff] = psi
    return torch.lerp(w_avg.to(ws.dtype), ws, coefs)


def style_mix(ws, ws2, crossover):
    """Sec. 3.1: layers < crossover take their style from ws, the rest from ws2 (both (N, layers, w_dim))."""
    layer = torch.arange(ws.shape[1], device=ws.device)[None, :, None]
    return torch.where(layer < crossover, ws, ws2)


class StyleLayer(nn.Module):
    """The code's layer_epilogue: + B ⊙ noise, + bias, LeakyReLU, instance norm, style modulation by A(w)."""

    def __init__(self, channels, w_dim, size):
        super().__init__()
        self.noise_strength = nn.Parameter(torch.zeros(channels))      # B, per channel, initialised to 0
        self.bias = nn.Parameter(torch.zeros(channels))
        self.affine = EqualizedLinear(w_dim, 2 * channels, gain=1)     # A: w → (y_s, y_b)
        self.register_buffer("fixed_noise", torch.randn(1, 1, size, size))  # used when randomize_noise=False

    def forward(self, x, w, randomize_noise=True):
        n, _, h, wd = x.shape
        noise = torch.randn(n, 1, h, wd, device=x.device, dtype=x.dtype) if randomize_noise else self.fixed_noise
        x = x + noise * self.noise_strength.view(1, -1, 1, 1)
        x = lrelu(x + self.bias.view(1, -1, 1, 1))
        return adain(x, self.affine(w))


class SynthesisBlock(nn.Module):
    """One resolution of g: two layers, each a conv3 then a StyleLayer with its own style. Above 4x4 the first
    conv works on the upsampled input and is followed by the blur; at 4x4 the first layer takes the learned
    constant as it is (no conv)."""

    def __init__(self, cin, cout, w_dim, size):
        super().__init__()
        self.conv0 = EqualizedConv2d(cin, cout, 3, bias=False) if size > 4 else None
        self.conv1 = EqualizedConv2d(cout, cout, 3, bias=False)
        self.style0, self.style1 = StyleLayer(cout, w_dim, size), StyleLayer(cout, w_dim, size)

    def forward(self, x, w0, w1, randomize_noise=True):
        if self.conv0 is not None:   # upsample → conv3 → blur
            x = blur(self.conv0(upscale(x)))
        x = self.style0(x, w0, randomize_noise)
        return self.style1(self.conv1(x), w1, randomize_noise)


class Synthesis(nn.Module):
    """g of Fig. 1b: a learned constant 4x4 input, one SynthesisBlock per resolution (at resolution 4·2^k layers
    2k and 2k + 1, styles ws[:, 2k] and ws[:, 2k + 1]), toRGB per resolution.
    forward(ws, level, alpha): ws (N, layers, w_dim); fades the newest block in as ProGAN."""

    def __init__(self, w_dim, resolution, channels=3, fmap_base=8192, fmap_max=512):
        super().__init__()
        nf = feature_maps(resolution, fmap_base, fmap_max)
        self.num_layers = 2 * len(nf)
        self.const = nn.Parameter(torch.ones(1, nf[0], 4, 4))         # constant input, initialised to ones
        self.blocks = nn.ModuleList([SynthesisBlock(nf[max(k - 1, 0)], nf[k], w_dim, 4 * 2 ** k)
                                     for k in range(len(nf))])
        self.to_rgb = nn.ModuleList([EqualizedConv2d(c, channels, 1, gain=1) for c in nf])

    def forward(self, ws, level, alpha=1.0, randomize_noise=True):
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        for k in range(level + 1):
            old, x = x, self.blocks[k](x, ws[:, 2 * k], ws[:, 2 * k + 1], randomize_noise)
        img = self.to_rgb[level](x)
        if level > 0 and alpha < 1:   # ProGAN Fig. 2: (1 − α)·upsample(toRGB(old)) + α·toRGB(new)
            img = torch.lerp(upscale(self.to_rgb[level - 1](old)), img, alpha)
        return img


class Generator(nn.Module):
    """G_style: mapping f, the running mean w̄ (a buffer), synthesis g, mixing and truncation."""

    def __init__(self, z_dim, w_dim, resolution, channels=3, mapping_layers=8, mapping_lrmul=0.01,
                 fmap_base=8192, fmap_max=512):
        super().__init__()
        self.z_dim = z_dim
        self.mapping = Mapping(z_dim, w_dim, mapping_layers, mapping_lrmul)
        self.synthesis = Synthesis(w_dim, resolution, channels, fmap_base, fmap_max)
        self.num_layers = self.synthesis.num_layers
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, level, alpha=1.0, *, mixing_prob=0.0, w_avg_beta=None, psi=None, cutoff=8,
                randomize_noise=True):
        w = self.mapping(z)
        if w_avg_beta is not None:  # training passes track w̄ ← β w̄ + (1 − β) mean(w)
            with torch.no_grad():
                self.w_avg.lerp_(w.detach().float().mean(0), 1 - w_avg_beta)
        ws = w[:, None].expand(-1, self.num_layers, -1)
        if mixing_prob > 0:  # Sec. 3.1, one crossover for the minibatch among the layers in use
            active = 2 * (level + 1)
            if float(torch.rand(())) < mixing_prob:
                crossover = int(torch.randint(1, active, ())) if active > 1 else active
                ws = style_mix(ws, self.mapping(torch.randn_like(z))[:, None].expand_as(ws), crossover)
        if psi is not None:
            ws = truncate(ws, self.w_avg, psi, cutoff)
        return self.synthesis(ws, level, alpha, randomize_noise)


class Discriminator(nn.Module):
    """D_basic: ProGAN's D with the [1 2 1] blur before each downsampling conv."""

    def __init__(self, resolution, channels=3, fmap_base=8192, fmap_max=512, mbstd_group=4):
        super().__init__()
        nf = feature_maps(resolution, fmap_base, fmap_max)
        self.mbstd_group = mbstd_group
        self.from_rgb = nn.ModuleList([EqualizedConv2d(channels, c, 1) for c in nf])
        self.blocks = nn.ModuleList([nn.ModuleList()])   # level 0 is the final block below
        for k in range(1, len(nf)):  # conv3, blur, conv3, 2x2 average pool
            self.blocks.append(nn.ModuleList([EqualizedConv2d(nf[k], nf[k], 3), EqualizedConv2d(nf[k], nf[k - 1], 3)]))
        extra = 1 if mbstd_group > 1 else 0
        self.final_conv = EqualizedConv2d(nf[0] + extra, nf[0], 3)
        dense = min(fmap_base, fmap_max)                               # the code's nf(0)
        self.final_dense = EqualizedLinear(nf[0] * 16, dense)
        self.out = EqualizedLinear(dense, 1, gain=1)

    def block(self, x, k):
        conv0, conv1 = self.blocks[k]
        x = lrelu(conv0(x))
        return lrelu(downscale(conv1(blur(x))))

    def forward(self, img, level, alpha=1.0):
        x = lrelu(self.from_rgb[level](img))
        if level > 0:
            x = self.block(x, level)
            if alpha < 1:
                x = torch.lerp(lrelu(self.from_rgb[level - 1](downscale(img))), x, alpha)
        for k in range(level - 1, 0, -1):
            x = self.block(x, k)
        if self.mbstd_group > 1:
            x = minibatch_stddev(x, self.mbstd_group)
        x = lrelu(self.final_conv(x))
        x = lrelu(self.final_dense(x.flatten(1)))
        return self.out(x).squeeze(1)


def sample_noise(n, z_dim, device, generator=None):
    """z ~ N(0, I)."""
    return torch.randn(n, z_dim, device=device, generator=generator)


# ------------------------------------------------------------------------------------------------
# The progressive schedule (as progan.py; training/training_loop.py TrainingSchedule, process_reals)
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
    """(level, resolution r of the nets, α) for a level of detail."""
    r = resolution >> int(math.floor(lod))
    return int(math.log2(r)) - 2, r, 1.0 - (lod - math.floor(lod))


def mirror(x):
    """mirror_augment: each image flipped left-right with probability ½."""
    flipped = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flipped, x.flip(3), x)


def process_reals(x, resolution, alpha):
    """Reals at the nets' resolution, cross-faded as G's output: (1 − α)·upsample(avgpool(x_r)) + α·x_r."""
    x = downscale(x, x.shape[-1] // resolution)
    if alpha < 1:
        x = torch.lerp(upscale(downscale(x)), x, alpha)
    return x


def steps_for_kimg(kimg, args):
    """Steps that show `kimg` thousand images under the schedule of args (batch per resolution)."""
    R, stable, fade = args.image_size, round(args.stable_kimg * 1000), round(args.fade_kimg * 1000)
    nimg, steps = 0, 0
    while nimg < kimg * 1000:
        res = nets_at(level_of_detail(nimg, R, args.initial_resolution, stable, fade), R)[1]
        b = args.batch_dict.get(res, args.batch_size)
        nimg, steps = nimg + args.minibatch_repeats * b, steps + args.minibatch_repeats
    return steps


# ------------------------------------------------------------------------------------------------
# Losses (training/loss.py G_logistic_nonsaturating, D_logistic_simplegp)
# ------------------------------------------------------------------------------------------------

def r1_penalty(D, real, level, alpha, gamma, norm_scale=1.0):
    """R1 = (γ/2) E ‖∇_x D(x)‖² on the reals; returns (penalty, D(x)). norm_scale = r / target resolution
    gives the code's norm with respect to the target-resolution image."""
    real = real.detach().requires_grad_(True)
    scores = D(real, level, alpha)
    (grad,) = torch.autograd.grad(scores.sum(), real, create_graph=True)
    sq = grad.float().pow(2).flatten(1).sum(1) * norm_scale ** 2
    return gamma / 2 * sq.mean(), scores


def d_loss(real_scores, fake_scores, penalty):
    """softplus(D(G(z))) + softplus(−D(x)) + R1: the logistic loss −log(1 − σ(D(G(z)))) − log σ(D(x))."""
    return F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean() + penalty


def g_loss(fake_scores):
    """Non-saturating: −log σ(D(G(z))) = softplus(−D(G(z)))."""
    return F.softplus(-fake_scores).mean()


@torch.no_grad()
def update_average(avg, model, beta):
    """G EMA: θ̄ ← β θ̄ + (1 − β) θ; buffers (w̄, fixed noise) are copied as the code's non-trainables."""
    for a, p in zip(avg.parameters(), model.parameters()):
        a.lerp_(p, 1 - beta)
    for a, b in zip(avg.buffers(), model.buffers()):
        a.copy_(b)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, shape):
    G = Generator(args.z_dim, args.w_dim, shape[1], shape[0], args.mapping_layers, args.mapping_lrmul,
                  args.fmap_base, args.fmap_max)
    return G, Discriminator(shape[1], shape[0], args.fmap_base, args.fmap_max, args.mbstd_group)


def check(args):
    try:
        num_levels(args.image_size, args.initial_resolution)
    except ValueError as e:
        raise runlib.UsageError(f"--image-size/--initial-resolution: {e}") from None
    for name in ("fmap_base", "fmap_max", "z_dim", "w_dim", "mapping_layers", "minibatch_repeats", "mbstd_group"):
        if getattr(args, name) < 1:
            raise runlib.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.stable_kimg < 0 or args.fade_kimg < 0:
        raise runlib.UsageError("--stable-kimg and --fade-kimg must be >= 0")
    if not 0 <= args.mixing_prob <= 1:
        raise runlib.UsageError("--mixing-prob must be in [0, 1]")
    if any(r < 4 or r & (r - 1) for r in {**args.batch_dict, **args.lr_dict}):
        raise runlib.UsageError("--batch-schedule/--lr-schedule name resolutions 4, 8, 16, ...")
    for res in (2 ** k for k in range(2, int(math.log2(args.image_size)) + 1)):
        b = args.batch_dict.get(res, args.batch_size)
        if b % min(args.mbstd_group, b):
            raise runlib.UsageError(f"minibatch {b} at {res}x{res} is not divisible by the stddev group size")
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
        raise runlib.UsageError(f"stylegan.py trains on images; {args.dataset} is 2D toy data")
    R, initial = args.image_size, args.initial_resolution
    batch_at = {res: args.batch_dict.get(res, args.batch_size) for res in (2 ** k for k in range(2, int(math.log2(R)) + 1))}
    if len(data) < max(batch_at.values()):
        raise runlib.UsageError(f"{args.dataset} holds {len(data)} images, fewer than one minibatch ({max(batch_at.values())})")
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    r = runlib.setup(args, SCRIPT, data=data)
    device, clf = r.device, clf.to(r.device) if clf is not None else None
    real_stats = (metrics.reference_stats(data, args.data_root, device, weights=args.inception_weights)
                  if args.metrics and "fid" in args.metrics else None)

    G, D = build(args, data.shape)
    Gs = copy.deepcopy(G).requires_grad_(False).to(device)
    G, D = prepare(r, G, args), prepare(r, D, args)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    d_penalty = getattr(D, "_orig_mod", D)   # the penalty's double backward runs uncompiled

    def adam(model):  # created afresh at each new level of detail (reset_opt_for_new_lod)
        return torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps,
                                foreach=True)
    opt_g, opt_d = adam(G), adam(D)

    stable_img, fade_img = round(args.stable_kimg * 1000), round(args.fade_kimg * 1000)
    nimg, lod, prev_lod = 0, None, -1.0
    start = r.resume({"G": g_raw, "D": d_raw, "Gs": Gs}, {"G": opt_g, "D": opt_d})
    if start:   # the schedule goes on where it stopped
        nimg, lod, prev_lod = (r.resume_state["schedule"][k] for k in ("nimg", "lod", "prev_lod"))
    batches = {b: datasets.iterate(data, b // r.world_size, device, rank=r.rank, world_size=r.world_size,
                                   workers=args.workers) for b in set(batch_at.values())}   # one per minibatch size
    fixed_z = sample_noise(64, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    r.restore_rng()

    def snapshot(tag, level, res, alpha, step, to_target=True):
        with r.side_rng(), torch.no_grad():
            x = Gs(fixed_z, level, alpha, psi=args.psi, cutoff=args.cutoff)
            r.images(tag, upscale(x, R // res) if to_target else x, step, nrow=8)

    def evaluate():   # FID of the EMA generator (ψ = 1) upscaled to the target resolution, as the code; cfid on digits
        def generate(n):
            return upscale(Gs(sample_noise(n, args.z_dim, device), level, alpha), R // res)
        scores = metrics.evaluate(generate, args.eval_samples, real_stats, device, metrics=args.metrics,
                                  weights=args.inception_weights) if args.metrics else {}
        if clf is not None:
            scores.update(digits.evaluate(clf, generate, args.eval_samples, data, args.digit_metrics))
        return scores

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict(), "Gs": Gs.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                "schedule": {"nimg": nimg, "lod": lod, "prev_lod": prev_lod, "level": level,
                          "resolution": res, "alpha": alpha},
                "data_shape": list(data.shape)}

    train_kw = dict(mixing_prob=args.mixing_prob, w_avg_beta=args.w_avg_beta)
    step = start
    for step in range(start + 1, args.steps + 1):
        if (step - 1) % args.minibatch_repeats == 0 or lod is None:   # the schedule, every 4 minibatches
            lod = level_of_detail(nimg, R, initial, stable_img, fade_img)
            if math.floor(lod) != math.floor(prev_lod) or math.ceil(lod) != math.ceil(prev_lod):
                if prev_lod >= 0 and prev_lod == math.floor(prev_lod):
                    pl, pres, _ = nets_at(prev_lod, R)
                    snapshot(f"res{pres}", pl, pres, 1.0, step - 1, to_target=False)
                opt_g, opt_d = adam(G), adam(D)                         # reset Adam at each new lod
            prev_lod = lod
        level, res, alpha = nets_at(lod, R)
        b = batch_at[res]
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = args.lr_dict.get(res, args.lr)
        bl = b // r.world_size

        # D step: softplus(D(G(z))) + softplus(−D(x)) + (γ/2)‖∇D(x)‖²
        x, _ = next(batches[b])
        x = process_reals(mirror(x) if args.flip else x, res, alpha)
        with r.autocast():
            with torch.no_grad():
                fake = G(sample_noise(bl, args.z_dim, device), level, alpha, **train_kw)
            penalty, real_scores = r1_penalty(d_penalty, x, level, alpha, args.r1_gamma, res / R)
            fake_scores = D(fake, level, alpha)
            loss_d = d_loss(real_scores, fake_scores, penalty)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        nimg += b

        # G step: softplus(−D(G(z)))
        with r.autocast():
            loss_g = g_loss(D(G(sample_noise(bl, args.z_dim, device), level, alpha, **train_kw), level, alpha))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        update_average(Gs, g_raw, 0.5 ** (b / (args.ema_kimg * 1000)) if args.ema_kimg > 0 else 0.0)

        scalars = {"loss/D": loss_d, "loss/G": loss_g, "loss/r1": penalty, "progress/kimg": nimg / 1000,
                   "progress/resolution": res, "progress/alpha": alpha, "progress/lod": lod, "progress/batch": b}
        if r.end_step(step, scalars, samples=lambda: snapshot("samples", level, res, alpha, step), state=state,
                      evaluate=evaluate if args.metrics or clf is not None else None):
            break
    level, res, alpha = nets_at(lod, R)
    return r.finish(step, kimg=nimg / 1000, resolution=res, alpha=alpha)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint: the paper's figures
# ------------------------------------------------------------------------------------------------

STYLE_RANGES = {"coarse": (0, 4), "middle": (4, 8), "fine": (8, None)}   # Fig. 3: 4²–8², 16²–32², 64²–1024²


def style_mixing_table(Gs, wa, wb, level, alpha, lo, hi):
    """Fig. 3: rows = sources A, columns = sources B; cell (i, j) = A_i with layers [lo, hi) from B_j.
    Returns images in grid order with the sources on the top row / left column (top-left blank)."""
    na, nb, L = wa.shape[0], wb.shape[0], Gs.num_layers
    img_a = Gs.synthesis(wa[:, None].expand(-1, L, -1), level, alpha, randomize_noise=False)
    img_b = Gs.synthesis(wb[:, None].expand(-1, L, -1), level, alpha, randomize_noise=False)
    ws = wa[:, None, None].expand(na, nb, L, -1).clone()
    ws[:, :, lo:hi] = wb[None, :, None].expand(na, nb, hi - lo, -1)
    mixed = Gs.synthesis(ws.flatten(0, 1), level, alpha, randomize_noise=False).view(na, nb, *img_a.shape[1:])
    rows = [torch.cat([torch.full_like(img_a[:1], -1), img_b])]
    rows += [torch.cat([img_a[i:i + 1], mixed[i]]) for i in range(na)]
    return torch.cat(rows)


@torch.no_grad()
def figure_claims(Gs, clf, level, alpha, z_dim, device, generator, n=500, draws=20, psi=0.7, cutoff=8):
    """The claims of the figures, measured on digits with the classifier `clf` (common/digits.py), fixed noise
    unless redrawn:
      latent_std / truncated_std: the per-pixel std of n images without truncation and with the sampling ψ on the
        layers below `cutoff` (Fig. 8, Sec. 3.4: truncation towards w̄ narrows the variation);
      mix_<styles>_keeps_A / _takes_B: of the pairs (A, B) whose images have different classes, the share of
        images made with A's w and B's w at those layers (Fig. 3) classified as A's class / as B's;
      noise_keeps_class: the share of images whose class survives a redraw of the noise (Fig. 4), and the
        per-pixel std over `draws` noise draws of one w (noise_std), to compare with latent_std."""
    L, out = Gs.num_layers, {}
    wa, wb = (Gs.mapping(sample_noise(n, z_dim, "cpu", generator).to(device))[:, None].expand(-1, L, -1)
              for _ in range(2))

    def image(ws, randomize_noise=False):
        return Gs.synthesis(ws, level, alpha, randomize_noise=randomize_noise)
    xa = image(wa)
    out["metric/latent_std"] = xa.std(0).mean()
    out["metric/truncated_std"] = image(truncate(wa, Gs.w_avg, psi, cutoff)).std(0).mean()
    ca, cb = digits.predict(clf, xa), digits.predict(clf, image(wb))
    differ = ca != cb
    active = 2 * (level + 1)
    for name, (lo, hi) in STYLE_RANGES.items():
        hi = active if hi is None else min(hi, active)
        if lo < hi:
            ws = wa.clone()
            ws[:, lo:hi] = wb[:, lo:hi]
            c = digits.predict(clf, image(ws))[differ]
            out[f"metric/mix_{name}_keeps_A"] = (c == ca[differ]).double().mean()
            out[f"metric/mix_{name}_takes_B"] = (c == cb[differ]).double().mean()
    redrawn = image(wa, randomize_noise=True)
    out["metric/noise_keeps_class"] = (digits.predict(clf, redrawn) == digits.predict(clf, image(wa, True))).double().mean()
    out["metric/noise_std"] = torch.stack([image(wa[:50], True) for _ in range(draws)]).std(0).mean()
    return {k: float(v) for k, v in out.items()}


@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    shape = state["data_shape"]
    Gs = Generator(targs.z_dim, targs.w_dim, shape[1], shape[0], targs.mapping_layers, targs.mapping_lrmul,
                   targs.fmap_base, targs.fmap_max).to(device).eval()
    Gs.load_state_dict(state["models"]["Gs"])
    schedule = state["schedule"]
    level, res, alpha = schedule["level"], schedule["resolution"], schedule["alpha"]
    print(f"checkpoint at {schedule['nimg'] / 1000:g} kimg: {res}x{res}, alpha {alpha:.3f}")
    g = torch.Generator().manual_seed(args.seed)
    z = sample_noise(100, targs.z_dim, "cpu", g).to(device)
    grids = {"samples_psi1.0": Gs(z, level, alpha),
             f"samples_psi{targs.psi}": Gs(z, level, alpha, psi=targs.psi, cutoff=targs.cutoff)}
    # Fig. 8: truncation sweep, ψ from −1 to 1 (rows: 8 latents, columns: ψ), on all layers in use
    psis = torch.linspace(-1, 1, 9).tolist()
    grids["truncation"] = torch.stack([Gs(z[:8], level, alpha, psi=p, cutoff=Gs.num_layers, randomize_noise=False)
                                       for p in psis], 1).flatten(0, 1)
    # Fig. 3: style mixing, coarse / middle / fine styles from source B
    wa, wb = (Gs.mapping(sample_noise(6, targs.z_dim, "cpu", g).to(device)) for _ in range(2))
    active = 2 * (level + 1)
    for name, (lo, hi) in STYLE_RANGES.items():
        hi = active if hi is None else min(hi, active)
        if lo < hi:
            grids[f"style_mixing_{name}"] = style_mixing_table(Gs, wa, wb, level, alpha, lo, hi)
    # Fig. 4: the same w with different noise (8 draws per row) and the per-pixel std over 100 draws
    ws = Gs.mapping(sample_noise(6, targs.z_dim, "cpu", g).to(device))[:, None].expand(-1, Gs.num_layers, -1)
    draws = torch.stack([Gs.synthesis(ws, level, alpha) for _ in range(100)], 1)    # (6, 100, C, H, W)
    std = draws.std(1).mean(1, keepdim=True)
    std = (std / std.flatten(1).amax(1).view(-1, 1, 1, 1).clamp_min(1e-8)) * 2 - 1  # normalised, [−1, 1]
    std = std.expand(-1, draws.shape[2], -1, -1)
    grids["noise"] = torch.cat([draws[:, :8], std[:, None]], 1).flatten(0, 1)
    result = {}
    for name, x in grids.items():   # images per row: the ψ values; 8 draws and the std; source + 6 mixed; 10
        nrow = {"truncation": len(psis), "noise": 9}.get(name, 7 if name.startswith("style_mixing") else 10)
        result.update(runlib.write_samples(out, state["step"], {name: x}, nrow=nrow))
    result.update(resolution=res, alpha=alpha)
    # --eval: samples at the checkpoint's resolution, upscaled to the data's
    result.update(metrics.score(args, targs, lambda n: upscale(Gs(sample_noise(n, targs.z_dim, device), level, alpha),
                                                               shape[1] // res), device, out=out, step=state["step"]))
    if args.eval and args.digit_metrics:   # on digits: what Figs. 3, 4 and 8 show, as numbers
        clf = digits.prepare(args.digit_metrics, datasets.load(targs), targs.data_root).to(device)
        claims = figure_claims(Gs, clf, level, alpha, targs.z_dim, device, g, psi=targs.psi, cutoff=targs.cutoff)
        print(" ".join(f"{k} {v:.3g}" for k, v in claims.items()))
        result.update(claims)
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
