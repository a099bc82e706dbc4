"""Conditional Generative Adversarial Nets — Mirza & Osindero, 2014. arXiv:1411.1784.

The idea: give both players the same extra information y (here a class label). The generator maps
noise and label to a sample, G(z|y); the discriminator judges a sample together with its label, D(x|y).
The value function is the GAN's (Goodfellow et al., Eq. 1) with both nets conditioned on y (Eq. 2):

    min_G max_D V(D, G) = E_{x,y ~ p_data}[log D(x|y)] + E_{z ~ p_z, y}[log(1 − D(G(z|y)|y))].

G maximises log D(G(z|y)|y) (the non-saturating form of the GAN paper, Sec. 3). Once trained, fixing y
and drawing z gives samples of class y: the label is an input of the model, not something it must guess.

The paper's MNIST model (Sec. 4.1), y one-hot:
    G: z (100, uniform in the unit hypercube) → 200 ReLU;  y → 1000 ReLU;
       [both] → 1200 ReLU → 784 sigmoid
    D: x → maxout 240 units × 5 pieces;  y → maxout 50 × 5;  [both] → maxout 240 × 4 → 1 sigmoid
    dropout 0.5 (in G and D); SGD, batch 100, lr 0.1 divided by 1.00004 every update down to 1e-6,
    momentum 0.5 rising to 0.7. Stopping point: the best validation log-likelihood.
Evaluation (Table 1): Gaussian Parzen-window log-likelihood of the MNIST test set under 10k samples
(σ picked on a validation split): 132 ± 1.8 nats (the unconditional GAN: 225 ± 2).

`--arch conv` is a convolutional variant for 32x32 / 64x64 labelled image sets (cifar10, svhn, ...):
a DCGAN generator whose input is [z, embedding(y)] and a DCGAN discriminator that reads the label as an
extra input plane (a learned embedding of y reshaped to H x W), trained with DCGAN's Adam settings.

Usage:
    python cgan.py                                        # the paper's MNIST model (downloads MNIST)
    python cgan.py --steps 20000 --eval-every 5000        # a quick CPU run
    python cgan.py --arch conv --dataset cifar10 --cuda   # the convolutional variant, 32x32
    python cgan.py --sample runs/cgan/mnist-.../ckpt.pt   # one row per class (+ a z interpolation)

Differences from the paper:
- Noise: Sec. 4.1 draws z uniformly "within the unit hypercube", [0, 1]^100. With that z (variance
  1/12, nonzero mean) G ignored z in our short MNIST runs (the MLP gave one image for every z and y;
  the conv variant one image per class, z drowned by the label embedding). We default to
  z ~ U[−√3, √3]^100 (zero mean, unit variance: the "uniform" noise of the GAN paper's pylearn2 code);
  `--noise hypercube` gives the paper's text.
- Dropout: the paper applies 0.5 "to both the generator and discriminator" without saying where. In
  D we drop 0.5 of the hidden units (after each maxout layer) and 0.2 of the input pixels, as the GAN
  paper's official configuration does, and never the label y. G has no dropout by default: with 0.5
  on its hidden units, G learnt to use the dropout masks as its source of randomness and to ignore z
  and y (on MNIST after 1.4k updates, test-mode samples were one image for every z and y).
  `--g-dropout 0.5` restores the paper's setting.
- The validation split (Parzen σ, stopping point) is the last 10k training images, as in the GAN
  paper's configuration; the cGAN paper does not say which images it held out.
- Momentum saturation: the paper only says 0.5 "increased up to 0.7"; we ramp it linearly from
  epoch 1 to epoch 250 as the GAN paper's official MNIST configuration does.
- Initialisation (U(±0.05) in G, U(±0.005) in D, zero biases), D's cost factor ½ and G's output bias
  (logit of the mean pixel) come from the GAN paper's official pylearn2 configuration; the cGAN
  paper gives none of them.
- PyTorch's SGD momentum (v ← m v + g; θ ← θ − lr v) differs slightly from pylearn2's while lr changes.
- D and G alternate (one D step, then one G step); the labels of generated samples are drawn uniformly
  over the classes.
- Training length: the paper stops at the best validation log-likelihood; `--steps` defaults to 150k
  updates (300 epochs of 50k images) and the Parzen estimate is logged every `--eval-every` steps so
  the best point can be read off TensorBoard.
- Additions: `--arch conv` (DCGAN nets with label embeddings, N(0, 0.02) init, values in [−1, 1],
  Adam 2e-4, β1 0.5; not evaluated), `--optimizer adam` for the MLP, sample grids.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "cgan"
PARZEN_SIGMA_IMAGES = 1000   # validation images that pick the Parzen window's sigma (the GAN code's parzen_ll.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Conditional GAN (Mirza & Osindero 2014)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=["mlp", "conv"], default="mlp",
                   help="the paper's MLP (MNIST) or a DCGAN-style variant for 32x32 / 64x64 images")
    p.add_argument("--z-dim", type=int, default=100, help="noise dimension")
    p.add_argument("--noise", choices=["hypercube", "sqrt3"], default="sqrt3",
                   help="z uniform in the unit hypercube [0, 1]^z_dim (Sec. 4.1), or in [-sqrt3, sqrt3]^z_dim "
                        "(zero mean, unit variance: the 'uniform' noise of the GAN paper's code)")
    g = p.add_argument_group("MLP (the paper's MNIST model)")
    g.add_argument("--g-z-units", type=int, default=200, help="G: ReLU units on z")
    g.add_argument("--g-y-units", type=int, default=1000, help="G: ReLU units on y")
    g.add_argument("--g-units", type=int, default=1200, help="G: joint ReLU units")
    g.add_argument("--d-x-units", type=int, default=240, help="D: maxout units on x (5 pieces)")
    g.add_argument("--d-y-units", type=int, default=50, help="D: maxout units on y (5 pieces)")
    g.add_argument("--d-units", type=int, default=240, help="D: joint maxout units (4 pieces)")
    g.add_argument("--d-dropout", type=float, default=0.5, help="dropout rate of D's hidden units")
    g.add_argument("--d-input-dropout", type=float, default=0.2,
                   help="dropout rate of D's input pixels (the GAN paper's official configuration)")
    g.add_argument("--g-dropout", type=float, default=0.0,
                   help="dropout rate of G's hidden units (the paper: 0.5; see the docstring)")
    g.add_argument("--valid-size", type=int, default=10000,
                   help="training images held out as the validation split (Parzen sigma selection)")
    o = p.add_argument_group("optimiser")
    o.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="the paper's SGD (decaying lr, rising momentum); --arch conv defaults to DCGAN's Adam")
    o.add_argument("--lr", type=float, default=0.1, help="learning rate (Adam: 2e-4)")
    o.add_argument("--lr-decay", type=float, default=1.00004, help="SGD lr is divided by this every update")
    o.add_argument("--min-lr", type=float, default=1e-6, help="floor of the decayed learning rate")
    o.add_argument("--momentum", type=float, default=0.5, help="initial SGD momentum")
    o.add_argument("--final-momentum", type=float, default=0.7, help="momentum reached at --momentum-epochs")
    o.add_argument("--momentum-epochs", type=float, default=250, help="epoch at which momentum saturates")
    o.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    c = p.add_argument_group("conv variant (DCGAN nets with label embeddings)")
    c.add_argument("--width", type=int, default=64, help="channels at the highest resolution (doubling inward)")
    c.add_argument("--embed-dim", type=int, default=50, help="G's label embedding size")
    runlib.add_args(p, dataset="mnist", image_size=28, batch_size=100, steps=150_000,
                    log_every=500, sample_every=5000, ckpt_every=5000, eval_every=10000, eval_samples=10000,
                    metrics="none", inception=False, digits=True)
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 8, "g_z_units": 16, "g_y_units": 16, "g_units": 32,
        "d_x_units": 16, "d_y_units": 8, "d_units": 16, "width": 8, "embed_dim": 4, "valid_size": 32},
        defaults=lambda a: {
            "optimizer": "sgd" if a.arch == "mlp" else "adam", "lr": 0.1 if a.optimizer == "sgd" else 2e-4,
            # the conv nets need a power of two; 28 is the MLP's MNIST default
            **({"image_size": 32} if a.arch == "conv" and not a.dry_run else {})})
    sgd_only = {"lr_decay", "min_lr", "momentum", "final_momentum", "momentum_epochs"} & set(args.explicit)
    if args.optimizer == "sgd" and "beta1" in args.explicit:
        raise runlib.UsageError("--beta1 is Adam's; this run uses SGD (give --optimizer adam)")
    if args.optimizer == "adam" and sgd_only:
        raise runlib.UsageError(f"--{sorted(sgd_only)[0].replace('_', '-')} sets the SGD schedule, but this run "
                                "uses Adam (give --optimizer sgd)")
    return args


# ------------------------------------------------------------------------------------------------
# Models: the paper's MLPs
# ------------------------------------------------------------------------------------------------

class Maxout(nn.Module):
    """h_i = max_j (x W_ij + b_ij): a linear layer with `pieces` outputs per unit, reduced by max."""

    def __init__(self, d_in, units, pieces):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(d_in, units * pieces)

    def forward(self, x):
        return self.linear(x).unflatten(1, (self.units, self.pieces)).amax(2)


def init_uniform(module, scale):
    """pylearn2's "irange" initialisation: weights U(−scale, scale), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.uniform_(m.weight, -scale, scale)
            nn.init.zeros_(m.bias)


