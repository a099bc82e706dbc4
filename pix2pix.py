"""Image-to-Image Translation with Conditional Adversarial Networks (pix2pix) — Isola, Zhu, Zhou, Efros, 2016.
arXiv:1611.07004.

The idea: learn a map x -> y from paired examples with a conditional GAN whose discriminator sees the
input together with the output, plus an L1 term that keeps the output near the target. L1 alone gets
the low frequencies right and blurs; the GAN term makes the output look real. The discriminator is a
PatchGAN: it classifies every 70x70 patch as real or fake (a Markov random field on patches), so it
models only high-frequency structure and runs on images of any size.

    L_cGAN(G, D) = E_{x,y}[log D(x, y)] + E_x[log(1 − D(x, G(x)))]        (Eq. 1; D averages over patches)
    L_L1(G)      = E_{x,y}[‖y − G(x)‖₁]                                 (Eq. 3)
    G* = arg min_G max_D L_cGAN(G, D) + λ L_L1(G),  λ = 100               (Eq. 4)
    D minimises ½ (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)) ("we divide the objective by 2 while optimizing D");
    G minimises BCE(D(x, G(x)), 1) + λ L1 (the non-saturating form, Sec. 3.3).

The nets (Sec. 6.1, and the official models/networks.py):
    G: U-Net. Encoder C64-C128-C256-C512-C512-C512-C512-C512 (Ck = conv 4x4 stride 2, BatchNorm, LeakyReLU
       0.2; no BN on the first and the innermost layer), so 256x256 reaches 1x1. The decoder mirrors it
       (ReLU, transposed conv 4x4 stride 2, BN) and each decoder layer also sees the encoder layer of the same
       size (skip connections: channels concatenated); the last one maps to the output channels with tanh.
       The depth follows the image size: log2(--image-size) stride-2 layers (8 at 256, 7 at 128, 5 at 32),
       always down to 1x1; the channel counts are --g-width · min(2^i, 8).
       Dropout 0.5 is G's only noise (Sec. 2.2: "we provide noise only in the form of dropout ... at both
       training and test time"); the official code puts it in the depth − 5 decoder layers after the
       innermost one (3 at 256; none at 32 or less).
    D: 70x70 PatchGAN C64-C128-C256-C512 on concat(x, y): conv 4x4 stride 2 (stride 1 for the last two
       convs), BN (not on the first layer), LeakyReLU 0.2, then a conv to one logit per patch.
       --d-layers 1 gives the 16x16 PatchGAN, 5 the 286x286 one, --netD pixel the 1x1 PixelGAN (Sec. 4.4).
    Weights ~ N(0, 0.02), BN scales ~ N(1, 0.02), biases 0 (Sec. 6.2 / init_weights of the official code).
    Adam lr 2e-4, β = (0.5, 0.999), batch 1, D updated before G (official pix2pix_model.py).
    Data (Sec. 6.2): "random jitter" = resize to 286x286 (--load-size) and random crop to 256x256
    (--image-size), plus mirroring (--no-flip turns it off); the same crop and flip for x and y.
    Training length (official scripts/train_pix2pix.sh): 100 epochs at the full lr, then 100 epochs with the
    lr decaying linearly to 0: --steps 80000 = 200 epochs of facades' 400 pairs, the last
    --decay-fraction 0.5 of them decaying. Per dataset (paper Sec. 6.2): maps 200 epochs of 1096, batch 1;
    edges2shoes 15 epochs of 50k and edges2handbags 15 epochs of 137k, batch 4; night2day 17 epochs of
    17823, batch 4. facades trains labels -> photo (--direction BtoA), as the official script.

Test time: G translates one image at a time with BN in train mode, so each image is normalised by its own
statistics, and with dropout on: the paper's noise, and the official test.py without --eval (which fixes the
batch at 1 whatever the training batch, e.g. 4 for edges2shoes). A U-Net of 32x32 or less has no dropout
layers (see below), so there the per-image statistics are the only difference from eval mode and the
output is deterministic. --no-test-noise uses BN's running averages and no dropout instead (the official
--eval). Test images are resized to --image-size, no crop or flip. Panels, evaluation and --sample all
translate this way.

Evaluation (logged every --eval-every steps and at the end, on the test split: test/ or, for sets that
have none such as maps, val/; at most --eval-samples images): metric/l1 = mean |G(x) − y| on the [−1, 1]
scale; metric/psnr = mean over images of 10 log10(1 / MSE) on the [0, 1] scale; metric/fid (--metrics fid)
= FID between G(test inputs) and the test targets, both at --image-size (Inception pool3, TF-FID resize, as
common.metrics), which on a 100-image split is strongly biased upward: compare runs, not papers. The paper's
own scores (FCN-8s segmentation of cityscapes outputs, Table 1; AMT studies) are not reproduced.

Usage:
    python pix2pix.py --cuda                                    # facades labels -> photo (downloads facades)
    python pix2pix.py --dataset maps --cuda                     # aerial photo -> map
    python pix2pix.py --dataset PATH --direction AtoB --cuda    # PATH/{train,val,test}/ with A|B side by side
    # a quick CPU run (2-3 minutes) on 32x32 digits with the lower half masked | the whole digit, the tasks of
    # benchmarks/digit_translation.py (`make` builds them from MNIST idx files, `score` scores the checkpoint):
    python benchmarks/digit_translation.py make MNIST_TEST_DIR tasks   # a folder of the t10k-* idx files
    python pix2pix.py --dataset tasks/masked --image-size 32 --load-size 36 --g-width 16 --d-width 16 --d-layers 2 --steps 4000 --metrics none
    python pix2pix.py --sample runs/pix2pix/facades-.../ckpt.pt                # translate the test split
    python pix2pix.py --sample runs/pix2pix/facades-.../ckpt.pt --input PATH  # translate your own images

Differences from the paper:
- Dropout placement is the official code's (the depth − 5 decoder layers after the innermost) rather than
  the paper's "first 3 decoder layers" (these agree at 256 except for the innermost layer); at 32x32 the
  U-Net has no dropout, so G is deterministic there.
- Images are drawn at random with replacement (each step an independent batch) instead of in shuffled
  epochs; the learning rate decays linearly per step (official: per epoch,
  lr · (1 − max(0, epoch − n_const) / (n_decay + 1))).
- The paper's ablations are flags: --lambda-l1 0 (cGAN alone), --gan-mode none (L1 alone), --gan-mode lsgan
  (the official code's alternative), --netG encoder-decoder (no skips), --netD pixel / --d-layers 1 or 5.
  The unconditional-D ablation ("GAN" in Table 1) is not offered.
- Images are held in memory at --load-size (uint8; edges2handbags needs about 70 GB: use a subset).
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data as datasets
from common import metrics
from common import run as runlib

SCRIPT = "pix2pix"

# Per-dataset settings of the paper's Sec. 6.2 (steps = epochs · training pairs / batch) and the official scripts.
DATASET_DEFAULTS = {
    "facades": {"direction": "BtoA", "steps": 200 * 400},
    "maps": {"direction": "AtoB", "steps": 200 * 1096},
    "edges2shoes": {"batch_size": 4, "steps": 15 * 50_000 // 4},
    "edges2handbags": {"batch_size": 4, "steps": 15 * 137_000 // 4},
    "night2day": {"batch_size": 4, "steps": 17 * 17_823 // 4},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="pix2pix (Isola et al. 2016): paired image-to-image translation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--netG", choices=["unet", "encoder-decoder"], default="unet",
                   help="U-Net (skips) or the same net without skips (Sec. 4.3 ablation)")
    p.add_argument("--netD", choices=["n_layers", "pixel"], default="n_layers",
                   help="PatchGAN of --d-layers stride-2 convs, or the 1x1 PixelGAN (Sec. 4.4)")
    p.add_argument("--d-layers", type=int, default=3,
                   help="PatchGAN stride-2 convs: 1 = 16x16, 3 = 70x70, 5 = 286x286 patches")
    p.add_argument("--g-width", type=int, default=64, help="channels of G's first layer (C64)")
    p.add_argument("--d-width", type=int, default=64, help="channels of D's first layer (C64)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout in the official decoder layers (G's noise)")
    p.add_argument("--gan-mode", choices=["vanilla", "lsgan", "none"], default="vanilla",
                   help="BCE (the paper), least squares, or none = L1 alone (Table 1)")
    p.add_argument("--lambda-l1", type=float, default=100.0, help="λ, the weight of the L1 term (Eq. 4)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (G and D)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--decay-fraction", type=float, default=0.5,
                   help="the last fraction of --steps over which the lr decays linearly to 0 (official 100 of 200 epochs)")
    d = p.add_argument_group("image-to-image data")
    d.add_argument("--direction", choices=["AtoB", "BtoA"], default="AtoB",
                   help="translate the left half (A) into the right (B), or back; facades defaults to BtoA")
    d.add_argument("--load-size", type=int, default=286, help="training images are resized to this, then cropped")
    d.add_argument("--no-flip", action="store_true", help="no random left-right flips")
    d.add_argument("--test-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="at test time keep dropout on and normalise each image by its own BN statistics (the paper's noise); "
                        "--no-test-noise = the official --eval")
    d.add_argument("--input", default=None, metavar="PATH",
                   help="with --sample: translate an image, or the images in a folder (any size; a folder whose images "
                        "are all twice as wide as high holds A|B pairs, as the datasets: their input halves are "
                        "translated), into PNGs of the same names in <out>/translated/")
    runlib.add_args(p, dataset="facades", image_size=256, batch_size=1, steps=80_000, log_every=100,
                    sample_every=2000, ckpt_every=2000, eval_every=0, eval_samples=10000, metrics="fid", export=False)
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 32, "load_size": 36, "g_width": 4, "d_width": 4, "batch_size": 2},
        defaults=lambda a: DATASET_DEFAULTS.get(a.dataset, {}))
    if args.input and not args.sample:
        raise runlib.UsageError("--input PATH translates your images with a trained model: give --sample CKPT too")
    if args.input and not Path(args.input).exists():
        raise runlib.UsageError(f"--input {args.input} does not exist: give an image or a folder of images")
    if args.netD == "pixel" and "d_layers" in args.explicit:
        raise runlib.UsageError("--d-layers sets the PatchGAN's depth; the PixelGAN (--netD pixel) has none")
    if args.gan_mode == "none" and args.lambda_l1 <= 0:
        raise runlib.UsageError("--gan-mode none with --lambda-l1 0 leaves nothing to train")
    d_flags = sorted({"netD", "d_layers", "d_width"} & set(args.explicit))
    if args.gan_mode == "none" and d_flags:
        raise runlib.UsageError(f"--gan-mode none trains G alone: --{d_flags[0].replace('_', '-')} has no D to act on")
    if not 0 <= args.decay_fraction <= 1:
        raise runlib.UsageError(f"--decay-fraction must be in [0, 1], got {args.decay_fraction}")
    if args.load_size < args.image_size:
        raise runlib.UsageError(f"--load-size {args.load_size} must be at least --image-size {args.image_size} "
                                "(images are resized to the load size, then cropped)")
    return args


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def unet_depth(image_size):
    """Stride-2 layers that take image_size down to 1x1 (8 at 256); ValueError unless a power of two >= 16."""
    depth = round(math.log2(image_size)) if image_size > 0 else 0
    if image_size < 16 or 2 ** depth != image_size:
        raise ValueError(f"the U-Net halves the image down to 1x1: --image-size must be a power of two, at least "
                         f"16 (32, 64, 128, 256, ...); got {image_size}")
    return depth


def init_weights(module):
    """Weights ~ N(0, 0.02), BN scales ~ N(1, 0.02), biases 0 (official init_weights, 'normal')."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class UNet(nn.Module):
    """The U-Net of Sec. 6.1.1 with depth log2(image_size); skips=False is the encoder-decoder ablation."""

    def __init__(self, in_channels, out_channels, image_size=256, width=64, skips=True, dropout=0.5):
        super().__init__()
        depth = unet_depth(image_size)
        self.skips = skips
        ch = [width * min(2 ** i, 8) for i in range(depth)]   # 64 128 256 512 512 512 512 512 at 256
        self.down = nn.ModuleList()
        for i in range(depth):   # encoder layer i: (size / 2^i) -> (size / 2^(i+1))
            layers = [nn.LeakyReLU(0.2)] if i > 0 else []         # the input layer has no activation before it
            layers.append(nn.Conv2d(in_channels if i == 0 else ch[i - 1], ch[i], 4, 2, 1, bias=False))
            if 0 < i < depth - 1:                                  # no BN on the first and the innermost layer
                layers.append(nn.BatchNorm2d(ch[i]))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()
        for i in range(depth):   # decoder layer i mirrors encoder layer i: sees cat(e_i, d_{i+1}) with skips
            c_in = ch[i] if i == depth - 1 or not skips else 2 * ch[i]
            if i == 0:
                layers = [nn.ReLU(), nn.ConvTranspose2d(c_in, out_channels, 4, 2, 1), nn.Tanh()]
            else:
                layers = [nn.ReLU(), nn.ConvTranspose2d(c_in, ch[i - 1], 4, 2, 1, bias=False), nn.BatchNorm2d(ch[i - 1])]
                if dropout > 0 and 4 <= i <= depth - 2:           # official: the depth − 5 layers after the innermost
                    layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))
        init_weights(self)

    def forward(self, x):
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = self.up[-1](skips[-1])
        for i in range(len(self.up) - 2, -1, -1):
            x = self.up[i](torch.cat([skips[i], x], 1) if self.skips else x)
        return x


