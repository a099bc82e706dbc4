"""Self-Attention Generative Adversarial Networks (SAGAN) — Zhang, Goodfellow, Metaxas, Odena, 2018.
arXiv:1805.08318.

The idea: convolutions only mix information within a local neighbourhood, so a GAN built from them models
long-range structure (the legs of a dog, the symmetry of a face) poorly. SAGAN adds a self-attention
block to both G and D (Sec. 3): every position of a feature map x (C channels, N positions) reads a
weighted sum of (a pooled copy of) all positions,

    s_ij = f(x_i)ᵀ g(x_j),    β_j,i = exp(s_ij) / Σ_i exp(s_ij)       (Eq. 1; softmax over the keys i)
    o_j  = v( Σ_i β_j,i h(x_i) )                                      (Eq. 2)
    y_j  = γ o_j + x_j,       γ a learned scalar initialised to 0     (Eq. 3)

f, g, h, v are 1x1 convolutions. The block here is the official `non_local.py: sn_non_local_block_sim`:
f (keys) and g (queries) map C → C/8 channels, h (values) C → C/2, v C/2 → C, all spectrally normalised
and without biases; keys and values are 2x2 max-pooled, so each of the N queries attends over N/4 keys.
(The code calls g θ, f φ and h g.) Because γ starts at 0, the nets first rely on local cues and learn
how much non-local evidence to use.

Everything else is the projection cGAN of Miyato & Koyama (2018) with two stabilisers (Sec. 4):
spectral normalisation in G as well as in D, and the two-timescale update rule (TTUR): D learns 4x faster
than G, with one D step per G step. The loss is the hinge loss (Eq. 4):

    L_D = E_(x,y) max(0, 1 − D(x, y)) + E_(z,y) max(0, 1 + D(G(z, y), y))
    L_G = −E_(z,y) D(G(z, y), y)

Networks (official generator.py / discriminator.py, `generator_test` / `discriminator_test`):
    G: z (128) ~ N(0, I) → SN dense → 4x4x(16·gf) → ResBlocks [conditional BN, ReLU, 2x nearest up,
       SN conv3x3, conditional BN, ReLU, SN conv3x3; shortcut up + SN conv1x1] → BN, ReLU, SN conv3x3, tanh.
       128x128: blocks of 16, 8, 4, 2, 1 ·gf channels (8, 16, 32, 64, 128 px); attention after the 32 px block.
       Conditional BN: a per-class scale (init 1) and shift (init 0) after a BN without affine parameters.
    D: ResBlocks [ReLU, SN conv3x3, ReLU, SN conv3x3, 2x2 average pooling; shortcut SN conv1x1 + pooling]
       (the first without the leading ReLU, pooling its input before the shortcut conv), widths 1, 2, 4, 8,
       16, 16 ·df (64, 32, 16, 8, 4, 4 px), attention after the 32 px block; ReLU, global sum pooling φ(x),
       D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩ with SN dense ψ and an SN class embedding (projection).
    gf = df = 64, Glorot-uniform init, zero biases (official ops.py). At 64x64 the BigGAN-PyTorch G_arch /
    D_arch[64] widths; at 32x32 the CIFAR-10 ResNet of the projection-discriminator code (sngan_projection,
    G 4·gf = 256 channels in 3 up-blocks, D 2·df = 128 channels in 2 down + 2 plain blocks); attention
    after the 16 px blocks there.
    `--attn-res R` puts the block after the (first) G and D blocks that output R x R (Table 1: feat8, feat16,
    feat32 — the default at 64 and 128 px —, feat64); `--attn-res 0` removes it.
Optimizer: Adam, D lr 4e-4, G lr 1e-4, β = (0, 0.9), batch 256 (official: 64 x 4 GPUs), 1M updates.

Evaluation (`--metrics`): Inception score and FID over 50k samples of uniformly drawn classes (official
eval_imagenet.py: eval_sample_size 50000), FID against 50k training images. Table 2 (ImageNet 128x128):
IS 52.52, FID 18.65 (SNGAN-projection 36.80 / 27.62). Table 1: attention at feat32 FID 18.28 vs feat8 22.98.

Usage:
    python sagan.py --dataset /path/to/imagenet/train --cuda     # the paper: class-conditional ImageNet 128x128
    python sagan.py --cuda                                       # CIFAR-10, conditional, 32x32
    python sagan.py --cuda --no-labels                           # unconditional (plain BN, no projection)
    # a CPU run on digits (class-conditional 32x32, ~30 min on one core), scored with the digit classifier:
    python sagan.py --dataset mnist --g-width 8 --d-width 8 --batch-size 32 --steps 3000 --metrics cfid,agree \\
        --eval-every 1000 --eval-samples 5000
    python sagan.py --sample runs/sagan/cifar10-.../ckpt.pt [--eval]   # class grid + attention maps (IS / FID)

Measured (docs/results.md, sagan): on the digit run above, classifier FID 114 with attention against 142
without (seeds 0-2, better on every seed).

`--sample` writes a class grid (one row per class; 10 rows spread over the classes when there are more)
and attention maps as in the paper's Fig. 1 / 5: for four query points (coloured squares) of each image,
the weights β_j,· of G's attention block over the image (bright = attended).

Differences from the paper:
- Adam β2 = 0.9 as the paper says; the official model.py leaves β2 at TensorFlow's 0.999.
- Batch norm running averages with PyTorch's momentum 0.1 (official: decay 0.999 in the conditional BN,
  0.9999 in G's last BN). Samples and evaluation use G in eval mode (running averages), as the official
  eval_imagenet.py does (is_training=False).
- One power iteration per training-mode forward pass: D scores the real and the generated batch in one
  pass (the official code iterates on the real pass only); G's step reads D's σ without iterating (D in
  eval mode). G iterates in both of its passes of a step (the official graph likewise ran G once per
  train op).
- D's update comes before G's within an iteration (TFGAN's sequential hooks also run D first).
- 32x32 and 64x64 use the architectures named above (the paper only trains 128x128); other sizes are refused.
- `--ema-decay` (an exponential moving average of G for sampling and evaluation, as BigGAN) is an
  addition, off by default; with it, BN statistics and spectral-norm vectors are averaged too.
- Intra-class FID is not computed.
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "sagan"

# width multipliers of gf (G: the 4x4 start, then each up-block's output) and df (D's blocks), and
# which D blocks down-sample, per image size
ARCH = {
    32: {"g": [4, 4, 4, 4], "d": [2, 2, 2, 2], "down": [True, True, False, False]},       # sngan_projection CIFAR-10
    64: {"g": [16, 16, 8, 4, 2], "d": [1, 2, 4, 8, 16], "down": [True] * 4 + [False]},    # BigGAN-PyTorch arch[64]
    128: {"g": [16, 16, 8, 4, 2, 1], "d": [1, 2, 4, 8, 16, 16], "down": [True] * 5 + [False]},   # official
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Self-Attention GAN (Zhang et al. 2018)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attn-res", type=int, default=None,
                   help="side of the feature map that gets self-attention in G and D (0: none); "
                        "32 at 64/128 px (Table 1's best, feat32), 16 at 32 px")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="class-conditional (conditional BN in G, projection D); --no-labels: unconditional")
    p.add_argument("--z-dim", type=int, default=128, help="noise dimension, z ~ N(0, I)")
    p.add_argument("--g-width", type=int, default=64, help="gf: G's channels are multiples of it (official gf_dim)")
    p.add_argument("--d-width", type=int, default=64, help="df: D's channels are multiples of it (official df_dim)")
    p.add_argument("--g-lr", type=float, default=1e-4, help="G's Adam learning rate (TTUR)")
    p.add_argument("--d-lr", type=float, default=4e-4, help="D's Adam learning rate (TTUR)")
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.9, help="Adam beta2 (paper; the official code 0.999)")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an exponential moving average of G with this decay for samples and evaluation "
                        "(e.g. 0.9999 as BigGAN); 0: off (the paper)")
    runlib.add_args(p, dataset="cifar10", image_size=None, batch_size=256, steps=1_000_000, log_every=100,
                    sample_every=1000, ckpt_every=5000, eval_every=50000, eval_samples=50000, metrics="fid,is",
                    digits=True, image_size_help="128 for an image folder (ImageNet), else 32")
    return runlib.parse(p, argv, dry_run_defaults={"dataset": "fake", "g_width": 4, "d_width": 4, "z_dim": 16},
                        defaults=config_defaults)


def config_defaults(args):
    """ImageNet-style image folders at 128x128 (the paper), anything else at 32x32; attention at 32x32
    feature maps (16x16 for 32 px images)."""
    size = args.image_size
    if size is None:
        folder = Path(args.dataset).expanduser()
        size = 128 if folder.is_dir() and not list(folder.glob("*-idx3-ubyte*")) else 32
    return {"image_size": size, "attn_res": 32 if size >= 64 else size // 2}


# ------------------------------------------------------------------------------------------------
# Layers: spectral normalisation everywhere, Glorot-uniform init (official ops.py)
# ------------------------------------------------------------------------------------------------

def glorot_(layer):
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def sn_conv(c_in, c_out, kernel, bias=True):
    """W / σ(W), σ by one power iteration per training-mode forward pass, u kept in a buffer."""
    return spectral_norm(glorot_(nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2, bias=bias)))


def sn_linear(c_in, c_out):
    return spectral_norm(glorot_(nn.Linear(c_in, c_out)))


class SelfAttention(nn.Module):
    """y = γ·v(Σ_i β_j,i h(x_i)) + x (Eqs. 1–3) as the official sn_non_local_block_sim: queries g and keys f
    with C/8 channels, values h with C/2, keys and values 2x2 max-pooled, output conv v back to C."""

    def __init__(self, channels):
        super().__init__()
        if channels < 8 or channels % 8:
            raise ValueError(f"self-attention needs a multiple of 8 channels (C/8 for keys), got {channels}")
        c = channels
        self.f = sn_conv(c, c // 8, 1, bias=False)        # keys      (code: φ)
        self.g = sn_conv(c, c // 8, 1, bias=False)        # queries   (code: θ)
        self.h = sn_conv(c, c // 2, 1, bias=False)        # values    (code: g)
        self.v = sn_conv(c // 2, c, 1, bias=False)        # output    (code: sn_conv_attn)
        self.gamma = nn.Parameter(torch.zeros(()))        # γ = 0 at init (code: sigma_ratio)

    def attention(self, x):
        """β: (B, N, N/4), row j = the softmax weights of query position j over the pooled key positions."""
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"self-attention pools 2x2: the feature map must have even sides, got {tuple(x.shape[-2:])}")
        queries = self.g(x).flatten(2)                            # (B, C/8, N)
        keys = F.max_pool2d(self.f(x), 2).flatten(2)              # (B, C/8, N/4)
        return torch.softmax(queries.transpose(1, 2) @ keys, -1)  # s_ij = f(x_i)ᵀ g(x_j), softmax over i (Eq. 1)

    def forward(self, x):
        b, c, height, width = x.shape
        beta = self.attention(x)
        values = F.max_pool2d(self.h(x), 2).flatten(2)            # (B, C/2, N/4)
        o = (values @ beta.transpose(1, 2)).view(b, c // 2, height, width)   # Σ_i β_j,i h(x_i) (Eq. 2)
        return x + self.gamma * self.v(o)                          # y = γ o + x (Eq. 3)


class ConditionalBatchNorm(nn.Module):
    """BN without affine parameters, then the class's own scale (init 1) and shift (init 0)
    (official ops.ConditionalBatchNorm). num_classes = 0: an ordinary BN."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(channels, affine=num_classes == 0)
        if num_classes:
            self.scale = nn.Embedding(num_classes, channels)
            self.shift = nn.Embedding(num_classes, channels)
            nn.init.ones_(self.scale.weight)
            nn.init.zeros_(self.shift.weight)

    def forward(self, x, y):
        h = self.bn(x)
        if not self.num_classes:
            return h
        return h * self.scale(y)[:, :, None, None] + self.shift(y)[:, :, None, None]


