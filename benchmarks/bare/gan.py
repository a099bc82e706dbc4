"""gan.py's training step without the plumbing: the official code's simultaneous update (both gradients
from one forward pass), SGD with the decaying learning rate and rising momentum."""
import time

import torch

import gan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "28"]   # the paper's MNIST nets and batch
STEPS = 40


def run(args, steps):
    data = datasets.load(args)
    G, D = gan.build(args, data.shape)
    G.init_output_bias(data.images.float().mean(0) / 255)
    opt_g = torch.optim.SGD(G.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
    opt_d = torch.optim.SGD(D.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
    batches = datasets.iterate(data, args.batch_size, "cpu", value_range=(0, 1))
    times = []
    for step in range(steps):
        t = time.perf_counter()
        lr, momentum = gan.schedule(step, args, len(data))
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"], group["momentum"] = lr, momentum
        x, _ = next(batches)
        fake_logits = D(G(gan.sample_noise(args.batch_size, args.z_dim, args.noise, "cpu")))
        loss_d, loss_g = gan.d_loss(D(x), fake_logits), gan.g_loss_nonsaturating(fake_logits)
        opt_d.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss_d.backward(inputs=list(D.parameters()), retain_graph=True)
        loss_g.backward(inputs=list(G.parameters()))
        opt_d.step()
        opt_g.step()
        times.append(time.perf_counter() - t)
    return times
