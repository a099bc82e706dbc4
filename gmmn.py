"""Generative Moment Matching Networks — Yujia Li, Kevin Swersky, Richard Zemel, 2015. arXiv:1502.02761.

The idea: a generator G maps uniform noise z to data space and is trained, with no discriminator, to
make its samples statistically indistinguishable from the data under a kernel two-sample test. The
test statistic is the maximum mean discrepancy (Sec. 2): with a feature map φ of a kernel k,

    MMD²(X, Y) = ‖ (1/N) Σ_i φ(x_i) − (1/M) Σ_j φ(y_j) ‖²
               = 1/N² Σ_ii' k(x_i, x_i') − 2/(NM) Σ_ij k(x_i, y_j) + 1/M² Σ_jj' k(y_j, y_j'),

which is zero iff all moments of the two distributions match when k is characteristic. G minimises
MMD² between a minibatch of samples and a minibatch of data by backpropagation (Sec. 3, Algorithm 1).
The kernel is
a sum of Gaussians, written as in the paper and the official code (core/generative.py) with σ
dividing the squared distance:

    k(x, y) = Σ_σ exp(−‖x − y‖² / (2σ)),   σ ∈ {2, 5, 10, 20, 40, 80} for MNIST pixels in [0, 1].

The official code minimises sqrt(MMD²) (its "mmdgen_sqrt_gaussian" loss; `--no-sqrt` gives MMD²) with
the biased estimate above (diagonal terms included; `--unbiased` drops them).

GMMN+AE (`--mode ae`): first a dropout autoencoder 784-1024-32 (sigmoid units) is trained; then the
GMMN learns to generate its 32-d codes, and samples are decoded to images. Both stages run in one
command: the 3 x `--ae-steps` autoencoder updates come first, then the `--steps` GMMN updates; the step
counter (logs, checkpoints, --resume) runs over both.

The paper's MNIST setups (official train.py, mnist_mmd_input_space / mnist_mmd_code_space):
    G: z (10) ~ U[−1, 1] → 64 → 256 → 256 → 1024 ReLU → 784 (or 32 codes) sigmoid;
       weights N(0, 0.1²), zero biases (pynn, the official code's library, as of the paper; its later
       N(0, 0.1/fan_in) init leaves G nearly constant in z at first, and our GMMNs then stalled).
    SGD, minibatch 1000 data + 1000 samples, lr 2, momentum 0.9; at iteration 10k lr ÷ 10 and
    momentum 0.99; 40k iterations. Kernel σ: {2, ..., 80} on pixels, a single σ = 1 on codes.
    Autoencoder: dropout 0.2 on the input and 0.5 on the hidden layer; cross-entropy reconstruction;
    greedy layer-wise pretraining (784-1024-784, then 1024-32-1024 on the first layer's codes) and
    fine-tuning of the whole net, each 3000 SGD updates of batch 100 at lr 0.1, gradient norm ≤ 10;
    momentum 0.5 while pretraining, 0 → 0.5 (update 50) → 0.9 (update 200) while fine-tuning.
    Evaluation: Gaussian Parzen window on 10k samples, its width picked on 5000 validation images
    from {0.10, 0.11, ..., 0.29}; Table 1: MNIST log-likelihood 147 ± 2 (GMMN), 282 ± 2 (GMMN+AE).
`--bandwidth-set tfd` selects the official TFD kernels ({5, ..., 160} on pixels, {1, ..., 40} on codes).

Usage:
    python gmmn.py                                    # GMMN on MNIST pixels (downloads MNIST)
    python gmmn.py --mode ae                          # GMMN+AE: autoencoder, then GMMN on its codes
    python gmmn.py --steps 2000 --eval-every 1000     # a quick CPU run
    python gmmn.py --dataset ring8 --steps 3000       # 2D mixture (mode coverage)
    python gmmn.py --sample runs/gmmn/mnist-.../ckpt.pt

Differences from the paper (and its official code):
- PyTorch's SGD keeps its momentum buffer in gradient units, the official optimiser in parameter
  units; the buffer is rescaled when the learning rate drops, so the steps are the same as the official
  v ← m v − lr g, θ ← θ + v (see `set_lr_momentum`).
- Dropout is PyTorch's inverted dropout (kept units scaled up while training) instead of the official
  unscaled masks with weights scaled down at test time; the same in expectation.
- The official optimiser clips gradients with max_grad_norm=10 in the autoencoder stage; we clip the
  norm of the whole gradient (torch.nn.utils.clip_grad_norm_).
- Minibatches are drawn uniformly with replacement (common.data) instead of by per-epoch permutations.
- Validation split: `--valid-size` random training images held out with our own seed (the official
  code also holds out 5000 at random, with numpy's seed 0, so not the same images). A source without a
  test split (e.g. a folder of idx files) gives half of the held-out images to validation, half to test.
- The square root of the loss is taken of MMD² clamped at 1e-12 (the official code adds 1e-10 to the
  gradient's denominator); with `--unbiased` a negative estimate gives no gradient for that step.
- Only the TFD kernel sets are built in: the official TFD runs also use another autoencoder
  (2304-512-512-128) and lr 0.1 for the code-space GMMN, which are not reproduced.
- Under torchrun the autoencoder stage trains on every process separately and rank 0's autoencoder is
  broadcast before the GMMN stage.
- Sample grids, 2D toy data and mode-coverage metrics are additions. On the toys G's output layer is
  linear, the kernels are σ = {10, 100, 1000, 10000} × the mixture's variance (from about three modes'
  widths to the whole layout) and the learning rate defaults to 0.05: at the paper's lr 2 the
  unbounded 2D outputs diverge.
"""
import argparse
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "gmmn"

