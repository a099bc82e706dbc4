"""bigbigan.py's training step without the plumbing: --n-dis D steps, each on the hinge of every score
(s_x, s_z, s_xz; s_xz alone with --no-unary) of a data pair (x, ẑ ~ E(x)) and a generated pair (G(z), z),
scored in one forward pass of D (one power iteration per layer), E and G without gradients; then one E/G
step on a fresh batch and fresh z, minimising the unhinged scores L_EG with D in eval mode (its σ estimates
reused); Adam for each of D, E and G. E's input is resized to G's side for D when --e-image-size is larger.

CONFIG is the README's CPU run on digits: 32x32, ch 8 for G and F, E of width 16, MLPs of 128 units, batch
32, on one-channel synthetic images. The bare loop runs in float32 on the CPU: --cuda, --amp and --compile
are refused."""
import argparse
import time

import torch

import bigbigan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--g-width", "8", "--d-width", "8", "--e-width", "16",
          "--mlp-width", "128", "--batch-size", "32", "--metrics", "none"]
STEPS = 20


def run(args, steps, keep=None):
    """`steps` E/G iterations of the configuration in args, from args.seed; seconds per iteration (with its D
    steps). `keep`, a dict, receives the trained G, E and D and their optimizers."""
    assert not (args.cuda or args.amp or args.compile), "the bare loop runs float32 on the CPU"
    bigbigan.check_config(args)
    data = datasets.load(argparse.Namespace(**{**vars(args), "image_size": args.e_image_size}))   # at E's size
    torch.manual_seed(args.seed)
    G, E, D = bigbigan.build(args, data.shape)
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, foreach=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, **adam)
    opt_e = torch.optim.Adam(E.parameters(), lr=args.e_lr, **adam)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, **adam)
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu", workers=args.workers)

    def scores_of(x, x_gen, z_hat, z):
        """D's scores of the data pairs and of the generated pairs, from one pass over both."""
        scores = D(torch.cat([bigbigan.to_g_size(x, args.image_size), x_gen]), torch.cat([z_hat, z]))
        return zip(*(s.split([len(x), b]) for s in scores))

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        for _ in range(args.n_dis):
            x, _ = next(batches)
            with torch.no_grad():
                z_hat = bigbigan.sample_posterior(*E(x), args.deterministic_e)
                z = bigbigan.sample_noise(b, args.z_dim, "cpu")
                x_gen = G(z)
            loss_d = bigbigan.d_loss(*scores_of(x, x_gen, z_hat, z))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        x, _ = next(batches)
        D.eval()
        z_hat = bigbigan.sample_posterior(*E(x), args.deterministic_e)
        z = bigbigan.sample_noise(b, args.z_dim, "cpu")
        loss_eg = bigbigan.eg_loss(*scores_of(x, G(z), z_hat, z))
        opt_e.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss_eg.backward()
        opt_e.step()
        opt_g.step()
        D.train()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, E=E, D=D, opt_G=opt_g, opt_E=opt_e, opt_D=opt_d)
    return times
