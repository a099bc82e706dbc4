"""Digit metrics of the MNIST family on a small CNN trained on the digits (cfid is no Inception FID): classifier
FID (cfid, its penultimate features), class agreement (agree), Stacked MNIST modes (VEEGAN, PacGAN). In a script:
    clf = digits.prepare(args.digit_metrics, data, args.data_root)  # before run.setup: one-line errors
    r.log(step, digits.evaluate(clf.to(device), lambda b: G(z(b)), n, data, args.digit_metrics), force=True)
Images (N, C, H, W) in [-1, 1] or uint8 are quantised to 8 bits and resized to 28x28; C = 3 (Stacked MNIST) is
classified channel by channel. Command line: python evaluate.py cfid A B | agree A | modes A --classifier DATASET.
"""
import argparse
import hashlib
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint as ckpt_io
from common import metrics
from common.run import UsageError

HOLDOUT = 2000        # a folder of idx files: its last 2000 images measure the accuracy
MIN_ACCURACY = 0.97   # digits; Fashion-MNIST (about 90% for a net this size) needs 0.85
VERSION = 2           # part of the cache key: bump when the net or its training changes


class DigitNet(nn.Module):
    """conv 5x5 stride 2 (16), conv 5x5 stride 2 (32), fc 128 (the features), fc 10; ReLUs. ~1M MACs."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 5, 2, 2), nn.ReLU(), nn.Conv2d(16, 32, 5, 2, 2), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.body(x))


def _prepare(x):
    """uint8 or [-1, 1] (N, 1, H, W) -> [-1, 1] on 8-bit levels at 28x28."""
    x = (x if x.dtype == torch.uint8 else metrics.to_uint8(x)).float() / 127.5 - 1
    return x if x.shape[-2:] == (28, 28) else F.interpolate(x, (28, 28), mode="bilinear", antialias=True)


def _apply(clf, images, fn, batch=500):
    """fn(28x28 batch) of each channel of (N, 1 or 3, H, W) images, on the CPU: a list per channel."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"digit images must be (N, 1, H, W), or (N, 3, H, W) stacked, got {tuple(images.shape)}")
    device = next(clf.parameters()).device
    with torch.no_grad():
        return [torch.cat([fn(_prepare(images[i:i + batch, c:c + 1].to(device))).cpu()
                           for i in range(0, len(images), batch)]) for c in range(images.shape[1])]


def features(clf, images):
    """(N, 128 C) float64 penultimate features (channels side by side)."""
    return torch.cat(_apply(clf, images, lambda x: clf.body(x).double()), 1)


def predict(clf, images):
    """The class of each image; of stacked images the mode 100 d0 + 10 d1 + d2."""
    digits = _apply(clf, images, lambda x: clf(x).argmax(1))
    return sum(d * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits))


def classifier_fid(clf, fake, real):
    """The Fréchet distance of the classifier features of two image sets (a rounding error below 0 gives 0)."""
    return max(0.0, metrics.fid_from_features(features(clf, fake), features(clf, real)))


def confident_classes(clf, images, threshold=0.99):
    """(the share of images given one class with p >= threshold, how many classes they cover): how many samples
    look like a digit, and which. MNIST test digits: 92% (0.9 would pass 42% of smoothed noise; 0.99 passes 16%)."""
    (probs,) = _apply(clf, images[:, :1], lambda x: torch.softmax(clf(x).double(), 1))
    p_max, cls = probs.max(1)
    sure = p_max >= threshold
    return float(sure.double().mean()), int(cls[sure].unique().numel())


def class_agreement(clf, images, labels):
    """The share of images classified as their label (on real data: the classifier's accuracy)."""
    return float((predict(clf, images) == torch.as_tensor(labels).cpu()).double().mean())