# σ of the kernels exp(−‖x − y‖² / (2σ)) in the official train.py.
BANDWIDTHS = {("mnist", "pixels"): [2, 5, 10, 20, 40, 80], ("mnist", "ae"): [1],
              ("tfd", "pixels"): [5, 10, 20, 40, 80, 160], ("tfd", "ae"): [1, 2, 5, 10, 20, 40]}
TOY_BANDWIDTHS = [10, 100, 1000, 10000]  # times the toy mixture's variance std²
PARZEN_SIGMAS = np.arange(10, 30) / 100      # official kde_eval_mnist: 0.10, 0.11, ..., 0.29


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generative Moment Matching Networks (Li, Swersky, Zemel 2015)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["pixels", "ae"], default="pixels",
                   help="GMMN on the data itself, or GMMN+AE: on the codes of a dropout autoencoder (Sec. 3.2)")
    p.add_argument("--z-dim", type=int, default=10, help="dimension of the uniform noise z ~ U[-1, 1]")
    p.add_argument("--g-hidden", type=int, nargs="+", default=[64, 256, 256, 1024], help="G's ReLU layers")
    p.add_argument("--bandwidth-set", choices=["mnist", "tfd"], default="mnist",
                   help="the official kernel set: mnist = {2,..,80} on pixels, {1} on codes; "
                        "tfd = {5,..,160} on pixels, {1,..,40} on codes")
    p.add_argument("--bandwidths", type=float, nargs="+", default=None,
                   help="explicit kernel sigmas (default: --bandwidth-set's for images; 10, 100, 1000, 10000 "
                        "times the mixture's variance for the 2D toys)")
    p.add_argument("--sqrt", action=argparse.BooleanOptionalAction, default=True,
                   help="minimise sqrt(MMD^2) as the official code does (--no-sqrt: MMD^2)")
    p.add_argument("--unbiased", action="store_true",
                   help="unbiased MMD^2 estimate (no i = i' terms); the official code uses the biased one")
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate (default: 2 as in the paper; 0.05 for the 2D toys)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--switch-step", type=int, default=10000,
                   help="GMMN iteration from which lr / 10 and momentum 1 - (1 - momentum) / 10 apply")
    p.add_argument("--ae-hidden", type=int, default=1024, help="autoencoder hidden units (--mode ae)")
    p.add_argument("--code-dim", type=int, default=32, help="autoencoder code size (--mode ae)")
    p.add_argument("--ae-dropout", type=float, nargs=2, default=[0.2, 0.5],
                   help="dropout on the encoder's input and on its hidden layer")
    p.add_argument("--ae-steps", type=int, default=3000,
                   help="updates in each of the 3 autoencoder phases (pretrain layer 1, layer 2, fine-tune)")
    p.add_argument("--ae-batch-size", type=int, default=100, help="autoencoder minibatch")
    p.add_argument("--ae-lr", type=float, default=0.1, help="autoencoder SGD learning rate")
    p.add_argument("--ae-pretrain-momentum", type=float, default=0.5, help="momentum in the pretraining phases")
    p.add_argument("--ae-momentum", type=float, default=0.9, help="final fine-tuning momentum (0 → 0.5 → this)")
    p.add_argument("--ae-max-grad-norm", type=float, default=10.0, help="autoencoder gradient-norm clipping")
    p.add_argument("--valid-size", type=int, default=5000,
                   help="training images held out as the validation split (Parzen sigma selection)")
    runlib.add_args(p, dataset="mnist", image_size=28, batch_size=1000, steps=40_000,
                    log_every=100, sample_every=2000, ckpt_every=2000, eval_every=10_000, eval_samples=10_000,
                    metrics="none", inception=False, digits=True)
    return runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 8, "g_hidden": [8, 16, 16, 32], "ae_hidden": 16, "code_dim": 4,
        "ae_steps": 2, "ae_batch_size": 8, "valid_size": 32})


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def init_linear(layer):
    """The official initialisation (pynn's layers as of the paper): W ~ N(0, 0.1²), zero biases."""
    nn.init.normal_(layer.weight, 0.0, 0.1)
    nn.init.zeros_(layer.bias)
    return layer


