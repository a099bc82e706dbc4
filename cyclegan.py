"""Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks (CycleGAN) — Zhu, Park,
Isola, Efros, 2017. arXiv:1703.10593.

The idea: with no paired examples, learn G: A -> B and F: B -> A together. Each has a GAN loss that makes
its outputs look like the other domain, and the two must undo each other (cycle consistency), which rules
out the many mappings that match the distributions but forget the input:

    L_GAN(G, D_B) = E_b[(D_B(b) − 1)²] + E_a[D_B(G(a))²]        (least-squares GAN, Sec. 4; Eq. 1 with LSGAN)
    L_cyc(G, F)   = E_a[‖F(G(a)) − a‖₁] + E_b[‖G(F(b)) − b‖₁]    (Eq. 2)
    L_identity    = E_b[‖G(b) − b‖₁] + E_a[‖F(a) − a‖₁]          (Sec. 5.2, painting <-> photo)
    G, F minimise (D_B(G(a)) − 1)² + (D_A(F(b)) − 1)² + λ L_cyc + λ_id L_identity,   λ = 10   (Eq. 3)
    each D minimises ½ [(D(real) − 1)² + D(fake)²] ("we divide the objective by 2 while optimizing D"),
    its fakes drawn from a history of the last 50 generated images (Sec. 4, Shrivastava et al. 2017).

The nets (Sec. 4, Appendix 7.2; official models/networks.py):
    G, F: c7s1-64, d128, d256, R256 × 9 (6 for 128x128 images and below), u128, u64, c7s1-3 (tanh);
        c7s1-k = reflection pad 3, conv 7x7, InstanceNorm, ReLU; dk = conv 3x3 stride 2, IN, ReLU;
        Rk = residual block of two reflection-padded 3x3 convs with IN (ReLU between);
        uk = transposed conv 3x3 stride 2, IN, ReLU. --g-width sets the 64.
    D_A, D_B: D_A judges domain A (real a against F(b): the paper's D_X, the official code's netD_B), D_B domain B
        (real b against G(a): the paper's D_Y, the official netD_A); G and F are the official netG_A and netG_B.
        Each is the 70x70 PatchGAN C64-C128-C256-C512 (conv 4x4, stride 2, stride 1 for the last two
        convs, InstanceNorm but not on the first layer, LeakyReLU 0.2), then a conv to one score per patch.
    Weights ~ N(0, 0.02), biases 0 (official init_weights); InstanceNorm without affine parameters.
    Adam lr 2e-4, β = (0.5, 0.999), batch 1; one Adam for G and F together and one for both Ds; G and F are
    updated before the Ds (official cycle_gan_model.py). 100 epochs at the full lr, then 100 epochs decaying
    linearly to 0: --steps 266800 = 200 epochs of horse2zebra (max(|trainA|, |trainB|) = 1334 images
    per epoch, as the official unaligned dataset), the last --decay-fraction 0.5 decaying.
    Data: resize to 286 (--load-size), random crop 256 (--image-size), random flip (--no-flip), each image
    on its own; A and B are drawn independently.

Identity loss: on by default with λ_id = 0.5 λ (--lambda-identity 0.5, a fraction of λ, as the official
code's, its default for every dataset); the paper used it only for painting <-> photo (Sec. 5.2).
--lambda-identity 0 is the paper's setting for horse2zebra, maps and cityscapes. Being a fraction of λ, it
goes with the cycle term: --lambda-cyc 0 alone drops both. --identity-weight sets λ_id itself, so that
--lambda-cyc 0 --identity-weight 5 drops the cycle term alone (the paper's ablations, on cityscapes, had no
identity term to keep).

Evaluation (every --eval-every steps and at the end, on testA/testB, at most --eval-samples images per
domain, at --image-size with no crop or flip): metric/cycle_l1 = ½ (mean |F(G(a)) − a| + mean |G(F(b)) − b|)
on the [−1, 1] scale; with --metrics fid, metric/fid_AtoB = FID between G(testA) and testB, and
metric/fid_BtoA = FID between F(testB) and testA (Inception pool3, TF-FID resize, as common.metrics; on
test sets of 100-1000 images it is biased upward: compare runs, not papers). The paper's AMT and FCN scores
are not reproduced.

Usage:
    python cyclegan.py --cuda                                   # horse2zebra (downloads it)
    python cyclegan.py --dataset monet2photo --cuda             # identity loss on, as the paper for paintings
    python cyclegan.py --dataset PATH --cuda                    # PATH/{trainA,trainB,testA,testB}/
    # a quick CPU run (3 minutes) at 32x32, digits <-> stroke outlines of other digits (the tasks of
    # benchmarks/digit_translation.py: `make` builds them from MNIST idx files, `score` scores the checkpoint):
    python cyclegan.py --dataset tasks/outline --image-size 32 --load-size 36 --g-width 16 --d-width 16 --d-layers 2 --steps 2000 --metrics none
    # ... the same without the cycle term (add --lambda-cyc 0 --identity-weight 5: the identity term kept), or
    # without both (add --lambda-cyc 0)
    python cyclegan.py --sample runs/cyclegan/horse2zebra-.../ckpt.pt                          # testA -> B, testB -> A
    python cyclegan.py --sample runs/cyclegan/horse2zebra-.../ckpt.pt --input PATH [--direction BtoA]

Differences from the paper:
- The identity loss is on by default (official code) rather than only for painting <-> photo; see above.
- Images are drawn at random with replacement instead of in epochs; the lr decays linearly per step
  (official: per epoch). --steps for a dataset other than horse2zebra: 200 × max(|trainA|, |trainB|).
- Images are held in memory at --load-size (uint8; monet2photo's 7.4k images take 1.8 GB).
"""
import argparse
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data as datasets
from common import metrics
from common import run as runlib

