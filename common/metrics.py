"""Evaluation metrics: FID, IS, KID and precision/recall on the Inception network, weights, resize and scaling of
the original TF code (numbers compare with published ones); 2D mode coverage (PacGAN); the Parzen-window
log-likelihood (GAN paper). Digit metrics: common/digits.py. In a script:
      real = metrics.reference_stats(data, args.data_root, r.device)   # cached in <data_root>/fid_stats/
      r.log(step, metrics.evaluate(lambda b: G(torch.randn(b, nz, device=r.device)), n, real, r.device), force=True)
Command line: python evaluate.py fid|kid|pr A B, is A (folders of images or .npz), stats DATASET.
"""
import contextlib
import functools
import math
import os
import re
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.run import UsageError


def _sqrt_psd(a):
    """Square root of a symmetric positive semi-definite matrix via eigh (float64)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ in float64; tr (Σ1 Σ2)^½ from the eigenvalues of the
    symmetric Lᵀ Σ2 L, Σ1 = L Lᵀ (or Σ1^½ Σ2 Σ1^½ when Σ1 is singular): no sqrtm, no complex parts."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    sigma1 = (sigma1 + sigma1.T) / 2
    chol, info = torch.linalg.cholesky_ex(sigma1)  # ~20x faster than eigh for 2048 x 2048
    s1 = chol if info == 0 else _sqrt_psd(sigma1)
    inner = s1.T @ sigma2 @ s1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def gaussian_stats(features):
    """Mean and covariance (unbiased, float64) of (N, D) features, as numpy arrays."""
    f = torch.as_tensor(features).double()
    return f.mean(0).cpu().numpy(), torch.cov(f.T).cpu().numpy()  # unbiased: divides by N − 1


# The Inception-v3 of the TF code (graph of 2015-12-05) as a torchvision network
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
_TF_AVG_POOL = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
_TF_MAX_POOL = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)


def _mixed_forward(m, x):
    """torchvision's InceptionA / C / E block with TF's pooling `m.pool` (padding not counted; Mixed_7c: max)."""
    from torchvision.models import inception as tvi
    if isinstance(m, tvi.InceptionA):
        mid = [m.branch5x5_2(m.branch5x5_1(x)), m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x)))]
    elif isinstance(m, tvi.InceptionC):
        mid = [m.branch7x7_3(m.branch7x7_2(m.branch7x7_1(x))),
               m.branch7x7dbl_5(m.branch7x7dbl_4(m.branch7x7dbl_3(m.branch7x7dbl_2(m.branch7x7dbl_1(x)))))]
    else:
        a, b = m.branch3x3_1(x), m.branch3x3dbl_2(m.branch3x3dbl_1(x))
        mid = [torch.cat([m.branch3x3_2a(a), m.branch3x3_2b(a)], 1),
               torch.cat([m.branch3x3dbl_3a(b), m.branch3x3dbl_3b(b)], 1)]
    return torch.cat([m.branch1x1(x), *mid, m.branch_pool(m.pool(x))], 1)


def _fid_forward(net, x):
    """x: (B, 3, 299, 299) scaled to [-1, 1] -> (pool3 (B, 2048), unbiased logits (B, 1008))."""
    for name, layer in net.named_children():
        if name not in ("dropout", "fc"):
            x = layer(x)
    pool3 = x.flatten(1)
    return pool3, pool3 @ net.fc.weight.T  # the IS code reads the logits without the bias


def fid_inception_net():
    """torchvision's Inception3 (1008 classes, no aux head) with the TF graph's pooling, random weights, in eval
    mode; returns (pool3, logits)."""
    from torchvision.models import Inception3
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    for name in ("5b", "5c", "5d", "6b", "6c", "6d", "6e", "7b", "7c"):  # the blocks with a pool branch
        block = getattr(net, f"Mixed_{name}")
        block.pool = _TF_MAX_POOL if name == "7c" else _TF_AVG_POOL
        block.forward = types.MethodType(_mixed_forward, block)
    net.forward = types.MethodType(_fid_forward, net)
    return net.eval().requires_grad_(False)


_NETS = {}


def load_fid_inception(weights=None, device="cpu"):
    """fid_inception_net() with the TF weights (pytorch-fid's port) from `weights`, $FID_INCEPTION_WEIGHTS or the
    torch hub cache (downloaded there if absent), on `device`, kept for later calls."""
    weights = weights or os.environ.get("FID_INCEPTION_WEIGHTS") or None
    if (str(weights), str(device)) not in _NETS:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
        where = (f"download {FID_WEIGHTS_URL} to {cached}, or give the file with --inception-weights PATH (or "
                 "$FID_INCEPTION_WEIGHTS); a training run without Inception metrics: --metrics none")
        path = Path(weights) if weights else cached if cached.is_file() else None
        if path is not None and not path.is_file():
            raise UsageError(f"Inception weights file {path} does not exist; {where}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True) if path else \
                torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=False,
                                                   check_hash=True, weights_only=True)
            net = fid_inception_net()
            net.load_state_dict(state)
        except Exception as e:  # offline, a corrupt download (hash mismatch), not the right file
            raise UsageError(f"cannot load the FID Inception weights ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); {where}") from None
        _NETS[str(weights), str(device)] = net.to(device)
    return _NETS[str(weights), str(device)]


def to_uint8(x, value_range=(-1, 1)):
    """Quantise images as save_image(x, normalize=True, value_range=...): samples and their PNGs score alike."""
    lo, hi = value_range
    return x.float().clamp(lo, hi).sub(lo).div(hi - lo).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def resize_tf1(x, size):
    """Bilinear resize to size x size as TF1's resize_bilinear: output pixel i reads input position i * in / out."""
    def taps(n):
        src = torch.arange(size, device=x.device, dtype=torch.float32) * (n / size)
        i0 = src.floor().long()
        return i0, (i0 + 1).clamp(max=n - 1), src - i0
    if x.shape[-1] != size:  # width, then height (the order of TF's kernel)
        i0, i1, w = taps(x.shape[-1])
        a = x[..., i0]
        x = a + (x[..., i1] - a) * w
    if x.shape[-2] != size:
        i0, i1, w = taps(x.shape[-2])
        a = x[..., i0, :]
        x = a + (x[..., i1, :] - a) * w[:, None]
    return x


def preprocess(x, mode="legacy"):
    """uint8 (B, 3, H, W) -> (B, 3, 299, 299) in [-1, 1], resized as the TF code (legacy) or clean-fid (clean)."""
    if mode == "legacy":
        x = resize_tf1(x.float(), 299)
    elif mode == "clean":
        from PIL import Image
        out = [[np.asarray(Image.fromarray(c).resize((299, 299), Image.BICUBIC)) for c in img]
               for img in x.cpu().numpy().astype(np.float32)]
        x = torch.from_numpy(np.array(out).clip(0, 255)).to(x.device)
    else:
        raise UsageError(f"unknown FID mode {mode!r} (legacy or clean)")
    return (x - 128) / 128


@contextlib.contextmanager
def _full_precision(device):
    """No TF32 and no autocast inside the Inception network."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def inception_features(batches, device="cpu", mode="legacy", net=None, weights=None):
    """pool3 features (N, 2048) and unbiased logits (N, 1008) on `device` of uint8 batches (B, 1 or 3, H, W)."""
    net = net if net is not None else load_fid_inception(weights, device)
    pool3, logits = [], []
    for x in batches:
        x = x.to(device, non_blocking=True)
        with _full_precision(device):
            p, q = net(preprocess(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, mode))
        pool3.append(p.float())
        logits.append(q.float())
    if not pool3:
        raise UsageError("no images to compute Inception features of")
    return torch.cat(pool3), torch.cat(logits)


def fid_from_features(f1, f2):
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def inception_score(logits, splits=10):
    """IS = exp E_x KL(p(y|x) || p(y)) (Salimans et al. 2016), (mean, std) over `splits` parts as the original code."""
    p = torch.as_tensor(logits).double().softmax(1)
    n = len(p)
    if n < splits:
        raise ValueError(f"the Inception score needs at least {splits} samples, got {n}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = torch.xlogy(part, part) - torch.xlogy(part, part.mean(0, keepdim=True))  # 0 log 0 = 0
        scores.append(kl.sum(1).mean().exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(correction=0))


def kid(f1, f2, subsets=100, subset_size=1000, seed=0):
    """KID (Bińkowski et al. 2018): the unbiased MMD² of k(x, y) = (xᵀy / d + 1)³, (mean, std) over random subsets."""
    f1 = torch.as_tensor(f1).double()
    f2 = torch.as_tensor(f2).double().to(f1.device)
    m, d = min(subset_size, len(f1), len(f2)), f1.shape[1]
    g = torch.Generator().manual_seed(seed)
    mmd = []
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=g)[:m].to(f1.device)]
        y = f2[torch.randperm(len(f2), generator=g)[:m].to(f1.device)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
        mmd.append(within / (m * (m - 1)) - 2 * kxy.mean())
    t = torch.stack(mmd)
    return float(t.mean()), float(t.std(correction=0))


def precision_recall(real, fake, k=3, batch=1000):
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of fake samples inside the k-NN ball of
    some real one, and of real samples inside that of some fake one."""
    real = torch.as_tensor(real).double()
    fake = torch.as_tensor(fake).double().to(real.device)

    def covered(a, b):  # the share of b inside a ball of a
        radius = torch.cat([torch.cdist(a[i:i + batch], a).kthvalue(k + 1, 1).values  # k + 1: itself first
                            for i in range(0, len(a), batch)])
        inside = [(torch.cdist(b[i:i + batch], a) <= radius).any(1) for i in range(0, len(b), batch)]
        return float(torch.cat(inside).double().mean())
    return covered(real, fake), covered(fake, real)


def features_to_stats(pool3, mode="legacy", keep=10000):
    """{"mu", "sigma", "n", "mode", "features"}: the Gaussian of pool3 features and up to `keep` of them (for KID/PR)."""
    mu, sigma = gaussian_stats(pool3)
    sel = torch.randperm(len(pool3), generator=torch.Generator().manual_seed(0))[:keep]
    return {"mu": mu, "sigma": sigma, "n": np.int64(len(pool3)), "mode": np.str_(mode),
            "features": pool3[sel.to(pool3.device)].float().cpu().numpy()}


def load_stats(path):
    """Statistics from an .npz file: ours, or pytorch-fid's / the TF code's (mu and sigma)."""
    try:
        with np.load(path) as f:
            stats = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read FID statistics from {path} ({e})") from None
    if "mu" not in stats or "sigma" not in stats:
        raise UsageError(f"{path} holds no FID statistics (mu and sigma)")
    return stats


def stats_path(data_root, name, split, size, mode, n):
    name = re.sub(r"[^\w.+-]+", "_", str(name)).strip("_")
    return Path(data_root) / "fid_stats" / f"{name}-{split}-{size}-{mode}-{n}.npz"


def reference_stats(data, data_root, device="cpu", batch_size=100, split="train", mode="legacy",
                    max_images=50000, net=None, weights=None, workers=0):
    """features_to_stats of a Data set (up to max_images), computed once, then read from <data_root>/fid_stats/."""
    if data.kind != "image":
        raise UsageError(f"FID needs an image dataset; {data.name} is not one")
    n = min(len(data), max_images)
    path = stats_path(data_root, data.name, split, data.shape[-1], mode, n)
    if path.is_file():
        stats = load_stats(path)
        if int(stats.get("n", -1)) == n and "features" in stats:
            return stats
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data), generator=g)[:n] if n < len(data) else torch.arange(n)
    if data.images is not None:
        batches = (data.images[idx[i:i + batch_size]] for i in range(0, n, batch_size))
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data.dataset, idx.tolist()), batch_size,
                                             num_workers=workers)
        batches = (to_uint8(x, (0, 1)) for x, _ in loader)
    stats = features_to_stats(inception_features(batches, device, mode, net, weights)[0], mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **stats)
    os.replace(tmp, path)
    return stats


