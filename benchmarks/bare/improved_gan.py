"""improved_gan.py's training step without the plumbing: D's cross-entropy on a labelled batch plus
½ L_unsupervised on an unlabelled and a generated batch, then G's feature matching on a fresh unlabelled
batch (--mode semi; the minimax G loss and its --g-steps in --mode generate), Adam with the linear lr
decay, and the Polyak average of D's weights."""
import math
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import improved_gan as ig
from common import data as datasets

CONFIG = ["--dataset", "fake:1", "--image-size", "28", "--test-size", "100"]   # the MNIST nets, 100 labels, batch 100
STEPS = 40


def run(args, steps, keep=None):
    """`steps` training steps of the configuration in args; seconds per step. `keep`, a dict, receives
    the trained G, D and D's Polyak average."""
    if args.hist_avg or args.no_gan:
        raise ValueError("the bare loop leaves out --hist-avg and --no-gan")
    data = datasets.load(args)
    ig.resolve(args, data)
    data, _, _ = ig.split_test(args, data)
    labelled = ig.select_labelled(args, data) if args.labels else None
    steps_per_epoch = len(data) / args.batch_size
    if args.epochs > 0:
        args.steps = max(1, round(args.epochs * steps_per_epoch))
    decay_steps = min(round(args.decay_epochs * steps_per_epoch), args.steps)
    torch.manual_seed(args.seed)
    value_range = ig.VALUE_RANGE[args.arch]
    b = args.batch_size

    G = ig.build_generator(args, data.shape)
    D = ig.build_discriminator(args, data.shape, data.num_classes if args.labels else 1)
    init_idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + 2))[:500]
    ig.data_dependent_init(G, ig.sample_noise(b, args.z_dim, "cpu"))
    ig.data_dependent_init(D, datasets.to_range(data.images[init_idx], value_range, True))
    g_params = [p for p in G.parameters() if p.requires_grad]
    d_params = [p for p in D.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(g_params, lr=args.lr, betas=(args.beta1, 0.999), eps=args.adam_eps, foreach=True)
    opt_d = torch.optim.Adam(d_params, lr=args.lr, betas=(args.beta1, 0.999), eps=args.adam_eps, foreach=True)
    d_avg = AveragedModel(D, multi_avg_fn=get_ema_multi_avg_fn(args.polyak)) if args.polyak > 0 else None
    batches = datasets.iterate(data, b, "cpu", value_range=value_range)
    if labelled is not None:
        lab_x, lab_y = datasets.to_range(data.images[labelled], value_range, True), data.labels[labelled]
        lab_reps = math.ceil(b / len(labelled))
    fm_norm = "l2" if args.arch == "mlp" else "l1"

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        lr = args.lr * (min(1.0, (args.steps - step + 1) / decay_steps) if decay_steps > 0 else 1.0)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

        loss_d = 0
        if labelled is not None:
            idx = torch.randperm(lab_reps * len(labelled))[:b] % len(labelled)
            loss_d = ig.supervised_loss(D(lab_x[idx]), lab_y[idx])
        x_unl, _ = next(batches)
        with torch.no_grad():
            fake = G(ig.sample_noise(b, args.z_dim, "cpu"))
        loss_d = loss_d + args.unsup_weight * ig.unsupervised_loss(D(x_unl), D(fake), args.real_target)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        if d_avg is not None:
            d_avg.update_parameters(D)

        for p in d_params:
            p.requires_grad_(False)
        for _ in range(args.g_steps):
            fake = G(ig.sample_noise(b, args.z_dim, "cpu"))
            if args.g_objective == "feature-matching":
                x_unl, _ = next(batches)
                with torch.no_grad():
                    f_real = D.features(x_unl)
                loss_g = ig.feature_matching_loss(f_real, D.features(fake), fm_norm)
            else:
                loss_g = ig.g_minimax_loss(D(fake))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
        for p in d_params:
            p.requires_grad_(True)
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(G=G, D=D, D_avg=d_avg)
    return times