class Generator(nn.Module):
    """z → ReLU layers → sigmoid output (pixels or autoencoder codes in [0, 1]), linear for 2D toys."""

    def __init__(self, z_dim, hidden, shape, sigmoid=True):
        super().__init__()
        self.z_dim, self.shape = z_dim, tuple(shape)
        layers, d = [], z_dim
        for h in hidden:
            layers += [init_linear(nn.Linear(d, h)), nn.ReLU()]
            d = h
        layers.append(init_linear(nn.Linear(d, math.prod(self.shape))))
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z).view(-1, *self.shape)


class AutoEncoder(nn.Module):
    """Encoder dim → hidden → code and decoder code → hidden → dim, sigmoid units throughout; dropout on
    the input of each encoder layer. `enc1`/`dec2` and `enc2`/`dec1` are the layer pairs that the
    greedy pretraining trains one at a time."""

    def __init__(self, shape, hidden, code, dropout):
        super().__init__()
        self.shape, dim = tuple(shape), math.prod(shape)
        self.drop1, self.drop2 = nn.Dropout(dropout[0]), nn.Dropout(dropout[1])
        self.enc1, self.enc2 = init_linear(nn.Linear(dim, hidden)), init_linear(nn.Linear(hidden, code))
        self.dec1, self.dec2 = init_linear(nn.Linear(code, hidden)), init_linear(nn.Linear(hidden, dim))

    def encode(self, x):
        h = torch.sigmoid(self.enc1(self.drop1(x.flatten(1))))
        return torch.sigmoid(self.enc2(self.drop2(h)))

    def decode_logits(self, code):
        return self.dec2(torch.sigmoid(self.dec1(code)))

    def decode(self, code):
        return torch.sigmoid(self.decode_logits(code)).view(-1, *self.shape)


def sample_noise(n, z_dim, device, generator=None):
    """z ~ U[−1, 1]^z_dim (official StochasticGenerativeNet.sample_hiddens)."""
    return torch.rand(n, z_dim, device=device, generator=generator) * 2 - 1


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def sq_distances(x, y):
    """‖x_i − y_j‖² for all pairs of rows, as ‖x‖² + ‖y‖² − 2 x·y (clamped at 0 against rounding)."""
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def kernel_sum(d2, bandwidths):
    """k = Σ_σ exp(−d² / (2σ)) on a matrix of squared distances."""
    return sum(torch.exp(-d2 / (2 * s)) for s in bandwidths)


