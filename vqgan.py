"""Taming Transformers for High-Resolution Image Synthesis (VQGAN) — Esser, Rombach, Ommer, 2020.
arXiv:2012.09841.

The idea: two stages. Stage 1 (the VQGAN) learns a codebook of image parts: a convolutional encoder E maps an
image to a grid of vectors, each is replaced by its nearest codebook entry, and a decoder G maps the grid of
codes back to an image; perceptual and adversarial losses let a coarse grid (f = 16: 256 px → 16x16 codes)
keep sharp detail. Stage 2 models the codes with an autoregressive transformer: an image becomes a sequence
of code indices (row by row), a GPT learns p(s) = Π_i p(s_i | s_<i, c), and sampling it then decoding with G
makes new images.

Stage 1 objective (Sec. 3.1; z = E(x), z_q = q(z) the nearest codes, x̂ = G(z_q)):
    q(z)_ij = argmin_k ‖z_ij − e_k‖                                                        (Eq. 2)
    L_VQ    = L_rec + ‖sg[E(x)] − z_q‖² + β ‖sg[z_q] − E(x)‖²   (paper's form, β = 0.25)  (Eq. 4)
              gradients pass the quantiser unchanged: x̂ = G(z + sg[z_q − z])  (straight-through)
    L_rec   = |x − x̂|₁ + LPIPS(x, x̂)                                                  (perceptual loss, Sec. 3.2)
    L_GAN   = hinge: D minimises E relu(1 − D(x)) + E relu(1 + D(x̂)) (halved); G minimises −E D(x̂)  (Eq. 5)
    loss    = L_VQ + λ · L_GAN,   λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ)                 (Eq. 7)
              G_L = the decoder's last layer; the code clamps λ to [0, 1e4], uses δ = 1e-4 and multiplies
              λ by disc_weight = 0.8; L_GAN (and D's training) starts after --disc-start steps.
Stage 2 objective (Sec. 3.2): p(s) = Π_i p(s_i | s_<i) (Eq. 8), L_Transformer = E_x[−log p(s)] (Eq. 9): the
cross-entropy of each code index given the ones before it, with a class token first for class-conditional
models (p(s | c), Eq. 10).

Architecture and defaults (CompVis/taming-transformers; the paper gives few numbers; the blocks at their classes):
    Encoder / decoder (taming/modules/diffusionmodules/model.py; configs/faceshq_vqgan.yaml): ch (--g-width) 128,
      ch_mult 1,1,2,2,4 (f = 2^(len − 1) = 16), 2 ResNet blocks per resolution, GroupNorm 32 groups, ε 1e-6,
      self-attention at attn_resolutions [16] (the lowest resolution at 256 px; here the lowest unless
      --attn-resolutions says otherwise) and in the middle block; no output activation.
    Codebook: n_embed 1024, embed_dim 256 (= z_channels), entries ~ U(±1/n_embed) (quantize.py), 1x1 convs
      quant_conv / post_quant_conv around it (taming/models/vqgan.py).
    β: VectorQuantizer2 is built with β = 0.25 and legacy=True, which puts β on the codebook term:
      ‖sg[z_q] − E(x)‖² + 0.25 ‖z_q − sg[E(x)]‖² (the README's "training with β = 1.0"); the released models were
      trained so, and so is the default here (--beta-on codebook). --beta-on commitment is the paper's Eq. 4.
    D (taming/modules/discriminator/model.py): the pix2pix PatchGAN, 3 layers, ndf 64 (--d-width), weights
      ~ N(0, 0.02), BN scales ~ N(1, 0.02).
    Loss (taming/modules/losses/vqperceptual.py, faceshq_vqgan.yaml): codebook_weight 1, perceptual_weight 1,
      disc_weight 0.8, disc_factor 1, disc_start 30001 (faces; custom_vqgan.yaml 10000, imagenet 250001).
    Optimisers: Adam β (0.5, 0.9) for both nets, lr = 4.5e-6 × batch (base_learning_rate × batch × GPUs, main.py);
      batch 3 (faceshq_vqgan.yaml, per GPU).
    Transformer (taming/modules/transformer/mingpt.py, configs/faceshq_transformer.yaml): GPT-2 blocks, learned
      position embeddings, no dropout; 24 layers, 16 heads, 1024 dims for 256 px images, the GPT class's defaults
      12 layers, 8 heads, 256 dims for smaller ones (fewer codes); weights ~ N(0, 0.02). AdamW β (0.9, 0.95),
      weight decay 0.01 on linear weights only, lr = 4.5e-6 × batch (cond_transformer.py), batch 2
      (faceshq_transformer.yaml). Sampling: top-k 100, temperature 1 (cond_transformer.py's log_images).

Metrics: stage 1 logs reconstruction L1 and PSNR on held-out images (the test split, or the first tenth of a set
without one, at most 10,000 images, which training never sees), codebook usage (the share of the n_embed codes
used and the perplexity exp H(p) of their frequencies, over each --log-every window in training and on the
held-out images; dead codes are the known failure of VQ models) and rFID (FID of the reconstructions against the
held-out images, as Table 5; --metrics, needs the FID Inception weights). Stage 2 logs the cross-entropy (nats
per code) and FID of samples (Table 3). Perceptual loss: common/lpips.py (the VGG16 LPIPS of the lpips package);
its weights download on first use (--lpips-weights / $LPIPS_WEIGHTS for the linear heads, the torch hub cache for
torchvision's VGG16); --perceptual-weight 0 trains with L1 alone when they cannot be had.

Usage:
    python vqgan.py --cuda                                        # stage 1: VQGAN, faces (CelebA) at 256 px
    python vqgan.py --stage 2 --vqgan runs/vqgan/celeba-.../ckpt.pt --cuda          # stage 2: the transformer
    python vqgan.py --dataset /path/to/ffhq --cuda                # the paper's FFHQ (an image folder)
    # a quick CPU run on digits at 32 px, f = 4 (8x8 codes), without the LPIPS and Inception weights, scored
    # with the digit classifier (about 1.4 steps/s on one core; --disc-start 500 gives the GAN term the second
    # half; --restart-dead-codes keeps the codebook in use, see below):
    python vqgan.py --dataset mnist --image-size 32 --g-width 32 --ch-mult 1,2,2 --num-res-blocks 1 \\
        --norm-groups 8 --embed-dim 64 --d-width 32 --batch-size 16 --steps 1000 --disc-start 500 \\
        --restart-dead-codes 100 --perceptual-weight 0 --metrics cfid,agree --eval-samples 1000
    python vqgan.py --stage 2 --vqgan runs/vqgan/mnist-.../ckpt.pt --n-layer 4 --n-head 4 --n-embd 128 \\
        --batch-size 32 --steps 2000 --metrics cfid --eval-samples 1000   # ~10 min on one core
    python vqgan.py --sample runs/vqgan/.../ckpt.pt [--eval]     # stage 1: reconstructions
    python vqgan.py --sample runs/vqgan/.../transformer.pt        # stage 2: samples (and reconstructions)

Differences from the paper:
- Two commands, one per stage, each with its own step counter and files (ckpt.pt, args.json, summary.json;
  transformer.pt, args-transformer.json, summary-transformer.json: both can share one --out, and --resume auto
  continues the stage asked for); a stage-2 checkpoint holds the frozen VQGAN it was trained on.
- β sits on the codebook term by default, as the official code trained it (see above); --beta-on commitment
  gives the paper's Eq. 4. The adaptive weight uses the code's δ = 1e-4 and clamp [0, 1e4] (paper: δ = 1e-6).
- D's update reuses the reconstruction of the autoencoder's step (before that step's update); the official
  Lightning loop ran the autoencoder again for D. Before --disc-start neither D nor L_GAN is computed (the code
  computed both and multiplied them by 0, which leaves every weight as here).
- Default data: CelebA at 256 px (torchvision's aligned crops upscaled), standing in for FFHQ / CelebA-HQ,
  which torchvision cannot download (give an image folder). Training length is not given by the paper;
  --steps 100000 per stage is our choice.
- The unconditional start token and the class tokens are tokens of their own (vocabulary n_embed + 1 or
  n_embed + classes) and the output layer predicts codes only; the official code used code indices for them
  (sos_token 0, class c as token c), sharing embeddings with the codes.
- Attention in the autoencoder uses torch's scaled_dot_product_attention (the same softmax(qkᵀ/√c)v).
- GroupNorm's number of groups is a flag (--norm-groups, 32 in the code) so small widths work.
- --restart-dead-codes STEPS (off by default, as the code): every STEPS steps the codes that no encoder output
  picked in those steps move onto random encoder outputs of the batch (the restarts of Jukebox, Dhariwal et
  al. 2020). With the code's U(±1/K) initialisation the encoder's outputs start far from almost every code, so
  a few codes take everything: in the quick run above on the 10,000 MNIST test digits as an idx folder (seeds
  0–2, step 500, before the GAN term) 11–12 of 1024 codes were in use without restarts and 93–94% with them (on
  the held-out first 1,000: PSNR 20.8 vs 23.8 dB, classifier FID of the reconstructions 38 vs 26).
- Sampling recomputes the whole prefix for every token (the code's sample(); no key/value cache).
"""
import argparse
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint as ckpt_io
from common import data as datasets
from common import digits
from common import lpips as lpips_lib
from common import metrics
from common import run as runlib

