"""Improved Techniques for Training GANs — Salimans, Goodfellow, Zaremba, Cheung, Radford, Chen, 2016.
arXiv:1606.03498.

The idea: a toolbox of tricks that make GAN training converge, and a GAN whose discriminator is a
classifier, which turns the GAN into a strong semi-supervised learner.

The techniques (Sec. 3), each a flag here:
- Feature matching (3.1, `--g-objective feature-matching`): G matches the mean of an intermediate layer
  f of D on real data,  L_G = ‖E_x f(x) − E_z f(G(z))‖².
- Minibatch discrimination (3.2, `--minibatch-disc`): with features f(x_i) ∈ R^A and a tensor T ∈ R^{A×B×C},
  M_i = f(x_i) T ∈ R^{B×C},  c_b(x_i, x_j) = exp(−‖M_{i,b} − M_{j,b}‖_1),  o_b(x_i) = Σ_{j≠i} c_b(x_i, x_j);
  D's next layer sees [f(x_i), o(x_i)] (A + B features). B = 100, C = 5.
- Historical averaging (3.3, `--hist-avg λ`): each player's cost gets λ ‖θ − (1/t) Σ_{i<t} θ[i]‖².
- One-sided label smoothing (3.4, `--real-target 0.9`): D's target for real data is 0.9, for fakes 0.
- Virtual batch normalisation (3.5, `--g-norm virtual`): every example is normalised with statistics of a
  reference batch, fixed once at the start, combined with its own; the output of one example no longer
  depends on the rest of its batch.

Semi-supervised learning (Sec. 5): D is a classifier with K + 1 outputs, "generated" being class K+1.
Fixing l_{K+1} = 0 leaves K logits l_1..l_K, and with Z(x) = Σ_k exp l_k(x)

    p(y = k | x, y < K+1) = softmax(l)_k,      D(x) = 1 − p(y = K+1 | x) = Z(x) / (Z(x) + 1),
    L = L_supervised + L_unsupervised,
    L_supervised   = −E_{x,y ~ labelled} log p(y | x, y < K+1)              (cross-entropy)
    L_unsupervised = −E_{x ~ data} log D(x) − E_z log(1 − D(G(z))).

With s = logsumexp(l): log D(x) = s − softplus(s) and log(1 − D(x)) = −softplus(s). G is trained by feature
matching. Test error uses D's argmax over the K logits, with D's weights Polyak-averaged (as the code).

Two modes, the two kinds of model in the official code (openai/improved-gan, mnist_svhn_cifar10/):
- `--mode semi` (default; train_*_feature_matching.py): feature matching, best classifier.
  Logs metric/test_error (% of test images misclassified).
- `--mode generate` (train_*_minibatch_discrimination.py): minibatch discrimination, best samples; the same
  K+1 classifier (the code still uses 400 labels per class on CIFAR-10), G minimises E log(1 − D(G(z))) with 3
  G updates per D update, and D takes Gaussian noise (σ 0.2) on its input instead of dropout.
  `--labels 0` drops the labels: one logit, D(x) = sigmoid(l), an ordinary GAN (Table 3's "−L").
  `--metrics is` (or fid,is) scores G's samples with the Inception Score of Table 3 at each evaluation.

The nets (the official code's sizes):
- MNIST (`--arch mlp`, data in [0, 1]): D = Gaussian noise σ 0.3 → 1000 → 500 → 250 → 250 → 250 → 10, ReLU,
  weight normalisation, Gaussian noise σ 0.5 after every hidden layer; feature matching on the last hidden
  layer. G: z ~ U[0, 1)^100 → 500 → 500 softplus with batch norm → 784 sigmoid (weight norm).
  Adam lr 3e-3, β1 0.5, batch 100, 300 epochs; 100 labels.
- CIFAR-10 and SVHN (`--arch conv`, data in [−1, 1]): D = dropout 0.2 → 3 × conv3 96 (the last stride 2) →
  dropout 0.5 → 3 × conv3 192 (the last stride 2) → dropout 0.5 → conv3 192 (valid) → 2 × NIN 192 →
  global mean pool (the feature-matching layer) → dense 10; lReLU 0.2, weight norm everywhere.
  G: z → 4x4x512 → deconv5 256 → 128 (batch norm, ReLU) → 32x32x3 tanh (weight norm).
  Adam lr 3e-4, β1 0.5, batch 100; CIFAR-10: 1200 epochs, lr decays linearly to 0 over the last 400,
  4000 labels; SVHN: 900 epochs, decay over the last 300, 1000 labels.
Weight-normalised layers get the code's data-dependent initialisation (pre-activations of one batch scaled
to mean 0 and std 1, 0.1 for the output layers), after which the hidden layers' scales g stay fixed.

Headline (Table 1, 2): MNIST with 100 labels 93 ± 6.5 test errors of 10k (0.93 %, over 10 seeds);
CIFAR-10 error 21.83 / 19.61 / 18.63 / 17.72 % with 1k / 2k / 4k / 8k labels; SVHN 8.11 % with 1k labels.
Table 3: Inception Score on CIFAR-10 8.09 ± .07 with all techniques (real data 11.24).

Usage:
    python improved_gan.py                                   # MNIST, 100 labels, the paper's 300 epochs
    python improved_gan.py --dataset cifar10 --cuda          # CIFAR-10, 4000 labels (image size 32)
    python improved_gan.py --dataset svhn --cuda             # SVHN, 1000 labels, with the CIFAR nets
    python improved_gan.py --dataset cifar10 --mode generate --cuda   # minibatch discrimination, samples
    python improved_gan.py --dataset mnist --epochs 20 --no-gan       # baseline: the 100 labels only
    python improved_gan.py --dataset path/to/mnist-idx-folder --test-size 2000 --epochs 50   # no test split
    python improved_gan.py --sample runs/improved_gan/mnist-.../ckpt.pt

Differences from the paper:
- Defaults follow the code released with the paper (mnist_svhn_cifar10/train_*.py): there,
  historical averaging, label smoothing and virtual batch norm are off (G uses batch norm). Table 3's
  best CIFAR-10 sample model also used VBN and label smoothing: add `--g-norm virtual --real-target 0.9`.
- D's loss is L_supervised + ½ L_unsupervised, the code's weighting (`--unsup-weight 1` gives the paper's sum).
- Feature matching as the code: the mean over features of the squared (MLP) or absolute (conv) difference
  of the mean features, instead of the squared norm; f = the last hidden layer (MLP) or the global pool (conv).
- The `minimax` G objective of the code's minibatch-discrimination models minimises E log(1 − D(G(z))),
  not the non-saturating −E log D(G(z)).
- Virtual batch norm: as the ImageNet code (the reference's statistics and the example's own, weights
  N/(N+1) and 1/(N+1), gradients through both), with the learned shift and no learned scale of the batch norm
  it replaces; the reference batch is `--ref-size` fixed noise vectors, passed through G at every step.
- Historical averaging: the paper gives no weight λ; the running mean includes the initial parameters.
- Polyak averaging (EMA 0.9999 of D's weights, for the test error) starts from D's weights after its first
  update (torch.optim.swa_utils.AveragedModel copies them at its first update); the code starts its average
  from zeros.
- Data: unlabelled batches are drawn at random with replacement, not by epoch permutations; each labelled
  batch is a random permutation of the labelled set (the code's batches when labels = batch size, 100).
  The data-dependent initialisation uses 500 random training images (the code: its first labelled batches).
- Datasets without a test split (e.g. a folder of MNIST idx files) hold out `--test-size` random images for
  the test error. Only datasets held in memory are supported (MNIST, CIFAR, SVHN, fake, idx folders).
- SVHN uses the CIFAR-10 nets, as the paper says; the official SVHN code's D is narrower (`--d-width 64`).
- The minibatch layer's scale is a plain weight-norm g (the code: exp of a log-scale; the sign cannot
  matter to L1 distances). In the MLP D (no official version) it sits right before the output layer.
- The conv nets accept any image size divisible by 8 (from 16); G starts at size / 8.
- Adam: PyTorch adds ε to √v, the code divides by √(v + 1e-8); ε = 1e-4 (`--adam-eps`) stands in for that
  (the two agree for v ≫ 1e-8 and v ≪ 1e-8, within √2 between; many gradients here are ~1e-4). The lr
  decays per step, not per epoch.
- Training length: `--epochs` of the training set (the paper's by default); one step = one D update and
  `--g-steps` G updates. A run is one seed; the paper reports the mean ± std over 10 seeds.
"""
import argparse
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common import data as datasets
from common import digits
from common import metrics as inception
from common import run as runlib

