"""vqgan.py's training steps without the plumbing, both stages.

Stage 1 (the VQGAN): encode, quantise (straight-through) and decode the batch; L_rec = |x − x̂| (+ the LPIPS
term when --perceptual-weight > 0) plus the codebook/commitment terms, and from --disc-start on the hinge
L_GAN under the adaptive weight λ (Eq. 7: two gradients of the decoder's last layer) with D frozen; one Adam
step of the autoencoder, then one of D on the batch against the same reconstruction; with
--restart-dead-codes, the count of codes used and, every STEPS steps, the restart of the unused ones.
Stage 2 (--stage 2 --vqgan CKPT): the frozen VQGAN's codes of the batch, the transformer's next-code
cross-entropy (Eq. 9, after a start or class token), one AdamW step (weight decay on the linear weights).

CONFIG is stage 1, the heavier stage, at the README's quick CPU run (32 px, f = 4, widths 32, batch 16,
restarts every 100 steps, no LPIPS: its weights are not at hand on a CPU machine) on one-channel synthetic
images, with the GAN term and D's step on from the first step (--disc-start 0), so every timed step is a
full one; STEPS lie before the first restart. overhead.py times one configuration per script, and stage 2
parses only with a stage-1 checkpoint at hand, so it has no CONFIG: run(args) trains it when args.stage is 2.
Not supported: --cuda, --amp, --compile, --resume and torchrun (the bare loop runs on the CPU, in one process)."""
import time
from types import SimpleNamespace

import torch

import vqgan
from common import data as datasets
from common import lpips as lpips_lib

CONFIG = ["--dataset", "fake:1", "--image-size", "32", "--g-width", "32", "--ch-mult", "1,2,2", "--num-res-blocks", "1",
          "--norm-groups", "8", "--embed-dim", "64", "--d-width", "32", "--batch-size", "16", "--disc-start", "0",
          "--restart-dead-codes", "100", "--perceptual-weight", "0", "--metrics", "none"]
STEPS = 15
ONE_PROCESS = SimpleNamespace(distributed=False, is_main=True)   # what restart_dead_codes asks of the run


def run(args, steps, keep=None):
    """`steps` training steps of the stage and configuration in args, from args.seed; seconds per step. `keep`, a
    dict, receives the trained nets and their optimizers (stage 1: vqgan, D, opt_vqgan, opt_D, restart_counts;
    stage 2: gpt, opt_gpt)."""
    assert not (args.cuda or args.amp or args.compile or args.resume), "the bare loop runs fresh, on the CPU, in fp32"
    return (stage1 if args.stage == 1 else stage2)(args, steps, keep)


def stage1(args, steps, keep):
    data = datasets.load(args)
    data, _, _ = vqgan.split_held_out(args, data, max(args.eval_samples, 50))   # trains without the held-out images
    perceptual = lpips_lib.load_lpips(args.lpips_weights) if args.perceptual_weight > 0 else None
    torch.manual_seed(args.seed)
    vq = vqgan.build_vqgan(args, data.shape)
    D = vqgan.PatchDiscriminator(data.shape[0], args.d_width, args.disc_layers)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), foreach=True)
    opt_vq, opt_d = torch.optim.Adam(vq.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
    batches = datasets.iterate(data, args.batch_size, "cpu")
    unused = torch.zeros(args.n_embed)   # code use since the last restart

    times = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        x, _ = next(batches)
        gan_on = step > args.disc_start
        x_rec, codebook_loss, idx = vq(x)
        rec_loss = (x - x_rec).abs().mean()
        if perceptual is not None:
            rec_loss = rec_loss + args.perceptual_weight * perceptual(x, x_rec).mean()
        loss = rec_loss + args.codebook_weight * codebook_loss
        if gan_on:
            D.requires_grad_(False)
            g_loss = -D(x_rec).mean()
            lam = vqgan.adaptive_weight(rec_loss, g_loss, vq.last_layer()) * args.disc_weight
            loss = loss + lam * args.disc_factor * g_loss
            D.requires_grad_(True)
        opt_vq.zero_grad(set_to_none=True)
        loss.backward()
        opt_vq.step()

        if gan_on:
            d_loss = args.disc_factor * vqgan.hinge_d_loss(D(x), D(x_rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        if args.restart_dead_codes:
            unused += torch.bincount(idx.flatten(), minlength=args.n_embed)
            if step % args.restart_dead_codes == 0:
                vqgan.restart_dead_codes(vq, x, unused, ONE_PROCESS)
                unused.zero_()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(vqgan=vq, D=D, opt_vqgan=opt_vq, opt_D=opt_d, restart_counts=unused)
    return times


def stage2(args, steps, keep):
    vq_state = vqgan.read_vqgan(args)   # sets the VQGAN's data and image size as the script does
    data = datasets.load(args)
    num_classes = data.num_classes if args.conditional else 0
    torch.manual_seed(args.seed)
    vq = vqgan.load_vqgan(vq_state, "cpu")
    gpt = vqgan.build_gpt(args, vq.n_embed, vq.side, num_classes)
    decay = [p for n, p in gpt.named_parameters() if n.endswith("weight") and p.dim() == 2 and "emb" not in n]
    no_decay = [p for n, p in gpt.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(args.beta1, args.beta2), foreach=True)
    batches = datasets.iterate(data, args.batch_size, "cpu")

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x, y = next(batches)
        with torch.no_grad():
            codes = vq.encode(x)[2].flatten(1)
        first = vqgan.first_tokens(vq.n_embed, y if num_classes else None, len(x), "cpu")
        loss = vqgan.gpt_loss(gpt, first, codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    if keep is not None:
        keep.update(gpt=gpt, opt_gpt=opt)
    return times
