"""progan.py's training step without the plumbing: the progressive schedule (the level of detail re-evaluated
every --minibatch-repeats minibatches, Adam reset at each new level, the resolution's minibatch and learning
rate, reals cross-faded as G's output), the WGAN-GP + drift D step, the G step on fresh latents, G's EMA.

CONFIG is the README's CPU run (MNIST grown 4 → 32, tiny nets) on one-channel synthetic images; its STEPS
minibatches of 16 lie in the 4x4 stabilisation phase, the cheapest steps of the run, where a fixed cost
per step weighs most."""
import copy
import math
import time

import torch

import progan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--fmap-base", "256", "--fmap-max", "32", "--z-dim", "32",
          "--batch-size", "16", "--stable-kimg", "10", "--fade-kimg", "10", "--gp-target", "1", "--ema", "0.99",
          "--metrics", "none"]
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args, from args.seed; seconds per step. `keep`, a dict,
    receives the trained G, D, Gs (G's EMA), the optimizers of the current level and the schedule."""
    data = datasets.load(args)
    torch.manual_seed(args.seed)
    R = args.image_size
    G, D = progan.build(args, data.shape)
    Gs = copy.deepcopy(G).requires_grad_(False)
    stable_img, fade_img = round(args.stable_kimg * 1000), round(args.fade_kimg * 1000)
    batches = {}   # one iterator per minibatch size
    nimg, lod, prev_lod = 0, None, -1.0

    times = []
    for step in range(steps):
        t = time.perf_counter()
        if step % args.minibatch_repeats == 0:
            lod = progan.level_of_detail(nimg, R, args.initial_resolution, stable_img, fade_img)
            level, res, alpha = progan.nets_at(lod, R)
            if math.floor(lod) != math.floor(prev_lod) or math.ceil(lod) != math.ceil(prev_lod):
                lr = args.lr_dict.get(res, args.lr)   # the resolution changes only here
                opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=lr, betas=(args.beta1, args.beta2),
                                                 eps=args.adam_eps, foreach=True) for m in (G, D))
                b = args.batch_dict.get(res, args.batch_size)
                if b not in batches:
                    batches[b] = datasets.iterate(data, b, "cpu")
            prev_lod = lod

        x, _ = next(batches[b])
        x = progan.process_reals(progan.mirror(x) if args.flip else x, res, alpha)
        with torch.no_grad():
            fake = G(progan.sample_noise(b, args.z_dim, "cpu"), level, alpha)
        real_scores, fake_scores = D(x, level, alpha), D(fake, level, alpha)
        penalty = progan.gradient_penalty(D, x, fake, level, alpha, args.gp_lambda, args.gp_target, res / R)
        loss_d = progan.d_loss(real_scores, fake_scores, penalty, args.eps_drift)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        nimg += b

        loss_g = progan.g_loss(D(G(progan.sample_noise(b, args.z_dim, "cpu"), level, alpha), level, alpha))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        progan.update_average(Gs, G, args.ema)
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, Gs=Gs, opt_G=opt_g, opt_D=opt_d,
                    schedule={"nimg": nimg, "lod": lod, "prev_lod": prev_lod})
    return times
