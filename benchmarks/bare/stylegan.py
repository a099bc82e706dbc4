"""stylegan.py's training step without the plumbing: ProGAN's progressive schedule (the level of detail
re-evaluated every --minibatch-repeats minibatches, Adam reset at each new level, the resolution's minibatch
and learning rate, reals cross-faded as G's output), the logistic D step with R1 on the reals, the
non-saturating G step on fresh latents; both passes of G mix styles and track w̄; G's EMA with a half-life
in images.

CONFIG is the README's CPU run (MNIST grown 8 → 32, tiny nets, no style mixing) on one-channel synthetic
images; its STEPS minibatches of 16 lie in the 8x8 stabilisation phase, the cheapest steps of the run, where
a fixed cost per step weighs most."""
import copy
import math
import time

import torch

import stylegan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--fmap-base", "256", "--fmap-max", "32", "--z-dim", "32",
          "--w-dim", "32", "--batch-size", "16", "--batch-schedule", "", "--stable-kimg", "10", "--fade-kimg", "10",
          "--ema-kimg", "1", "--mixing-prob", "0", "--metrics", "none"]
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args, from args.seed; seconds per step. `keep`, a dict,
    receives the trained G, D, Gs (G's EMA), the optimizers of the current level and the schedule."""
    data = datasets.load(args)
    torch.manual_seed(args.seed)
    R = args.image_size
    G, D = stylegan.build(args, data.shape)
    Gs = copy.deepcopy(G).requires_grad_(False)
    stable_img, fade_img = round(args.stable_kimg * 1000), round(args.fade_kimg * 1000)
    batches = {}   # one iterator per minibatch size
    nimg, lod, prev_lod = 0, None, -1.0
    mixing = dict(mixing_prob=args.mixing_prob, w_avg_beta=args.w_avg_beta)   # G's training passes

    times = []
    for step in range(steps):
        t = time.perf_counter()
        if step % args.minibatch_repeats == 0:
            lod = stylegan.level_of_detail(nimg, R, args.initial_resolution, stable_img, fade_img)
            level, res, alpha = stylegan.nets_at(lod, R)
            if math.floor(lod) != math.floor(prev_lod) or math.ceil(lod) != math.ceil(prev_lod):
                lr = args.lr_dict.get(res, args.lr)   # the resolution changes only here
                opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=lr, betas=(args.beta1, args.beta2),
                                                 eps=args.adam_eps, foreach=True) for m in (G, D))
                b = args.batch_dict.get(res, args.batch_size)
                if b not in batches:
                    batches[b] = datasets.iterate(data, b, "cpu")
            prev_lod = lod

        x, _ = next(batches[b])
        x = stylegan.process_reals(stylegan.mirror(x) if args.flip else x, res, alpha)
        with torch.no_grad():
            fake = G(stylegan.sample_noise(b, args.z_dim, "cpu"), level, alpha, **mixing)
        penalty, real_scores = stylegan.r1_penalty(D, x, level, alpha, args.r1_gamma, res / R)
        loss_d = stylegan.d_loss(real_scores, D(fake, level, alpha), penalty)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        nimg += b

        fake = G(stylegan.sample_noise(b, args.z_dim, "cpu"), level, alpha, **mixing)
        loss_g = stylegan.g_loss(D(fake, level, alpha))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        stylegan.update_average(Gs, G, 0.5 ** (b / (args.ema_kimg * 1000)) if args.ema_kimg > 0 else 0.0)
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, Gs=Gs, opt_G=opt_g, opt_D=opt_d,
                    schedule={"nimg": nimg, "lod": lod, "prev_lod": prev_lod})
    return times