def evaluate(generate_fn, n, real, device="cpu", batch_size=100, metrics=("fid", "is"), *, mode="legacy",
             net=None, weights=None, data_root="data", seed=0):
    """{"metric/fid", "metric/is", ...} (of `metrics`: fid, is, kid, pr) of n samples generate_fn(b) in [-1, 1].
    real: reference_stats (a dict or an .npz path) or a Data set. Under torchrun each rank scores its share."""
    if set(metrics) - {"fid", "is", "kid", "pr"}:
        raise UsageError(f"unknown metrics {sorted(set(metrics) - {'fid', 'is', 'kid', 'pr'})} (fid, is, kid, pr)")
    if isinstance(real, (str, Path)):
        real = load_stats(real)
    elif real is None or set(metrics) == {"is"}:
        real = {}  # the Inception Score needs no reference data
    elif not isinstance(real, dict):
        real = reference_stats(real, data_root, device, batch_size, mode=mode, net=net, weights=weights)
    if str(real.get("mode", mode)) != mode:
        raise UsageError(f"the reference statistics were computed in {real['mode']} mode, not {mode}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    share = -(-n // world)
    mine = min(share, n - rank * share)
    if mine < 1:
        raise UsageError(f"--eval-samples {n} is too few for {world} processes")
    sizes = [min(batch_size, mine - i) for i in range(0, mine, batch_size)]
    with torch.no_grad():
        pool3, logits = inception_features((to_uint8(generate_fn(b)) for b in sizes), device, mode, net, weights)
    if world > 1:
        pool3, logits = _gather_rows(pool3, share, n), _gather_rows(logits, share, n)
    out = {}
    if "fid" in metrics:
        out["metric/fid"] = frechet_distance(*gaussian_stats(pool3), real["mu"], real["sigma"])
    if "is" in metrics:
        out["metric/is"], out["metric/is_std"] = inception_score(logits)
    if {"kid", "pr"} & set(metrics):
        if "features" not in real:
            raise UsageError("KID and precision/recall need reference features; these statistics have none")
        ref = torch.as_tensor(real["features"]).to(pool3.device)
        if "kid" in metrics:
            out["metric/kid"], out["metric/kid_std"] = kid(ref, pool3, seed=seed)
        if "pr" in metrics:
            out["metric/precision"], out["metric/recall"] = precision_recall(ref, pool3)
    return out


def _gather_rows(x, share, n):
    """Concatenate every rank's rows (rank r holds rows r*share ... of n) on every rank."""
    padded = x.new_zeros(share, *x.shape[1:])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n]