class MLPGenerator(nn.Module):
    """G(z|y): z → 200 ReLU and y → 1000 ReLU, joined → 1200 ReLU → sigmoid pixels in [0, 1]."""

    def __init__(self, z_dim, num_classes, shape, z_units=200, y_units=1000, units=1200, dropout=0.0):
        super().__init__()
        self.num_classes, self.shape = num_classes, tuple(shape)
        self.z_path = nn.Sequential(nn.Linear(z_dim, z_units), nn.ReLU(), nn.Dropout(dropout))
        self.y_path = nn.Sequential(nn.Linear(num_classes, y_units), nn.ReLU(), nn.Dropout(dropout))
        self.joint = nn.Sequential(nn.Linear(z_units + y_units, units), nn.ReLU(), nn.Dropout(dropout),
                                   nn.Linear(units, math.prod(self.shape)), nn.Sigmoid())
        init_uniform(self, 0.05)

    def init_output_bias(self, mean_image):
        """Start the sigmoid layer at the data's pixel marginals: bias = logit(mean pixel)."""
        with torch.no_grad():
            self.joint[3].bias.copy_(torch.logit(mean_image.flatten().clamp(1e-3, 1 - 1e-3)))

    def forward(self, z, y):
        y = F.one_hot(y, self.num_classes).float()
        h = torch.cat([self.z_path(z), self.y_path(y)], 1)
        return self.joint(h).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    """D(x|y) as a logit: x → maxout 240×5 and y → maxout 50×5, joined → maxout 240×4 → 1."""

    def __init__(self, num_classes, shape, x_units=240, y_units=50, units=240, dropout=0.5, input_dropout=0.2):
        super().__init__()
        self.num_classes = num_classes
        self.x_path = nn.Sequential(nn.Flatten(), nn.Dropout(input_dropout), Maxout(math.prod(shape), x_units, 5),
                                    nn.Dropout(dropout))
        self.y_path = nn.Sequential(Maxout(num_classes, y_units, 5), nn.Dropout(dropout))
        self.joint = nn.Sequential(Maxout(x_units + y_units, units, 4), nn.Dropout(dropout), nn.Linear(units, 1))
        init_uniform(self, 0.005)

    def forward(self, x, y):
        y = F.one_hot(y, self.num_classes).float()
        return self.joint(torch.cat([self.x_path(x), self.y_path(y)], 1)).squeeze(1)


