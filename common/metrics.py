"""Evaluation metrics shared by the scripts.

- frechet_distance: the Fréchet distance between two Gaussians (the formula behind FID).
- mode_coverage: modes captured and % high-quality samples on the 2D mixtures (PacGAN protocol).
- parzen_log_likelihood: the Gaussian Parzen-window estimate of the GAN paper (Goodfellow et al. 2014).
"""
import math

import numpy as np
import torch


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------

def _sqrt_psd(a):
    """Square root of a symmetric positive semi-definite matrix via eigh (float64)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½, in float64.

    tr (Σ1 Σ2)^½ is computed in the symmetric form tr (Σ1^½ Σ2 Σ1^½)^½: the matrix inside is
    symmetric PSD, so eigh applies (no scipy.linalg.sqrtm, no complex parts to discard)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    s1 = _sqrt_psd((sigma1 + sigma1.T) / 2)
    inner = s1 @ sigma2 @ s1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def gaussian_stats(features):
    """Mean and covariance (unbiased, float64) of (N, D) features, as numpy arrays."""
    f = torch.as_tensor(features).double()
    mu = f.mean(0)
    c = f - mu
    return mu.cpu().numpy(), (c.T @ c / (len(f) - 1)).cpu().numpy()


# --------------------------------------------------------------------------------------------
# 2D mode coverage (PacGAN, Lin et al. 2018, protocol of its Table 1)
# --------------------------------------------------------------------------------------------

def mode_coverage(samples, centers, std):
    """Assign each sample to its nearest centre; it is high-quality (HQ) if within 3σ of it.
    A mode is captured if at least one HQ sample is assigned to it.
    Returns {"modes": captured count, "num_modes": K, "hq": fraction of HQ samples, "counts": HQ per mode}."""
    samples, centers = torch.as_tensor(samples).float().cpu(), torch.as_tensor(centers).float().cpu()
    dist = torch.cdist(samples, centers)
    nearest_dist, nearest = dist.min(1)
    hq = nearest_dist <= 3 * std
    counts = torch.bincount(nearest[hq], minlength=len(centers))
    return {"modes": int((counts > 0).sum()), "num_modes": len(centers),
            "hq": float(hq.float().mean()) if len(samples) else 0.0, "counts": counts.tolist()}


# --------------------------------------------------------------------------------------------
# Parzen-window log-likelihood (Goodfellow et al. 2014, Sec. 5; Breuleux et al. 2011)
# --------------------------------------------------------------------------------------------

def parzen_log_likelihood(samples, test, sigma, batch=100):
    """Per-example log p(x) under an isotropic Gaussian kernel density on `samples`:
    log p(x) = logsumexp_i(−‖x − s_i‖² / 2σ²) − log N − (d/2) log(2πσ²). Returns a (len(test),) tensor."""
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
    """The GAN paper's protocol: pick σ from `sigmas` (default logspace(−1, 0, 10)) by the mean
    log-likelihood of `valid`, then report the mean and standard error on `test`.
    Returns {"ll": mean, "se": standard error, "sigma": chosen σ}."""
    sigmas = np.logspace(-1, 0, 10) if sigmas is None else sigmas
    scores = [float(parzen_log_likelihood(samples, valid, float(s), batch).mean()) for s in sigmas]
    sigma = float(sigmas[int(np.nanargmax(scores))])
    ll = parzen_log_likelihood(samples, test, sigma, batch)
    return {"ll": float(ll.mean()), "se": float(ll.std() / math.sqrt(len(ll))), "sigma": sigma}