SCRIPT = "vqgan"
CKPT_NAMES = {1: "ckpt.pt", 2: "transformer.pt"}   # one checkpoint file per stage in the run directory
BASE_LR = 4.5e-6   # base_learning_rate of every config; lr = base × batch (main.py)
STAGE_FLAGS = {   # the flags that act in one stage only (refused in the other) with each size's least value
    1: dict(g_width=1, ch_mult=None, num_res_blocks=1, attn_resolutions=None, norm_groups=1, n_embed=1, embed_dim=1,
            beta=None, beta_on=None, d_width=1, disc_layers=1, disc_start=None, disc_weight=None, disc_factor=None,
            codebook_weight=None, perceptual_weight=None, lpips_weights=None, restart_dead_codes=0),
    2: dict(vqgan=None, conditional=None, n_layer=1, n_head=1, n_embd=1, weight_decay=None, top_k=0, temperature=None)}
FACES_GPT = {"n_layer": 24, "n_head": 16, "n_embd": 1024}   # configs/faceshq_transformer.yaml


def ints(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="VQGAN + transformer (Esser, Rombach, Ommer 2020)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1,
                   help="1: train the VQGAN (writes <out>/ckpt.pt); 2: train the transformer on the codes of a --vqgan "
                        "checkpoint (writes <out>/transformer.pt)")
    g = p.add_argument_group("stage 1: the VQGAN")
    g.add_argument("--g-width", type=int, default=128, help="ch: base channels of the encoder and the decoder")
    g.add_argument("--ch-mult", type=ints, default=(1, 1, 2, 2, 4),
                   help="channel multiplier per resolution; downsampling f = 2^(len − 1)")
    g.add_argument("--num-res-blocks", type=int, default=2, help="ResNet blocks per resolution")
    g.add_argument("--attn-resolutions", type=ints, default=None,
                   help="resolutions with self-attention after each block (default: the lowest, 16 at 256 px)")
    g.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups")
    g.add_argument("--n-embed", type=int, default=1024, help="codebook size K")
    g.add_argument("--embed-dim", type=int, default=256, help="code dimension (= z_channels)")
    g.add_argument("--beta", type=float, default=0.25, help="β of the codebook loss")
    g.add_argument("--beta-on", choices=["codebook", "commitment"], default="codebook",
                   help="the term β weighs: codebook (the official code, legacy=True) or commitment (Eq. 4)")
    g.add_argument("--restart-dead-codes", type=int, default=0, metavar="STEPS",
                   help="not in the paper: every STEPS steps the codes unused in them move onto encoder outputs "
                        "(0: never)")
    g.add_argument("--d-width", type=int, default=64, help="ndf: channels of D's first layer")
    g.add_argument("--disc-layers", type=int, default=3, help="stride-2 layers of the PatchGAN D")
    g.add_argument("--disc-start", type=int, default=30001, help="steps before L_GAN and D's training start")
    g.add_argument("--disc-weight", type=float, default=0.8, help="multiplies the adaptive weight λ")
    g.add_argument("--disc-factor", type=float, default=1.0, help="multiplies L_GAN and D's loss once on")
    g.add_argument("--codebook-weight", type=float, default=1.0, help="weight of the codebook/commitment terms")
    g.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight in L_rec (0: L1 alone)")
    g.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="LPIPS linear heads (lpips' v0.1 vgg.pth; default: $LPIPS_WEIGHTS or the torch hub cache)")
    g = p.add_argument_group("stage 2: the transformer")
    g.add_argument("--vqgan", default=None, metavar="CKPT", help="the stage-1 checkpoint whose codes are modelled")
    g.add_argument("--conditional", action="store_true", help="class-conditional: a class token comes first")
    g.add_argument("--n-layer", type=int, default=12, help="transformer blocks (24 for images of 128 px or more)")
    g.add_argument("--n-head", type=int, default=8, help="attention heads (16 for images of 128 px or more)")
    g.add_argument("--n-embd", type=int, default=256, help="model width (1024 for images of 128 px or more)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of linear weights")
    g.add_argument("--top-k", type=int, default=100, help="sample among the k most likely codes (0: all)")
    g.add_argument("--temperature", type=float, default=1.0, help="divides the logits when sampling")
    g = p.add_argument_group("both stages")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: 4.5e-6 × --batch-size)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (stage 2: 0.9)")
    g.add_argument("--beta2", type=float, default=0.9, help="Adam beta2 (stage 2: 0.95)")
    runlib.add_args(p, dataset="celeba", image_size=256, batch_size=3, steps=100_000, log_every=100,
                    sample_every=1000, ckpt_every=2000, eval_every=0, eval_samples=10000, metrics="fid",
                    digits=True)
    return runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 16, "g_width": 8, "ch_mult": (1, 2, 2), "num_res_blocks": 1,
        "norm_groups": 4, "n_embed": 32, "embed_dim": 8, "d_width": 8, "disc_layers": 2, "disc_start": 2,
        "perceptual_weight": 0.0, "n_layer": 1, "n_head": 2, "n_embd": 16}, defaults=stage_defaults)