SCRIPT = "cyclegan"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CycleGAN (Zhu et al. 2017): unpaired image-to-image translation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-blocks", type=int, default=9, help="residual blocks in G and F (default: 9 at 256x256, 6 below)")
    p.add_argument("--g-width", type=int, default=64, help="channels of G's first layer (c7s1-64)")
    p.add_argument("--d-width", type=int, default=64, help="channels of D's first layer (C64)")
    p.add_argument("--d-layers", type=int, default=3,
                   help="PatchGAN stride-2 convs: 3 = 70x70 patches, 2 = 34x34, 1 = 16x16")
    p.add_argument("--lambda-cyc", type=float, default=10.0, help="λ, the weight of the cycle loss (Eq. 3)")
    p.add_argument("--lambda-identity", type=float, default=0.5,
                   help="identity loss weight as a fraction of λ (official default; the paper: 0.5 for paintings only)")
    p.add_argument("--identity-weight", type=float, default=None,
                   help="the identity loss's weight itself, λ_id in Eq. 3 (default: --lambda-identity × --lambda-cyc); "
                        "give it to change λ without changing λ_id, e.g. --lambda-cyc 0 --identity-weight 5")
    p.add_argument("--pool-size", type=int, default=50, help="generated images kept for D (0 = none)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (G, F and the Ds)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    p.add_argument("--decay-fraction", type=float, default=0.5,
                   help="the last fraction of --steps over which the lr decays linearly to 0 (official 100 of 200 epochs)")
    d = p.add_argument_group("image-to-image data")
    d.add_argument("--direction", choices=["AtoB", "BtoA"], default="AtoB",
                   help="training: swap the domains for BtoA; with --sample --input: AtoB translates with G, BtoA with F")
    d.add_argument("--load-size", type=int, default=286, help="training images are resized to this, then cropped")
    d.add_argument("--no-flip", action="store_true", help="no random left-right flips")
    d.add_argument("--input", default=None, metavar="PATH",
                   help="with --sample: translate an image, or the images in a folder (any size), into PNGs of the "
                        "same names in <out>/translated_AtoB/ (or _BtoA/, see --direction)")
    runlib.add_args(p, dataset="horse2zebra", image_size=256, batch_size=1, steps=200 * 1334, log_every=100,
                    sample_every=2000, ckpt_every=2000, eval_every=0, eval_samples=10000, metrics="fid", export=False)
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 16, "load_size": 18, "g_width": 4, "d_width": 4, "d_layers": 1,
        "pool_size": 3, "batch_size": 2},
        defaults=lambda a: {"n_blocks": 9 if a.image_size >= 256 else 6,
                            "identity_weight": a.lambda_identity * a.lambda_cyc})
    if {"lambda_identity", "identity_weight"} <= set(args.explicit):
        raise runlib.UsageError("--identity-weight sets the identity loss's weight itself, --lambda-identity sets it "
                                "as a fraction of --lambda-cyc: give one of them")
    if args.input and not args.sample:
        raise runlib.UsageError("--input PATH translates your images with a trained model: give --sample CKPT too")
    if args.input and not Path(args.input).exists():
        raise runlib.UsageError(f"--input {args.input} does not exist: give an image or a folder of images")
    if not 0 <= args.decay_fraction <= 1:
        raise runlib.UsageError(f"--decay-fraction must be in [0, 1], got {args.decay_fraction}")
    if args.load_size < args.image_size:
        raise runlib.UsageError(f"--load-size {args.load_size} must be at least --image-size {args.image_size} "
                                "(images are resized to the load size, then cropped)")
    for name in ("lambda_cyc", "lambda_identity", "identity_weight", "pool_size"):
        if getattr(args, name) < 0:
            raise runlib.UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def patch_output_size(size, n_layers):
    """Side of the PatchGAN's logit map for an input side `size` (convs 4x4, padding 1)."""
    for n in range(n_layers + 2):
        size = (size + 2 - 4) // (2 if n < n_layers else 1) + 1
    return size


