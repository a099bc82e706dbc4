"""wgan.py's training step without the plumbing: n_critic critic updates (100 at the first 25 and every
500th G iteration with the official boost), each descending E f(G(z)) − E f(x) and followed by clipping
every critic weight to [−c, c], then one G update on −E f(G(z)); RMSProp.

CONFIG is the DCGAN nets at 32x32 with width 32 on one-channel images, without the boost: a step is then
5 critic updates and one G update, as in every G iteration of a run but the first 25 and every 500th (with
the boost, the first 25 steps would do 20 times that work and hide any fixed cost per step)."""
import time

import torch

import wgan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--g-width", "32", "--d-width", "32", "--metrics", "none",
          "--no-boost-critic"]
STEPS = 30


def run(args, steps, keep=None):
    """`steps` G iterations of the configuration in args, from args.seed; seconds per G iteration (with its
    critic updates). `keep`, a dict, receives the trained G and critic D and their optimizers."""
    data = datasets.load(args)
    wgan.check_shape(args.arch, data.shape)
    torch.manual_seed(args.seed)
    G, D = wgan.build_generator(args, data.shape), wgan.build_critic(args, data.shape)
    opt_g = torch.optim.RMSprop(G.parameters(), lr=args.lr, foreach=True)
    opt_d = torch.optim.RMSprop(D.parameters(), lr=args.lr, foreach=True)
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu")

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        for _ in range(wgan.critic_iters(step, args)):
            x, _ = next(batches)
            with torch.no_grad():
                fake = G(wgan.sample_noise(b, args.z_dim, "cpu"))
            loss_d = wgan.critic_loss(D(x), D(fake))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            wgan.clip_weights_(D, args.clip)

        loss_g = wgan.generator_loss(D(G(wgan.sample_noise(b, args.z_dim, "cpu"))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, opt_G=opt_g, opt_D=opt_d)
    return times