SCRIPT = "improved_gan"
VALUE_RANGE = {"mlp": (0, 1), "conv": (-1, 1)}   # the data range of each kind of net (the code's)

# The official code's settings (mnist_svhn_cifar10/train_*_feature_matching.py): labelled examples,
# Adam learning rate, epochs, and the last epochs over which the lr decays linearly to 0.
PAPER = {
    "mnist": dict(labels=100, lr=3e-3, epochs=300, decay_epochs=0),
    "cifar10": dict(labels=4000, lr=3e-4, epochs=1200, decay_epochs=400),
    "svhn": dict(labels=1000, lr=3e-4, epochs=900, decay_epochs=300),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Improved Techniques for Training GANs (Salimans et al. 2016)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["semi", "generate"], default="semi",
                   help="semi: feature matching, semi-supervised classifier (test error); generate: "
                        "minibatch discrimination for sample quality")
    p.add_argument("--arch", choices=["auto", "mlp", "conv"], default="auto",
                   help="mlp: the MNIST nets; conv: the CIFAR-10/SVHN nets; auto: mlp for one-channel images")
    p.add_argument("--labels", type=int, default=None,
                   help="labelled training examples, balanced over the classes; 0 (--mode generate only): one logit, "
                        "an ordinary GAN (default: 100 mlp/MNIST, 4000 conv/CIFAR-10, 1000 SVHN; 0 without labels)")
    p.add_argument("--no-gan", action="store_true",
                   help="baseline: train the same classifier on the labelled examples only (no G, no L_unsupervised)")
    p.add_argument("--test-size", type=int, default=2000,
                   help="images held out for the test error when the dataset has no test split")
    p.add_argument("--z-dim", type=int, default=100, help="noise dimension, z ~ U[0, 1)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate "
                   "(default: 3e-3 with the mlp nets, 3e-4 with the conv nets)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    p.add_argument("--adam-eps", type=float, default=1e-4,
                   help="Adam epsilon, added to sqrt(v); the code divides by sqrt(v + 1e-8), about sqrt(v) + 1e-4 "
                        "for the small gradients of these nets")
    p.add_argument("--epochs", type=float, default=None,
                   help="training length in passes over the training set, sets --steps (default: the paper's, "
                        "300 mlp/MNIST, 1200 conv/CIFAR-10, 900 SVHN; none when --steps is given)")
    p.add_argument("--decay-epochs", type=float, default=None,
                   help="the lr decays linearly to 0 over these last epochs (default: 0 mlp/MNIST, "
                        "400 conv/CIFAR-10, 300 SVHN)")
    p.add_argument("--unsup-weight", type=float, default=0.5,
                   help="weight of L_unsupervised in D's loss (the code's 1/2; the paper's sum is 1)")
    g = p.add_argument_group("techniques (Sec. 3)")
    g.add_argument("--g-objective", choices=["feature-matching", "minimax"], default=None,
                   help="G's loss: feature matching (3.1) or minimise E log(1 - D(G(z))) "
                        "(default: feature-matching in --mode semi, minimax in generate, as the code)")
    g.add_argument("--minibatch-disc", action=argparse.BooleanOptionalAction, default=None,
                   help="minibatch discrimination layer before D's output (3.2) "
                        "(default: on in --mode generate, off in semi)")
    g.add_argument("--mb-kernels", type=int, default=100, help="minibatch discrimination: kernels B")
    g.add_argument("--mb-dim", type=int, default=5, help="minibatch discrimination: kernel dimension C")
    g.add_argument("--hist-avg", type=float, default=0.0,
                   help="historical averaging (3.3): weight of |theta - mean of past theta|^2 in both costs; 0 = off")
    g.add_argument("--real-target", type=float, default=1.0,
                   help="one-sided label smoothing (3.4): D's target for real data, e.g. 0.9; 1 = off")
    g.add_argument("--g-norm", choices=["batch", "virtual"], default="batch",
                   help="normalisation in G: batch norm (the code) or virtual batch norm (3.5)")
    g.add_argument("--ref-size", type=int, default=100, help="virtual batch norm: size of the reference batch")
    g.add_argument("--polyak", type=float, default=0.9999,
                   help="EMA decay of D's weights used for the test error (the code's); 0 = the current D")
    g.add_argument("--g-steps", type=int, default=None,
                   help="G updates per D update (default: 1 in --mode semi, 3 in generate)")
    n = p.add_argument_group("network sizes")
    n.add_argument("--d-hidden", default="1000,500,250,250,250", help="mlp D: hidden layer widths")
    n.add_argument("--g-hidden", type=int, default=500, help="mlp G: width of its two softplus layers")
    n.add_argument("--d-width", type=int, default=96, help="conv D: channels of the first block (then 2x)")
    n.add_argument("--g-width", type=int, default=512, help="conv G: channels at size/8 (halved per upsampling)")
    runlib.add_args(p, dataset="mnist", image_size=28, batch_size=100, steps=180_000,
                    log_every=100, sample_every=5000, ckpt_every=5000, eval_every=5000, eval_samples=10000,
                    metrics="none", digits=True)
    args = runlib.parse(p, argv, dry_run_defaults={
        "dataset": "fake", "image_size": 16, "labels": 20, "test_size": 64, "decay_epochs": 0,
        "d_hidden": "32,16", "g_hidden": 16, "d_width": 8, "g_width": 16, "mb_kernels": 8, "mb_dim": 3,
        "ref_size": 8, "epochs": 0}, defaults=lambda a: {
        **({"epochs": 0} if "steps" in a.explicit else {}),   # 0: train for --steps
        **({"image_size": 32} if a.dataset in ("cifar10", "cifar100", "svhn") and not a.dry_run else {}),
        **({"eval_samples": 50000} if a.sample and a.eval else {})})   # Table 3: IS of 50k samples
    try:
        args.d_hidden = [int(w) for w in args.d_hidden.split(",")]
    except ValueError:
        raise runlib.UsageError(f"--d-hidden takes comma-separated widths, got {args.d_hidden!r}")
    return args


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------