def stage_defaults(a):
    """lr = 4.5e-6 × batch (main.py: base_learning_rate × batch × GPUs × accumulation); stage 2: AdamW's β and the
    batch of the transformer configs (and the VQGAN's data and image size: read_vqgan)."""
    out = {"lr": BASE_LR * a.batch_size}
    if a.stage == 2:
        out.update(beta1=0.9, beta2=0.95, **({} if a.dry_run else {"batch_size": 2}))
    return out


# ------------------------------------------------------------------------------------------------
# Stage 1: encoder, decoder, quantiser, D, losses (taming/modules/diffusionmodules/model.py, vqvae/quantize.py,
# discriminator/model.py, losses/vqperceptual.py)
# ------------------------------------------------------------------------------------------------

def check_autoencoder(image_size, ch_mult, width, groups, attn_resolutions=()):
    """ValueError unless the encoder can downsample image_size by f = 2^(len(ch_mult) − 1) and every GroupNorm
    divides its channels; returns the code grid's side."""
    if not ch_mult or min(ch_mult) < 1 or width < 1 or groups < 1:
        raise ValueError("--ch-mult needs positive entries and --g-width, --norm-groups must be positive")
    f = 2 ** (len(ch_mult) - 1)
    if image_size < f or image_size % f:
        raise ValueError(f"the encoder downsamples by f = {f} (--ch-mult {','.join(map(str, ch_mult))}); "
                         f"--image-size {image_size} is not a multiple of {f}")
    bad = [width * m for m in (1, *ch_mult) if (width * m) % groups]
    if bad:
        raise ValueError(f"GroupNorm with --norm-groups {groups} cannot split {bad[0]} channels "
                         f"(--g-width × --ch-mult); choose groups that divide them")
    resolutions = {image_size // 2 ** i for i in range(len(ch_mult))}
    if set(attn_resolutions) - resolutions:
        raise ValueError(f"--attn-resolutions {sorted(set(attn_resolutions) - resolutions)} is not a resolution "
                         f"of the encoder ({sorted(resolutions)})")
    return image_size // f


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm → swish → conv3x3, twice, plus the input (a 1x1 conv when the width changes)."""

    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in, eps=1e-6), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out, eps=1e-6), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions (1x1 convs for q, k, v and the output), residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (self.q(y), self.k(y), self.v(y)))  # (b, 1, hw, c)
        y = F.scaled_dot_product_attention(q, k, v)                    # softmax(q kᵀ / √c) v
        return x + self.proj_out(y[:, 0].transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """3x3 conv with stride 2 after padding one pixel right and bottom (the code's asymmetric padding)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(c, groups):
    return [ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)]


class Encoder(nn.Sequential):
    """conv_in; per resolution num_res_blocks ResNet blocks (+ attention at attn_resolutions) and a downsampling
    (none after the last); middle block (ResNet, attention, ResNet); GroupNorm, swish, conv_out → z_channels."""

    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, groups):
        layers, c, res = [nn.Conv2d(in_channels, ch, 3, 1, 1)], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(c, ch * mult, groups))
                c = ch * mult
                if res in attn_resolutions:
                    layers.append(AttnBlock(c, groups))
            if level != len(ch_mult) - 1:
                layers.append(Downsample(c))
                res //= 2
        layers += middle(c, groups) + [nn.GroupNorm(groups, c, eps=1e-6), nn.SiLU(), nn.Conv2d(c, z_channels, 3, 1, 1)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """The encoder mirrored: conv_in, middle block, per resolution (lowest first) num_res_blocks + 1 ResNet
    blocks (+ attention) and a nearest ×2 upsampling (none after the last); GroupNorm, swish, conv_out."""

    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, groups):
        c, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        layers = [nn.Conv2d(z_channels, c, 3, 1, 1)] + middle(c, groups)
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(c, ch * ch_mult[level], groups))
                c = ch * ch_mult[level]
                if res in attn_resolutions:
                    layers.append(AttnBlock(c, groups))
            if level != 0:
                layers.append(Upsample(c))
                res *= 2
        layers += [nn.GroupNorm(groups, c, eps=1e-6), nn.SiLU(), nn.Conv2d(c, out_channels, 3, 1, 1)]
        super().__init__(*layers)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation of (B, D, H, W) vectors onto K codes (Eq. 2) with straight-through
    gradients. Returns (z_q, codebook loss, indices (B, H, W))."""

    def __init__(self, n_embed, dim, beta=0.25, beta_on="codebook"):
        super().__init__()
        if beta_on not in ("codebook", "commitment"):
            raise ValueError(f"beta_on must be 'codebook' or 'commitment', got {beta_on!r}")
        self.beta, self.beta_on = beta, beta_on
        self.codebook = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / n_embed, 1.0 / n_embed)   # quantize.py

    def forward(self, z):
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        with torch.autocast(z.device.type, enabled=False):   # distances in float32: bf16 would pick wrong codes
            e, f32 = self.codebook.weight.float(), flat.float()
            dist = f32.square().sum(1, keepdim=True) - 2 * f32 @ e.T + e.square().sum(1)   # ‖z − e_k‖²
        idx = dist.argmin(1)
        z_q = self.codebook(idx).view(b, h, w, d).permute(0, 3, 1, 2)
        codebook_term = F.mse_loss(z_q, z.detach().float())       # ‖sg[E(x)] − z_q‖²  moves the codes
        commitment_term = F.mse_loss(z.float(), z_q.detach())     # ‖sg[z_q] − E(x)‖²  moves the encoder
        if self.beta_on == "commitment":
            loss = codebook_term + self.beta * commitment_term    # Eq. 4
        else:
            loss = commitment_term + self.beta * codebook_term    # the official code (legacy=True)
        z_q = z + (z_q - z).detach()                              # straight-through: ∂z_q/∂z = I
        return z_q, loss, idx.view(b, h, w)

    @torch.no_grad()
    def restart(self, dead, z):
        """Move the codes `dead` (indices) onto randomly chosen rows of z (N, D), encoder outputs, so that they
        are picked again (not in the paper: the dead-code restarts of Jukebox, Dhariwal et al. 2020)."""
        pick = torch.randint(len(z), (len(dead),), device=z.device)
        self.codebook.weight[dead] = z[pick].to(self.codebook.weight.dtype)

    def lookup(self, idx):
        """Indices (B, H, W) → code vectors (B, D, H, W)."""
        return self.codebook(idx).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    """E → quant_conv → quantiser → post_quant_conv → G (taming/models/vqgan.py's VQModel)."""

    def __init__(self, channels, resolution, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 attn_resolutions=None, n_embed=1024, embed_dim=256, groups=32, beta=0.25, beta_on="codebook"):
        super().__init__()
        side = check_autoencoder(resolution, ch_mult, ch, groups, attn_resolutions or ())
        attn = tuple(attn_resolutions) if attn_resolutions else (side,)   # default: the lowest resolution
        net = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn,
                   resolution=resolution, z_channels=embed_dim, groups=groups)
        self.encoder = Encoder(channels, **net)
        self.quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.quantizer = VectorQuantizer(n_embed, embed_dim, beta, beta_on)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.decoder = Decoder(channels, **net)
        self.n_embed, self.side = n_embed, side

    def encode(self, x):
        return self.quantizer(self.quant_conv(self.encoder(x)))

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, idx):
        return self.decode(self.quantizer.lookup(idx))

    def forward(self, x):
        z_q, codebook_loss, idx = self.encode(x)
        return self.decode(z_q), codebook_loss, idx

    def last_layer(self):
        """G_L of Eq. 7: the weight of the decoder's output convolution."""
        return self.decoder[-1].weight


