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


def test_matches_the_formula():
    """d = Σ_l mean_hw Σ_c w_lc (f̂_lc(x) − f̂_lc(y))², f̂ = f / (‖f‖ + 1e-10), on the scaled inputs."""
    net = stand_in_lpips()
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    fx, fy = net.backbone((x - shift) / scale), net.backbone((y - shift) / scale)
    expected = torch.zeros(2)
    for head, a, b in zip(net.heads, fx, fy):
        w = head.weight.flatten()
        for n in range(2):
            na = a[n] / (a[n].pow(2).sum(0).sqrt() + 1e-10)
            nb = b[n] / (b[n].pow(2).sum(0).sqrt() + 1e-10)
            expected[n] += torch.einsum("c,chw->hw", w, (na - nb) ** 2).mean()
    assert torch.allclose(net(x, y), expected, rtol=1e-5, atol=1e-7)


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
