"""Large Scale Adversarial Representation Learning (BigBiGAN) — Donahue & Simonyan, 2019. arXiv:1907.02544.

The idea: a BiGAN (Donahue et al. 2017; ALI, Dumoulin et al. 2017) built from BigGAN parts learns an
image representation without labels. An encoder E maps images to latents, the generator G maps latents
to images, and a joint discriminator D tells data pairs (x, ẑ ~ E(x)) from generated pairs (x̂ = G(z), z).
At the optimum E inverts G, so E must pull semantics out of images; E's features are the representation,
scored by a linear classifier trained on them (the paper's evaluation, Sec. 3.1).

D has three parts (Sec. 2): F, a ConvNet on x; H, an MLP on z; J, an MLP on [F(x), H(z)]. They give two
unary scores and a joint one:

    s_x = θ_xᵀ F(x),    s_z = θ_zᵀ H(z),    s_xz = θ_xzᵀ J(F(x), H(z))

With y = +1 for data pairs and y = −1 for generated pairs (Sec. 2, Eqs. 3–5):

    ℓ_EG(x, z, y) = y (s_x + s_z + s_xz)                                             E and G minimise
    L_EG = E_{x~P_x, ẑ~E(x)} ℓ_EG(x, ẑ, +1) + E_{z~P_z, x̂=G(z)} ℓ_EG(x̂, z, −1)
    ℓ_D(x, z, y)  = h(y s_x) + h(y s_z) + h(y s_xz),   h(t) = max(0, 1 − t)           D minimises
    L_D  = E_{x~P_x, ẑ~E(x)} ℓ_D(x, ẑ, +1) + E_{z~P_z, x̂=G(z)} ℓ_D(x̂, z, −1)

The unary terms keep the image and latent marginals matched even when the joint score is hard to learn;
`--no-unary` keeps only s_xz (the plain BiGAN discriminator; the paper's ablation, Table 1).
E outputs a Gaussian posterior: μ and σ = softplus(σ̂) (Sec. 2), and ẑ = μ + σ ε by reparameterisation
(`--deterministic-e`: ẑ = μ, another ablation).

Networks (BigGAN: Brock et al. 2019 and ajbrock/BigGAN-PyTorch BigGAN.py / layers.py, unconditional):
    G: z (120) ~ N(0, I) split into len(blocks) + 1 chunks (hierarchical z): chunk 0 → SN dense →
       4x4x(16·ch); up ResBlocks [BN(z_k), ReLU, 2x up, SN conv3x3, BN(z_k), ReLU, SN conv3x3; shortcut up +
       SN conv1x1], BN(z_k) a batch norm whose gain 1 + W_g z_k and bias W_b z_k come from the block's chunk
       (SN linear maps; the class embedding of BigGAN is dropped: unconditional); BN, ReLU, SN conv3x3, tanh.
       128x128: 5 blocks of 16, 8, 4, 2, 1 ·ch, ch = 96, self-attention at 64x64 (BigGAN's G_attn 64).
    F: BigGAN's D trunk: down ResBlocks (widths 1, 2, 4, 8, 16, 16 ·ch at 128x128, attention at 64x64), ReLU,
       global sum pooling. H and J: SN MLPs of --mlp-width units (2048), an input layer then 4 residual
       blocks of two layers. θ_x, θ_z, θ_xz: SN linear maps to one score. SN on every layer of D and G.
    E: a pre-activation ResNet with batch norm (the paper's ResNet-v2-50 / RevNet-50x4, scaled down here:
       one residual block per resolution, widths 1, 2, 4, 8, 8, ... ·--e-width, down to 4x4), global average
       pooling (the "avepool" features), then an MLP head (one hidden layer of --mlp-width) to μ, σ̂.
    At 32x32 and 64x64 BigGAN-PyTorch's arch[32] / arch[64] (ch = 64 at 32x32, no attention as its CIFAR script).
    Orthogonal init (BigGAN-PyTorch --G_init/--D_init ortho).
Optimizer: Adam β = (0, 0.999), ε = 1e-6, G 1e-4, D 4e-4, one D step per E/G step, E at G's learning rate;
batch 2048, 500k steps (the paper's ablation length). The optimizer values are unverified: see "Differences
from the paper".

Evaluation (`--eval-every`, and at the end): a linear classifier on E's features of labelled training
images, its held-out accuracy logged as metric/linear_probe (on μ) and metric/linear_probe_pool (on the
average-pooled ResNet features after BN + CReLU, the paper's best layer); reconstructions x → G(μ(E(x)))
as an image panel (Fig. 2); FID / IS of G's samples with --metrics. Headline (ImageNet, Table 2): linear
top-1 / top-5 61.3 / 81.9 with RevNet-50x4 E at 256 px (56.6 top-1 with ResNet-50).

Usage:
    python bigbigan.py --dataset /path/to/imagenet/train --e-image-size 256 --cuda   # 128 px G, 256 px E
    python bigbigan.py --cuda                                            # CIFAR-10, 32x32
    # a CPU run on digits (~35 min on one core): linear probe, samples' classifier FID, reconstructions
    # (on the 10k MNIST test digits, probe on μ at step 2000, seeds 0–2: 74.8% (70.5–79.8%), 65.8% with
    # --no-unary; random encoders 57–66%, raw pixels 90%: benchmarks/bigbigan_probe.py, docs/results.md)
    python bigbigan.py --dataset mnist --g-width 8 --d-width 8 --e-width 16 --mlp-width 128 --batch-size 32 \\
        --steps 2000 --metrics cfid,agree --eval-every 500 --eval-samples 2000
    python bigbigan.py --sample runs/bigbigan/cifar10-.../ckpt.pt     # samples + reconstructions
    python benchmarks/bigbigan_probe.py RUN/ckpt.pt   # the same probe on random encoders and raw pixels

Differences from the paper:
- E is a small pre-activation ResNet (one block per resolution) with a one-hidden-layer head instead of
  ResNet-v2-50 / RevNet-50x4 with the paper's MLP head; H and J as described above (their depth and
  width are our reading of the paper).
- Unverified optimiser settings. The paper's appendix states them, but its text could not be checked for
  this script, so these values come from BigGAN-PyTorch's scripts/launch_BigGAN_bs256x8.sh (BigGAN trained
  at BigBiGAN's batch of 2048), not from the paper: Adam β1 = 0, β2 = 0.999, ε = 1e-6 (--beta1, --beta2,
  --adam-eps), G 1e-4 and D 4e-4 (--g-lr, --d-lr), one D step per E/G step (--n-dis). E's learning rate
  (--e-lr) is set to G's because E and G minimise the same L_EG; that is our choice. A higher E learning
  rate than G's, which the best rows of the paper's Table 1 reportedly use (also unverified), can be set
  with --e-lr.
- The linear probe: an L2-regularised softmax regression fitted by L-BFGS on up to 10k labelled training
  images, tested on up to 10k images of the test split (a fixed random 20% of the data when the dataset
  has no test split, e.g. a folder); the paper trains on all of ImageNet's train set and reports validation
  accuracy. Reconstructions use ẑ = μ(E(x)).
- High-resolution E (`--e-image-size`): data are loaded at E's size and resized (bilinear, antialiased)
  to G's size for D; the paper's 256/128 setting.
- One power iteration per training-mode forward pass (D scores data and generated pairs in one pass; the
  E/G step reads D's σ without iterating). No EMA of G (BigGAN's) and no truncation.
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

SCRIPT = "bigbigan"

# BigGAN-PyTorch G_arch / D_arch: channel multipliers of ch (G: the 4x4 start then each up-block; F: each
# down-block), which F blocks down-sample
ARCH = {
    32: {"g": [4, 4, 4, 4], "d": [4, 4, 4, 4], "down": [True, True, False, False]},
    64: {"g": [16, 16, 8, 4, 2], "d": [1, 2, 4, 8, 16], "down": [True] * 4 + [False]},
    128: {"g": [16, 16, 8, 4, 2, 1], "d": [1, 2, 4, 8, 16, 16], "down": [True] * 5 + [False]},
}
PROBE_IMAGES = 10000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="BigBiGAN (Donahue & Simonyan 2019)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--unary", action=argparse.BooleanOptionalAction, default=True,
                   help="the unary scores s_x, s_z (--no-unary: joint score s_xz only, the BiGAN ablation)")
    p.add_argument("--deterministic-e", action="store_true", help="ẑ = μ(x) instead of a sample of E's Gaussian")
    p.add_argument("--e-image-size", type=int, default=None,
                   help="E's input side (the paper's best: 256 with G at 128); default: --image-size")
    p.add_argument("--z-dim", type=int, default=120, help="latent dimension, z ~ N(0, I)")
    p.add_argument("--g-width", type=int, default=None, help="ch of G (BigGAN: 96 at 128 px, 64 at 32 px)")
    p.add_argument("--d-width", type=int, default=None, help="ch of F, D's image ConvNet (as --g-width)")
    p.add_argument("--e-width", type=int, default=64, help="channels of E's first stage")
    p.add_argument("--mlp-width", type=int, default=2048, help="hidden units of H, J and E's head")
    p.add_argument("--attn-res", type=int, default=None,
                   help="self-attention in G and F at this feature-map side (0: none); 64 at 128 px, else 0")
    p.add_argument("--g-lr", type=float, default=1e-4, help="G's Adam learning rate")
    p.add_argument("--e-lr", type=float, default=1e-4, help="E's Adam learning rate")
    p.add_argument("--d-lr", type=float, default=4e-4, help="D's Adam learning rate")
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--adam-eps", type=float, default=1e-6, help="Adam epsilon")
    p.add_argument("--n-dis", type=int, default=1, help="D steps per E/G step")
    runlib.add_args(p, dataset="cifar10", image_size=None, batch_size=2048, steps=500_000, log_every=100,
                    sample_every=1000, ckpt_every=5000, eval_every=10000, eval_samples=10000, metrics="fid,is",
                    digits=True, image_size_help="128 for an image folder (ImageNet), else 32")
    return runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 32, "g_width": 2, "d_width": 2, "e_width": 4, "mlp_width": 16,
        "z_dim": 8}, defaults=config_defaults)


def config_defaults(args):
    """128 px (ch 96, attention at 64) for image folders, else 32 px (ch 64, no attention)."""
    from pathlib import Path
    size = args.image_size
    if size is None:
        folder = Path(args.dataset).expanduser()
        size = 128 if folder.is_dir() and not list(folder.glob("*-idx3-ubyte*")) else 32
    ch = 96 if size >= 64 else 64
    return {"image_size": size, "g_width": args.g_width or ch, "d_width": args.d_width or ch,
            "attn_res": 64 if size >= 128 else 0, "e_image_size": args.e_image_size or size}


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------

def ortho_(layer):
    nn.init.orthogonal_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def sn_conv(c_in, c_out, kernel, bias=True):
    """W / σ(W), σ by one power iteration per training-mode forward pass."""
    return spectral_norm(ortho_(nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2, bias=bias)))


def sn_linear(c_in, c_out, bias=True):
    return spectral_norm(ortho_(nn.Linear(c_in, c_out, bias=bias)))


class SelfAttention(nn.Module):
    """SAGAN's block (Zhang et al. 2018, Eqs. 1–3; BigGAN layers.Attention), named as in the SAGAN paper:
    y = x + γ·v(Σ_i β_j,i h(x_i)), β_j,· = softmax_i(f(x_i)ᵀ g(x_j)); queries g and keys f with C/8
    channels, values h with C/2, keys and values 2x2 max-pooled, v back to C, γ = 0 at init.
    (BigGAN-PyTorch calls g θ, f φ, h g and v o.)"""

    def __init__(self, c):
        super().__init__()
        if c < 8 or c % 8:
            raise ValueError(f"self-attention needs a multiple of 8 channels, got {c}")
        self.f, self.g = sn_conv(c, c // 8, 1, False), sn_conv(c, c // 8, 1, False)   # keys, queries
        self.h, self.v = sn_conv(c, c // 2, 1, False), sn_conv(c // 2, c, 1, False)   # values, output
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, c, height, width = x.shape
        queries = self.g(x).flatten(2)                                    # (B, C/8, N)
        keys = F.max_pool2d(self.f(x), 2).flatten(2)                      # (B, C/8, N/4)
        values = F.max_pool2d(self.h(x), 2).flatten(2)                    # (B, C/2, N/4)
        beta = torch.softmax(queries.transpose(1, 2) @ keys, -1)          # softmax over the keys i
        return x + self.gamma * self.v((values @ beta.transpose(1, 2)).view(b, c // 2, height, width))


class LatentBatchNorm(nn.Module):
    """BigGAN's ccbn with the latent chunk as its only input: BN, then gain 1 + W_g z_k and bias W_b z_k."""

    def __init__(self, channels, z_chunk):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain, self.bias = sn_linear(z_chunk, channels, bias=False), sn_linear(z_chunk, channels, bias=False)

    def forward(self, x, z):
        return self.bn(x) * (1 + self.gain(z))[:, :, None, None] + self.bias(z)[:, :, None, None]