def export(path, make, n, *, value_range=(-1, 1), conditional=False, batch=500):
    """Write n samples of make(b) (images, or (images, labels) when `conditional`) as an .npz ("arr_0" uint8
    (n, H, W, C) as the reference FID tools, "labels") or a folder of PNGs (labels in labels.txt)."""
    images, labels = [], []
    with torch.no_grad():
        for i in range(0, n, batch):
            x = make(min(batch, n - i))
            if conditional:
                x, y = x
                labels.append(y.cpu())
            images.append(to_uint8(x.float(), value_range).cpu())
    x = torch.cat(images).permute(0, 2, 3, 1).numpy()
    y = torch.cat(labels).numpy() if labels else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, arr_0=x, **({"labels": y} if y is not None else {}))
    else:
        from PIL import Image
        path.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(x):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path / f"{i:06d}.png")
        if y is not None:
            (path / "labels.txt").write_text("".join(f"{i:06d}.png {int(v)}\n" for i, v in enumerate(y)))
    return str(path)


def export_samples(args, out, step, make, *, value_range=(-1, 1), conditional=False):
    """--sample CKPT --num-samples N: N samples of make(n) in <out>/samples-<step>-<N>.npz (or a PNG folder)."""
    if not getattr(args, "num_samples", 0):
        return {}
    name = f"samples-{step:07d}-{args.num_samples}" + (".npz" if args.format == "npz" else "")
    path = export(Path(out) / name, make, args.num_samples, value_range=value_range, conditional=conditional)
    print(f"wrote {args.num_samples} samples to {path}")
    return {"export": path}