def mmd2(x, y, bandwidths, unbiased=False):
    """MMD² between the sets of rows of x (N, ...) and y (M, ...) under the kernel sum (Sec. 2):
    mean k(x, x') − 2 mean k(x, y) + mean k(y, y'). The biased estimate keeps the i = i' terms (always
    ≥ 0, the official code's); the unbiased one averages k(x, x') and k(y, y') over distinct pairs."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    kxx = kernel_sum(sq_distances(x, x), bandwidths)
    kyy = kernel_sum(sq_distances(y, y), bandwidths)
    kxy = kernel_sum(sq_distances(x, y), bandwidths)
    if not unbiased:
        return kxx.mean() + kyy.mean() - 2 * kxy.mean()
    n, m = len(x), len(y)
    off_xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    off_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return off_xx + off_yy - 2 * kxy.mean()


def objective(m2, sqrt=True):
    """What G minimises: sqrt(MMD²) (official code) or MMD²."""
    return m2.clamp_min(1e-12).sqrt() if sqrt else m2


def reconstruction_loss(logits, target):
    """Cross-entropy of sigmoid units, summed over dimensions and averaged over the batch (official)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)


def ae_loss(ae, x, phase):
    """The autoencoder's loss in training phase 1 (layer pair enc1/dec2 alone: x → h → x), 2 (enc2/dec1
    on the fixed first layer's codes: h → c → h) or 3 (fine-tuning the whole net: x → c → x)."""
    x = x.flatten(1)
    if phase == 1:
        return reconstruction_loss(ae.dec2(torch.sigmoid(ae.enc1(ae.drop1(x)))), x)
    if phase == 2:
        with torch.no_grad():
            h = torch.sigmoid(ae.enc1(x))
        return reconstruction_loss(ae.dec1(torch.sigmoid(ae.enc2(ae.drop2(h)))), h)
    return reconstruction_loss(ae.decode_logits(ae.encode(x)), x)


# ------------------------------------------------------------------------------------------------
# Optimisation schedules
# ------------------------------------------------------------------------------------------------

def schedule(t, args):
    """lr and momentum of GMMN iteration t (1-based, as the official optimiser counts): from
    `switch_step` on, lr / 10 and momentum 1 − (1 − m) / 10 (2, 0.9 → 0.2, 0.99)."""
    if t >= args.switch_step:
        return args.lr / 10, 1 - (1 - args.momentum) / 10
    return args.lr, args.momentum


def ae_momentum(i, phase, args):
    """Momentum of update i (1-based) of an autoencoder phase: constant while pretraining; 0, then 0.5
    from update 50 and the final value from update 200 while fine-tuning (official schedule)."""
    if phase < 3:
        return args.ae_pretrain_momentum
    return 0.0 if i < 50 else 0.5 if i < 200 else args.ae_momentum


def set_lr_momentum(opt, lr, momentum):
    """Set SGD's lr and momentum. PyTorch keeps the velocity in gradient units (b ← m b + g,
    θ ← θ − lr b), the official optimiser in parameter units (v ← m v − lr g, θ ← θ + v), i.e.
    v = −lr b; rescaling b by old/new lr when lr changes keeps the two identical."""
    for group in opt.param_groups:
        if group["lr"] != lr:
            for p in group["params"]:
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(group["lr"] / lr)
        group["lr"], group["momentum"] = lr, momentum


# ------------------------------------------------------------------------------------------------
# Data splits and evaluation
# ------------------------------------------------------------------------------------------------

def kernel_bandwidths(args, data):
    if args.bandwidths:
        return args.bandwidths
    if data.kind == "toy":
        return [data.std ** 2 * f for f in TOY_BANDWIDTHS]
    return BANDWIDTHS[(args.bandwidth_set, args.mode)]


@torch.no_grad()
def generate(G, ae, n, device, batch=1000, generator=None):
    """n samples in data space (decoded when there is an autoencoder)."""
    out = []
    for i in range(0, n, batch):
        x = G(sample_noise(min(batch, n - i), G.z_dim, device, generator))
        out.append(ae.decode(x) if ae is not None else x)
    return torch.cat(out)