class PatchGAN(nn.Module):
    """n_layers stride-2 convs 4x4 (C64-C128-C256 for 3), one stride-1 C512, a stride-1 conv to 1 logit: each
    output logit sees a 70x70 input patch for n_layers = 3 (16 for 1, 286 for 5). pixel=True: 1x1 convs."""

    def __init__(self, in_channels, width=64, n_layers=3, pixel=False):
        super().__init__()
        if pixel:   # PixelGAN: 1x1 receptive field
            layers = [nn.Conv2d(in_channels, width, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
                      nn.Conv2d(2 * width, 1, 1, bias=False)]
        else:
            if n_layers < 1:
                raise ValueError(f"the PatchGAN needs at least one stride-2 layer, got {n_layers}")
            layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]   # no BN on the first layer
            c = width
            for n in range(1, n_layers + 1):
                c_next = width * min(2 ** n, 8)
                stride = 2 if n < n_layers else 1
                layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2)]
                c = c_next
            layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.n_layers, self.pixel = n_layers, pixel
        init_weights(self)

    def forward(self, x, y):
        return self.net(torch.cat([x, y], 1))   # conditional: D sees the input with the output


def patch_output_size(size, n_layers):
    """Side of the PatchGAN's logit map for an input side `size` (convs 4x4, padding 1)."""
    for n in range(n_layers + 2):
        size = (size + 2 - 4) // (2 if n < n_layers else 1) + 1
    return size