def patch_output_size(image_size, n_layers):
    """Side of the PatchGAN's logit map: n stride-2 4x4 convs (pad 1), then two stride-1 4x4 convs (pad 1)."""
    s = image_size
    for _ in range(n_layers):
        s = (s + 2 - 4) // 2 + 1
    return s - 2


class PatchDiscriminator(nn.Sequential):
    """The pix2pix PatchGAN (taming's NLayerDiscriminator): conv4x4/2 (ndf) + LeakyReLU; n − 1 conv4x4/2 layers
    doubling the width (at most 8 ndf) + BN + LeakyReLU; conv4x4/1 + BN + LeakyReLU; conv4x4/1 → 1 logit per patch."""

    def __init__(self, channels, ndf=64, n_layers=3):
        layers, c = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        super().__init__(*layers)
        for m in self.modules():   # weights_init of the code
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


def hinge_d_loss(real_logits, fake_logits):
    """½ (E relu(1 − D(x)) + E relu(1 + D(x̂))) (vqperceptual.py's hinge_d_loss)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss, g_loss, last_layer, delta=1e-4, max_weight=1e4):
    """λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ), clamped to [0, max_weight], no gradient (Eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + delta)).clamp(0.0, max_weight).detach()


def codebook_usage(counts):
    """(share of codes used, perplexity exp H(p)) of code counts (K,); perplexity K means uniform use."""
    p = counts.double() / counts.sum().clamp_min(1)
    return (counts > 0).double().mean(), torch.exp(-torch.xlogy(p, p).sum())


