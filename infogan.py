"""InfoGAN: Interpretable Representation Learning by Information Maximizing Generative Adversarial Nets —
Chen, Duan, Houthooft, Schulman, Sutskever, Abbeel, 2016. arXiv:1606.03657.

The idea: split G's input into incompressible noise z and a latent code c, and make c matter by
maximising the mutual information I(c; G(z, c)) — without labels. The information is bounded from below
with an auxiliary distribution Q(c|x) (Lemma 5.1, Eq. 4):

    I(c; G(z, c)) ≥ L_I(G, Q) = E_{c ~ P(c), x ~ G(z, c)}[log Q(c|x)] + H(c),

which is tight when Q is the true posterior; for a categorical code L_I ≤ H(c) (ln 10 for one
10-way code), reached when Q recovers c exactly. The game (Eq. 6) is

    min_{G,Q} max_D V(D, G) − λ L_I(G, Q),

V the GAN value (D ascends log D(x) + log(1 − D(G(z, c))), G the non-saturating −log D(G(z, c))).
Q is D's convolutional trunk with a small head of its own: a softmax for each categorical code
(−log Q is a cross-entropy) and a factored Gaussian for the continuous ones (−log Q is a Gaussian
negative log-likelihood).

The paper's MNIST setup (Sec. 7.2, Appendix C.1; nets and optimisers of the official code):
    c1 ~ Cat(K = 10), c2, c3 ~ U(−1, 1), 62 noise variables z ~ U(−1, 1): G's input has 74 dimensions.
    D / Q: conv 4x4 s2 64 lReLU → conv 4x4 s2 128 BN lReLU → FC 1024 BN lReLU → D: FC 1
                                                                              → Q: FC 128 BN lReLU → FC codes
    G: FC 1024 BN ReLU → FC 7·7·128 BN ReLU → deconv 4x4 s2 64 BN ReLU → deconv 4x4 s2 1 → sigmoid
    Adam, lr 2e-4 for D (and Q's head), 1e-3 for G, β1 = 0.5, batch 128, 5000 updates (50 × 100);
    λ = 1; Q's Gaussian has a fixed standard deviation of 1.
Reported (Sec. 7.1-7.2): L_I quickly reaches H(c) = ln 10 ≈ 2.30; c1 used as a classifier (each
category mapped to a digit) has 5% error on MNIST; c2 captures rotation, c3 width, and sweeping
them over [−2, 2] (beyond the training range) still gives meaningful digits.

Other datasets (`--config`, chosen from --dataset by default):
    svhn   (Appendix C.2): four 10-way codes, 4 continuous codes, 124 noise variables (168 inputs);
           D / Q: conv 64 lReLU → conv 128 BN lReLU → conv 256 BN lReLU (4x4, stride 2) → D: FC 1,
           Q: FC 128 BN lReLU → FC; G: FC 2·2·448 BN ReLU → deconv 256 BN ReLU → deconv 128 ReLU →
           deconv 64 ReLU → deconv 3 tanh (4x4, stride 2), 32x32 images in [−1, 1].
    celeba (Appendix C.3): ten 10-way codes, 128 noise variables (228 inputs), the same nets as svhn.
    The 3D faces and 3D chairs experiments (Appendix C.4-C.5) are not provided: their rendered
    datasets are not available through torchvision, and their per-factor configurations (Tables 5, 7)
    would not fit this script's single setup.

Usage:
    python infogan.py                                         # the paper's MNIST run (downloads MNIST)
    python infogan.py --steps 2000 --eval-every 500           # a quick CPU run
    python infogan.py --dataset svhn --cuda                   # Appendix C.2
    python infogan.py --sample runs/infogan/mnist-.../ckpt.pt # Fig. 2: c1.png, c2.png, c3.png

`--sample` writes one figure per code, numbered c1, c2, ... (categorical codes first). A categorical
code's figure varies it from left to right (one column per value), each row another draw of the noise
and the other codes (Fig. 2a). A continuous code's figure sweeps it over [−sweep, sweep] from left to
right, each row a value of the first categorical code, the noise fixed (Fig. 2c-d).

Differences from the paper:
- Q's head is trained by D's optimiser (lr 2e-4), as in the official code, where it lives in D's
  variable scope; only G uses 1e-3. `--q-lr` sets a separate rate for Q's head.
- λ = 1 for every code (the official MNIST launcher). Sec. 6 says a smaller λ is "typically used" for
  continuous codes without a value; with the official fixed σ = 1, their term is ½(c − μ)² + const.
  `--lambda-cont` scales it.
- Q's Gaussian has a fixed σ = 1 (official MNIST code); Appendix C describes a learned σ through an
  exponential, available as `--q-std learned`.
- lReLU slope: 0.01 for the MNIST nets (the official code's leaky_rectify), 0.1 for svhn / celeba
  (Appendix C; there is no official code for them). `--leak` overrides it.
- Weight initialisation N(0, 0.02) with zero biases and BatchNorm scales N(1, 0.02) follows the
  official code; PyTorch's BatchNorm (ε 1e-5, running-average momentum 0.1) matches its settings.
- SVHN: Sec. 7.2 says four categorical and two continuous codes, Appendix C.2 four and four (168
  inputs); we follow the appendix. The number of updates for svhn / celeba is not given; `--steps`
  stays at MNIST's 5000.
- The c1 error is measured on the test split of labelled in-memory datasets (on the training images
  when the source has no test split). The paper does not give its protocol; each value of c1 is
  mapped to the digit most frequent among the images assigned to it (so two values may map to one
  digit). Two numbers are logged: `metric/c1_error` with D / Q in eval mode (BN's running averages,
  which are dominated by the fake batches D also sees) and `metric/c1_error_batch_stats` with BN
  normalising each batch of 500 real test images by its own statistics, as D normalises the real
  batches it is trained on. The second is the one comparable with a network used the way it was
  trained; both are reported so the difference is visible.
- The official code trains on the 55k-image TensorFlow MNIST split; we use the 60k training images.
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data as datasets
from common import digits
from common import metrics
from common import run as runlib

SCRIPT = "infogan"

# Latent codes and nets of each experiment (Appendix C): noise dimensions, categorical codes (how many,
# how many values each), continuous codes, the nets, lReLU slope.
CONFIGS = {
    "mnist": {"noise_dim": 62, "n_cat": 1, "cat_dim": 10, "n_cont": 2, "net": "mnist", "leak": 0.01},
    "svhn": {"noise_dim": 124, "n_cat": 4, "cat_dim": 10, "n_cont": 4, "net": "dcgan32", "leak": 0.1},
    "celeba": {"noise_dim": 128, "n_cat": 10, "cat_dim": 10, "n_cont": 0, "net": "dcgan32", "leak": 0.1},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="InfoGAN (Chen et al. 2016)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=["auto", *CONFIGS], default="auto",
                   help="latent codes and nets of the paper's experiment; auto: svhn or celeba for those "
                        "datasets, mnist otherwise")
    p.add_argument("--noise-dim", type=int, default=None, help="noise variables z ~ U(-1, 1) "
                   "(default: the config's, mnist 62, svhn 124, celeba 128)")
    p.add_argument("--n-cat", type=int, default=None, help="number of categorical codes "
                   "(default: the config's, mnist 1, svhn 4, celeba 10)")
    p.add_argument("--cat-dim", type=int, default=None, help="values of each categorical code "
                   "(default: the config's, 10 in each)")
    p.add_argument("--n-cont", type=int, default=None, help="continuous codes ~ U(-1, 1) "
                   "(default: the config's, mnist 2, svhn 4, celeba 0)")
    p.add_argument("--lambda-cat", type=float, default=1.0, help="λ of the categorical codes' L_I")
    p.add_argument("--lambda-cont", type=float, default=1.0, help="λ of the continuous codes' L_I")
    p.add_argument("--q-std", choices=["fixed", "learned"], default="fixed",
                   help="Q's Gaussian: sigma = 1 (official code) or predicted through exp (Appendix C)")
    p.add_argument("--width", type=int, default=64, help="base channels (64 in the paper's nets)")
    p.add_argument("--leak", type=float, default=None, help="lReLU slope of D / Q "
                   "(default: the config's, mnist 0.01, svhn and celeba 0.1)")
    p.add_argument("--d-lr", type=float, default=2e-4, help="Adam lr of D (shared trunk and D's head)")
    p.add_argument("--g-lr", type=float, default=1e-3, help="Adam lr of G")
    p.add_argument("--q-lr", type=float, default=2e-4, help="Adam lr of Q's head (trained with D's optimiser)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--sweep", type=float, default=2.0, help="continuous codes are swept over [-sweep, sweep] "
                   "in the --sample figures (the paper goes beyond the training range [-1, 1])")
    runlib.add_args(p, dataset="mnist", image_size=28, batch_size=128, steps=5000,
                    log_every=100, sample_every=500, ckpt_every=1000, eval_every=1000, eval_samples=10000,
                    metrics="none", inception=False, digits=True)
    args = runlib.parse(p, argv, dry_run_defaults={"dataset": "fake", "image_size": 8, "width": 8},
                        defaults=config_defaults)
    check_config(args)
    return args


def config_defaults(args):
    """The paper's configuration for the dataset: its codes, nets and (for the 32x32 nets) image size."""
    name = args.config
    if name == "auto":
        name = args.dataset if args.dataset in ("svhn", "celeba") else "mnist"
    config = CONFIGS[name]
    size = {"image_size": 32} if config["net"] == "dcgan32" and not args.dry_run else {}
    return {"config": name, **{k: config[k] for k in ("noise_dim", "n_cat", "cat_dim", "n_cont", "leak")}, **size}


