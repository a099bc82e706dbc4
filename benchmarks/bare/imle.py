"""imle.py's training step without the plumbing: Algorithm 1 — at the start of every --staleness-th epoch
the nearest-neighbour search (m = factor x N samples; each data point gets its nearest sample's z plus
jitter), a fresh permutation of the (data point, z) pairs every epoch, and Adam on the squared error of
each minibatch of pairs. A search step costs far more than the others; it is timed as part of its step."""
import argparse
import time

import torch

import imle
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "28"]   # the reference MNIST G, batch 64, 10 x N samples per search
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args; seconds per step. `keep`, a dict, receives
    the trained G."""
    data = datasets.load(args)
    if data.kind == "image":
        data, _, _ = datasets.split_held_out(args, data, args.valid_size, shuffle=True)
    toy = data.kind == "toy"
    n = args.toy_points if toy else len(data)
    z_dim = args.z_dim if args.z_dim is not None else 2 if toy else 64
    lr = args.lr if args.lr is not None else 1e-2 if toy else 1e-3
    args = argparse.Namespace(**{**vars(args), "z_dim": z_dim, "lr": lr})
    torch.manual_seed(args.seed)
    points = imle.training_set(args, data, "cpu")
    b = args.batch_size
    epoch_steps = n // b
    m = args.factor * epoch_steps * b
    G = imle.build(args, data.shape, data.kind)
    opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                           weight_decay=args.weight_decay, foreach=True)

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        epoch, i = divmod(step - 1, epoch_steps)
        if i == 0:
            if epoch % args.staleness == 0:
                z_matched, _ = imle.match(G, points, m, b, args.nn_chunk, args.jitter)
            perm = torch.randperm(n)
        idx = perm[i * b:(i + 1) * b]
        loss = imle.imle_loss(G(z_matched[idx]), points[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep["G"] = G
    return times
