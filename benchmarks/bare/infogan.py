"""infogan.py's training step without the plumbing: D and Q's head descend the GAN loss plus λ·(−log Q(c|x))
on a real and a generated batch, then G descends the non-saturating loss plus λ·(−log Q(c|x)) on fresh
codes; Adam (D's trunk and head, Q's head in D's optimizer with their own rates)."""
import time

import torch

import infogan
from common import data as datasets

CONFIG = ["--dataset", "fake:1"]   # the paper's MNIST codes, nets and batch (28x28)
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args; seconds per step. `keep`, a dict, receives
    the trained G and D (with Q's head)."""
    data = datasets.load(args)
    torch.manual_seed(args.seed)
    value_range = (0, 1) if args.net == "mnist" else (-1, 1)
    G, D = infogan.build(args, data.shape)
    shared = [p for n, p in D.named_parameters() if not n.startswith("q_head.")]
    opt_d = torch.optim.Adam([{"params": shared, "lr": args.d_lr}, {"params": D.q_head.parameters(), "lr": args.q_lr}],
                             betas=(args.beta1, 0.999), foreach=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, betas=(args.beta1, 0.999), foreach=True)
    batches = datasets.iterate(data, args.batch_size, "cpu", value_range=value_range)
    b = args.batch_size

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x, _ = next(batches)
        noise, cat, cont = infogan.sample_latent(b, args, "cpu")
        with torch.no_grad():
            fake = G(infogan.latent_vector(noise, cat, cont, args.cat_dim))
        real_logits, _ = D(x, with_q=False)
        fake_logits, q = D(fake)
        nll_cat, nll_cont = infogan.info_losses(q, cat, cont, args)
        loss_d = infogan.d_loss(real_logits, fake_logits) + args.lambda_cat * nll_cat + args.lambda_cont * nll_cont
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        noise, cat, cont = infogan.sample_latent(b, args, "cpu")
        fake_logits, q = D(G(infogan.latent_vector(noise, cat, cont, args.cat_dim)))
        nll_cat, nll_cont = infogan.info_losses(q, cat, cont, args)
        loss_g = infogan.g_loss(fake_logits) + args.lambda_cat * nll_cat + args.lambda_cont * nll_cont
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D)
    return times