def check_config(args):
    if args.config == "auto":  # given explicitly
        args.config = config_defaults(args)["config"]
    args.net = CONFIGS[args.config]["net"]
    if min(args.noise_dim, args.n_cat, args.n_cont) < 0 or args.n_cat + args.n_cont == 0:
        raise runlib.UsageError("InfoGAN needs at least one latent code (--n-cat / --n-cont) and no negative counts")
    if args.n_cat and args.cat_dim < 2:
        raise runlib.UsageError(f"--cat-dim must be at least 2, got {args.cat_dim}")
    factor = 4 if args.net == "mnist" else 16
    if args.image_size < factor or args.image_size % factor:
        raise runlib.UsageError(f"the {args.net} nets need --image-size divisible by {factor} "
                           f"(28 for MNIST, 32 for svhn / celeba), got {args.image_size}")


# ------------------------------------------------------------------------------------------------
# Latent codes
# ------------------------------------------------------------------------------------------------

def sample_latent(n, args, device, generator=None):
    """z ~ U(−1, 1)^noise_dim; categorical codes uniform over cat_dim values (as indices);
    continuous codes ~ U(−1, 1)."""
    noise = torch.rand(n, args.noise_dim, device=device, generator=generator) * 2 - 1
    cat = torch.randint(args.cat_dim, (n, args.n_cat), device=device, generator=generator)
    cont = torch.rand(n, args.n_cont, device=device, generator=generator) * 2 - 1
    return noise, cat, cont


