"""gmmn.py's training step without the plumbing: G descends sqrt(MMD²) between a batch of its samples and a
batch of data under the kernel sum, by SGD with the official lr / momentum switch. With --mode ae the steps
first train the dropout autoencoder (three phases, a fresh SGD each, clipped gradients, the momentum
schedule), then the GMMN on its codes."""
import time

import torch

import gmmn
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "28"]   # the paper's MNIST pixel-space G, batch 1000
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args (in --mode ae the autoencoder's 3 x --ae-steps
    come first); seconds per step. `keep`, a dict, receives the trained G (and AE)."""
    data = datasets.load(args)
    if data.kind == "image":
        data, _, _ = datasets.split_held_out(args, data, args.valid_size, shuffle=True)
    ae_total = 3 * args.ae_steps if args.mode == "ae" else 0
    args.lr = args.lr if args.lr is not None else 0.05 if data.kind == "toy" else 2.0
    torch.manual_seed(args.seed)
    bandwidths = gmmn.kernel_bandwidths(args, data)
    G, ae = gmmn.build(args, data.shape, data.kind)
    opt_g = torch.optim.SGD(G.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu", value_range=(0, 1))
    if ae is not None:
        ae_batches = datasets.iterate(data, args.ae_batch_size, "cpu", value_range=(0, 1))
    codes = None

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        if step <= ae_total:   # the autoencoder: layer pair enc1/dec2, then enc2/dec1, then fine-tuning
            phase, i = (step - 1) // args.ae_steps + 1, (step - 1) % args.ae_steps + 1
            if i == 1:
                ae_opt = torch.optim.SGD(ae.parameters(), lr=args.ae_lr,
                                         momentum=gmmn.ae_momentum(1, phase, args), foreach=True)
            for group in ae_opt.param_groups:
                group["momentum"] = gmmn.ae_momentum(i, phase, args)
            x, _ = next(ae_batches)
            loss = gmmn.ae_loss(ae, x, phase)
            ae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), args.ae_max_grad_norm)
            ae_opt.step()
            if step == ae_total:
                codes = gmmn.encode_all(ae, data.images, "cpu")
        else:                  # the GMMN
            gmmn.set_lr_momentum(opt_g, *gmmn.schedule(step - ae_total, args))
            if codes is not None:
                real = codes[torch.randint(len(codes), (b,))]
            else:
                real, _ = next(batches)
            m2 = gmmn.mmd2(G(gmmn.sample_noise(b, args.z_dim, "cpu")), real, bandwidths, args.unbiased)
            loss = gmmn.objective(m2, args.sqrt)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, AE=ae)
    return times