class GBlock(nn.Module):
    def __init__(self, c_in, c_out, z_chunk):
        super().__init__()
        self.bn1, self.bn2 = LatentBatchNorm(c_in, z_chunk), LatentBatchNorm(c_out, z_chunk)
        self.conv1, self.conv2 = sn_conv(c_in, c_out, 3), sn_conv(c_out, c_out, 3)
        self.shortcut = sn_conv(c_in, c_out, 1)

    def forward(self, x, z):
        h = self.conv1(F.interpolate(F.relu(self.bn1(x, z)), scale_factor=2))
        h = self.conv2(F.relu(self.bn2(h, z)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """(ReLU), SN conv3x3, ReLU, SN conv3x3, (avg pool); SN conv1x1 shortcut when the shape changes; the
    first block has no leading ReLU and pools before its shortcut conv (BigGAN layers.DBlock)."""

    def __init__(self, c_in, c_out, down, first=False):
        super().__init__()
        self.down, self.first = down, first
        self.conv1, self.conv2 = sn_conv(c_in, c_out, 3), sn_conv(c_out, c_out, 3)
        self.shortcut = sn_conv(c_in, c_out, 1) if (first or down or c_in != c_out) else None

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.shortcut is None:
            return h + x
        if self.first:
            return h + self.shortcut(F.avg_pool2d(x, 2))
        s = self.shortcut(x)
        return h + (F.avg_pool2d(s, 2) if self.down else s)


def arch_for(size, attn_res):
    """ARCH[size], the G block and the F block after which attention sits (None: no attention)."""
    if size not in ARCH:
        raise ValueError(f"bigbigan.py's G makes 32x32, 64x64 or 128x128 images; got image size {size}")
    arch = ARCH[size]
    g_res = [4 * 2 ** (i + 1) for i in range(len(arch["g"]) - 1)]
    d_res, r = [], size
    for down in arch["down"]:
        r //= 2 if down else 1
        d_res.append(r)
    if not attn_res:
        return arch, None, None
    if attn_res not in g_res or attn_res not in d_res:
        both = sorted(set(g_res) & set(d_res))
        raise ValueError(f"--attn-res {attn_res}: at {size}x{size} G and F share feature maps of side "
                         f"{', '.join(map(str, both))} (or 0 for none)")
    return arch, g_res.index(attn_res), d_res.index(attn_res)


class Generator(nn.Module):
    """BigGAN's G, unconditional, with hierarchical z: one chunk for the dense layer, one per block."""

    def __init__(self, z_dim, channels, size, width, attn_res=0):
        super().__init__()
        arch, self.attn_at, _ = arch_for(size, attn_res)
        widths = [m * width for m in arch["g"]]
        slots = len(widths)                                      # dense layer + one per block
        if z_dim % slots:
            raise ValueError(f"--z-dim {z_dim} must split into {slots} equal chunks at {size}x{size}")
        self.chunk = z_dim // slots
        self.start = (widths[0], 4, 4)
        self.dense = sn_linear(self.chunk, widths[0] * 16)
        self.blocks = nn.ModuleList(GBlock(a, b, self.chunk) for a, b in zip(widths[:-1], widths[1:]))
        self.attn = SelfAttention(widths[self.attn_at + 1]) if self.attn_at is not None else None
        self.bn = nn.BatchNorm2d(widths[-1])
        self.out = sn_conv(widths[-1], channels, 3)

    def forward(self, z):
        chunks = z.split(self.chunk, 1)
        h = self.dense(chunks[0]).view(-1, *self.start)
        for i, block in enumerate(self.blocks):
            h = block(h, chunks[i + 1])
            if i == self.attn_at:
                h = self.attn(h)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class EBlock(nn.Module):
    """Pre-activation residual block (ResNet-v2): BN, ReLU, conv3x3 (stride s), BN, ReLU, conv3x3; a
    strided conv1x1 shortcut when the shape changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if (stride != 1 or c_in != c_out) else None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return h + (self.shortcut(a) if self.shortcut is not None else x)


class Encoder(nn.Module):
    """x → ResNet → average pool (the representation) → MLP → (μ, σ = softplus(σ̂)) of the posterior over z."""

    def __init__(self, z_dim, channels, size, width, mlp_width):
        super().__init__()
        stages = int(round(math.log2(size))) - 2 if size > 0 else -1
        if stages < 1 or 2 ** (stages + 2) != size:
            raise ValueError(f"E's input side must be a power of two >= 8, got {size}")
        widths = [width * min(2 ** i, 8) for i in range(stages)]
        layers, c = [nn.Conv2d(channels, width, 3, 1, 1, bias=False)], width
        for w in widths:   # one down-sampling residual block per resolution, down to 4x4
            layers.append(EBlock(c, w, 2))
            c = w
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, mlp_width), nn.ReLU(), nn.Linear(mlp_width, 2 * z_dim))
        self.features_dim = c

    def features(self, x):
        """The average-pooled ResNet output ("avepool")."""
        return self.body(x).mean((2, 3))

    def forward(self, x):
        mu, pre_sigma = self.head(self.features(x)).chunk(2, 1)
        return mu, F.softplus(pre_sigma)


def sample_posterior(mu, sigma, deterministic=False):
    """ẑ = μ + σ ε, ε ~ N(0, I) (reparameterisation: gradients reach μ and σ); μ when deterministic."""
    return mu if deterministic else mu + sigma * torch.randn_like(mu)


def sample_noise(n, z_dim, device, generator=None):
    return torch.randn(n, z_dim, device=device, generator=generator)


class ResidualMLP(nn.Module):
    """SN linear in → width, then `blocks` residual blocks [ReLU, SN linear, ReLU, SN linear] + skip."""

    def __init__(self, c_in, width, blocks=4):
        super().__init__()
        self.inp = sn_linear(c_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), sn_linear(width, width), nn.ReLU(), sn_linear(width, width))
                                    for _ in range(blocks))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return F.relu(h)


class JointDiscriminator(nn.Module):
    """Scores (s_x, s_z, s_xz) of pairs (x, z); only (s_xz,) with unary=False."""

    def __init__(self, z_dim, channels, size, width, mlp_width, unary=True, attn_res=0):
        super().__init__()
        arch, _, self.attn_at = arch_for(size, attn_res)
        widths = [m * width for m in arch["d"]]
        ins = [channels] + widths[:-1]
        self.blocks = nn.ModuleList(DBlock(a, b, down, first=i == 0)
                                    for i, (a, b, down) in enumerate(zip(ins, widths, arch["down"])))
        self.attn = SelfAttention(widths[self.attn_at]) if self.attn_at is not None else None
        self.H = ResidualMLP(z_dim, mlp_width)
        self.J = ResidualMLP(widths[-1] + mlp_width, mlp_width)
        self.theta_xz = sn_linear(mlp_width, 1)
        self.unary = unary
        if unary:
            self.theta_x, self.theta_z = sn_linear(widths[-1], 1), sn_linear(mlp_width, 1)

    def image_features(self, x):
        """F(x): BigGAN's D trunk, ReLU, global sum pooling."""
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_at:
                h = self.attn(h)
        return F.relu(h).sum((2, 3))

    def forward(self, x, z):
        fx, hz = self.image_features(x), self.H(z)
        s_xz = self.theta_xz(self.J(torch.cat([fx, hz], 1))).squeeze(1)     # s_xz = θ_xzᵀ J(F(x), H(z))
        if not self.unary:
            return (s_xz,)
        return self.theta_x(fx).squeeze(1), self.theta_z(hz).squeeze(1), s_xz   # s_x = θ_xᵀF(x), s_z = θ_zᵀH(z)


# ------------------------------------------------------------------------------------------------
# Losses (Eqs. 3–5) on the score tuples of data pairs (x, E(x)) and generated pairs (G(z), z)
# ------------------------------------------------------------------------------------------------

def d_loss(data_scores, gen_scores):
    """L_D = E Σ_s h(+s(x, ẑ)) + E Σ_s h(−s(x̂, z)), h(t) = max(0, 1 − t), over s ∈ {s_x, s_z, s_xz}."""
    return sum(F.relu(1 - s).mean() for s in data_scores) + sum(F.relu(1 + s).mean() for s in gen_scores)


def eg_loss(data_scores, gen_scores):
    """L_EG = E [s_x + s_z + s_xz](x, ẑ) − E [s_x + s_z + s_xz](x̂, z): y·ℓ unhinged, minimised by E and G."""
    return sum(s.mean() for s in data_scores) - sum(s.mean() for s in gen_scores)


# ------------------------------------------------------------------------------------------------
# The representation: linear probe
# ------------------------------------------------------------------------------------------------

def crelu(x):
    return torch.cat([F.relu(x), F.relu(-x)], 1)


def fit_linear_probe(train_x, train_y, test_x, test_y, classes, transform="none", weight_decay=1e-4, iters=100):
    """Accuracy on (test_x, test_y) of a softmax regression fitted by L-BFGS on (train_x, train_y). Features are
    standardised with the training statistics (a BN without learnt parameters); transform="crelu" follows it
    with CReLU, the paper's "BN+CReLU" features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    prep = (lambda f: crelu((f - mean) / std)) if transform == "crelu" else (lambda f: (f - mean) / std)
    a, b = prep(train_x).double(), prep(test_x).double()
    W = torch.zeros(a.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ W + bias, train_y) + weight_decay * W.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((b @ W + bias).argmax(1) == test_y).double().mean())


@torch.no_grad()
def encode(E, images, batch=500):
    """(μ, avepool features) of images, E in eval mode."""
    was = E.training
    E.eval()
    mus, feats = [], []
    for i in range(0, len(images), batch):
        f = E.features(images[i:i + batch])
        mus.append(E.head(f).chunk(2, 1)[0].float().cpu())
        feats.append(f.float().cpu())
    E.train(was)
    return torch.cat(mus), torch.cat(feats)


def linear_probe(E, probe, classes):
    """metric/linear_probe (on μ) and metric/linear_probe_pool (avepool, BN + CReLU)."""
    (xa, ya), (xb, yb) = probe
    mu_a, pool_a = encode(E, xa)
    mu_b, pool_b = encode(E, xb)
    return {"metric/linear_probe": fit_linear_probe(mu_a, ya, mu_b, yb, classes),
            "metric/linear_probe_pool": fit_linear_probe(pool_a, ya, pool_b, yb, classes, transform="crelu")}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def labelled_images(data, idx, device, value_range=(-1, 1)):
    """Images (float in value_range, on device) and labels of data[idx]."""
    if data.images is not None:
        return datasets.to_range(data.images[idx], value_range, True).to(device), data.labels[idx].clone()
    items = [data.dataset[int(i)] for i in idx]
    x = torch.stack([t for t, _ in items])
    return datasets.to_range(x, value_range, False).to(device), torch.tensor([int(l) for _, l in items])


def probe_sets(args, data, device):
    """(train images, labels), (test images, labels) for the linear probe; None when unlabelled."""
    if data.num_classes < 2 or (data.labels is not None and (data.labels < 0).any()):
        return None
    g = torch.Generator().manual_seed(0)
    if args.dataset in datasets.IN_MEMORY:
        test = datasets.load(args, split="test")
        tr = torch.randperm(len(data), generator=g)[:PROBE_IMAGES]
        te = torch.randperm(len(test), generator=g)[:PROBE_IMAGES]
        return labelled_images(data, tr, device), labelled_images(test, te, device)
    perm = torch.randperm(len(data), generator=g)
    n_test = len(data) // 5   # a fixed random 20% held out from the probe's training
    return (labelled_images(data, perm[n_test:][:PROBE_IMAGES], device),
            labelled_images(data, perm[:n_test][:PROBE_IMAGES], device))


def to_g_size(x, size):
    """The data as D sees them: E's (possibly larger) input resized to G's side."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def build(args, shape):
    """(G, E, D) for data of `shape` at E's size (C, e, e); G and D work at args.image_size."""
    c = shape[0]
    G = Generator(args.z_dim, c, args.image_size, args.g_width, args.attn_res)
    E = Encoder(args.z_dim, c, args.e_image_size, args.e_width, args.mlp_width)
    D = JointDiscriminator(args.z_dim, c, args.image_size, args.d_width, args.mlp_width, args.unary, args.attn_res)
    return G, E, D


def check_config(args):
    if args.n_dis < 1:
        raise runlib.UsageError(f"--n-dis must be >= 1, got {args.n_dis}")
    if args.e_image_size < args.image_size or args.e_image_size % args.image_size:
        raise runlib.UsageError(f"--e-image-size {args.e_image_size} must be a multiple of --image-size "
                                f"{args.image_size} (E may see larger images than G makes, not smaller)")
    with runlib.as_usage_error():
        arch, g_at, d_at = arch_for(args.image_size, args.attn_res)
        if args.z_dim % len(arch["g"]):
            raise ValueError(f"--z-dim {args.z_dim} must split into {len(arch['g'])} equal chunks "
                             f"(hierarchical z) at {args.image_size}x{args.image_size}")
        if g_at is not None:
            for net, c in (("G", arch["g"][g_at + 1] * args.g_width), ("F", arch["d"][d_at] * args.d_width)):
                if c % 8:
                    raise ValueError(f"--attn-res {args.attn_res}: {net} has {c} channels there, not a multiple of 8")
        Encoder(1, 1, args.e_image_size, 1, 1)   # E's input side


def train(args):
    check_config(args)
    e_args = argparse.Namespace(**{**vars(args), "image_size": args.e_image_size})   # data at E's size
    data = datasets.load(e_args)
    if data.kind != "image":
        raise runlib.UsageError(f"bigbigan.py needs images; {args.dataset} is not an image dataset")
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    clf = digits.prepare(args.digit_metrics, data, args.data_root, conditional=True)   # agree: reconstructions
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    probe = probe_sets(e_args, data, device)
    real_stats = None
    if args.metrics:
        g_data = datasets.load(args)   # FID against the data at G's size
        real_stats = metrics.reference_stats(g_data, args.data_root, device, weights=args.inception_weights)

    g_net, e_net, d_net = build(args, data.shape)
    G, E, D = (r.prepare(m, channels_last=True) for m in (g_net, e_net, d_net))
    g_raw, e_raw, d_raw = (runlib.unwrap(m) for m in (G, E, D))
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, foreach=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, **adam)
    opt_e = torch.optim.Adam(E.parameters(), lr=args.e_lr, **adam)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, **adam)
    nets, opts = {"G": g_raw, "E": e_raw, "D": d_raw}, {"G": opt_g, "E": opt_e, "D": opt_d}

    start = r.resume(nets, opts)
    batches = datasets.iterate(data, args.batch_size // r.world_size, device,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed_z = sample_noise(100, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    fixed_x = labelled_images(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:50],
                              device)[0]
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            return {"samples": g_raw(fixed_z),
                    "reconstructions": reconstruction_panel(g_raw, e_raw, fixed_x, args.image_size)}

    def evaluation():
        """The linear probe on E's features, the --metrics of G's samples, the digit metrics."""
        out = linear_probe(e_raw, probe, data.num_classes) if probe is not None else {}
        if args.metrics:
            with runlib.eval_mode(g_raw):
                out.update(metrics.evaluate(lambda n: g_raw(sample_noise(n, args.z_dim, device)), args.eval_samples,
                                            real_stats, device, metrics=args.metrics, weights=args.inception_weights))
        if clf is not None:
            out.update(digit_scores(g_raw, e_raw, clf, probe, data, args, device))
        return out

    def state():
        return {"models": {k: m.state_dict() for k, m in nets.items()},
                "optimizers": {k: o.state_dict() for k, o in opts.items()}, "data_shape": list(data.shape)}

    b = args.batch_size // r.world_size
    step = start
    for step in range(start + 1, args.steps + 1):
        for _ in range(args.n_dis):   # D: hinge on each score, data pairs +1, generated pairs −1 (L_D)
            x, _ = next(batches)
            with r.autocast():
                with torch.no_grad():
                    z_hat = sample_posterior(*E(x), args.deterministic_e)   # ẑ ~ E(x)
                    z = sample_noise(b, args.z_dim, device)
                    x_gen = G(z)
                scores = D(torch.cat([to_g_size(x, args.image_size), x_gen]), torch.cat([z_hat, z]))
                data_scores, gen_scores = zip(*(s.split([len(x), b]) for s in scores))
                loss_d = d_loss(data_scores, gen_scores)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        # E and G: the unhinged scores, data pairs +1, generated pairs −1 (L_EG); D in eval mode
        x, _ = next(batches)
        D.eval()
        with r.autocast():
            z_hat = sample_posterior(*E(x), args.deterministic_e)
            z = sample_noise(b, args.z_dim, device)
            scores = D(torch.cat([to_g_size(x, args.image_size), G(z)]), torch.cat([z_hat, z]))
            data_scores_eg, gen_scores_eg = zip(*(s.split([len(x), b]) for s in scores))
            loss_eg = eg_loss(data_scores_eg, gen_scores_eg)
        opt_e.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss_eg.backward()
        opt_e.step()
        opt_g.step()
        D.train()

        names = ("s_x", "s_z", "s_xz") if args.unary else ("s_xz",)
        scalars = {"loss/D": loss_d, "loss/EG": loss_eg}
        for name, sd, sg in zip(names, data_scores, gen_scores):
            scalars[f"train/{name}_data"], scalars[f"train/{name}_gen"] = sd.mean(), sg.mean()
        if r.end_step(step, scalars, samples=samples, evaluate=evaluation, state=state):
            break
    return r.finish(step)