# ------------------------------------------------------------------------------------------------
# Stage 2: the transformer (taming/modules/transformer/mingpt.py)
# ------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"--n-embd {dim} is not divisible by --n-head {heads}")
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # position i attends to positions ≤ i
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                                              nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Tokens (B, T) → logits (B, T, n_codes) of the next code. Tokens < n_codes are codes; the start token
    (unconditional) or the class tokens (class-conditional) come after them in the vocabulary."""

    def __init__(self, vocab, n_codes, block_size, n_layer=12, n_head=8, n_embd=256):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.blocks = nn.Sequential(*[Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, n_codes, bias=False)
        for m in self.modules():   # mingpt's _init_weights
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens):
        if tokens.shape[1] > self.pos_emb.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the block size {self.pos_emb.shape[1]}")
        x = self.tok_emb(tokens) + self.pos_emb[:, :tokens.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))


def gpt_loss(gpt, first, codes):
    """Eq. 9: −log p(s) per code, p(s) = Π_i p(s_i | first, s_<i); first: (B,) start or class tokens,
    codes: (B, T) the code indices row by row."""
    tokens = torch.cat([first[:, None], codes[:, :-1]], 1)
    logits = gpt(tokens)
    return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())


def top_k_filter(logits, k):
    """Keep the k largest logits per row (ties with the k-th are kept), set the rest to −inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@torch.no_grad()
def sample_codes(gpt, first, n_codes, top_k=100, temperature=1.0):
    """Draw codes one at a time from softmax(top_k(logits / temperature)), each given the ones before."""
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    tokens = first[:, None]
    for _ in range(n_codes):
        logits = gpt(tokens)[:, -1].float() / temperature
        nxt = torch.multinomial(top_k_filter(logits, top_k).softmax(-1), 1)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens[:, 1:]


# ------------------------------------------------------------------------------------------------
# Training, evaluation, sampling
# ------------------------------------------------------------------------------------------------

def build_vqgan(a, shape):
    return VQGAN(shape[0], shape[-1], a.g_width, tuple(a.ch_mult), a.num_res_blocks, a.attn_resolutions,
                 a.n_embed, a.embed_dim, a.norm_groups, a.beta, a.beta_on)


def read_vqgan(args):
    """The stage-1 checkpoint --vqgan (a clear error for anything else). Stage 2 models the VQGAN's data at its image
    size: --dataset, --data-root and --image-size default to the VQGAN's, and at 128 px or more the transformer's size
    to the faces config's (explicit flags win)."""
    if not args.vqgan:
        raise runlib.UsageError("stage 2 needs the VQGAN's checkpoint: --vqgan CKPT")
    state = ckpt_io.load(args.vqgan, SCRIPT)
    if state.get("stage") != 1:
        raise runlib.UsageError(f"--vqgan {args.vqgan} is a stage-{state.get('stage')} checkpoint; stage 2 needs the "
                                "VQGAN's (stage-1) checkpoint")
    vq_args = state["args"]
    defaults = {name: vq_args[name] for name in ("dataset", "data_root", "image_size")}
    if vq_args["image_size"] >= 128 and not args.dry_run:
        defaults.update(FACES_GPT)
    vars(args).update({name: value for name, value in defaults.items() if name not in args.explicit})
    if args.image_size != vq_args["image_size"]:
        raise runlib.UsageError(f"the VQGAN was trained at {vq_args['image_size']} px; stage 2 trains at that size, "
                                f"not --image-size {args.image_size}")
    return state


def load_vqgan(state, device):
    """The frozen VQGAN of a stage-1 checkpoint: in eval mode, no gradients."""
    vq = build_vqgan(argparse.Namespace(**state["args"]), state["data_shape"])
    vq.load_state_dict(state["models"]["vqgan"])
    return vq.to(device).eval().requires_grad_(False)


def build_gpt(a, n_embed, side, num_classes):
    starts = num_classes if a.conditional else 1     # start tokens after the codes in the vocabulary
    return GPT(n_embed + starts, n_embed, side * side, a.n_layer, a.n_head, a.n_embd)


def first_tokens(n_embed, labels=None, n=None, device="cpu"):
    """The token that starts each sequence: n_embed (unconditional) or n_embed + class."""
    if labels is None:
        return torch.full((n,), n_embed, dtype=torch.long, device=device)
    return labels.long() + n_embed


