"""wgan_gp.py's training step without the plumbing: n_critic critic updates, each descending
E D(x̃) − E D(x) + λ E (‖∇D(x̂)‖ − 1)² on a real batch and a generated one, then one G update on −E D(G(z))
with G's larger batch; Adam with the linear learning-rate decay.

CONFIG is the CIFAR-10 ResNet at 32x32 with width 32 (a quarter of the paper's) on one-channel images."""
import time

import torch

import wgan_gp
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--g-width", "32", "--d-width", "32", "--metrics", "none"]
STEPS = 12


def run(args, steps, keep=None):
    """`steps` G iterations of the configuration in args, from args.seed; seconds per G iteration (with its
    critic updates). `keep`, a dict, receives the trained G and critic D and their optimizers."""
    data = datasets.load(args)
    torch.manual_seed(args.seed)
    G, D = wgan_gp.build(args, data.shape)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=betas, foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=betas, foreach=True)
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu")

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        lr = wgan_gp.learning_rate(step, args)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

        for _ in range(args.n_critic):
            real, _ = next(batches)
            with torch.no_grad():
                fake = G(wgan_gp.sample_noise(b, args.z_dim, "cpu"))
            real_scores, fake_scores = D(real), D(fake)
            penalty, _ = wgan_gp.gradient_penalty(D, real, fake, args.gp_lambda)
            loss_d = wgan_gp.critic_loss(real_scores, fake_scores, penalty)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        loss_g = wgan_gp.generator_loss(D(G(wgan_gp.sample_noise(args.g_batch_mult * b, args.z_dim, "cpu"))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, opt_G=opt_g, opt_D=opt_d)
    return times
