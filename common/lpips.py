"""LPIPS (Zhang et al. 2018, arXiv:1801.03924), v0.1 on VGG16: the perceptual distance of the `lpips` package.

    d(x, y) = Σ_l  mean_hw  w_l · (f̂_l(x) − f̂_l(y))²,    f̂ = f / (‖f‖_channels + 1e-10)

f_l: torchvision's VGG16 ImageNet features (relu1_2 … relu5_3) of (x − shift) / scale, x in [−1, 1]; w_l ≥ 0: the
published linear heads (lpips/weights/v0.1/vgg.pth, taming-transformers' vgg_lpips). In a script, before run.setup:
    perceptual = lpips.load_lpips(args.lpips_weights).to(device)   # a missing file is a one-line UsageError
"""
import os
from pathlib import Path

import torch
import torch.nn as nn

HEADS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
HEADS_FILE = "lpips_vgg_v0.1-a78928a0.pth"   # sha256 prefix of vgg.pth: torch.hub checks it after a download
CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """torchvision's vgg16().features (same layers and state-dict keys, without the last pooling), returning the
    activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            out += [x] if i in (3, 8, 15, 22, 29) else []
        return out


class LPIPS(nn.Module):
    """d(x, y) for images in [−1, 1] (B, 3 or 1, H, W) -> (B,). `backbone` maps an image to a list of feature maps
    with `channels` channels (VGG16Features by default); frozen, in eval mode."""

    def __init__(self, backbone=None, channels=CHANNELS):
        super().__init__()
        self.backbone = backbone if backbone is not None else VGG16Features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def forward(self, x, y):
        fx, fy = (self.backbone((t.expand(-1, 3, -1, -1) - self.shift) / self.scale) for t in (x, y))
        d = 0
        for head, a, b in zip(self.heads, fx, fy):
            a, b = (f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10) for f in (a, b))
            d = d + head((a - b).square()).mean((2, 3))
        return d.flatten()

    def train(self, mode=True):  # always in eval mode (as the package)
        return super().train(False)


def load_lpips(weights=None):
    """LPIPS with the VGG16 ImageNet weights (torchvision, from the torch hub cache or downloaded there) and the
    linear heads: `weights`, else $LPIPS_WEIGHTS, else <torch.hub.get_dir()>/checkpoints/HEADS_FILE (downloaded
    there if absent). A missing or unloadable file is a one-line UsageError saying where to put it."""
    from torchvision.models import VGG16_Weights
    from common.run import UsageError
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    weights = weights or os.environ.get("LPIPS_WEIGHTS") or None
    net, what = LPIPS(), "the VGG16 ImageNet weights"
    where = (f"download {VGG16_Weights.IMAGENET1K_V1.url} to {hub}/ (or set $TORCH_HOME), or train without the "
             "perceptual term: --perceptual-weight 0")
    try:
        vgg = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True, weights_only=True)
        net.backbone.features.load_state_dict({k[9:]: v for k, v in vgg.items() if k.startswith("features.")})
        what = "the LPIPS linear heads"
        where = (f"download {HEADS_URL} (the lpips package's v0.1 vgg.pth) to {hub / HEADS_FILE}, or give it with "
                 "--lpips-weights or $LPIPS_WEIGHTS, or train without the perceptual term: --perceptual-weight 0")
        heads = torch.load(weights, map_location="cpu", weights_only=True) if weights else \
            torch.hub.load_state_dict_from_url(HEADS_URL, map_location="cpu", progress=False, check_hash=True,
                                               file_name=HEADS_FILE, weights_only=True)
        net.heads.load_state_dict({f"{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(len(CHANNELS))})
    except Exception as e:  # offline, a corrupt download, not the right file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"cannot load {what} ({type(e).__name__}: {first}); {where}") from None
    return net