@torch.no_grad()
def generate(vq, gpt, n, device, num_classes=0, top_k=100, temperature=1.0, labels=None):
    """n images from the transformer's codes; class-conditional models take `labels` (default: uniform)."""
    if num_classes and labels is None:
        labels = torch.randint(num_classes, (n,), device=device)
    codes = sample_codes(gpt, first_tokens(vq.n_embed, labels, n, device), vq.side * vq.side, top_k, temperature)
    return vq.decode_indices(codes.view(n, vq.side, vq.side)).float().clamp(-1, 1)


def split_held_out(args, data, n):
    """(training data, up to n held-out uint8 images, their labels): a named dataset's test split, else the first
    tenth, at most 10,000 images (the official FFHQ validation list: 10,000 of 70,000; with class subfolders, the
    first classes). The digit classifier holds out the last 2,000 of a folder of idx files (common/digits.py)."""
    if args.dataset in datasets.IN_MEMORY + datasets.STREAMED + ("stacked-mnist",) or args.dataset.startswith("lsun:"):
        train, held = data, datasets.load(args, split="test")
    elif len(data) < 2:
        raise runlib.UsageError(f"{args.dataset} holds a single image; one is held out, so at least 2 are needed")
    else:
        k = max(1, min(len(data) // 10, 10_000))
        held, n = data, min(n, k)
        train = (dataclasses.replace(data, images=data.images[k:], labels=data.labels[k:]) if data.images is not None
                 else dataclasses.replace(data, dataset=torch.utils.data.Subset(data.dataset, range(k, len(data)))))
    if held.images is not None:
        return train, held.images[:n], held.labels[:n]
    items = [held.dataset[i] for i in range(min(n, len(held)))]
    return train, torch.stack([metrics.to_uint8(x, (0, 1)) for x, _ in items]), torch.tensor([y for _, y in items])


@torch.no_grad()
def reconstruct(vq, images, device, batch=100):
    """uint8 images → (them in [−1, 1], their reconstructions clamped to [−1, 1], code indices), on the CPU."""
    x, rec, idx = images.float() / 127.5 - 1, [], []
    with runlib.eval_mode(vq):
        for part in x.split(batch):
            r, _, k = vq(part.to(device))
            rec.append(r.float().clamp(-1, 1).cpu())
            idx.append(k.cpu())
    return x, torch.cat(rec), torch.cat(idx)


@torch.no_grad()
def evaluate_stage1(vq, held, args, device, real_stats=None, labels=None, data=None, clf=None):
    """L1, PSNR (dB, on [0, 1] images, per-image mean), codebook usage of the held-out images' reconstructions;
    rFID against real_stats (--metrics); on digits cfid and agree (classified as the original's label)."""
    x, rec, idx = reconstruct(vq, held, device)
    mse = ((rec - x) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    used, ppl = codebook_usage(torch.bincount(idx.flatten(), minlength=vq.n_embed))
    out = {"metric/l1": (rec - x).abs().mean(), "metric/psnr": (10 * torch.log10(1 / mse)).mean(),
           "metric/usage": used, "metric/perplexity": ppl}
    if args.metrics and real_stats is not None:
        parts = iter(rec.split(100))   # metrics.evaluate asks for batches of 100 in order
        scores = metrics.evaluate(lambda b: next(parts).to(device), len(rec), real_stats, device,
                                  metrics=args.metrics, weights=args.inception_weights)
        out.update({k.replace("metric/fid", "metric/rfid"): v for k, v in scores.items()})
    if clf is not None:
        out.update(digits.score(clf, rec, data, args.digit_metrics, labels))
    return out


def held_out_stats(held, args, device):
    pool3, _ = metrics.inception_features(held.split(100), device, weights=args.inception_weights)
    return metrics.features_to_stats(pool3)


def interleave(x, rec, nrow=10):
    """Rows of nrow originals above rows of their reconstructions (a short last row is padded with black)."""
    pad = -len(x) % nrow
    x, rec = (torch.cat([t, t.new_full((pad, *t.shape[1:]), -1.0)]) for t in (x, rec))
    return torch.stack([x.view(-1, nrow, *x.shape[1:]), rec.view(-1, nrow, *x.shape[1:])], 1).flatten(0, 2)


def train(args):
    """Stage 1 or 2. A flag of the other stage, or a size below its least value, is refused (resuming the other
    stage's checkpoint is refused by the set-up's check of the resumed flags: --stage differs)."""
    other = sorted(set(args.explicit) & set(STAGE_FLAGS[3 - args.stage]))
    if other:
        raise runlib.UsageError(f"--{other[0].replace('_', '-')} does not act in stage {args.stage}")
    for name, least in STAGE_FLAGS[args.stage].items():
        if least is not None and getattr(args, name) < least:
            raise runlib.UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    return train_stage1(args) if args.stage == 1 else train_stage2(args)


def train_stage1(args):
    if args.lpips_weights and args.perceptual_weight == 0:
        raise runlib.UsageError("--lpips-weights does nothing with --perceptual-weight 0")
    with runlib.as_usage_error():
        check_autoencoder(args.image_size, args.ch_mult, args.g_width, args.norm_groups, args.attn_resolutions or ())
        if patch_output_size(args.image_size, args.disc_layers) < 1:
            least = 3 * 2 ** args.disc_layers
            raise ValueError(f"the {args.disc_layers}-layer PatchGAN needs images of at least {least} px; "
                             f"--image-size is {args.image_size} (try fewer --disc-layers)")
    data = datasets.load(args)
    if data.kind != "image":
        raise runlib.UsageError(f"vqgan.py models images; {args.dataset} is 2D toy data")
    data, held, held_labels = split_held_out(args, data, max(args.eval_samples, 50))   # the first 50 are shown
    perceptual = lpips_lib.load_lpips(args.lpips_weights) if args.perceptual_weight > 0 else None
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)  # missing weights fail before anything is written
    clf = digits.prepare(args.digit_metrics, data, args.data_root, conditional=True)   # agree: reconstructions
    r = runlib.setup(args, SCRIPT, ckpt_name=CKPT_NAMES[1], data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    if args.compile:   # the adaptive weight backpropagates twice through the same compiled graph (retain_graph)
        from torch._functorch import config as functorch_config
        functorch_config.donated_buffer = False
    vq = r.prepare(build_vqgan(args, data.shape), channels_last=True)
    D = r.prepare(PatchDiscriminator(data.shape[0], args.d_width, args.disc_layers), channels_last=True)
    vq_raw, d_raw = runlib.unwrap(vq), runlib.unwrap(D)
    if perceptual is not None:
        perceptual = r.prepare(perceptual, channels_last=True, ddp=False)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), foreach=True)
    opt_vq, opt_d = torch.optim.Adam(vq.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
    start = r.resume({"vqgan": vq_raw, "D": d_raw}, {"vqgan": opt_vq, "D": opt_d})
    batches = datasets.iterate(data, args.batch_size // r.world_size, device,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    shown, held, held_labels = held[:50], held[:args.eval_samples], held_labels[:args.eval_samples]
    with r.side_rng():   # the held-out images' Inception statistics (building the network draws random numbers)
        real_stats = held_out_stats(held, args, device) if args.metrics and args.eval_samples else None
    counts = torch.zeros(args.n_embed, device=device)   # code use within the current --log-every window
    unused = torch.zeros(args.n_embed, device=device)   # code use since the last restart (kept in the checkpoint)
    if r.resume_state is not None and "restart_counts" in r.resume_state:
        unused.copy_(r.resume_state["restart_counts"])
    restarted = torch.zeros((), device=device)
    r.restore_rng()

    def samples():
        return {"reconstructions": interleave(*reconstruct(vq_raw, shown, device)[:2])}

    def evaluation():
        return evaluate_stage1(vq_raw, held, args, device, real_stats, held_labels, data, clf)

    def state():
        return {"stage": 1, "data_shape": list(data.shape), "restart_counts": unused,
                "models": {"vqgan": vq_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"vqgan": opt_vq.state_dict(), "D": opt_d.state_dict()}}

    step = start
    for step in range(start + 1, args.steps + 1):
        x, _ = next(batches)
        gan_on = step > args.disc_start        # the code's adopt_weight: global_step (from 0) ≥ disc_start
        with r.autocast():
            x_rec, codebook_loss, idx = vq(x)
            rec_loss = l1 = (x - x_rec).abs().mean()                   # L_rec = |x − x̂| + w · LPIPS(x, x̂)
            scalars = {"loss/rec": l1, "loss/codebook": codebook_loss}
            if perceptual is not None:
                scalars["loss/perceptual"] = p_loss = perceptual(x, x_rec).mean()
                rec_loss = rec_loss + args.perceptual_weight * p_loss
        loss = rec_loss + args.codebook_weight * codebook_loss        # L_VQ (Eq. 4)
        if gan_on:
            d_raw.requires_grad_(False)                                 # G's step leaves D's gradients alone
            with r.autocast():
                g_loss = -d_raw(x_rec).mean()                          # G's hinge loss
            lam = adaptive_weight(rec_loss, g_loss, vq_raw.last_layer()) * args.disc_weight   # Eq. 7
            loss = loss + lam * args.disc_factor * g_loss
            d_raw.requires_grad_(True)
            scalars.update({"loss/G": g_loss, "loss/lambda": lam})
        opt_vq.zero_grad(set_to_none=True)
        loss.backward()
        opt_vq.step()

        if gan_on:
            with r.autocast():
                d_loss = args.disc_factor * hinge_d_loss(D(x), D(x_rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            scalars["loss/D"] = d_loss

        uses = torch.bincount(idx.flatten(), minlength=args.n_embed)
        counts += uses
        if args.restart_dead_codes:
            unused += uses
            if step % args.restart_dead_codes == 0:
                restarted = restart_dead_codes(vq_raw, x, unused, r)
                unused.zero_()
            scalars["train/restarted_codes"] = restarted   # at the last restart
        if r.every(step, args.log_every) or step == args.steps:   # code use in this --log-every window
            scalars["metric/train_usage"], scalars["metric/train_perplexity"] = codebook_usage(counts)
            counts.zero_()
        if r.end_step(step, scalars, samples=samples, evaluate=evaluation if args.eval_samples else None,
                      state=state):
            break
    return r.finish(step)


@torch.no_grad()
def restart_dead_codes(vq, x, uses, r):
    """--restart-dead-codes: the codes no encoder output picked since the last restart (`uses` == 0, summed over
    the ranks) move onto random encoder outputs of rank 0's batch (then sent to every rank); returns how many."""
    if r.distributed:
        torch.distributed.all_reduce(uses)
    dead = (uses == 0).nonzero().squeeze(1)
    if len(dead) and r.is_main:
        z = vq.quant_conv(vq.encoder(x)).float()
        vq.quantizer.restart(dead, z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    if r.distributed:
        torch.distributed.broadcast(vq.quantizer.codebook.weight.data, 0)
    return (uses == 0).sum()


def train_stage2(args):
    if not args.temperature > 0:
        raise runlib.UsageError(f"--temperature must be > 0, got {args.temperature}")
    vq_state = read_vqgan(args)
    data = datasets.load(args)
    if data.kind != "image" or data.shape[0] != vq_state["data_shape"][0]:
        raise runlib.UsageError(f"{args.dataset} is not an image set with the VQGAN's "
                                f"{vq_state['data_shape'][0]} channels")
    num_classes = data.num_classes if args.conditional else 0
    if args.conditional and num_classes < 2:
        raise runlib.UsageError(f"--conditional needs class labels; {args.dataset} has none")
    if args.metrics:
        metrics.load_fid_inception(args.inception_weights)
    if args.n_embd % args.n_head:
        raise runlib.UsageError(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    clf = digits.prepare(args.digit_metrics, data, args.data_root, conditional=num_classes > 0)
    r = runlib.setup(args, SCRIPT, ckpt_name=CKPT_NAMES[2], data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    vq = load_vqgan(vq_state, device)
    gpt = r.prepare(build_gpt(args, vq.n_embed, vq.side, num_classes))
    gpt_raw = runlib.unwrap(gpt)
    decay = [p for n, p in gpt_raw.named_parameters() if n.endswith("weight") and p.dim() == 2 and "emb" not in n]
    no_decay = [p for n, p in gpt_raw.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},   # cond_transformer.py:
                             {"params": no_decay, "weight_decay": 0.0}],             # linear weights only
                            lr=args.lr, betas=(args.beta1, args.beta2), foreach=True)
    start = r.resume({"gpt": gpt_raw}, {"gpt": opt})
    batches = datasets.iterate(data, args.batch_size // r.world_size, device,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    real_stats = (metrics.reference_stats(data, args.data_root, device, weights=args.inception_weights)
                  if args.metrics else None)
    shown_labels = torch.arange(100, device=device) // 10 % num_classes if num_classes else None
    r.restore_rng()

    def make(n, labels=None):
        return generate(vq, gpt_raw, n, device, num_classes, args.top_k, args.temperature, labels)

    def samples():
        torch.manual_seed(args.seed)   # the same draws at every sample step
        with runlib.eval_mode(gpt_raw):
            return {"samples": make(100, shown_labels)}

    def evaluation():
        """FID of samples (--metrics); on digits cfid, and agree: classified as the class they were drawn for."""
        def labelled(n):
            y = torch.randint(num_classes, (n,), device=device) if num_classes else None
            return (make(n, y), y) if num_classes else make(n)
        with runlib.eval_mode(gpt_raw):
            scores = metrics.evaluate(make, args.eval_samples, real_stats, device, metrics=args.metrics,
                                      weights=args.inception_weights) if args.metrics else {}
            if clf is not None:
                scores.update(digits.evaluate(clf, labelled, args.eval_samples, data, args.digit_metrics))
        return scores

    def state():
        return {"stage": 2, "data_shape": list(data.shape), "num_classes": num_classes,
                "vqgan": {k: vq_state[k] for k in ("args", "data_shape", "models")},
                "models": {"gpt": gpt_raw.state_dict()}, "optimizers": {"gpt": opt.state_dict()}}

    step = start
    for step in range(start + 1, args.steps + 1):
        x, y = next(batches)
        with torch.no_grad(), r.autocast():
            codes = vq.encode(x)[2].flatten(1)                         # (B, h·w), row by row
        with r.autocast():
            loss = gpt_loss(gpt, first_tokens(vq.n_embed, y if num_classes else None, len(x), device), codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        if r.end_step(step, {"loss/ce": loss}, samples=samples, state=state,
                      evaluate=evaluation if args.metrics or clf is not None else None):
            break
    return r.finish(step)


@torch.no_grad()
def sample(args):
    """Stage 1: reconstructions of held-out images; stage 2: also 100 samples (a row per class when conditional).
    --eval: rFID / L1 / PSNR / usage (stage 1) or FID of samples (stage 2) on --eval-samples images."""
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    stage = state.get("stage")
    if args.num_samples and stage == 1:
        raise runlib.UsageError(f"{args.sample} is a stage-1 checkpoint, which reconstructs: --num-samples draws "
                                "from a stage-2 checkpoint (the transformer's prior)")
    if args.eval and stage == 2 and not args.metrics:
        raise runlib.UsageError("--eval of a stage-2 checkpoint needs --metrics (FID of samples)")
    vq = load_vqgan(state if stage == 1 else state["vqgan"], device)
    scoring = args.eval and stage == 1
    _, held, _ = split_held_out(targs, datasets.load(targs), max(args.eval_samples, 50) if scoring else 50)
    grids = {"reconstructions": interleave(*reconstruct(vq, held[:50], device)[:2])}
    if stage == 2:
        k = state["num_classes"]
        gpt = build_gpt(targs, vq.n_embed, vq.side, k).to(device).eval()
        gpt.load_state_dict(state["models"]["gpt"])

        def make(n, labels=None):
            return generate(vq, gpt, n, device, k, args.top_k, args.temperature, labels)
        torch.manual_seed(args.seed)
        grids["samples"] = make(100, torch.arange(100, device=device) // 10 % k if k else None)
    result = dict(runlib.write_samples(out, state["step"], grids))
    if scoring:
        held = held[:args.eval_samples]
        scores = evaluate_stage1(vq, held, args, device, held_out_stats(held, args, device) if args.metrics else None)
        result.update({name: float(v) for name, v in scores.items()})
        print(" ".join(f"{name} {float(v):.4g}" for name, v in scores.items()))
    elif stage == 2:
        result.update(metrics.score(args, targs, make, device, out=out, step=state["step"]))
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