class GBlock(nn.Module):
    """CBN, ReLU, 2x nearest up, SN conv3x3, CBN, ReLU, SN conv3x3; shortcut: up, SN conv1x1 (generator.py: block)."""

    def __init__(self, c_in, c_out, num_classes):
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm(c_in, num_classes), ConditionalBatchNorm(c_out, num_classes)
        self.conv1, self.conv2 = sn_conv(c_in, c_out, 3), sn_conv(c_out, c_out, 3)
        self.shortcut = sn_conv(c_in, c_out, 1)

    def forward(self, x, y):
        h = self.conv1(F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2))
        h = self.conv2(F.relu(self.bn2(h, y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """(ReLU), SN conv3x3, ReLU, SN conv3x3, (2x2 average pooling); shortcut SN conv1x1 (+ pooling) when the
    shape changes (discriminator.py: block). The first block (`optimized_block`) has no leading ReLU and
    pools its input before the shortcut conv."""

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


def architecture(size, attn_res):
    """The ARCH entry for `size` and the index of the G block and of the D block after which attention
    sits (None when attn_res is 0). ValueError for sizes or attention placements the nets cannot make."""
    if size not in ARCH:
        raise ValueError(f"sagan.py makes 32x32, 64x64 or 128x128 images; got image size {size}")
    arch = ARCH[size]
    g_res = [4 * 2 ** (i + 1) for i in range(len(arch["g"]) - 1)]
    d_res, r = [], size
    for down in arch["down"]:
        r //= 2 if down else 1
        d_res.append(r)
    if attn_res == 0:
        return arch, None, None
    if attn_res not in g_res or attn_res not in d_res:
        both = sorted(set(g_res) & set(d_res))
        raise ValueError(f"--attn-res {attn_res}: at {size}x{size} both G and D have feature maps of side "
                         f"{', '.join(map(str, both))} (or 0 for no attention)")
    return arch, g_res.index(attn_res), d_res.index(attn_res)


class Generator(nn.Module):
    def __init__(self, z_dim, channels, size, width, num_classes=0, attn_res=0):
        super().__init__()
        arch, self.attn_at, _ = architecture(size, attn_res)
        widths = [m * width for m in arch["g"]]
        self.start = (widths[0], 4, 4)
        self.dense = sn_linear(z_dim, widths[0] * 16)
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in zip(widths[:-1], widths[1:]))
        self.attn = SelfAttention(widths[self.attn_at + 1]) if self.attn_at is not None else None
        self.bn = nn.BatchNorm2d(widths[-1])
        self.out = sn_conv(widths[-1], channels, 3)

    def forward(self, z, y=None):
        h = self.dense(z).view(-1, *self.start)
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if i == self.attn_at:
                h = self.attn(h)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class Discriminator(nn.Module):
    """D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩ (projection discriminator); no class term when num_classes = 0."""

    def __init__(self, channels, size, width, num_classes=0, attn_res=0):
        super().__init__()
        arch, _, self.attn_at = architecture(size, attn_res)
        widths = [m * width for m in arch["d"]]
        ins = [channels] + widths[:-1]
        self.blocks = nn.ModuleList(DBlock(a, b, down, first=i == 0)
                                    for i, (a, b, down) in enumerate(zip(ins, widths, arch["down"])))
        self.attn = SelfAttention(widths[self.attn_at]) if self.attn_at is not None else None
        self.psi = sn_linear(widths[-1], 1)
        self.embed = spectral_norm(glorot_(nn.Embedding(num_classes, widths[-1]))) if num_classes else None

    def features(self, x):
        """φ(x): ReLU and global sum pooling of the last block."""
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_at:
                h = self.attn(h)
        return F.relu(h).sum((2, 3))

    def forward(self, x, y=None):
        phi = self.features(x)
        out = self.psi(phi).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * phi).sum(1)   # projection: ⟨embed(y), φ(x)⟩
        return out


def sample_noise(n, z_dim, device, generator=None):
    return torch.randn(n, z_dim, device=device, generator=generator)


def sample_labels(n, num_classes, device, generator=None):
    """Classes of generated images, uniform (official model.py); None when unconditional."""
    return torch.randint(num_classes, (n,), device=device, generator=generator) if num_classes else None


# ------------------------------------------------------------------------------------------------
# Hinge loss (Eq. 4)
# ------------------------------------------------------------------------------------------------

def d_loss_hinge(real, fake):
    """L_D = E max(0, 1 − D(x, y)) + E max(0, 1 + D(G(z, y), y))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_loss_hinge(fake):
    """L_G = −E D(G(z, y), y)."""
    return -fake.mean()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def num_classes_of(args, data):
    if not args.labels:
        return 0
    if data.num_classes == 0 or (data.labels is not None and (data.labels < 0).any()):
        raise runlib.UsageError(f"{args.dataset} has no class labels (or some images lack one); "
                                "train unconditionally with --no-labels")
    return data.num_classes


def build(args, shape, num_classes):
    G = Generator(args.z_dim, shape[0], shape[-1], args.g_width, num_classes, args.attn_res)
    D = Discriminator(shape[0], shape[-1], args.d_width, num_classes, args.attn_res)
    return G, D


def check_config(args, shape):
    """Everything the nets would refuse, as one-line errors before the run directory is made."""
    if len(shape) != 3:
        raise runlib.UsageError(f"sagan.py needs images; {args.dataset} is not an image dataset")
    with runlib.as_usage_error():
        arch, g_at, d_at = architecture(shape[-1], args.attn_res)
        if g_at is not None:   # the attended feature maps need a multiple of 8 channels (C/8 keys)
            for net, c in (("G", arch["g"][g_at + 1] * args.g_width), ("D", arch["d"][d_at] * args.d_width)):
                if c % 8:
                    raise ValueError(f"--attn-res {args.attn_res}: {net} has {c} channels there, "
                                     "not a multiple of 8 (change --g-width / --d-width)")
    if not 0 <= args.ema_decay < 1:
        raise runlib.UsageError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")


def make_ema(G, decay):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def class_grid(num_classes, cols, z_dim, device, generator=None, rows=10):
    """z and y for a grid with one row per class (`rows` classes spread evenly when there are more)."""
    z = sample_noise(rows * cols, z_dim, "cpu", generator).to(device)
    if not num_classes:
        return z, None
    classes = torch.linspace(0, num_classes - 1, min(rows, num_classes)).round().long()
    y = classes.repeat_interleave(cols).to(device)
    return z[:len(y)], y


def evaluate(G, args, device, num_classes, real_stats, data=None, clf=None):
    """--metrics: the Inception ones; on digits cfid and agree (samples classified as the class they were
    made for) with the classifier `clf` (common/digits.py)."""
    def make(b):
        y = sample_labels(b, num_classes, device)
        return G(sample_noise(b, args.z_dim, device), y), y

    G.eval()
    scores = {}
    if args.metrics:
        scores = metrics.evaluate(lambda b: make(b)[0], args.eval_samples, real_stats, device, metrics=args.metrics,
                                  weights=args.inception_weights)
    if clf is not None:
        scores.update(digits.evaluate(clf, make, args.eval_samples, data, args.digit_metrics))
    G.train()
    return scores


def train(args):
    data = datasets.load(args)
    check_config(args, data.shape)
    K = num_classes_of(args, data)
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    clf = digits.prepare(args.digit_metrics, data, args.data_root, conditional=K > 0)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    real_stats = None
    if args.metrics:
        real_stats = metrics.reference_stats(data, args.data_root, device, weights=args.inception_weights)

    g_net, d_net = build(args, data.shape, K)
    G, D = r.prepare(g_net, channels_last=True), r.prepare(d_net, channels_last=True)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, betas=(args.beta1, args.beta2), foreach=True)   # TTUR
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, betas=(args.beta1, args.beta2), foreach=True)
    ema = make_ema(g_raw, args.ema_decay) if args.ema_decay else None

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    if ema is not None and r.resume_state is not None:
        ema.load_state_dict(r.resume_state["ema"])
    batches = datasets.iterate(data, args.batch_size // r.world_size, device,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed_z, fixed_y = class_grid(K, 10, args.z_dim, device, torch.Generator().manual_seed(args.seed))
    r.restore_rng()
    g_eval = ema.module if ema is not None else g_raw

    def samples():
        with runlib.eval_mode(g_eval):
            return {"samples": g_eval(fixed_z, fixed_y)}

    def checkpoint():
        state = {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                 "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                 "data_shape": list(data.shape), "num_classes": K}
        if ema is not None:
            state["ema"] = ema.state_dict()
        return state

    b = args.batch_size // r.world_size
    step = start
    for step in range(start + 1, args.steps + 1):
        # one D step: real and generated batches in one pass (one power iteration per layer)
        x, y = next(batches)
        y = y if K else None
        with r.autocast():
            with torch.no_grad():
                y_fake = sample_labels(b, K, device)
                fake = G(sample_noise(b, args.z_dim, device), y_fake)
            labels = torch.cat([y, y_fake]) if K else None
            d_real, d_fake = D(torch.cat([x, fake]), labels).split([len(x), len(fake)])
            loss_d = d_loss_hinge(d_real, d_fake)                          # Eq. 4, D
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # one G step (1:1 with TTUR); D in eval mode reuses its σ estimates
        D.eval()
        with r.autocast():
            y_fake = sample_labels(b, K, device)
            loss_g = g_loss_hinge(D(G(sample_noise(b, args.z_dim, device), y_fake), y_fake))   # Eq. 4, G
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.train()
        if ema is not None:
            ema.update_parameters(g_raw)

        scalars = {"loss/D": loss_d, "loss/G": loss_g, "train/D_real": d_real.mean(), "train/D_fake": d_fake.mean()}
        if g_raw.attn is not None:   # γ leaves 0 as the nets learn to use non-local evidence
            scalars.update({"train/gamma_G": g_raw.attn.gamma, "train/gamma_D": d_raw.attn.gamma})
        if r.end_step(step, scalars, samples=samples, state=checkpoint,
                      evaluate=(lambda: evaluate(g_eval, args, device, K, real_stats, data, clf))
                      if args.metrics or clf is not None else None):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling: class grid and attention maps (Fig. 1 / 5)
# ------------------------------------------------------------------------------------------------

QUERIES = [(0.25, 0.25), (0.25, 0.75), (0.7, 0.3), (0.6, 0.6)]            # (row, column) as fractions
COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.5, 1.0], [1.0, 1.0, 0.2]])


@torch.no_grad()
def attention_maps(G, z, y, queries=QUERIES):
    """Images G(z, y) and, for each query point, the attention weights β_j,· of G's attention block over
    the image: (images (B, C, H, W), maps (B, Q, H, W) each scaled to max 1, query pixel coordinates)."""
    seen = {}
    hook = G.attn.register_forward_pre_hook(lambda module, inputs: seen.__setitem__("x", inputs[0]))
    try:
        images = G(z, y)
    finally:
        hook.remove()
    beta = G.attn.attention(seen["x"])                                    # (B, N, N/4)
    side, size = seen["x"].shape[-1], images.shape[-1]
    maps, pixels = [], []
    for qr, qc in queries:
        i, j = min(int(qr * side), side - 1), min(int(qc * side), side - 1)
        w = beta[:, i * side + j].view(-1, 1, side // 2, side // 2)
        maps.append(F.interpolate(w, size=(size, size), mode="nearest"))
        pixels.append((int((i + 0.5) * size / side), int((j + 0.5) * size / side)))
    maps = torch.cat(maps, 1)
    return images, maps / maps.amax((2, 3), keepdim=True).clamp_min(1e-12), pixels


def attention_panel(images, maps, pixels):
    """Rows of [the image with coloured query squares, one heat map per query] in [0, 1]."""
    gray = ((images.float().mean(1, keepdim=True) + 1) / 2).clamp(0, 1).cpu()
    base = gray.repeat(1, 3, 1, 1) if images.shape[1] == 1 else ((images.float() + 1) / 2).clamp(0, 1).cpu()
    marked, heat = base.clone(), []
    r = max(1, images.shape[-1] // 32)
    for q, (pi, pj) in enumerate(pixels):
        marked[:, :, max(pi - r, 0):pi + r + 1, max(pj - r, 0):pj + r + 1] = COLOURS[q][None, :, None, None]
        m = maps[:, q:q + 1].float().cpu()
        h = 0.35 * gray.repeat(1, 3, 1, 1) + 0.65 * m * COLOURS[q][None, :, None, None]
        h[:, :, max(pi - r, 0):pi + r + 1, max(pj - r, 0):pj + r + 1] = 1.0
        heat.append(h)
    return torch.stack([marked, *heat], 1).flatten(0, 1)


@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    K = state["num_classes"]
    G, _ = build(targs, state["data_shape"], K)
    G.load_state_dict(state["models"]["G"])
    if "ema" in state:   # the averaged G (AveragedModel keeps it under "module.")
        G.load_state_dict({k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")})
    G.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    z, y = class_grid(K, 10, targs.z_dim, device, g)
    grids = {"samples": G(z, y)}
    if G.attn is not None:
        zq, yq = class_grid(K, 1, targs.z_dim, device, g, rows=8)
        images, maps, pixels = attention_maps(G, zq, yq)
        grids["attention"] = attention_panel(images, maps, pixels)
    paths = runlib.write_samples(out, state["step"], {"samples": grids["samples"]})
    if "attention" in grids:
        paths.update(runlib.write_samples(out, state["step"], {"attention": grids["attention"]},
                                          value_range=(0, 1), nrow=1 + len(QUERIES)))
    result = dict(paths)

    def make(n):   # --eval: IS / FID (and the digit metrics) of the checkpoint, of uniformly drawn classes
        y = sample_labels(n, K, device)
        x = G(sample_noise(n, targs.z_dim, device), y)
        return (x, y) if K else x
    result.update(metrics.score(args, targs, make, device, conditional=K > 0, out=out, step=state["step"]))
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
