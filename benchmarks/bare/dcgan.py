"""dcgan.py's training step without the plumbing: D descends the binary cross-entropy on a real batch and a
generated one, then G the non-saturating loss on fresh noise; Adam with the official weight decay."""
import time

import torch

import dcgan
from common import data as datasets

# the README's MNIST run: 32x32 nets of width 32, batch 64
CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--g-width", "32", "--d-width", "32", "--batch-size", "64",
          "--metrics", "none"]
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args, from args.seed; seconds per step. `keep`, a dict,
    receives the trained G and D and their optimizers."""
    data = datasets.load(args)
    torch.manual_seed(args.seed)
    G, D = (m.to(memory_format=torch.channels_last) for m in dcgan.build(args, data.shape))
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay, foreach=True)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu")

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x, _ = next(batches)
        with torch.no_grad():
            fake = G(dcgan.sample_noise(b, args.z_dim, "cpu"))
        loss_d = dcgan.d_loss(D(x), D(fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        loss_g = dcgan.g_loss(D(G(dcgan.sample_noise(b, args.z_dim, "cpu"))))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, opt_G=opt_g, opt_D=opt_d)
    return times
