"""pix2pix.py's training step without the plumbing: a random pair (x, y), jittered (a random crop of the
load-size image, mirrored with p ½, the same for x and y), G(x) once; the PatchGAN D descends ½ of Eq. 1 on
the real pair (x, y) and the generated pair (x, G(x)); then, with D frozen, G descends Eq. 4 (the
non-saturating cGAN term + λ L1) through D. Adam for each, the learning rate decaying linearly per step over
the last --decay-fraction of --steps. With --gan-mode none there is no D and G descends λ L1 alone.

CONFIG is the paper's nets (U-Net G and 70x70 PatchGAN D of width 64, batch 1) on three-channel synthetic
pairs at 128x128 (loaded at 143, about the paper's 286/256) instead of the paper's 256x256, whose steps take
longer than a second on a two-core CPU. The plumbing the bare loop leaves out and rejects: --cuda, --amp,
--compile and torchrun (the script's autocast, channels-last weights, compiled or DDP-wrapped nets)."""
import time

import torch

import pix2pix
from common import data as datasets

CONFIG = ["--dataset", "fake", "--image-size", "128", "--load-size", "143", "--metrics", "none"]
STEPS = 30


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args, from args.seed; seconds per step. `keep`, a dict,
    receives the trained G and D (None with --gan-mode none) and their optimizers."""
    assert not (args.cuda or getattr(args, "amp", False) or getattr(args, "compile", False)), "CPU, fp32, eager only"
    data = datasets.load_translation(args, "train", paired=True, size=args.load_size)
    torch.manual_seed(args.seed)
    G, D = pix2pix.build(args, data.a.shape[1], data.b.shape[1])
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt_g = torch.optim.Adam(G.parameters(), **adam)
    opt_d = torch.optim.Adam(D.parameters(), **adam) if D is not None else None
    optimizers = [opt for opt in (opt_g, opt_d) if opt is not None]
    batches = datasets.translation_batches(data, args.batch_size, "cpu", args.image_size, flip=not args.no_flip)

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        lr = args.lr * pix2pix.lr_factor(step, args)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        x, y = next(batches)
        fake = G(x)
        if D is not None:
            D.requires_grad_(True)
            loss_d = pix2pix.d_loss(D(x, y), D(x, fake.detach()), args.gan_mode)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            D.requires_grad_(False)
        loss_g, _, _ = pix2pix.g_loss(D(x, fake) if D is not None else None, fake, y, args.lambda_l1, args.gan_mode)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, opt_G=opt_g, opt_D=opt_d)
    return times
