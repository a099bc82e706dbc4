"""cgan.py's training step without the plumbing: D descends ½ of the conditional GAN loss on a labelled real
batch and a batch generated for uniformly drawn labels, then G the non-saturating loss on fresh noise and
labels; the paper's SGD with the decaying learning rate and rising momentum (the MLP), or Adam (--arch conv)."""
import time

import torch

import cgan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "28"]   # the paper's MNIST MLPs, batch 100, SGD
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args, from args.seed; seconds per step. `keep`, a dict,
    receives the trained G and D and their optimizers."""
    data = cgan.load_labelled(args)
    mlp = args.arch == "mlp"
    if mlp and data.images is not None:
        data, _, _ = datasets.split_held_out(args, data, args.valid_size)
    torch.manual_seed(args.seed)
    K = data.num_classes
    G, D = cgan.build(args, data.shape, K)
    if mlp and data.images is not None:
        G.init_output_bias(data.images.float().mean(0) / 255)
    sgd = args.optimizer == "sgd"
    if sgd:
        opt_g = torch.optim.SGD(G.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
        opt_d = torch.optim.SGD(D.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
    else:
        opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, 0.999), foreach=True)
        opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, 0.999), foreach=True)
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu", value_range=(0, 1) if mlp else (-1, 1))

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        if sgd:
            lr, momentum = cgan.schedule(step - 1, args, len(data))
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = lr, momentum

        x, y = next(batches)
        y_fake = torch.randint(K, (b,))
        with torch.no_grad():
            fake = G(cgan.sample_noise(b, args.z_dim, args.noise, "cpu"), y_fake)
        loss_d = cgan.d_loss(D(x, y), D(fake, y_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        y_fake = torch.randint(K, (b,))
        loss_g = cgan.g_loss(D(G(cgan.sample_noise(b, args.z_dim, args.noise, "cpu"), y_fake), y_fake))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, opt_G=opt_g, opt_D=opt_d)
    return times