def evaluate(G, ae, args, device, data, valid, test, clf=None):
    """Parzen log-likelihood for images (the paper's Table 1), mode coverage for the 2D toys; the digit
    metrics of --metrics (common/digits.py) with their classifier `clf`."""
    G.eval()
    if ae is not None:
        ae.eval()
    if data.kind == "toy":
        result = metrics.mode_coverage(generate(G, None, 2500, device), data.centers, data.std)
        out = {"metric/modes": result["modes"], "metric/hq": result["hq"]}
    else:
        samples = generate(G, ae, args.eval_samples, device)
        as_unit = lambda u8: u8.to(device).float() / 255  # noqa: E731
        result = metrics.parzen_evaluate(samples, as_unit(valid), as_unit(test), sigmas=PARZEN_SIGMAS)
        out = {"metric/parzen_ll": result["ll"], "metric/parzen_se": result["se"], "metric/parzen_sigma": result["sigma"]}
        if clf is not None:
            out.update(digits.score(clf, samples, data, args.digit_metrics, value_range=(0, 1)))
    G.train()
    return out


@torch.no_grad()
def encode_all(ae, images, device, batch=1000):
    """Codes of every training image (no dropout): the GMMN's data in --mode ae. The autoencoder is
    fixed from here on, so it is left in eval mode."""
    ae.eval()
    return torch.cat([ae.encode(images[i:i + batch].to(device).float() / 255) for i in range(0, len(images), batch)])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build(args, shape, kind):
    if args.mode == "ae":
        ae = AutoEncoder(shape, args.ae_hidden, args.code_dim, args.ae_dropout)
        return Generator(args.z_dim, args.g_hidden, (args.code_dim,)), ae
    return Generator(args.z_dim, args.g_hidden, shape, sigmoid=kind != "toy"), None


def check(args, data):
    if args.mode == "ae" and data.kind != "image":
        raise runlib.UsageError("--mode ae needs image data (the autoencoder works on pixels), not a 2D toy")
    if data.kind == "image" and data.images is None:
        raise runlib.UsageError(f"{args.dataset} is streamed from disk; gmmn.py needs a dataset held in memory "
                                "(mnist, fashion-mnist, cifar10, svhn, fake, a folder of idx files)")
    if args.bandwidths and min(args.bandwidths) <= 0:
        raise runlib.UsageError("--bandwidths must be positive")
    if args.mode == "ae" and args.ae_steps <= 0:
        raise runlib.UsageError("--ae-steps must be positive in --mode ae")


