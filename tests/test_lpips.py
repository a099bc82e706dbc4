import pytest
import torch
import torch.nn as nn

from common import lpips
from common.run import UsageError


class StandIn(nn.Module):
    """Two feature maps (3 and 5 channels, full and half resolution) instead of VGG16's five."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 5, 3, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


def stand_in_lpips():
    torch.manual_seed(0)
    net = lpips.LPIPS(StandIn(), channels=(3, 5))
    for head in net.heads:
        nn.init.uniform_(head.weight)
    return net


def uniform(n, seed):
    """n numbers in [0, 1) from a linear congruential generator: the same on every machine and torch version."""
    i = torch.arange(n, dtype=torch.int64) + 7919 * seed
    return ((i * 1103515245 + 12345) % 2 ** 31).double() / 2 ** 31


def fixed_weights():
    """VGG16 features (torchvision's state-dict keys; He-scaled, biases ±0.05) and non-negative heads."""
    vgg, k = {}, 0
    for i, m in enumerate(lpips.VGG16Features().features):
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * 9
            w = (uniform(m.weight.numel(), k) - 0.5) * (12 * 2 / fan_in) ** 0.5
            vgg[f"features.{i}.weight"] = w.float().view_as(m.weight)
            vgg[f"features.{i}.bias"] = ((uniform(m.out_channels, 100 + k) - 0.5) * 0.1).float()
            k += 1
    heads = [uniform(c, 200 + l).float().view(1, c, 1, 1) for l, c in enumerate(lpips.CHANNELS)]
    return vgg, heads


def fixed_images():
    """Three pairs at 32 px in [−1, 1]: unrelated images, a lower contrast, a little noise."""
    x = (uniform(3 * 3 * 32 * 32, 300).float().view(3, 3, 32, 32) * 2 - 1)
    y = (uniform(3 * 3 * 32 * 32, 301).float().view(3, 3, 32, 32) * 2 - 1)
    y[1] = 0.8 * x[1]
    y[2] = (x[2] + 0.2 * (y[2] - 0.5)).clamp(-1, 1)
    return x, y


# The lpips package's LPIPS (v0.1, net="vgg"; lpips 0.1.4 from PyPI) on fixed_weights() and fixed_images(): built
# with pnet_rand=True (no VGG16 download), the features of its vgg16 slices and its lin0..lin4 heads overwritten
# with fixed_weights(), called as ref(x, y) in float32. (Importing the package also needs scipy and tqdm, which
# this project does not install, so the values are pinned here.)
REFERENCE = [1.3541594, 0.046058308, 0.27911815]


def test_matches_the_lpips_package():
    net = lpips.LPIPS()
    vgg, heads = fixed_weights()
    net.backbone.features.load_state_dict({k[9:]: v for k, v in vgg.items()})
    for head, w in zip(net.heads, heads):
        head.weight.data.copy_(w)
    x, y = fixed_images()
    assert torch.allclose(net(x, y), torch.tensor(REFERENCE), rtol=1e-5, atol=0)


def test_zero_for_identical_images_symmetric_and_non_negative():
    net = stand_in_lpips()
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(net(x, x), torch.zeros(4))
    assert torch.allclose(net(x, y), net(y, x))
    assert (net(x, y) > 0).all()
    assert torch.allclose(net(x[:, :1], y[:, :1]), net(x[:, :1].expand(-1, 3, -1, -1), y[:, :1].expand(-1, 3, -1, -1)))


def test_frozen_and_always_in_eval_mode():
    net = lpips.LPIPS()
    net.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    net(x, torch.ones(1, 3, 16, 16)).sum().backward()       # gradients still reach the images (a loss)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vgg16_features_have_torchvisions_layout():
    import torchvision
    with torch.device("meta"):
        reference = torchvision.models.vgg16().features.state_dict()
    mine = lpips.VGG16Features().features.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    shapes = [f.shape for f in lpips.VGG16Features()(torch.zeros(1, 3, 32, 32))]
    assert shapes == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 512, 2, 2)]


def fake_vgg_state():
    return {f"features.{k}": v for k, v in lpips.VGG16Features().features.state_dict().items()}


def test_loads_heads_file_and_vgg(tmp_path, monkeypatch):
    vgg = fake_vgg_state()
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: vgg)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(lpips.CHANNELS)}
    torch.save(heads, tmp_path / "vgg.pth")
    for how in ("flag", "env"):
        if how == "env":
            monkeypatch.setenv("LPIPS_WEIGHTS", str(tmp_path / "vgg.pth"))
        net = lpips.load_lpips(str(tmp_path / "vgg.pth") if how == "flag" else None)
        assert torch.equal(net.heads[3].weight, heads["lin3.model.1.weight"])
        assert torch.equal(net.backbone.features[28].weight, vgg["features.28.weight"])


def test_missing_or_wrong_files_are_one_line_errors(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("offline")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UsageError, match="VGG16 ImageNet weights.*--perceptual-weight 0") as e:
        lpips.load_lpips()
    assert "\n" not in str(e.value)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: fake_vgg_state())
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UsageError, match="linear heads.*--lpips-weights"):
        lpips.load_lpips()
    with pytest.raises(UsageError, match="linear heads.*No such file"):
        lpips.load_lpips(str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="linear heads"):
        lpips.load_lpips(str(tmp_path / "bad.pth"))