def latent_vector(noise, cat, cont, cat_dim):
    """G's input [z, one-hot c_1, ..., one-hot c_n, continuous codes] (the official code's order)."""
    return torch.cat([noise, F.one_hot(cat, cat_dim).flatten(1).to(noise.dtype), cont], 1)


def code_entropy(args):
    """H(c) of the categorical codes: n_cat · ln(cat_dim) nats."""
    return args.n_cat * math.log(args.cat_dim)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def init_weights(module):
    """Official initialisation: weights N(0, 0.02), zero biases; BatchNorm scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, in_dim, shape, net, width=64):
        super().__init__()
        channels, size = shape[0], shape[1]
        w = width
        if net == "mnist":  # FC 1024 → FC 7·7·128 → deconv 64 → deconv 1 (sigmoid)
            s = size // 4
            self.start = (2 * w, s, s)
            self.fc = nn.Sequential(nn.Linear(in_dim, 16 * w), nn.BatchNorm1d(16 * w), nn.ReLU(),
                                    nn.Linear(16 * w, 2 * w * s * s), nn.BatchNorm1d(2 * w * s * s), nn.ReLU())
            self.up = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
                                    nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Sigmoid())
        else:  # FC 2·2·448 → deconv 256 → deconv 128 → deconv 64 → deconv 3 (tanh)
            s = size // 16
            self.start = (7 * w, s, s)
            self.fc = nn.Sequential(nn.Linear(in_dim, 7 * w * s * s), nn.BatchNorm1d(7 * w * s * s), nn.ReLU())
            self.up = nn.Sequential(nn.ConvTranspose2d(7 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
                                    nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.ReLU(),
                                    nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(),
                                    nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh())
        init_weights(self)

    def forward(self, latent):
        return self.up(self.fc(latent).view(-1, *self.start))


class DiscriminatorQ(nn.Module):
    """D and Q share a trunk; D's head gives the logit of D(x), Q's head the parameters of Q(c|x)."""

    def __init__(self, shape, net, q_dim, width=64, leak=0.01):
        super().__init__()
        channels, size = shape[0], shape[1]
        w = width
        if net == "mnist":  # conv 64 → conv 128 → FC 1024
            s = size // 4
            self.trunk = nn.Sequential(
                nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(leak),
                nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(leak), nn.Flatten(),
                nn.Linear(2 * w * s * s, 16 * w), nn.BatchNorm1d(16 * w), nn.LeakyReLU(leak))
            features = 16 * w
        else:  # conv 64 → conv 128 → conv 256
            s = size // 8
            self.trunk = nn.Sequential(
                nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(leak),
                nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(leak),
                nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.LeakyReLU(leak), nn.Flatten())
            features = 4 * w * s * s
        self.d_head = nn.Linear(features, 1)
        self.q_head = nn.Sequential(nn.Linear(features, 2 * w), nn.BatchNorm1d(2 * w), nn.LeakyReLU(leak),
                                    nn.Linear(2 * w, q_dim))
        init_weights(self)

    def forward(self, x, with_q=True):
        h = self.trunk(x)
        return self.d_head(h).squeeze(1), (self.q_head(h) if with_q else None)


def q_dim(args):
    return args.n_cat * args.cat_dim + args.n_cont * (2 if args.q_std == "learned" else 1)


def build(args, shape):
    G = Generator(args.noise_dim + args.n_cat * args.cat_dim + args.n_cont, shape, args.net, args.width)
    D = DiscriminatorQ(shape, args.net, q_dim(args), args.width, args.leak)
    return G, D


def split_q(q, args):
    """Q's output → categorical logits (B, n_cat, cat_dim), Gaussian means (B, n_cont), log σ (B, n_cont)."""
    k = args.n_cat * args.cat_dim
    logits = q[:, :k].view(-1, args.n_cat, args.cat_dim)
    mean = q[:, k:k + args.n_cont]
    log_std = q[:, k + args.n_cont:] if args.q_std == "learned" else torch.zeros_like(mean)
    return logits, mean, log_std


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def d_loss(real_logits, fake_logits):
    """D ascends V: minimise −E log D(x) − E log(1 − D(G(z, c)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits):
    """Non-saturating G loss: −E log D(G(z, c))."""
    return F.softplus(-fake_logits).mean()


def categorical_nll(logits, cat):
    """E[−log Q(c|x)] of the categorical codes, summed over codes: their cross-entropy."""
    if cat.shape[1] == 0:
        return logits.sum() * 0
    return F.cross_entropy(logits.transpose(1, 2), cat, reduction="none").sum(1).mean()


def gaussian_nll(mean, log_std, cont):
    """E[−log Q(c|x)] of the continuous codes under a factored Gaussian N(mean, exp(log_std)²),
    summed over codes."""
    nll = 0.5 * ((cont - mean) * torch.exp(-log_std)) ** 2 + log_std + 0.5 * math.log(2 * math.pi)
    return nll.sum(1).mean()


def info_lower_bound(logits, cat, entropy):
    """L_I of the categorical codes (Eq. 4): E log Q(c|x) + H(c) ≤ H(c)."""
    return entropy - categorical_nll(logits, cat)


def info_losses(q, cat, cont, args):
    """(categorical −E log Q, continuous −E log Q): λ-weighted, their sum is −λ L_I up to a constant."""
    logits, mean, log_std = split_q(q, args)
    return categorical_nll(logits, cat), gaussian_nll(mean, log_std, cont)


# ------------------------------------------------------------------------------------------------
# Evaluation: c1 as an unsupervised classifier (Sec. 7.2)
# ------------------------------------------------------------------------------------------------

def cluster_error(pred, labels, num_values):
    """Map every value of the code to the label most frequent among the images assigned to it;
    return the fraction of images whose label differs from their value's label."""
    num_labels = int(labels.max()) + 1
    counts = torch.zeros(num_values, num_labels, dtype=torch.long)
    counts.index_put_((pred.long(), labels.long()), torch.ones_like(pred, dtype=torch.long), accumulate=True)
    return 1.0 - float(counts.max(1).values.sum()) / len(pred)