def score(args, targs, make, device, *, out=None, step=0, value_range=(-1, 1), conditional=False, max_images=50000):
    """--sample CKPT: export_samples, and with --eval print and return the --metrics of --eval-samples samples of
    make(n) (images in value_range, or (images, labels) when `conditional`)."""
    from common import data as datasets, digits
    scores = export_samples(args, out, step, make, value_range=value_range, conditional=conditional)
    if not args.eval or not (args.metrics or args.digit_metrics):
        return scores
    data = datasets.load(targs)
    if args.metrics:
        real = (reference_stats(data, targs.data_root, device, max_images=max_images, weights=args.inception_weights)
                if set(args.metrics) - {"is"} else None)   # the Inception Score needs no reference data
        lo, hi = value_range

        def images(n):   # in [-1, 1], without labels
            x = make(n)[0] if conditional else make(n)
            return x if (lo, hi) == (-1, 1) else (x - lo) / (hi - lo) * 2 - 1
        part = evaluate(images, args.eval_samples, real, device, metrics=args.metrics, weights=args.inception_weights)
        print(" ".join(f"{k} {v:.4g}" for k, v in part.items()))
        scores.update(part)
    if args.digit_metrics:
        clf = digits.prepare(args.digit_metrics, data, targs.data_root, conditional).to(device)
        part = digits.evaluate(clf, make, args.eval_samples, data, args.digit_metrics, value_range)
        print(" ".join(f"{k} {v:.4g}" for k, v in part.items()))
        scores.update(part)
    return scores


