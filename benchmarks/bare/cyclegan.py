"""cyclegan.py's training step without the plumbing: an image a of domain A and an image b of domain B, drawn
independently and each jittered on its own (random crop of the load-size image, mirrored with p ½); with
both Ds frozen, G and F descend Eq. 3 (the LSGAN terms of G(a) under D_B and F(b) under D_A, λ times the
cycle terms ‖F(G(a)) − a‖₁ + ‖G(F(b)) − b‖₁, and λ_id times the identity terms ‖G(b) − b‖₁ + ‖F(a) − a‖₁)
with one Adam; then each D descends ½ [(D(real) − 1)² + D(fake)²] with its fakes drawn through its history
pool (Python's `random` picks which stored image to return), both Ds with one Adam. The learning rate decays
linearly per step over the last --decay-fraction of --steps.

CONFIG is the paper's nets (ResNet G and F of width 64 with 6 blocks, as the paper's below 256x256; 70x70
PatchGAN Ds; batch 1; pools of 50) on three-channel synthetic images at 64x64 (loaded at 72) instead of the
paper's 256x256, whose steps (6 passes of G or F, each with its backward) take several seconds on a
two-core CPU. The plumbing the bare loop leaves out and rejects: --cuda, --amp, --compile and torchrun."""
import random
import time

import torch

import cyclegan
from common import data as datasets

CONFIG = ["--dataset", "fake", "--image-size", "64", "--load-size", "72", "--metrics", "none"]
STEPS = 15


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args, from args.seed; seconds per step. `keep`, a dict,
    receives the trained nets by their names (G, F, D_A, D_B), the two optimizers and the two pools."""
    assert not (args.cuda or getattr(args, "amp", False) or getattr(args, "compile", False)), "CPU, fp32, eager only"
    data = datasets.load_translation(args, "train", paired=False, size=args.load_size)
    random.seed(args.seed)        # the pools' draws
    torch.manual_seed(args.seed)
    nets = cyclegan.build(args, data.a.shape[1], data.b.shape[1])
    G, F_, D_A, D_B = (nets[k] for k in ("G", "F", "D_A", "D_B"))
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    opt_g = torch.optim.Adam(list(G.parameters()) + list(F_.parameters()), **adam)
    opt_d = torch.optim.Adam(list(D_A.parameters()) + list(D_B.parameters()), **adam)
    pool_a, pool_b = cyclegan.ImagePool(args.pool_size), cyclegan.ImagePool(args.pool_size)
    batches = datasets.translation_batches(data, args.batch_size, "cpu", args.image_size, flip=not args.no_flip)
    identity = args.identity_weight > 0

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        lr = args.lr * cyclegan.lr_factor(step, args)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        a, b = next(batches)

        D_A.requires_grad_(False)
        D_B.requires_grad_(False)
        fake_b, fake_a = G(a), F_(b)
        idt = (G(b), F_(a)) if identity else (None, None)
        loss_g, _ = cyclegan.generator_loss(D_B(fake_b), D_A(fake_a), F_(fake_b), a, G(fake_a), b,
                                            args.lambda_cyc, args.identity_weight, *idt)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        D_A.requires_grad_(True)
        D_B.requires_grad_(True)
        loss_d_b = cyclegan.d_loss(D_B(b), D_B(pool_b.query(fake_b)))
        loss_d_a = cyclegan.d_loss(D_A(a), D_A(pool_a.query(fake_a)))
        opt_d.zero_grad(set_to_none=True)
        (loss_d_a + loss_d_b).backward()
        opt_d.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(nets, opt_G=opt_g, opt_D=opt_d, pools={"A": pool_a, "B": pool_b})
    return times
