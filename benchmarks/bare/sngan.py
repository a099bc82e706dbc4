"""sngan.py's training step without the plumbing: n_dis updates of the spectrally normalised D (real and
generated batch in one forward pass, so one power iteration per update) on the hinge or non-saturating
loss, then one G update with D in eval mode (no further power iteration); Adam, with the optional linear
learning-rate decay.

CONFIG is the CIFAR-10 ResNet (Table 4, n_dis 5) at 32x32 with reduced widths (G 64, D 32 channels instead
of 256, 128) on one-channel images."""
import time

import torch

import sngan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--g-width", "64", "--d-width", "32", "--metrics", "none"]
STEPS = 12


def run(args, steps, keep=None):
    """`steps` G iterations of the configuration in args, from args.seed; seconds per G iteration (with its
    D updates). `keep`, a dict, receives the trained G and D and their optimizers."""
    data = datasets.load(args)
    sngan.check_shape(data.shape)
    torch.manual_seed(args.seed)
    G, D = sngan.build_generator(args, data.shape), sngan.build_discriminator(args, data.shape)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=betas, foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=betas, foreach=True)
    d_loss_fn, g_loss_fn = sngan.LOSSES[args.loss]
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu")

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        lr = args.lr * (1 - (step - 1) / args.steps) if args.lr_decay == "linear" else args.lr
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

        for _ in range(args.n_dis):
            x, _ = next(batches)
            with torch.no_grad():
                fake = G(sngan.sample_noise(b, args.z_dim, "cpu"))
            d_real, d_fake = D(torch.cat([x, fake])).split([len(x), len(fake)])
            loss_d = d_loss_fn(d_real, d_fake)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        D.eval()
        loss_g = g_loss_fn(D(G(sngan.sample_noise(b, args.z_dim, "cpu"))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.train()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, opt_G=opt_g, opt_D=opt_d)
    return times