def mode_coverage(samples, centers, std):
    """PacGAN's Table 1 protocol: a sample is high-quality (HQ) within 3σ of its nearest centre; a mode is captured
    by one HQ sample. {"modes": captured, "num_modes": K, "hq": the share of HQ samples, "counts": HQ per mode}."""
    samples, centers = torch.as_tensor(samples).float().cpu(), torch.as_tensor(centers).float().cpu()
    dist = torch.cdist(samples, centers)
    nearest_dist, nearest = dist.min(1)
    hq = nearest_dist <= 3 * std
    counts = torch.bincount(nearest[hq], minlength=len(centers))
    return {"modes": int((counts > 0).sum()), "num_modes": len(centers),
            "hq": float(hq.float().mean()) if len(samples) else 0.0, "counts": counts.tolist()}


def parzen_log_likelihood(samples, test, sigma, batch=100):
    """The Parzen-window estimate (GAN paper Sec. 5): log p(x) = logsumexp_i(−‖x − s_i‖² / 2σ²) − log N − (d/2)
    log(2πσ²) of each test example under a Gaussian kernel density on `samples`."""
    samples = torch.as_tensor(samples).flatten(1).double()
    test = torch.as_tensor(test).flatten(1).double().to(samples.device)
    n, d = samples.shape
    const = -math.log(n) - d / 2 * math.log(2 * math.pi * sigma ** 2)
    out = []
    for i in range(0, len(test), batch):
        sq = torch.cdist(test[i:i + batch], samples).pow(2)
        out.append(torch.logsumexp(-sq / (2 * sigma ** 2), dim=1) + const)
    return torch.cat(out)


def parzen_evaluate(samples, valid, test, sigmas=None, batch=100):
    """The GAN paper's protocol: σ of `sigmas` (logspace(−1, 0, 10)) by the mean log-likelihood of `valid`, then
    {"ll": the mean, "se": its standard error, "sigma": σ} on `test`."""

    sigmas = np.logspace(-1, 0, 10) if sigmas is None else sigmas
    scores = [float(parzen_log_likelihood(samples, valid, float(s), batch).mean()) for s in sigmas]
    sigma = float(sigmas[int(np.nanargmax(scores))])
    ll = parzen_log_likelihood(samples, test, sigma, batch)
    return {"ll": float(ll.mean()), "se": float(ll.std() / math.sqrt(len(ll))), "sigma": sigma}