# ------------------------------------------------------------------------------------------------
# Losses (on D's logits; every patch is one real/fake decision)
# ------------------------------------------------------------------------------------------------

def gan_loss(logits, real, mode="vanilla"):
    """BCE with targets 1 (real) / 0 (fake) (vanilla), or the squared error to them (lsgan)."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def d_loss(real_logits, fake_logits, mode="vanilla"):
    """½ (L(D(x, y), 1) + L(D(x, G(x)), 0)): Eq. 1 for D, halved (Sec. 3.3)."""
    return 0.5 * (gan_loss(real_logits, True, mode) + gan_loss(fake_logits, False, mode))


def l1_loss(fake, target):
    """L_L1 = E ‖y − G(x)‖₁ (Eq. 3), a mean over pixels."""
    return (fake - target).abs().mean()


def g_loss(fake_logits, fake, target, lambda_l1, mode="vanilla"):
    """L(D(x, G(x)), 1) + λ L_L1 (Eq. 4, G's part); mode "none" drops the GAN term (L1 alone).
    Returns (total, GAN term, L1 term)."""
    l1 = l1_loss(fake, target)
    adv = gan_loss(fake_logits, True, mode) if mode != "none" else torch.zeros((), device=fake.device)
    return adv + lambda_l1 * l1, adv, l1


@torch.no_grad()
def translate(G, x, noise=True):
    """G at test time. noise=True (the paper's): one image at a time with dropout on and BN in train mode, so
    each image is normalised by its own statistics, as the official test.py (batch 1) without --eval; G's
    running BN averages are left unchanged. noise=False: G.eval() (official --eval), in batches of 100."""
    was_training = G.training
    saved = {k: v.clone() for k, v in G.named_buffers()}
    G.train(noise)
    batch = 1 if noise else 100
    out = torch.cat([G(x[i:i + batch]) for i in range(0, len(x), batch)])
    G.load_state_dict(saved, strict=False)   # train-mode BN updated its running averages: undo
    G.train(was_training)
    return out


def psnr(fake, target):
    """Mean over images of 10 log10(1 / MSE) with both in [0, 1] (inputs in [−1, 1])."""
    mse = ((fake.float() - target.float()) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, in_channels, out_channels):
    G = UNet(in_channels, out_channels, args.image_size, args.g_width, skips=args.netG == "unet", dropout=args.dropout)
    D = None if args.gan_mode == "none" else \
        PatchGAN(in_channels + out_channels, args.d_width, args.d_layers, pixel=args.netD == "pixel")
    return G, D


def lr_factor(step, args):
    """1 for the first (1 − decay_fraction) of the steps, then linear towards 0 (official 'linear' policy)."""
    n_decay = round(args.steps * args.decay_fraction)
    return 1.0 - max(0, step - (args.steps - n_decay)) / (n_decay + 1)


def as_rgb(x, channels):
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x


def panel(x, fake, y):
    """Rows of input | output | target (grey images shown as RGB when the other side has colour)."""
    c = max(x.shape[1], y.shape[1])
    return torch.stack([as_rgb(x, c), as_rgb(fake, c), as_rgb(y, c)], 1).flatten(0, 1)


def evaluate(G, test, args, device, noise):
    """metric/l1, metric/psnr (and metric/fid with --metrics fid) on the test split; see the docstring."""
    n = min(len(test.a), args.eval_samples)
    x, y = (datasets.to_range(t[:n], (-1, 1), True).to(device) for t in (test.a, test.b))
    fake = translate(G, x, noise)
    out = {"metric/l1": l1_loss(fake, y), "metric/psnr": psnr(fake, y)}
    if args.metrics and "fid" in args.metrics and n >= 2:
        feats = [metrics.inception_features((metrics.to_uint8(t[i:i + 100]) for i in range(0, n, 100)), device,
                                            weights=args.inception_weights)[0] for t in (fake, y)]
        out["metric/fid"] = metrics.fid_from_features(*feats)
    return out


def load_data(args):
    train = datasets.load_translation(args, "train", paired=True, size=args.load_size)
    test = datasets.load_translation(args, "test", paired=True, size=args.image_size)  # no crop at test time
    if test.a.shape[1] != train.a.shape[1] or test.b.shape[1] != train.b.shape[1]:
        raise runlib.UsageError(f"{args.dataset}: the test images have {test.a.shape[1]} channels, the training "
                                f"images {train.a.shape[1]}: make them all grey or all colour")
    return train, test


def train(args):
    with runlib.as_usage_error():
        if unet_depth(args.image_size) < 6 and "dropout" in args.explicit:
            raise ValueError(f"a {args.image_size}x{args.image_size} U-Net has no dropout layers (they start at 64x64)")
        if args.gan_mode != "none" and args.netD != "pixel" and patch_output_size(args.image_size, args.d_layers) < 1:
            raise ValueError(f"a {args.d_layers}-layer PatchGAN needs images larger than {args.image_size}x"
                             f"{args.image_size}: lower --d-layers or raise --image-size")
    train_data, test = load_data(args)
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    r = runlib.setup(args, SCRIPT, data=train_data)
    device = r.device
    c_in, c_out = train_data.a.shape[1], train_data.b.shape[1]

    G, D = build(args, c_in, c_out)
    g_raw, d_raw = G, D
    G = r.prepare(G, channels_last=True)
    # fused: Adam in one pass over the 57M parameters (at batch 1 the update is a large share of a step)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt_g = torch.optim.Adam(G.parameters(), **adam)
    models, optimizers = {"G": g_raw}, {"G": opt_g}
    if D is not None:
        D = r.prepare(D, channels_last=True)
        opt_d = torch.optim.Adam(D.parameters(), **adam)
        models["D"], optimizers["D"] = d_raw, opt_d
    start = r.resume(models, optimizers)
    batches = datasets.translation_batches(train_data, args.batch_size // r.world_size, device, args.image_size,
                                           flip=not args.no_flip, rank=r.rank, world_size=r.world_size)
    fixed_x, fixed_y = (datasets.to_range(t[:8], (-1, 1), True).to(device) for t in (test.a, test.b))
    r.restore_rng()

    def samples():
        return {"test_panel": (panel(fixed_x, translate(g_raw, fixed_x, args.test_noise), fixed_y), 3)}

    def state():
        return {"models": {k: m.state_dict() for k, m in models.items()},
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "channels": [c_in, c_out]}

    step = start
    for step in range(start + 1, args.steps + 1):
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(step, args)
        x, y = next(batches)
        with r.autocast():
            fake = G(x)
        scalars = {}
        if D is not None:   # D first (official pix2pix_model.py): real pairs -> 1, generated pairs -> 0
            D.requires_grad_(True)
            with r.autocast():
                real_logits, fake_logits = D(x, y), D(x, fake.detach())
                loss_d = d_loss(real_logits, fake_logits, args.gan_mode)   # ½ of Eq. 1, ascended by D
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            D.requires_grad_(False)
            scalars = {"loss/D": loss_d}
            if r.is_log_step(step):   # D's real and fake halves, only for the log
                scalars.update({"loss/D_real": gan_loss(real_logits.detach(), True, args.gan_mode),
                                "loss/D_fake": gan_loss(fake_logits.detach(), False, args.gan_mode)})
        with r.autocast():
            # Eq. 4: L_cGAN (non-saturating) + λ L_L1
            loss_g, adv, l1 = g_loss(D(x, fake) if D is not None else None, fake, y, args.lambda_l1, args.gan_mode)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        scalars = {"loss/G": loss_g, "loss/G_GAN": adv, "loss/G_L1": l1, **scalars,
                   "opt/lr": opt_g.param_groups[0]["lr"]}
        if r.end_step(step, scalars, samples=samples, state=state,
                      evaluate=lambda: evaluate(g_raw, test, args, device, args.test_noise)):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Translating with a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    c_in, c_out = state["channels"]
    G = UNet(c_in, c_out, targs.image_size, targs.g_width, skips=targs.netG == "unet", dropout=targs.dropout)
    G.load_state_dict(state["models"]["G"])
    G.to(device)
    torch.manual_seed(args.seed)   # the test-time dropout
    noise, step = args.test_noise, state["step"]
    if args.input:   # the user's images, any size, resized to the training size
        try:   # all twice as wide as high: A|B pairs, as in the dataset folders, of which G translates the input half
            a, b, names = datasets.read_image_folder(args.input, targs.image_size, pairs=True, channels=c_in)
            x, half = (a, "A") if targs.direction == "AtoB" else (b, "B")
            what = f"the {half} halves (G's input) of {len(names)} A|B pairs"
        except runlib.UsageError:   # whole images
            x, names = datasets.read_image_folder(args.input, targs.image_size, channels=c_in)
            what = f"{len(names)} images"
        fake = translate(G, datasets.to_range(x, (-1, 1), True).to(device), noise)
        datasets.save_images(fake, out / "translated", names)
        print(f"translated {what} from {args.input} into {out / 'translated'}")
        return {"translated": len(names), "out": str(out / "translated")}
    test = datasets.load_translation(argparse.Namespace(**{**vars(targs), "download": args.download}), "test",
                                     paired=True, size=targs.image_size)
    x, y = (datasets.to_range(t, (-1, 1), True).to(device) for t in (test.a, test.b))
    fake = translate(G, x, noise)
    datasets.save_images(fake, out / "test", test.names)
    print(f"wrote {len(fake)} translations of the test split to {out / 'test'}")
    result = dict(runlib.write_samples(out, step, {"test_panel": panel(x[:16], fake[:16], y[:16])}, nrow=6))
    if args.eval:
        eargs = argparse.Namespace(**{**vars(targs), "eval_samples": args.eval_samples, "metrics": args.metrics,
                                      "inception_weights": args.inception_weights})
        scores = {k: float(v) for k, v in evaluate(G, test, eargs, device, noise).items()}
        print(" ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        result.update(scores)
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