@torch.no_grad()
def predict_code(D, images, args, device, value_range, batch=500, batch_stats=False):
    """argmax_k Q(c1 = k | x) for uint8 images. BN uses its running averages (eval mode), or with
    batch_stats the statistics of each batch of `batch` real images (train mode, on a copy of D so
    that its running averages are not touched)."""
    was_training = D.training
    if batch_stats:
        D = copy.deepcopy(D).train()
    else:
        D.eval()
    preds = []
    for chunk in images.split(batch):
        _, q = D(datasets.to_range(chunk.to(device), value_range, True))
        preds.append(split_q(q, args)[0][:, 0].argmax(1).cpu())
    D.train(was_training)
    return torch.cat(preds)


def eval_split(args, data):
    """Labelled images on which c1 is scored: the test split of in-memory datasets, else the training
    images; None when there are no labels or no categorical code."""
    if args.n_cat == 0 or data.images is None or data.labels is None or bool((data.labels < 0).any()):
        return None
    if args.dataset in datasets.IN_MEMORY:
        data = datasets.load(args, split="test")
    return data.images[:args.eval_samples], data.labels[:args.eval_samples]


# ------------------------------------------------------------------------------------------------
# Figures (Fig. 2)
# ------------------------------------------------------------------------------------------------

def code_figure(args, code, generator, rows=10, columns=10, sweep=2.0):
    """G's inputs for the figure of code number `code` (0-based; categorical codes first), row-major.
    Categorical: column j sets the code to value j, each row another draw of everything else.
    Continuous: columns sweep the code over [−sweep, sweep]; rows set the first categorical code to
    0, 1, ... (a fresh draw of it when there is none), the noise and other codes fixed at one draw."""
    if code < args.n_cat:
        noise, cat, cont = sample_latent(rows, args, "cpu", generator)
        columns = args.cat_dim
        noise, cat, cont = (t.repeat_interleave(columns, 0) for t in (noise, cat, cont))
        cat[:, code] = torch.arange(columns).repeat(rows)
        return latent_vector(noise, cat, cont, args.cat_dim), columns
    j = code - args.n_cat
    if args.n_cat:
        rows = args.cat_dim
        noise, cat, cont = (t.repeat(rows * columns, 1) for t in sample_latent(1, args, "cpu", generator))
        cat[:, 0] = torch.arange(rows).repeat_interleave(columns)
        cont[:, :] = 0
    else:
        noise, cat, cont = (t.repeat_interleave(columns, 0) for t in sample_latent(rows, args, "cpu", generator))
    cont[:, j] = torch.linspace(-sweep, sweep, columns).repeat(rows)
    return latent_vector(noise, cat, cont, args.cat_dim), columns


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train(args):
    data = datasets.load(args)
    if data.kind != "image":
        raise runlib.UsageError("infogan trains on images (mnist, svhn, celeba, ...), not on 2D toy data")
    scored = eval_split(args, data)
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    value_range = (0, 1) if args.net == "mnist" else (-1, 1)
    entropy = code_entropy(args)

    G, D = build(args, data.shape)
    G, D = r.prepare(G, channels_last=True), r.prepare(D, channels_last=True)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    q_params = list(d_raw.q_head.parameters())
    shared = [p for n, p in d_raw.named_parameters() if not n.startswith("q_head.")]
    opt_d = torch.optim.Adam([{"params": shared, "lr": args.d_lr}, {"params": q_params, "lr": args.q_lr}],
                             betas=(args.beta1, 0.999), foreach=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, betas=(args.beta1, 0.999), foreach=True)

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    batches = datasets.iterate(data, args.batch_size // r.world_size, device, value_range=value_range,
                               rank=r.rank, world_size=r.world_size, workers=args.workers)
    fixed, columns = code_figure(args, 0, torch.Generator().manual_seed(args.seed), sweep=args.sweep)
    fixed = fixed.to(device)
    r.restore_rng()

    def samples():
        with runlib.eval_mode(g_raw):
            return {"samples": (g_raw(fixed), columns, value_range)}

    def evaluate():
        """c1's cluster error on labelled images (Q with running and with batch BN statistics) and the
        digit metrics (--metrics cfid, modes)."""
        out = {}
        if scored is not None:
            pred = predict_code(d_raw, scored[0], args, device, value_range)
            pred_bs = predict_code(d_raw, scored[0], args, device, value_range, batch_stats=True)
            out["metric/c1_error"] = cluster_error(pred, scored[1], args.cat_dim)
            out["metric/c1_error_batch_stats"] = cluster_error(pred_bs, scored[1], args.cat_dim)
        if clf is not None:
            def make(n):
                return g_raw(latent_vector(*sample_latent(n, args, device), args.cat_dim))
            with runlib.eval_mode(g_raw):
                out.update(digits.evaluate(clf, make, args.eval_samples, data, args.digit_metrics, value_range))
        return out

    def state():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()}, "data_shape": list(data.shape)}

    b = args.batch_size // r.world_size
    step = start
    for step in range(start + 1, args.steps + 1):
        x, _ = next(batches)

        # D and Q: ascend V, and L_I on generated samples (descend −log Q(c|G(z, c)))
        noise, cat, cont = sample_latent(b, args, device)
        with r.autocast():
            with torch.no_grad():
                fake = G(latent_vector(noise, cat, cont, args.cat_dim))
            real_logits, _ = D(x, with_q=False)
            fake_logits, q = D(fake)
            nll_cat, nll_cont = info_losses(q.float(), cat, cont, args)
            loss_d = d_loss(real_logits, fake_logits)
            total_d = loss_d + args.lambda_cat * nll_cat + args.lambda_cont * nll_cont
        opt_d.zero_grad(set_to_none=True)
        total_d.backward()
        opt_d.step()

        # G: descend −log D(G(z, c)) − λ L_I, fresh codes
        noise, cat, cont = sample_latent(b, args, device)
        with r.autocast():
            fake_logits, q = D(G(latent_vector(noise, cat, cont, args.cat_dim)))
            g_nll_cat, g_nll_cont = info_losses(q.float(), cat, cont, args)
            loss_g = g_loss(fake_logits)
            total_g = loss_g + args.lambda_cat * g_nll_cat + args.lambda_cont * g_nll_cont
        opt_g.zero_grad(set_to_none=True)
        total_g.backward()
        opt_g.step()

        scalars = {"loss/D": loss_d, "loss/G": loss_g}
        if args.n_cat:  # L_I = H(c) − E[−log Q(c|x)] and its bound H(c) (Fig. 1)
            scalars.update({"info/L_I": entropy - nll_cat, "info/H_c": entropy})
        if args.n_cont:
            scalars["info/nll_cont"] = nll_cont
        if r.end_step(step, scalars, samples=samples, evaluate=evaluate, state=state):
            break
    return r.finish(step)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G, _ = build(targs, state["data_shape"])
    G.load_state_dict(state["models"]["G"])
    G.to(device).eval()
    value_range = (0, 1) if targs.net == "mnist" else (-1, 1)
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    result = {}
    for code in range(targs.n_cat + targs.n_cont):
        latent, columns = code_figure(targs, code, g, sweep=args.sweep)
        result.update(runlib.write_samples(out, step, {f"c{code + 1}": G(latent.to(device))}, value_range, columns))
    # --eval: the digit metrics of the checkpoint
    result.update(metrics.score(args, targs, lambda n: G(latent_vector(*sample_latent(n, targs, device), targs.cat_dim)),
                                device, value_range=value_range, out=out, step=step))
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