def wn(layer, init_scale=1.0, train_g=False):
    """Weight normalisation W = g v / ‖v‖ per output unit. As in the code, g is set by the data-dependent
    initialisation (pre-activations of std `init_scale`; None: no such initialisation) and trained only
    where `train_g`."""
    layer = weight_norm(layer, dim=1 if isinstance(layer, nn.ConvTranspose2d) else 0)
    layer.parametrizations.weight.original0.requires_grad_(train_g)
    layer.init_scale = init_scale
    return layer


class GaussianNoise(nn.Module):
    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return x + self.sigma * torch.randn_like(x) if self.training else x


class MinibatchDiscrimination(nn.Module):
    """Sec. 3.2: M_i = f(x_i) T (B × C); o_b(x_i) = Σ_{j≠i} exp(−‖M_{i,b} − M_{j,b}‖_1) (+ a bias);
    returns [f(x_i), o(x_i)]. T's columns are weight-normalised, as the code's."""

    def __init__(self, in_features, kernels=100, dim=5):
        super().__init__()
        self.kernels, self.dim = kernels, dim
        linear = nn.Linear(in_features, kernels * dim, bias=False)
        nn.init.normal_(linear.weight, std=0.05)
        self.T = weight_norm(linear)
        with torch.no_grad():
            self.T.parametrizations.weight.original0.fill_(1.0)
        self.bias = nn.Parameter(torch.full((kernels,), -1.0))

    def distances(self, x):
        m = self.T(x).view(len(x), self.kernels, self.dim)      # M: (N, B, C)
        return (m[:, None] - m[None]).abs().sum(3)                # ‖M_{i,b} − M_{j,b}‖_1: (N, N, B)

    def closeness(self, x):
        c = torch.exp(-self.distances(x))                         # c_b(x_i, x_j)
        self_term = torch.eye(len(x), dtype=torch.bool, device=x.device)[:, :, None]
        return c.masked_fill(self_term, 0).sum(1)                 # o_b(x_i), j ≠ i: (N, B)

    def forward(self, x):
        return torch.cat([x, self.closeness(x) + self.bias], 1)

    @torch.no_grad()
    def data_init(self, x):
        """The code's initialisation: scale T so that half the mean distance to the nearest other example
        is 1 for every kernel, then centre o(x) on the batch."""
        d = self.distances(x) + torch.diag(torch.full((len(x),), float("inf"), device=x.device))[:, :, None]
        scale = 0.5 * d.amin(1).mean(0)                           # (B,)
        g = self.T.parametrizations.weight.original0
        g.div_(scale.repeat_interleave(self.dim).view_as(g))
        self.bias.copy_(-self.closeness(x).mean(0))