@torch.no_grad()
def digit_scores(G, E, clf, probe, data, args, device):
    """On digits (common/digits.py): cfid of G's samples; agree, the share of the probe's held-out images whose
    reconstruction G(μ(E(x))) is classified as x's label (does the representation keep the class?)."""
    G.eval()
    out = {}
    if "cfid" in args.digit_metrics:
        out = digits.evaluate(clf, lambda n: G(sample_noise(n, args.z_dim, device)), args.eval_samples, data, ["cfid"])
    if "agree" in args.digit_metrics and probe is not None:
        (x, y) = probe[1]
        mu = encode(E, x)[0]
        rec = torch.cat([G(m.to(device)).cpu() for m in mu.split(500)])
        out["metric/agree"] = digits.class_agreement(clf, rec, y)
    G.train()
    return out


@torch.no_grad()
def reconstruction_panel(G, E, x, size):
    """Rows of 10 real images, each followed by a row of their reconstructions G(μ(E(x)))."""
    was = E.training
    E.eval()
    rec = G(E(x)[0])
    E.train(was)
    real = to_g_size(x, size)
    rows = [t for i in range(0, len(x), 10) for t in (real[i:i + 10], rec[i:i + 10])]
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G, E, _ = build(targs, state["data_shape"])
    G.load_state_dict(state["models"]["G"])
    E.load_state_dict(state["models"]["E"])
    G.to(device).eval()
    E.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    data = datasets.load(argparse.Namespace(**{**vars(targs), "image_size": targs.e_image_size}))
    idx = torch.randperm(len(data), generator=g)[:50]
    x, _ = labelled_images(data, idx, device)
    grids = {"samples": G(sample_noise(100, targs.z_dim, "cpu", g).to(device)),
             "reconstructions": reconstruction_panel(G, E, x, targs.image_size)}
    paths = runlib.write_samples(out, state["step"], grids)
    # --num-samples: G's samples for evaluate.py; --eval: the --metrics of --eval-samples of them
    paths.update(metrics.score(args, targs, lambda n: G(sample_noise(n, targs.z_dim, device)), device,
                               out=out, step=state["step"]))
    return paths


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