def train(args):
    data = datasets.load(args)
    check(args, data)
    valid = test = None
    if data.kind == "image":
        data, valid, test = datasets.split_held_out(args, data, args.valid_size, shuffle=True)
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    # The step counter runs over the whole command: 3 autoencoder phases first (--mode ae), then the GMMN.
    ae_total = 3 * args.ae_steps if args.mode == "ae" else 0
    lr = args.lr if args.lr is not None else 0.05 if data.kind == "toy" else 2.0
    args = argparse.Namespace(**{**vars(args), "lr": lr, "gmmn_steps": args.steps, "steps": ae_total + args.steps})
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    bandwidths = kernel_bandwidths(args, data)

    G, ae = build(args, data.shape, data.kind)
    G = r.prepare(G)
    g_raw = runlib.unwrap(G)
    opt_g = torch.optim.SGD(G.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
    if ae is not None:
        ae = ae.to(device)
    ae_opt, ae_phase = None, 0    # a fresh optimiser for each autoencoder phase, as the official code

    def new_ae_opt(phase):
        return torch.optim.SGD(ae.parameters(), lr=args.ae_lr, momentum=ae_momentum(1, phase, args), foreach=True)

    start = r.resume({"G": g_raw}, {"G": opt_g})
    state = r.resume_state
    if state is not None:
        if ae is not None:
            ae.load_state_dict(state["models"]["AE"])
            if "AE" in state["optimizers"]:
                ae_phase = state["ae_phase"]
                ae_opt = new_ae_opt(ae_phase)
                ae_opt.load_state_dict(state["optimizers"]["AE"])
    b = args.batch_size // r.world_size
    batches = datasets.iterate(data, b, device, value_range=(0, 1),
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    codes = None
    if ae is not None:
        ae_batches = datasets.iterate(data, args.ae_batch_size, device, value_range=(0, 1),
                                      rank=r.rank, world_size=r.world_size, workers=args.workers)
        if start >= ae_total:
            codes = encode_all(ae, data.images, device)
    fixed_z = sample_noise(100, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    fixed_x = data.images[:50].to(device).float() / 255 if ae is not None else None
    r.restore_rng()

    def ae_samples():
        with runlib.eval_mode(ae):
            return {"ae_reconstructions": (torch.cat([fixed_x, ae.decode(ae.encode(fixed_x))]), 10, (0, 1))}

    def samples():
        with runlib.eval_mode(g_raw):
            if data.kind != "toy":
                x = g_raw(fixed_z)
                return {"samples": (ae.decode(x) if ae is not None else x, 10, (0, 1))}
            r.scatter("samples", generate(g_raw, None, 2500, device), step,
                      real=data.centers, lim=data.centers.abs().max().item() * 1.5)

    def scores():
        return evaluate(g_raw, ae, args, device, data, valid, test, clf)

    def checkpoint():
        models = {"G": g_raw.state_dict()}
        optimizers = {"G": opt_g.state_dict()}
        if ae is not None:
            models["AE"] = ae.state_dict()
            if ae_opt is not None:
                optimizers["AE"] = ae_opt.state_dict()
        return {"models": models, "optimizers": optimizers, "ae_phase": ae_phase,
                "data_shape": list(data.shape), "data_kind": data.kind}

    step = start
    for step in range(start + 1, args.steps + 1):
        if step <= ae_total:
            # ---- stage 1 (--mode ae): the dropout autoencoder, one layer pair at a time, then fine-tuned
            phase, i = (step - 1) // args.ae_steps + 1, (step - 1) % args.ae_steps + 1
            if phase != ae_phase:
                ae_opt, ae_phase = new_ae_opt(phase), phase
            for group in ae_opt.param_groups:
                group["momentum"] = ae_momentum(i, phase, args)
            x, _ = next(ae_batches)
            loss_ae = ae_loss(ae, x, phase)
            ae_opt.zero_grad(set_to_none=True)
            loss_ae.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), args.ae_max_grad_norm)
            ae_opt.step()
            scalars, show, score, count = {f"loss/AE_phase{phase}": loss_ae}, ae_samples, None, step
            if step == ae_total:   # the autoencoder is done: its codes become the GMMN's data
                ae_opt = None
                if r.distributed:
                    for tensor in ae.state_dict().values():
                        dist.broadcast(tensor, 0)
                codes = encode_all(ae, data.images, device)
        else:
            # ---- stage 2: the GMMN, minimising sqrt(MMD²) between a batch of samples and a batch of data
            t = step - ae_total
            lr, momentum = schedule(t, args)
            set_lr_momentum(opt_g, lr, momentum)
            if codes is not None:
                real = codes[torch.randint(len(codes), (b,), device=device)]
            else:
                real, _ = next(batches)
            with r.autocast():
                fake = G(sample_noise(b, args.z_dim, device))
            m2 = mmd2(fake, real, bandwidths, args.unbiased)
            loss = objective(m2, args.sqrt)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()

            scalars = {"loss/G": loss, "loss/mmd2": m2, "train/lr": lr, "train/momentum": momentum}
            show, score, count = samples, scores, t   # this stage samples and evaluates on its own step count
        if r.end_step(step, scalars, samples=show, evaluate=score, state=checkpoint, count=count):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G, ae = build(targs, state["data_shape"], state["data_kind"])
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    if ae is not None:
        ae.load_state_dict(state["models"]["AE"])
        ae.to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]

    def to_data(x):
        return ae.decode(x) if ae is not None else x

    if state["data_kind"] == "toy":
        points = G(sample_noise(2500, targs.z_dim, "cpu", g).to(device))
        return runlib.write_samples(out, step, {"samples": runlib.scatter_image(points)[None]}, (0, 1), nrow=1)
    grid = to_data(G(sample_noise(100, targs.z_dim, "cpu", g).to(device)))
    # interpolation strip: 8 rows, each a straight line in z between two random codes
    line = runlib.latent_walks(lambda n: sample_noise(n, targs.z_dim, "cpu", g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": to_data(G(line))}, value_range=(0, 1))
    # --eval: the digit metrics of the checkpoint
    paths.update(metrics.score(args, targs, lambda n: to_data(G(sample_noise(n, targs.z_dim, device))), device,
                               value_range=(0, 1), out=out, step=step))
    return paths


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