def check_size(image_size, d_layers):
    """G halves the image twice; the PatchGAN needs at least one output. ValueError otherwise."""
    if image_size < 8 or image_size % 4:
        raise ValueError(f"G downsamples twice by 2: --image-size must be a multiple of 4, at least 8; got {image_size}")
    if patch_output_size(image_size, d_layers) < 1:
        raise ValueError(f"a {d_layers}-layer PatchGAN needs images larger than {image_size}x{image_size}: "
                         "lower --d-layers or raise --image-size")


def init_weights(module):
    """Conv weights ~ N(0, 0.02), biases 0 (official init_weights, 'normal')."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


def norm(channels):
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResidualBlock(nn.Module):
    """Rk: x + [reflect-pad, conv 3x3, IN, ReLU, reflect-pad, conv 3x3, IN](x)."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm(channels), nn.ReLU(),
                                  nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm(channels))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """c7s1-64, d128, d256, n_blocks × R256, u128, u64, c7s1-C with tanh (Appendix 7.2)."""

    def __init__(self, in_channels, out_channels, width=64, n_blocks=9):
        super().__init__()
        w = width
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, w, 7), norm(w), nn.ReLU()]
        for k in (1, 2):   # d128, d256
            layers += [nn.Conv2d(w * k, w * 2 * k, 3, 2, 1), norm(w * 2 * k), nn.ReLU()]
        layers += [ResidualBlock(4 * w) for _ in range(n_blocks)]
        for k in (4, 2):   # u128, u64
            layers += [nn.ConvTranspose2d(w * k, w * k // 2, 3, 2, 1, output_padding=1), norm(w * k // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.net(x)


class PatchGAN(nn.Module):
    """C64-C128-C256 (stride 2), C512 (stride 1), conv to 1 score per patch: 70x70 patches for n_layers = 3."""

    def __init__(self, in_channels, width=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]   # no norm on the first layer
        c = width
        for n in range(1, n_layers + 1):
            c_next = width * min(2 ** n, 8)
            layers += [nn.Conv2d(c, c_next, 4, 2 if n < n_layers else 1, 1), norm(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.net(x)


class ImagePool:
    """The last `size` generated images (official util/image_pool.py). Until it is full, every new image
    is stored and returned; then each new image, with probability ½, replaces a random stored one, which is
    returned in its place, else it is returned itself. Draws from Python's `random`."""

    def __init__(self, size=50):
        self.size, self.images = size, []

    def query(self, images):
        if self.size == 0:   # no pool: D trains on the new images, detached from G's graph as the pool's are
            return images.detach()
        out = []
        for image in images.detach().split(1):
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif random.uniform(0, 1) > 0.5:
                i = random.randint(0, self.size - 1)
                out.append(self.images[i])
                self.images[i] = image
            else:
                out.append(image)
        return torch.cat(out)

    def state_dict(self):
        return {"images": torch.cat(self.images) if self.images else torch.empty(0)}

    def load_state_dict(self, state):
        self.images = list(state["images"].split(1)) if len(state["images"]) else []


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def lsgan_loss(scores, real):
    """(D − 1)² for real, D² for fake, a mean over the patch scores (LSGAN with targets 1 / 0)."""
    return F.mse_loss(scores, torch.ones_like(scores) if real else torch.zeros_like(scores))


def d_loss(real_scores, fake_scores):
    """½ [(D(real) − 1)² + D(fake)²] (Sec. 4: the D objective divided by 2)."""
    return 0.5 * (lsgan_loss(real_scores, True) + lsgan_loss(fake_scores, False))


def cycle_loss(reconstruction, original):
    """‖F(G(a)) − a‖₁ for one direction of Eq. 2 (a mean over pixels)."""
    return (reconstruction - original).abs().mean()


def identity_loss(mapped, original):
    """‖G(b) − b‖₁: G should leave an image of its target domain unchanged (Sec. 5.2)."""
    return (mapped - original).abs().mean()


def generator_loss(d_b_fake, d_a_fake, rec_a, a, rec_b, b, lambda_cyc, lambda_id=0.0, idt_b=None, idt_a=None):
    """Eq. 3 for G and F: GAN terms + λ L_cyc + λ_id L_identity (λ_id is the identity term's own weight, not a
    fraction of λ). Returns (total, dict of the terms)."""
    terms = {"G_GAN": lsgan_loss(d_b_fake, True), "F_GAN": lsgan_loss(d_a_fake, True),
             "cycle_A": cycle_loss(rec_a, a), "cycle_B": cycle_loss(rec_b, b)}
    total = terms["G_GAN"] + terms["F_GAN"] + lambda_cyc * (terms["cycle_A"] + terms["cycle_B"])
    if lambda_id > 0:
        terms["identity_B"], terms["identity_A"] = identity_loss(idt_b, b), identity_loss(idt_a, a)
        total = total + lambda_id * (terms["identity_B"] + terms["identity_A"])
    return total, terms


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, c_a, c_b):
    """G: A -> B, F: B -> A, D_A judging domain A and D_B judging domain B."""
    return {"G": Generator(c_a, c_b, args.g_width, args.n_blocks), "F": Generator(c_b, c_a, args.g_width, args.n_blocks),
            "D_A": PatchGAN(c_a, args.d_width, args.d_layers), "D_B": PatchGAN(c_b, args.d_width, args.d_layers)}


def lr_factor(step, args):
    """1 for the first (1 − decay_fraction) of the steps, then linear towards 0 (official 'linear' policy)."""
    n_decay = round(args.steps * args.decay_fraction)
    return 1.0 - max(0, step - (args.steps - n_decay)) / (n_decay + 1)


@torch.no_grad()
def translate(net, x, batch=50):
    return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])


def as_rgb(x, channels):
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x


def panel(x, y, z):
    c = max(x.shape[1], y.shape[1])
    return torch.stack([as_rgb(x, c), as_rgb(y, c), as_rgb(z, c)], 1).flatten(0, 1)


def evaluate(G, F_, test, args, device):
    """metric/cycle_l1 (and metric/fid_AtoB, metric/fid_BtoA with --metrics fid) on the test split."""
    a, b = (datasets.to_range(t[:args.eval_samples], (-1, 1), True).to(device) for t in (test.a, test.b))
    fake_b, fake_a = translate(G, a), translate(F_, b)
    out = {"metric/cycle_l1": 0.5 * (cycle_loss(translate(F_, fake_b), a) + cycle_loss(translate(G, fake_a), b))}
    if args.metrics and "fid" in args.metrics and min(len(a), len(b)) >= 2:
        def feats(x):
            return metrics.inception_features((metrics.to_uint8(x[i:i + 100]) for i in range(0, len(x), 100)), device,
                                              weights=args.inception_weights)[0]
        out["metric/fid_AtoB"] = metrics.fid_from_features(feats(fake_b), feats(b))
        out["metric/fid_BtoA"] = metrics.fid_from_features(feats(fake_a), feats(a))
    return out


def load_data(args):
    train = datasets.load_translation(args, "train", paired=False, size=args.load_size)
    test = datasets.load_translation(args, "test", paired=False, size=args.image_size)   # no crop at test time
    if (test.a.shape[1], test.b.shape[1]) != (train.a.shape[1], train.b.shape[1]):
        raise runlib.UsageError(f"{args.dataset}: the test and training images of a domain differ in channels: "
                                "make each domain all grey or all colour")
    return train, test


def train(args):
    with runlib.as_usage_error():
        check_size(args.image_size, args.d_layers)
    train_data, test = load_data(args)
    c_a, c_b = train_data.a.shape[1], train_data.b.shape[1]
    if args.identity_weight > 0 and c_a != c_b:
        raise runlib.UsageError(f"the identity loss needs domains with the same channels ({c_a} vs {c_b}): "
                                "use --lambda-identity 0")
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)
    r = runlib.setup(args, SCRIPT, data=train_data)
    device = r.device

    raw = build(args, c_a, c_b)
    # Contiguous layout on CUDA too: InstanceNorm2d returns a contiguous tensor from a channels-last one, so
    # with channels-last weights every conv/norm pair would convert the layout twice.
    G, F_, D_A, D_B = (r.prepare(raw[k], channels_last=False) for k in ("G", "F", "D_A", "D_B"))
    # fused: Adam in one pass over the 28M parameters (at batch 1 the update is a large share of a step)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt_g = torch.optim.Adam(list(G.parameters()) + list(F_.parameters()), **adam)      # one Adam for G and F
    opt_d = torch.optim.Adam(list(D_A.parameters()) + list(D_B.parameters()), **adam)   # one for both Ds
    pools = {"A": ImagePool(args.pool_size), "B": ImagePool(args.pool_size)}
    start = r.resume(raw, {"G": opt_g, "D": opt_d})
    if r.resume_state is not None:
        for k, pool in pools.items():
            pool.load_state_dict({"images": r.resume_state["pools"][k].to(device)})
    batches = datasets.translation_batches(train_data, args.batch_size // r.world_size, device, args.image_size,
                                           flip=not args.no_flip, rank=r.rank, world_size=r.world_size)
    fixed_a, fixed_b = (datasets.to_range(t[:4], (-1, 1), True).to(device) for t in (test.a, test.b))
    r.restore_rng()

    def samples():
        gb, fa = raw["G"](fixed_a), raw["F"](fixed_b)
        return {"test_A_to_B_to_A": (panel(fixed_a, gb, raw["F"](gb)), 3),
                "test_B_to_A_to_B": (panel(fixed_b, fa, raw["G"](fa)), 3)}

    def state():
        return {"models": {k: m.state_dict() for k, m in raw.items()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                "pools": {k: p.state_dict()["images"] for k, p in pools.items()}, "channels": [c_a, c_b]}

    step = start
    for step in range(start + 1, args.steps + 1):
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(step, args)
        a, b = next(batches)
        # G and F first (official), with the Ds frozen
        for D in (D_A, D_B):
            D.requires_grad_(False)
        with r.autocast():
            fake_b, fake_a = G(a), F_(b)
            idt = (G(b), F_(a)) if args.identity_weight > 0 else (None, None)
            # Eq. 3: LSGAN terms for G and F + λ (‖F(G(a)) − a‖₁ + ‖G(F(b)) − b‖₁) [+ identity]
            loss_g, terms = generator_loss(D_B(fake_b), D_A(fake_a), F_(fake_b), a, G(fake_a), b,
                                           args.lambda_cyc, args.identity_weight, *idt)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        # then both Ds, each on real images and on images from its history pool
        for D in (D_A, D_B):
            D.requires_grad_(True)
        with r.autocast():
            scores = {"B_real": D_B(b), "B_fake": D_B(pools["B"].query(fake_b)),
                      "A_real": D_A(a), "A_fake": D_A(pools["A"].query(fake_a))}
            # ½ [(D(real) − 1)² + D(fake)²] per D, fakes from the history pools
            loss_d_b, loss_d_a = d_loss(scores["B_real"], scores["B_fake"]), d_loss(scores["A_real"], scores["A_fake"])
        opt_d.zero_grad(set_to_none=True)
        (loss_d_a + loss_d_b).backward()
        opt_d.step()

        scalars = {"loss/G_total": loss_g, **{f"loss/{k}": v for k, v in terms.items()},
                   "loss/D_A": loss_d_a, "loss/D_B": loss_d_b, "opt/lr": opt_g.param_groups[0]["lr"]}
        if r.is_log_step(step):   # each D's real and fake halves, only for the log
            scalars.update({f"loss/D_{k}": lsgan_loss(v.detach(), k.endswith("real")) for k, v in scores.items()})
        if r.end_step(step, scalars, samples=samples, state=state,
                      evaluate=lambda: evaluate(raw["G"], raw["F"], test, args, device)):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Translating with a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    c_a, c_b = state["channels"]
    G = Generator(c_a, c_b, targs.g_width, targs.n_blocks).to(device).eval()
    F_ = Generator(c_b, c_a, targs.g_width, targs.n_blocks).to(device).eval()
    G.load_state_dict(state["models"]["G"])
    F_.load_state_dict(state["models"]["F"])
    if args.input:   # the user's images, any size, resized to the training size
        net, channels = (G, c_a) if args.direction == "AtoB" else (F_, c_b)
        x, names = datasets.read_image_folder(args.input, targs.image_size, channels=channels)
        folder = out / f"translated_{args.direction}"
        datasets.save_images(translate(net, datasets.to_range(x, (-1, 1), True).to(device)), folder, names)
        print(f"translated {len(names)} images from {args.input} ({args.direction}) into {folder}")
        return {"translated": len(names), "out": str(folder)}
    test = datasets.load_translation(argparse.Namespace(**{**vars(targs), "download": args.download}), "test",
                                     paired=False, size=targs.image_size)
    a, b = (datasets.to_range(t, (-1, 1), True).to(device) for t in (test.a, test.b))
    fake_b, fake_a = translate(G, a), translate(F_, b)
    datasets.save_images(fake_b, out / "AtoB", test.names)
    datasets.save_images(fake_a, out / "BtoA", test.names_b)
    print(f"wrote G(testA) to {out / 'AtoB'} and F(testB) to {out / 'BtoA'}")
    result = dict(runlib.write_samples(out, state["step"], {
        "test_A_to_B_to_A": panel(a[:16], fake_b[:16], translate(F_, fake_b[:16])),
        "test_B_to_A_to_B": panel(b[:16], fake_a[:16], translate(G, fake_a[:16]))}, nrow=6))
    if args.eval:
        eargs = argparse.Namespace(**{**vars(targs), "eval_samples": args.eval_samples, "metrics": args.metrics,
                                      "inception_weights": args.inception_weights})
        scores = {k: float(v) for k, v in evaluate(G, F_, test, eargs, device).items()}
        print(" ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        result.update(scores)
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