def stacked_mnist_modes(clf, images):
    """Stacked MNIST (VEEGAN; PacGAN Table 2, 26,000 samples): (modes of 1000 with a sample, KL(p_model || uniform)).
    PacGAN Table 2: DCGAN 99 / 3.40 (VEEGAN's run), 78.9 / 4.50 (PacGAN's), PacDCGAN2 1000 / 0.06."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"stacked digits must be (N, 3, H, W), got {tuple(images.shape)}")
    counts = torch.bincount(predict(clf, images), minlength=1000).double()
    p = counts / counts.sum()
    return int((counts > 0).sum()), float(torch.xlogy(p, p * 1000).sum())


def train_classifier(images, labels, steps=1500, batch_size=64, lr=2e-3, seed=0, device="cpu"):
    """A DigitNet trained by Adam (one-cycle) on images and labels, on its own RNG (the caller's is untouched)."""
    device = torch.device(device)
    x, y = _prepare(images).to(device), torch.as_tensor(labels).long().to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = DigitNet(int(y.max()) + 1).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        for _ in range(steps):
            idx = torch.randint(len(x), (batch_size,), device=device)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval().requires_grad_(False)


def classifier(dataset, data_root, device="cpu", download=True):
    """The classifier of a digit set (stacked ones: of their source), trained on its training split (a folder: all
    but its last HOLDOUT images), scored on the rest, cached in <data_root>/digit_classifier/."""
    from common import data as datasets
    name = dataset.split(":", 1)[1] if dataset.startswith("stacked:") else \
        "mnist" if dataset == "stacked-mnist" else dataset
    ns = argparse.Namespace(dataset=name, data_root=data_root, image_size=28, seed=0, download=download)
    train = datasets.load(ns)
    if train.kind != "image" or train.images is None or train.shape[0] != 1 or train.num_classes < 2:
        raise UsageError(f"the digit metrics (cfid, agree, modes) need a labelled one-channel set held in memory "
                         f"(mnist, fashion-mnist, a folder of MNIST idx files, stacked-mnist); {name} is not one")
    if name in datasets.IN_MEMORY:
        held = datasets.load(ns, split="test")
        x, y, hx, hy = train.images, train.labels, held.images, held.labels
    elif len(train) <= 2 * HOLDOUT:
        raise UsageError(f"{name} has {len(train)} images; the digit classifier needs more than {2 * HOLDOUT}")
    else:
        x, y, hx, hy = train.images[:-HOLDOUT], train.labels[:-HOLDOUT], train.images[-HOLDOUT:], train.labels[-HOLDOUT:]
    digest = hashlib.sha1(f"v{VERSION}".encode())
    for t in (x, y, hx, hy):
        digest.update(t.contiguous().numpy().tobytes())
    slug = re.sub(r"[^\w.+-]+", "_", str(name)).strip("_")[-40:]
    path = Path(data_root) / "digit_classifier" / f"{slug}-{digest.hexdigest()[:12]}.pt"
    try:
        state, verb = torch.load(path, map_location="cpu", weights_only=True), "loaded"
        clf = DigitNet(len(state["model"]["head.bias"]))
        clf.load_state_dict(state["model"])
    except Exception:  # absent, unreadable or of another net: train (again)
        clf = train_classifier(x, y, device=device).cpu()
        state, verb = {"model": clf.state_dict(), "accuracy": class_agreement(clf, hx, hy), "dataset": name,
                       "train_images": len(x), "held_out_images": len(hx)}, "trained"
        ckpt_io.save(state, path)
    least = 0.85 if "fashion" in name.lower() else MIN_ACCURACY
    print(f"digit classifier {verb} ({path}): held-out accuracy {100 * state['accuracy']:.2f}% "
          f"on {state['held_out_images']} images", flush=True)
    if state["accuracy"] < least:
        raise UsageError(f"the digit classifier of {name} reaches only {100 * state['accuracy']:.1f}% held-out "
                         f"accuracy ({100 * least:.0f}% is needed for the digit metrics)")
    return clf.to(device).eval().requires_grad_(False)


def prepare(wanted, data, data_root, conditional=False):
    """Before run.setup: the classifier of `data` for args.digit_metrics (None when none is asked), or a UsageError
    when one cannot act (not digits, modes without stacked data, agree without labels)."""
    if "modes" in wanted and data.num_classes != 1000:
        raise UsageError("--metrics modes counts Stacked MNIST modes: use --dataset stacked-mnist or stacked:PATH")
    if "agree" in wanted and not conditional:
        raise UsageError("--metrics agree scores samples against the labels they are conditioned on; "
                         "this model's samples have none")
    return classifier(data.name, data_root) if wanted else None


def score(clf, images, data, wanted, labels=None, value_range=(-1, 1), seed=0):
    """The `wanted` of {"metric/cfid" (against as many images of `data`; on single digits also confident_classes),
    "metric/agree" (with `labels`), "metric/modes", "metric/modes_kl"} of samples in value_range."""

    images, out = images if images.dtype == torch.uint8 else metrics.to_uint8(images, value_range), {}
    if "cfid" in wanted:
        idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(seed))[:len(images)]
        out["metric/cfid"] = classifier_fid(clf, images, data.images[idx])
        if images.shape[1] == 1:
            out["metric/confident"], out["metric/classes"] = confident_classes(clf, images)
    if "agree" in wanted:
        out["metric/agree"] = class_agreement(clf, images, labels)
    if "modes" in wanted:
        out["metric/modes"], out["metric/modes_kl"] = stacked_mnist_modes(clf, images)
    return out


def evaluate(clf, generate_fn, n, data, wanted, value_range=(-1, 1), batch_size=500):
    """score() of n samples of generate_fn(b): b images (on any device), or (images, labels) for agree."""
    images, labels = [], []
    with torch.no_grad():
        for b in [min(batch_size, n - i) for i in range(0, n, batch_size)]:
            out = generate_fn(b)
            x, y = out if isinstance(out, tuple) else (out, None)
            images.append(metrics.to_uint8(x, value_range).cpu())
            labels.append(y.cpu() if y is not None else torch.full((b,), -1))
    return score(clf, torch.cat(images), data, wanted, torch.cat(labels))
