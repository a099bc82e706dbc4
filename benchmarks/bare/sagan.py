"""sagan.py's training step without the plumbing: one D step on the hinge loss (Eq. 4) with the real and the
generated batch in one forward pass (one power iteration per layer), generated images of uniformly drawn
classes, then one G step on fresh noise and classes with D in eval mode (its σ estimates reused); Adam with
the two-timescale learning rates (D 4x G), then, with --ema-decay, the update of G's moving average
(parameters and buffers).

CONFIG is the README's CPU run on digits: class-conditional 32x32 (the CIFAR-10 ResNet with attention at
16x16) with gf = df = 8 and batch 32, on one-channel synthetic images of 10 classes. The bare loop runs in
float32 on the CPU: --cuda, --amp and --compile are refused."""
import time

import torch

import sagan
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--g-width", "8", "--d-width", "8", "--batch-size", "32",
          "--metrics", "none"]
STEPS = 30


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args, from args.seed; seconds per step. `keep`, a dict,
    receives the trained G and D, their optimizers and G's moving average ("ema", None without --ema-decay)."""
    assert not (args.cuda or args.amp or args.compile), "the bare loop runs float32 on the CPU"
    data = datasets.load(args)
    sagan.check_config(args, data.shape)
    K = sagan.num_classes_of(args, data)
    torch.manual_seed(args.seed)
    G, D = sagan.build(args, data.shape, K)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, betas=betas, foreach=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.d_lr, betas=betas, foreach=True)
    ema = sagan.make_ema(G, args.ema_decay) if args.ema_decay else None
    b = args.batch_size
    batches = datasets.iterate(data, b, "cpu", workers=args.workers)

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x, y = next(batches)
        with torch.no_grad():
            y_fake = sagan.sample_labels(b, K, "cpu")
            fake = G(sagan.sample_noise(b, args.z_dim, "cpu"), y_fake)
        labels = torch.cat([y, y_fake]) if K else None
        d_real, d_fake = D(torch.cat([x, fake]), labels).split([len(x), len(fake)])
        loss_d = sagan.d_loss_hinge(d_real, d_fake)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        D.eval()
        y_fake = sagan.sample_labels(b, K, "cpu")
        loss_g = sagan.g_loss_hinge(D(G(sagan.sample_noise(b, args.z_dim, "cpu"), y_fake), y_fake))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.train()
        if ema is not None:
            ema.update_parameters(G)
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, opt_G=opt_g, opt_D=opt_d, ema=ema)
    return times