class GeneratorNorm(nn.Module):
    """Normalisation in G, followed by a learned shift (the code's batch norm in G has no learned scale).

    batch: the current batch's statistics (always; the code never uses running averages in G).
    virtual (Sec. 3.5): the input's first `ref_size` rows are the reference batch, normalised with their own
    statistics; every other example x with mean = (N μ_ref + μ_x)/(N + 1) and mean square likewise, where μ_x
    is x's own mean over positions (the ImageNet code's VBN)."""

    def __init__(self, features, kind="batch", ref_size=100, eps=1e-6):
        super().__init__()
        self.kind, self.ref_size, self.eps = kind, ref_size, eps
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, h):
        shape = (1, -1) + (1,) * (h.dim() - 2)
        if self.kind == "batch":
            out = F.batch_norm(h, None, None, training=True, eps=self.eps)
        else:
            dims, spatial = [0, *range(2, h.dim())], list(range(2, h.dim()))
            ref, x = h[:self.ref_size], h[self.ref_size:]
            ref_mean, ref_sq = ref.mean(dims, keepdim=True), ref.square().mean(dims, keepdim=True)
            own_mean = x.mean(spatial, keepdim=True) if spatial else x
            own_sq = x.square().mean(spatial, keepdim=True) if spatial else x.square()
            a = 1.0 / (self.ref_size + 1)
            mean = a * own_mean + (1 - a) * ref_mean
            sq = a * own_sq + (1 - a) * ref_sq
            out = torch.cat([(ref - ref_mean) / (ref_sq - ref_mean.square()).clamp_min(0).add(self.eps).sqrt(),
                             (x - mean) / (sq - mean.square()).clamp_min(0).add(self.eps).sqrt()])
        return out + self.bias.view(shape)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """mlp: z → 500 → 500 softplus (norm) → C·H·W sigmoid (weight norm), data in [0, 1].
    conv: z → (width, s/8, s/8) → deconv5 width/2 → width/4 (norm, ReLU) → C × s × s tanh (weight norm)."""

    def __init__(self, arch, z_dim, shape, width, norm="batch", ref_size=100):
        super().__init__()
        self.shape, self.virtual = tuple(shape), norm == "virtual"
        gnorm = lambda f: GeneratorNorm(f, norm, ref_size)  # noqa: E731
        if arch == "mlp":
            out = wn(nn.Linear(width, math.prod(self.shape)), init_scale=None, train_g=True)
            self.net = nn.Sequential(
                nn.Linear(z_dim, width, bias=False), gnorm(width), nn.Softplus(),
                nn.Linear(width, width, bias=False), gnorm(width), nn.Softplus(),
                out, nn.Sigmoid(), nn.Unflatten(1, self.shape))
            nn.init.xavier_uniform_(self.net[0].weight)  # Lasagne's Glorot-uniform weights
            nn.init.xavier_uniform_(self.net[3].weight)
            nn.init.xavier_uniform_(out.parametrizations.weight.original1)
            with torch.no_grad():  # the code's output layer: g = 1, zero bias, no data-dependent init
                out.parametrizations.weight.original0.fill_(1.0)
                out.bias.zero_()
        else:
            c, s = self.shape[0], self.shape[1] // 8
            up = lambda i, o, bias=False: nn.ConvTranspose2d(i, o, 5, 2, padding=2, output_padding=1, bias=bias)  # noqa: E731
            self.net = nn.Sequential(
                nn.Linear(z_dim, width * s * s, bias=False), gnorm(width * s * s), nn.ReLU(),
                nn.Unflatten(1, (width, s, s)),
                up(width, width // 2), gnorm(width // 2), nn.ReLU(),
                up(width // 2, width // 4), gnorm(width // 4), nn.ReLU(),
                wn(up(width // 4, c, bias=True), init_scale=0.1, train_g=True), nn.Tanh())
            for m in self.modules():  # the code's N(0, 0.05) weights
                if isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
                    w = m.parametrizations.weight.original1 if hasattr(m, "parametrizations") else m.weight
                    nn.init.normal_(w, std=0.05)
        if self.virtual:  # the fixed reference batch of noise vectors
            self.register_buffer("ref_z", torch.rand(ref_size, z_dim))

    def forward(self, z):
        if not self.virtual:
            return self.net(z)
        return self.net(torch.cat([self.ref_z, z]))[len(self.ref_z):]


class Discriminator(nn.Module):
    """A classifier with `classes` logits (l_{K+1} = 0 implicit). `features` is the feature-matching layer;
    the minibatch discrimination layer, when used, sits between it and the output layer."""

    def __init__(self, arch, shape, classes, hidden=(1000, 500, 250, 250, 250), width=96,
                 minibatch=None, input_noise=False):
        super().__init__()
        if arch == "mlp":
            layers, d = [nn.Flatten(), GaussianNoise(0.3)], math.prod(shape)
            for i, h in enumerate(hidden):
                layers += ([GaussianNoise(0.5)] if i else []) + [wn(nn.Linear(d, h)), nn.ReLU()]
                d = h
            self.body = nn.Sequential(*layers)
            head = [GaussianNoise(0.5)]
            init_std, out_scale = 0.1, 1.0
        else:
            w1, w2 = width, 2 * width

            def conv(i, o, stride=1, pad=1, k=3):
                return [wn(nn.Conv2d(i, o, k, stride, pad)), nn.LeakyReLU(0.2)]
            self.body = nn.Sequential(
                GaussianNoise(0.2) if input_noise else nn.Dropout(0.2),
                *conv(shape[0], w1), *conv(w1, w1), *conv(w1, w1, 2), nn.Dropout(0.5),
                *conv(w1, w2), *conv(w2, w2), *conv(w2, w2, 2), nn.Dropout(0.5),
                *conv(w2, w2, pad=0), *conv(w2, w2, pad=0, k=1), *conv(w2, w2, pad=0, k=1),  # conv3 valid, 2 × NIN
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            head, d = [], w2
            init_std, out_scale = 0.05, 0.1
        if minibatch is not None:
            head.append(MinibatchDiscrimination(d, *minibatch))
            d += minibatch[0]
        head.append(wn(nn.Linear(d, classes), init_scale=out_scale, train_g=True))
        self.head = nn.Sequential(*head)
        for m in self.modules():
            if getattr(m, "init_scale", None) is not None:
                nn.init.normal_(m.parametrizations.weight.original1, std=init_std)
                nn.init.zeros_(m.bias)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


@torch.no_grad()
def data_dependent_init(net, x):
    """The code's initialisation of weight-normalised nets: run one batch through `net`; at every layer
    made by `wn`, set g and b so that its pre-activations have mean 0 and std `init_scale` per unit over the
    batch, before the next layer sees them. The minibatch layer rescales its distances likewise."""
    def weight_norm_hook(m, inputs, out):
        g = m.parametrizations.weight.original0
        shape, dims = (1, -1) + (1,) * (out.dim() - 2), [0, *range(2, out.dim())]
        t = (out - m.bias.view(shape)) / g.reshape(shape)      # v̂·x, the unscaled pre-activation
        mean, std = t.mean(dims), t.std(dims, correction=0).clamp_min(1e-8)
        g.copy_((m.init_scale / std).view_as(g))
        m.bias.copy_(-mean * m.init_scale / std)
        return (t - mean.view(shape)) * (m.init_scale / std).view(shape)

    hooks = []
    for m in net.modules():
        if getattr(m, "init_scale", None) is not None:
            hooks.append(m.register_forward_hook(weight_norm_hook))
        elif isinstance(m, MinibatchDiscrimination):
            hooks.append(m.register_forward_pre_hook(lambda mod, inputs: mod.data_init(inputs[0])))
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()


def sample_noise(n, z_dim, device, generator=None):
    return torch.rand(n, z_dim, device=device, generator=generator)  # the code's U[0, 1)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def log_d(logits):
    """log D(x) and log(1 − D(x)) of the K+1 classifier with l_{K+1} = 0: D(x) = Z/(Z + 1), Z = Σ_k exp l_k.
    With s = logsumexp(l): log D = s − softplus(s), log(1 − D) = −softplus(s)."""
    s = torch.logsumexp(logits, 1)
    return s - F.softplus(s), -F.softplus(s)


def supervised_loss(logits, labels):
    """L_supervised = −E log p(y | x, y < K+1) = cross-entropy over the K logits."""
    return F.cross_entropy(logits, labels)


def unsupervised_loss(real_logits, fake_logits, real_target=1.0):
    """L_unsupervised = −E_x log D(x) − E_z log(1 − D(G(z))) (Sec. 5). With one-sided label smoothing
    (Sec. 3.4) real data has target α: its term is −α log D(x) − (1 − α) log(1 − D(x))."""
    log_d_real, log_1md_real = log_d(real_logits)
    _, log_1md_fake = log_d(fake_logits)
    real = -(real_target * log_d_real + (1 - real_target) * log_1md_real).mean()
    return real - log_1md_fake.mean()


def feature_matching_loss(f_real, f_fake, norm="l2"):
    """Sec. 3.1: ‖E f(x) − E f(G(z))‖², as the code: the mean over features of the squared (MNIST) or
    absolute (CIFAR-10, SVHN) difference of the batch means."""
    diff = f_real.mean(0) - f_fake.mean(0)
    return diff.square().mean() if norm == "l2" else diff.abs().mean()


def g_minimax_loss(fake_logits):
    """The code's G loss for the minibatch-discrimination models: minimise E log(1 − D(G(z)))."""
    return log_d(fake_logits)[1].mean()


class HistoricalAverage:
    """Sec. 3.3: the cost term ‖θ − (1/t) Σ_{i<t} θ[i]‖², with the running mean of the parameters' past
    values (the initial ones included)."""

    def __init__(self, params):
        self.params = list(params)
        self.mean = [p.detach().clone() for p in self.params]
        self.count = 1

    def penalty(self):
        return sum((p - m).square().sum() for p, m in zip(self.params, self.mean))

    @torch.no_grad()
    def update(self):
        """Add the current parameters to the mean (call after each update)."""
        self.count += 1
        for p, m in zip(self.params, self.mean):
            m.add_((p - m) / self.count)

    def state_dict(self):
        return {"mean": [m.clone() for m in self.mean], "count": self.count}

    def load_state_dict(self, state):
        for m, saved in zip(self.mean, state["mean"]):
            m.copy_(saved)
        self.count = int(state["count"])


# ------------------------------------------------------------------------------------------------
# Data: the labelled subset and the test set
# ------------------------------------------------------------------------------------------------

def resolve(args, data):
    """The architecture and the paper's per-dataset settings for what was left open; checks."""
    if data.kind != "image" or data.images is None:
        raise runlib.UsageError(f"improved_gan.py needs an image dataset held in memory (mnist, cifar10, svhn, fake, "
                           f"or a folder of MNIST idx files), not {args.dataset}")
    c, h, w = data.shape
    if args.arch == "auto":
        args.arch = "mlp" if c == 1 else "conv"
    if args.arch == "conv" and (h % 8 or h < 16 or h != w):
        raise runlib.UsageError(f"the conv nets need square images with a side divisible by 8 and at least 16, "
                           f"got {h}x{w}; use --image-size 32 (or --arch mlp)")
    paper = PAPER["svhn"] if args.dataset == "svhn" else PAPER["mnist" if args.arch == "mlp" else "cifar10"]
    semi = args.mode == "semi"
    left_open = {**paper, "labels": paper["labels"] if data.num_classes else 0,   # the code's, per mode:
                 "g_objective": "feature-matching" if semi else "minimax", "minibatch_disc": not semi,
                 "g_steps": 1 if semi else 3}
    for key, value in left_open.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.labels < 0 or (args.labels and not data.num_classes):
        raise runlib.UsageError(f"--labels {args.labels}: {args.dataset} has no labels" if args.labels > 0
                           else "--labels must be >= 0")
    if args.labels == 0 and (semi or args.no_gan):
        raise runlib.UsageError("--mode semi and --no-gan need labelled examples: --labels N > 0 on a labelled dataset")
    if args.labels % max(data.num_classes, 1):
        raise runlib.UsageError(f"--labels {args.labels} cannot be balanced over {data.num_classes} classes: "
                           f"give a multiple of {data.num_classes}")
    for name, ok in (("real_target", 0 < args.real_target <= 1), ("polyak", 0 <= args.polyak < 1),
                     ("hist_avg", args.hist_avg >= 0), ("g_steps", args.g_steps >= 1),
                     ("ref_size", args.ref_size >= 1), ("epochs", args.epochs >= 0),
                     ("decay_epochs", args.decay_epochs >= 0)):
        if not ok:
            raise runlib.UsageError(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")


def split_test(args, data):
    """(train, test images, test labels): the dataset's test split when it has one, else `--test-size`
    random held-out images. Test is None for unlabelled data."""
    if not data.num_classes:
        return data, None, None
    if args.dataset in datasets.IN_MEMORY:
        test = datasets.load(args, split="test")
        return data, test.images, test.labels
    if not 0 < args.test_size < len(data):
        raise runlib.UsageError(f"--test-size must be between 1 and {len(data) - 1} for {args.dataset} "
                           f"({len(data)} images, no test split)")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    test, train = perm[:args.test_size], perm[args.test_size:]
    return (dataclasses.replace(data, images=data.images[train], labels=data.labels[train]),
            data.images[test], data.labels[test])


def select_labelled(args, train):
    """`--labels` training examples, the same number from each class (indices into `train`)."""
    per_class = args.labels // train.num_classes
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1))
    chosen = []
    for k in range(train.num_classes):
        of_k = perm[train.labels[perm] == k][:per_class]
        if len(of_k) < per_class:
            raise runlib.UsageError(f"class {k} has only {len(of_k)} training examples; --labels {args.labels} "
                               f"needs {per_class} per class")
        chosen.append(of_k)
    return torch.cat(chosen)


@torch.no_grad()
def test_error(D, images, labels, value_range, device, batch=100):
    """% of test images whose argmax over D's K logits is wrong (D in eval mode: no noise, no dropout)."""
    wrong = torch.zeros((), device=device)
    with runlib.eval_mode(D):
        for i in range(0, len(images), batch):
            x = datasets.to_range(images[i:i + batch].to(device), value_range, True)
            wrong += (D(x).argmax(1) != labels[i:i + batch].to(device)).sum()
    return 100 * wrong.item() / len(images)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build_generator(args, shape):
    width = args.g_hidden if args.arch == "mlp" else args.g_width
    return Generator(args.arch, args.z_dim, shape, width, args.g_norm, args.ref_size)


def build_discriminator(args, shape, classes):
    return Discriminator(args.arch, shape, classes, hidden=args.d_hidden, width=args.d_width,
                         minibatch=(args.mb_kernels, args.mb_dim) if args.minibatch_disc else None,
                         input_noise=args.mode == "generate")


def train(args):
    data = datasets.load(args)
    resolve(args, data)
    data, test_images, test_labels = split_test(args, data)
    if args.metrics:
        inception.load_fid_inception(args.inception_weights)  # missing weights: an error before anything is written
    if args.digit_metrics and args.no_gan:
        raise runlib.UsageError("--metrics cfid/modes score G's samples, and --no-gan trains no G")
    clf = digits.prepare(args.digit_metrics, data, args.data_root)
    labelled = select_labelled(args, data) if args.labels else None
    steps_per_epoch = len(data) / args.batch_size
    if args.epochs > 0:
        args.steps = max(1, round(args.epochs * steps_per_epoch))
    decay_steps = min(round(args.decay_epochs * steps_per_epoch), args.steps)
    r = runlib.setup(args, SCRIPT, data=data)
    device = r.device
    clf = clf.to(device) if clf is not None else None
    gan = not args.no_gan
    conv = args.arch == "conv"
    value_range = VALUE_RANGE[args.arch]
    classes = data.num_classes if args.labels else 1  # K; one logit without labels (an ordinary GAN)
    b = args.batch_size // r.world_size

    G = build_generator(args, data.shape).to(device)
    D = build_discriminator(args, data.shape, classes).to(device)
    init_idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + 2))[:500]
    data_dependent_init(G, sample_noise(args.batch_size, args.z_dim, device))
    data_dependent_init(D, datasets.to_range(data.images[init_idx].to(device), value_range, True))
    G, D = r.prepare(G, channels_last=conv), r.prepare(D, channels_last=conv)
    g_raw, d_raw = runlib.unwrap(G), runlib.unwrap(D)
    g_params = [p for p in g_raw.parameters() if p.requires_grad]
    d_params = [p for p in d_raw.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(g_params, lr=args.lr, betas=(args.beta1, 0.999), eps=args.adam_eps, foreach=True)
    opt_d = torch.optim.Adam(d_params, lr=args.lr, betas=(args.beta1, 0.999), eps=args.adam_eps, foreach=True)
    d_avg = (AveragedModel(d_raw, multi_avg_fn=get_ema_multi_avg_fn(args.polyak)) if args.polyak > 0 else None)
    hist = {"G": HistoricalAverage(g_params), "D": HistoricalAverage(d_params)} if args.hist_avg > 0 else {}

    start = r.resume({"G": g_raw, "D": d_raw}, {"G": opt_g, "D": opt_d})
    if r.resume_state is not None:   # the averages travel with the checkpoint
        if d_avg is not None:
            d_avg.load_state_dict(r.resume_state["ema"]["D"])
        for k, h in hist.items():
            h.load_state_dict(r.resume_state["hist_avg"][k])
    batches = datasets.iterate(data, b, device, value_range=value_range, rank=r.rank, world_size=r.world_size,
                               workers=args.workers)
    if labelled is not None:
        lab_x = datasets.to_range(data.images[labelled].to(device), value_range, True)
        lab_y = data.labels[labelled].to(device)
        lab_reps = math.ceil(b / len(labelled))
    fixed_z = sample_noise(100, args.z_dim, "cpu", torch.Generator().manual_seed(args.seed)).to(device)
    fm_norm = "l2" if args.arch == "mlp" else "l1"
    r.restore_rng()

    def samples():
        return {"samples": (g_raw(fixed_z), 10, value_range)}

    def evaluate():
        """The test error (with labels), Table 3's Inception Score and the digit metrics of G's samples; each
        part draws from the RNG state the training step left, as if it ran alone."""
        out = {}
        if test_images is not None and args.labels:
            out["metric/test_error_raw"] = test_error(d_raw, test_images, test_labels, value_range, device, b)
            evaluated = d_avg.module if d_avg is not None else d_raw
            out["metric/test_error"] = test_error(evaluated, test_images, test_labels, value_range, device, b)
        if gan and args.metrics:
            with r.side_rng():  # the Inception network takes images in [-1, 1]
                lo, hi = value_range
                out.update(inception.evaluate(
                    lambda n: (g_raw(sample_noise(n, args.z_dim, device)) - lo) / (hi - lo) * 2 - 1,
                    args.eval_samples, data, device, metrics=args.metrics, weights=args.inception_weights,
                    data_root=args.data_root))
        if gan and clf is not None:
            with r.side_rng():  # --metrics cfid, modes: on a digit classifier (common/digits.py)
                out.update(digits.evaluate(clf, lambda n: g_raw(sample_noise(n, args.z_dim, device)),
                                           args.eval_samples, data, args.digit_metrics, value_range))
        return out

    def checkpoint():
        return {"models": {"G": g_raw.state_dict(), "D": d_raw.state_dict()},
                "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                "ema": {"D": d_avg.state_dict()} if d_avg is not None else {},
                "hist_avg": {k: h.state_dict() for k, h in hist.items()},
                "data_shape": list(data.shape), "classes": classes}

    zero = torch.zeros((), device=device)
    step = start
    for step in range(start + 1, args.steps + 1):
        lr = args.lr * (min(1.0, (args.steps - step + 1) / decay_steps) if decay_steps > 0 else 1.0)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

        # D: L_supervised + w L_unsupervised (+ historical averaging)
        loss_sup = loss_unsup = train_err = zero
        with r.autocast():
            if labelled is not None:  # a random permutation of the labelled set (repeated if smaller than b)
                idx = torch.randperm(lab_reps * len(labelled), device=device)[:b] % len(labelled)
                logits = D(lab_x[idx]).float()
                loss_sup = supervised_loss(logits, lab_y[idx])
                train_err = 100 * (logits.argmax(1) != lab_y[idx]).float().mean()
            if gan:
                x_unl, _ = next(batches)
                with torch.no_grad():
                    fake = G(sample_noise(b, args.z_dim, device))
                loss_unsup = unsupervised_loss(D(x_unl).float(), D(fake).float(), args.real_target)
            loss_d = loss_sup + args.unsup_weight * loss_unsup
            if hist:
                loss_d = loss_d + args.hist_avg * hist["D"].penalty()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        if d_avg is not None:
            d_avg.update_parameters(d_raw)
        if hist:
            hist["D"].update()

        # G: feature matching on D's features, or the code's minimax loss
        loss_g = zero
        if gan:
            for p in d_params:
                p.requires_grad_(False)
            for _ in range(args.g_steps):
                with r.autocast():
                    fake = G(sample_noise(b, args.z_dim, device))
                    if args.g_objective == "feature-matching":
                        x_unl, _ = next(batches)
                        with torch.no_grad():
                            f_real = d_raw.features(x_unl).float()
                        loss_g = feature_matching_loss(f_real, d_raw.features(fake).float(), fm_norm)
                    else:
                        loss_g = g_minimax_loss(d_raw(fake).float())
                    if hist:
                        loss_g = loss_g + args.hist_avg * hist["G"].penalty()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                if hist:
                    hist["G"].update()
            for p in d_params:
                p.requires_grad_(True)

        scalars = {"loss/D_sup": loss_sup, "train/error": train_err, "train/lr": lr}
        if gan:
            scalars.update({"loss/D_unsup": loss_unsup, "loss/G": loss_g})
        if r.end_step(step, scalars, samples=samples if gan else None, evaluate=evaluate, state=checkpoint):
            break
    return r.finish(step, labelled=args.labels, train_images=len(data),
                    test_images=len(test_images) if test_images is not None else 0)


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    G = build_generator(targs, state["data_shape"]).to(device)
    G.load_state_dict(state["models"]["G"])
    value_range = VALUE_RANGE[targs.arch]
    g = torch.Generator().manual_seed(args.seed)
    step = state["step"]
    grid = G(sample_noise(100, targs.z_dim, "cpu", g).to(device))
    # interpolation strip: 8 rows, each a straight line in z between two random codes
    line = runlib.latent_walks(lambda n: sample_noise(n, targs.z_dim, "cpu", g)).to(device)
    paths = runlib.write_samples(out, step, {"samples": grid, "interpolation": G(line)}, value_range=value_range)
    if args.eval and not args.metrics and not args.digit_metrics:
        raise runlib.UsageError("--eval scores the --metrics: give --metrics is (or fid,is; cfid on digits)")
    # --eval: Table 3's Inception Score of the checkpoint's samples (50k samples unless --eval-samples)
    return {**paths, **inception.score(args, targs, lambda n: G(sample_noise(n, targs.z_dim, device)), device,
                                       value_range=value_range, out=out, step=step)}


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