# ------------------------------------------------------------------------------------------------
# Models: the convolutional variant (DCGAN nets with label embeddings)
# ------------------------------------------------------------------------------------------------

def init_dcgan(module):
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ConvGenerator(nn.Module):
    """[z, embed(y)] → 4x4 → ... (transposed convs, BN, ReLU, doubling the side) → tanh image."""

    def __init__(self, z_dim, num_classes, shape, width=64, embed_dim=50):
        super().__init__()
        channels, size = shape[0], shape[1]
        n_up = int(math.log2(size)) - 2
        ch = width * 2 ** (n_up - 1)
        self.embed = nn.Embedding(num_classes, embed_dim)
        layers = [nn.ConvTranspose2d(z_dim + embed_dim, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, z, y):
        h = torch.cat([z, self.embed(y)], 1)
        return self.net(h[:, :, None, None])


class ConvDiscriminator(nn.Module):
    """[x, embed(y) as an H x W plane] → strided convs (LeakyReLU 0.2, BN after the first) → 1 logit."""

    def __init__(self, num_classes, shape, width=64):
        super().__init__()
        channels, size = shape[0], shape[1]
        self.size = size
        self.embed = nn.Embedding(num_classes, size * size)
        layers = [nn.Conv2d(channels + 1, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(int(math.log2(size)) - 3):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)
        init_dcgan(self)

    def forward(self, x, y):
        plane = self.embed(y).view(-1, 1, self.size, self.size).to(x.dtype)
        return self.net(torch.cat([x, plane], 1)).flatten()


def build(args, shape, num_classes):
    if args.arch == "mlp":
        return (MLPGenerator(args.z_dim, num_classes, shape, args.g_z_units, args.g_y_units, args.g_units,
                             args.g_dropout),
                MLPDiscriminator(num_classes, shape, args.d_x_units, args.d_y_units, args.d_units, args.d_dropout,
                                 args.d_input_dropout))
    return (ConvGenerator(args.z_dim, num_classes, shape, args.width, args.embed_dim),
            ConvDiscriminator(num_classes, shape, args.width))


def sample_noise(n, z_dim, kind, device, generator=None):
    """z uniform in the unit hypercube [0, 1]^z_dim (Sec. 4.1), or in [−√3, √3]^z_dim ("sqrt3")."""
    z = torch.rand(n, z_dim, device=device, generator=generator)
    return z if kind == "hypercube" else (z * 2 - 1) * math.sqrt(3)


# ------------------------------------------------------------------------------------------------
# Losses (on D's logits l, D = sigmoid(l); log D = −softplus(−l), log(1 − D) = −softplus(l))
# ------------------------------------------------------------------------------------------------

def d_loss(real_logits, fake_logits):
    """D ascends V (Eq. 2): minimise ½ (−E log D(x|y) − E log(1 − D(G(z|y)|y)))."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def g_loss(fake_logits):
    """G maximises log D(G(z|y)|y) (non-saturating), i.e. minimises −E log D(G(z|y)|y)."""
    return F.softplus(-fake_logits).mean()


def schedule(step, args, epoch_size):
    """SGD learning rate and momentum after `step` updates: lr 0.1 / 1.00004^step (floor 1e-6);
    momentum linear from 0.5 at epoch 1 to 0.7 at epoch `momentum_epochs`."""
    lr = max(args.lr / args.lr_decay ** step, args.min_lr)
    epoch = step * args.batch_size / max(epoch_size, 1)
    ramp = min(max((epoch - 1) / max(args.momentum_epochs - 1, 1e-9), 0.0), 1.0)
    return lr, args.momentum + (args.final_momentum - args.momentum) * ramp


# ------------------------------------------------------------------------------------------------
# Data and evaluation
# ------------------------------------------------------------------------------------------------

def load_labelled(args):
    """The training images and their labels; bad input (no labels, an impossible size) is a UsageError."""
    if args.dataset in ("ring8", "grid25"):
        raise runlib.UsageError("cgan conditions on class labels: use a labelled image dataset (mnist, cifar10, ...)")
    if args.dataset == "stl10":
        raise runlib.UsageError("stl10's training split is mostly unlabelled; cgan needs a labelled dataset")
    if args.arch == "conv" and (args.image_size < 8 or args.image_size & (args.image_size - 1)):
        raise runlib.UsageError(f"--arch conv needs a power-of-two --image-size >= 8 (32 or 64), got {args.image_size}")
    data = datasets.load(args)
    if data.num_classes < 2 or (data.labels is not None and bool((data.labels < 0).any())):
        raise runlib.UsageError(f"{args.dataset} has no class labels; cgan needs a labelled dataset")
    return data


@torch.no_grad()
def generate(G, n, num_classes, args, device, batch=1000, generator=None):
    """n samples with balanced labels 0, 1, ..., K−1, 0, 1, ..."""
    y = torch.arange(n, device=device) % num_classes
    return torch.cat([G(sample_noise(len(y[i:i + batch]), args.z_dim, args.noise, device, generator), y[i:i + batch])
                      for i in range(0, n, batch)])


def evaluate(G, args, device, num_classes, valid, test, data=None, clf=None):
    """Parzen log-likelihood of the test images under samples of all classes (Sec. 4.1, Table 1; MLP runs);
    the digit metrics of --metrics (common/digits.py; agree: the share classified as the label given to G)."""
    G.eval()
    samples = generate(G, args.eval_samples, num_classes, args, device)
    G.train()
    out = {}
    if valid is not None:
        as_unit = lambda u8: u8.to(device).float() / 255  # noqa: E731
        # sigma is chosen on the first 1,000 validation images (the GAN code's parzen_ll.py --limit_size 1000)
        result = metrics.parzen_evaluate(samples.flatten(1), as_unit(valid[:PARZEN_SIGMA_IMAGES]).flatten(1),
                                         as_unit(test).flatten(1))
        out = {"metric/parzen_ll": result["ll"], "metric/parzen_se": result["se"], "metric/parzen_sigma": result["sigma"]}
    if clf is not None:   # generate() gives the labels 0, 1, ..., K - 1, 0, 1, ...
        labels = torch.arange(len(samples)) % num_classes
        out.update(digits.score(clf, samples, data, args.digit_metrics, labels,
                                value_range=(0, 1) if args.arch == "mlp" else (-1, 1)))
    return out


def class_grid(num_classes, columns, args, device, generator=None):
    """Inputs of a grid with one row per class; column j uses the same z in every row."""
    z = sample_noise(columns, args.z_dim, args.noise, "cpu", generator).repeat(num_classes, 1).to(device)
    y = torch.arange(num_classes, device=device).repeat_interleave(columns)
    return z, y


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train(args):
    data = load_labelled(args)
    valid = test = None
    if args.arch == "mlp" and data.images is not None:
        data, valid, test = datasets.split_held_out(args, data, args.valid_size)
    clf = digits.prepare(args.digit_metrics, data, args.data_root, conditional=True)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    value_range = (0, 1) if args.arch == "mlp" else (-1, 1)
    K = data.num_classes

    G, D = build(args, data.shape, K)
    if args.arch == "mlp" and data.images is not None:
        G.init_output_bias(data.images.float().mean(0) / 255)
    conv = args.arch == "conv"
    G, D = r.prepare(G, channels_last=conv), r.prepare(D, channels_last=conv)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    sgd = args.optimizer == "sgd"
    if sgd:
        opt_g = torch.optim.SGD(G.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
        opt_d = torch.optim.SGD(D.parameters(), lr=args.lr, momentum=args.momentum, foreach=True)
    else:
        opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, 0.999), foreach=True)
        opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, 0.999), foreach=True)

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    batches = datasets.iterate(data, args.batch_size // r.world_size, device, value_range=value_range,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed_z, fixed_y = class_grid(min(K, 10), 10, args, device, torch.Generator().manual_seed(args.seed))
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            return {"samples": (g_raw(fixed_z, fixed_y), 10, value_range)}

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                "data_shape": list(data.shape), "num_classes": K}

    b = args.batch_size // r.world_size
    step = start
    for step in range(start + 1, args.steps + 1):
        scalars = {}
        if sgd:
            lr, momentum = schedule(step - 1, args, len(data))
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = lr, momentum
            scalars = {"train/lr": lr, "train/momentum": momentum}

        # D: ascend log D(x|y) + log(1 − D(G(z|y')|y')), labels y' of the fakes uniform over classes
        x, y = next(batches)
        y_fake = torch.randint(K, (b,), device=device)
        with r.autocast():
            with torch.no_grad():
                fake = G(sample_noise(b, args.z_dim, args.noise, device), y_fake)
            loss_d = d_loss(D(x, y), D(fake, y_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # G: ascend log D(G(z|y')|y')
        y_fake = torch.randint(K, (b,), device=device)
        with r.autocast():
            loss_g = g_loss(D(G(sample_noise(b, args.z_dim, args.noise, device), y_fake), y_fake))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        if r.end_step(step, {"loss/D": loss_d, "loss/G": loss_g, **scalars}, samples=samples, state=state,
                      evaluate=(lambda: evaluate(g_raw, args, device, K, valid, test, data, clf))
                      if valid is not None or clf is not None else None):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    K = state["num_classes"]
    G, _ = build(targs, state["data_shape"], K)
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    value_range = (0, 1) if targs.arch == "mlp" else (-1, 1)
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    z, y = class_grid(K, 10, targs, device, g)
    # interpolation: every row a class, the columns a straight line between two noise vectors
    ends = sample_noise(2, targs.z_dim, targs.noise, "cpu", g)
    t = torch.linspace(0, 1, 10)[:, None]
    line = (ends[:1] * (1 - t) + ends[1:] * t).repeat(K, 1).to(device)
    paths = runlib.write_samples(out, step, {"samples": G(z, y), "interpolation": G(line, y)}, value_range=value_range)

    def make(n):   # --eval: the digit metrics of the checkpoint, the classes in turn
        y = torch.arange(n, device=device) % K
        return G(sample_noise(n, targs.z_dim, targs.noise, device), y), y
    paths.update(metrics.score(args, targs, make, device, value_range=value_range, conditional=True, out=out, step=step))
    return paths


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
