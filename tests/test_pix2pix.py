import argparse
import contextlib
import copy
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import pix2pix
from common import data as datasets
from common import metrics
from tests import helpers, wiring


class StubInception(nn.Module):
    """Stands in for the Inception network (its weights are not available offline): (features, logits)."""

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return f, f[:, :10]


def write_pairs(folder, n, h=12, mode="RGB", width=None):
    """n side-by-side pair images: A (left) has red = 10 * i, B (right) has blue = 10 * i + 5."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new(mode, (width or 2 * h, h))
        if mode == "RGB":
            img.paste((10 * i, 0, 0), (0, 0, h, h))
            img.paste((0, 0, 10 * i + 5), (h, 0, 2 * h, h))
        else:
            img.paste(10 * i, (0, 0, h, h))
            img.paste(10 * i + 5, (h, 0, 2 * h, h))
        img.save(folder / f"{i:03d}.png")


def ns(path, direction="AtoB", **kw):
    return argparse.Namespace(dataset=str(path), data_root="unused", direction=direction, download=False, **kw)


# -- the run: dry run, resume, sampling, help, bad input -----------------------------------------------

def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(pix2pix, tmp_path)
    assert summary["metrics"]["metric/l1"] > 0 and math.isfinite(summary["metrics"]["metric/psnr"])
    assert {"loss/G_GAN", "loss/G_L1", "loss/D_real", "loss/D_fake"} <= set(summary["losses"])
    assert state["channels"] == [3, 3] and set(state["models"]) == {"G", "D"}


def test_fid_of_translations_is_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": StubInception())
    _, summary, _ = helpers.dry_run(pix2pix, tmp_path, "--metrics", "fid")
    assert summary["metrics"]["metric/fid"] > 0


def test_resume_is_exact(tmp_path, monkeypatch):
    a, _ = helpers.assert_resume_exact(pix2pix, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))
    assert a["optimizers"]["G"]["param_groups"][0]["lr"] < 2e-4   # the decayed learning rate is in the state


def test_sample_test_split_and_own_images(tmp_path):
    out, _, _ = helpers.dry_run(pix2pix, tmp_path)
    written = helpers.sample_from(pix2pix, out / "ckpt.pt", tmp_path, "--eval", "--metrics", "none")
    assert len(list((tmp_path / "sampled" / "test").glob("*.png"))) == 8
    assert written["metric/l1"] > 0 and "metric/psnr" in written
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (50, 37), (200, 10, 10)).save(mine / "photo.jpg")
    Image.new("L", (13, 70), 90).save(mine / "scan.png")
    result = pix2pix.main(["--sample", str(out / "ckpt.pt"), "--input", str(mine), "--out", str(tmp_path / "o")])
    assert result["translated"] == 2
    for name in ("photo.png", "scan.png"):
        with Image.open(tmp_path / "o" / "translated" / name) as img:
            assert img.size == (32, 32)   # the training size


def test_help(capsys):
    text = helpers.help_text(pix2pix, capsys)
    for flag in ("--lambda-l1", "--gan-mode", "--netD", "--netG", "--direction", "--load-size", "--no-flip", "--input"):
        assert flag in text


@pytest.mark.parametrize("argv, match", [
    (["--image-size", "48", "--load-size", "48"], "power of two"),
    (["--input", "somewhere"], "--sample"),
    (["--sample", "ckpt.pt", "--input", "no/such/folder"], "--input no/such/folder does not exist"),
    (["--netD", "pixel", "--d-layers", "2"], "PixelGAN"),
    (["--gan-mode", "none", "--lambda-l1", "0"], "nothing to train"),
    (["--load-size", "16"], "--load-size"),
    (["--image-size", "16", "--load-size", "16"], "PatchGAN"),
    (["--gan-mode", "none", "--d-width", "8"], "no D"),
    (["--dropout", "0.3"], "no dropout layers"),
])
def test_bad_flags(tmp_path, capsys, argv, match):
    out = tmp_path / "x"
    helpers.expect_usage_error(pix2pix, ["--dry-run", "--out", str(out), *argv], capsys, match)
    assert not out.exists()


def test_bad_folders(tmp_path, capsys):
    out = tmp_path / "x"
    root = tmp_path / "set"
    (root / "trainA").mkdir(parents=True)
    helpers.expect_usage_error(pix2pix, ["--dry-run", "--dataset", str(root), "--out", str(out)], capsys, "{train,val,test}")
    (root / "train").mkdir()
    (root / "test").mkdir()
    helpers.expect_usage_error(pix2pix, ["--dry-run", "--dataset", str(root), "--out", str(out)], capsys, "holds no images")
    write_pairs(root / "train", 2, width=30)   # 30x12: not two squares side by side
    helpers.expect_usage_error(pix2pix, ["--dry-run", "--dataset", str(root), "--out", str(out)], capsys, "twice its height")
    helpers.expect_usage_error(pix2pix, ["--dry-run", "--dataset", str(tmp_path / "nope"), "--out", str(out)], capsys,
                               "does not exist")
    helpers.expect_usage_error(pix2pix, ["--dry-run", "--dataset", "horse2zebra", "--out", str(out)], capsys,
                               "facades, maps")   # a CycleGAN set is not a paired one
    assert not out.exists()


# -- data: the paired layout, direction, jitter, download ---------------------------------------------

def test_paired_images_are_split_and_directed(tmp_path):
    write_pairs(tmp_path / "set" / "train", 3)
    write_pairs(tmp_path / "set" / "val", 2)   # no test/: val/ is the test split
    d = datasets.load_translation(ns(tmp_path / "set"), "train", paired=True, size=8)
    assert d.a.shape == d.b.shape == (3, 3, 8, 8)
    assert d.a[2, 0].float().mean() == 20 and d.a[:, 2].max() == 0     # A: the red left half
    assert d.b[2, 2].float().mean() == 25 and d.b[:, 0].max() == 0     # B: the blue right half
    back = datasets.load_translation(ns(tmp_path / "set", "BtoA"), "train", paired=True, size=8)
    assert torch.equal(back.a, d.b) and torch.equal(back.b, d.a)
    assert len(datasets.load_translation(ns(tmp_path / "set"), "test", paired=True, size=8).a) == 2
    write_pairs(tmp_path / "grey" / "train", 2, mode="L")
    assert datasets.load_translation(ns(tmp_path / "grey"), "train", paired=True, size=8).a.shape[1] == 1


def test_pairs_get_the_same_crop_and_flip():
    a = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10).to(torch.uint8)
    d = datasets.Translation("t", a, a.clone(), True, [], [])
    batches = datasets.translation_batches(d, 16, "cpu", 6)
    x, y = next(batches)
    assert x.shape == (16, 3, 6, 6) and torch.equal(x, y)
    unpaired = datasets.Translation("t", a, a.clone(), False, [], [])
    x, y = next(datasets.translation_batches(unpaired, 16, "cpu", 6))
    assert not torch.equal(x, y)   # unpaired images are drawn and cropped on their own
    flips = next(datasets.translation_batches(d, 64, "cpu", 10))[0]
    mirrored = (flips == a.flip(-1)[:1].float() / 255 * 2 - 1).flatten(1).all(1) | \
               (flips == a.flip(-1)[1:].float() / 255 * 2 - 1).flatten(1).all(1)
    assert 0 < mirrored.sum() < 64   # some but not all are flipped
    no_flip = next(datasets.translation_batches(d, 64, "cpu", 10, flip=False))[0]
    assert not ((no_flip == a.flip(-1)[:1].float() / 255 * 2 - 1).flatten(1).all(1)).any()


def test_standard_archive_is_downloaded_and_unpacked(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src" / "facades"
    write_pairs(src / "train", 2)
    write_pairs(src / "test", 1)
    with tarfile.open(tmp_path / "facades.tar.gz", "w:gz") as t:
        t.add(src, arcname="facades")
    monkeypatch.setattr(datasets, "PAIRED_URL", f"file://{tmp_path}/{{}}.tar.gz")
    args = argparse.Namespace(dataset="facades", data_root=str(tmp_path / "data"), direction="AtoB", download=True)
    d = datasets.load_translation(args, "train", paired=True, size=8)
    assert len(d.a) == 2 and (tmp_path / "data" / "facades" / "test").is_dir()
    assert not list((tmp_path / "data").glob(".facades*"))   # the archive is removed
    monkeypatch.setattr(datasets, "PAIRED_URL", f"file://{tmp_path}/missing-{{}}.tar.gz")
    out = tmp_path / "x"
    helpers.expect_usage_error(pix2pix, ["--dry-run", "--dataset", "maps", "--data-root", str(tmp_path / "data"),
                                         "--out", str(out)], capsys, "missing-maps.tar.gz")
    assert not out.exists()


def test_facades_defaults_to_labels_to_photo():
    args = pix2pix.parse_args(["--dataset", "facades"])
    assert args.direction == "BtoA" and args.steps == 80_000 and args.batch_size == 1
    assert pix2pix.parse_args(["--dataset", "facades", "--direction", "AtoB"]).direction == "AtoB"
    assert pix2pix.parse_args(["--dataset", "edges2shoes"]).batch_size == 4


# -- the paper's nets and losses ----------------------------------------------------------------------

def test_unet_256_is_the_papers():
    G = pix2pix.UNet(3, 3, 256, 64)
    convs = [m for m in G.down.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 512, 512, 512, 512]
    assert [any(isinstance(m, nn.BatchNorm2d) for m in block) for block in G.down] == [False] + [True] * 6 + [False]
    dropout = [any(isinstance(m, nn.Dropout) for m in block) for block in G.up]
    assert dropout == [False] * 4 + [True] * 3 + [False]   # the 3 decoder layers after the innermost
    assert [m.in_channels for m in G.up.modules() if isinstance(m, nn.ConvTranspose2d)] == \
        [128, 256, 512, 1024, 1024, 1024, 1024, 512]       # decoder inputs include the skips
    assert not any(isinstance(m, nn.Dropout) for m in pix2pix.UNet(1, 1, 32, 8).modules())
    # the official code prints 54.414 M parameters for unet_256 and 2.769 M for the 70x70 PatchGAN
    assert round(sum(p.numel() for p in G.parameters()) / 1e6, 3) == 54.414
    assert round(sum(p.numel() for p in pix2pix.PatchGAN(6).parameters()) / 1e6, 3) == 2.769


def test_unet_shape_and_skip_wiring():
    torch.manual_seed(0)
    for skips in (True, False):
        G = pix2pix.UNet(1, 2, 32, 4, skips=skips).eval()
        x = torch.randn(2, 1, 32, 32)
        assert G(x).shape == (2, 2, 32, 32) and G(x).abs().max() <= 1
        # cut the path through the bottleneck: what the first encoder layer computes can reach the output only
        # through its skip connection
        nn.init.zeros_(G.down[1][1].weight)
        first = {}

        def keep(module, inputs, output):
            output.retain_grad()
            first["out"] = output
        G.down[0].register_forward_hook(keep)
        G(x).sum().backward()
        reaches = first["out"].grad.abs().sum() > 0
        assert reaches == skips


def receptive_field(D, size, channels):
    x = torch.randn(1, channels, size, size, requires_grad=True)
    out = D(x[:, :1], x[:, 1:])
    i, j = out.shape[-2] // 2, out.shape[-1] // 2
    out[0, 0, i, j].backward()
    hit = x.grad.abs().sum((0, 1)) > 0
    rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert hit.sum() == height * width   # a full window, no holes
    return height, width


@pytest.mark.parametrize("layers, patch, size", [(3, 70, 128), (1, 16, 48)])
def test_patchgan_receptive_field(layers, patch, size):
    torch.manual_seed(0)
    D = pix2pix.PatchGAN(2, 4, layers).eval()   # eval: BN does not mix positions through batch statistics
    assert receptive_field(D, size, 2) == (patch, patch)
    assert pix2pix.patch_output_size(256, 3) == 30   # the 30x30 logit map of a 256x256 image


def test_pixelgan_sees_one_pixel():
    D = pix2pix.PatchGAN(2, 4, pixel=True).eval()
    assert receptive_field(D, 16, 2) == (1, 1)


def test_losses_on_hand_made_logits():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    bce_real = -torch.log(torch.sigmoid(real)).mean()
    bce_fake = -torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(pix2pix.d_loss(real, fake), 0.5 * (bce_real + bce_fake))   # halved
    assert torch.allclose(pix2pix.d_loss(real, fake, "lsgan"), 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean()))
    y, out = torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.5, -0.5], [0.0, 1.0]]]])
    total, adv, l1 = pix2pix.g_loss(fake, out, y, 100.0)
    assert torch.isclose(l1, torch.tensor(0.5)) and torch.isclose(adv, -torch.log(torch.sigmoid(fake)).mean())
    assert torch.isclose(total, adv + 50)
    total, adv, _ = pix2pix.g_loss(None, out, y, 100.0, "none")
    assert adv == 0 and torch.isclose(total, torch.tensor(50.0))


def test_test_time_noise():
    torch.manual_seed(0)
    G = pix2pix.UNet(3, 3, 64, 4)   # 64x64: one decoder layer with dropout
    x = torch.randn(4, 3, 64, 64)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    a, b = pix2pix.translate(G, x, noise=True), pix2pix.translate(G, x, noise=True)
    assert not torch.equal(a, b)   # dropout at test time
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())   # BN running averages untouched
    assert torch.equal(pix2pix.translate(G, x, noise=False), pix2pix.translate(G, x, noise=False))
    assert G.training


def test_learning_rate_schedule():
    args = argparse.Namespace(steps=10, decay_fraction=0.5)
    assert [pix2pix.lr_factor(s, args) for s in (1, 5)] == [1.0, 1.0]
    assert math.isclose(pix2pix.lr_factor(6, args), 5 / 6) and math.isclose(pix2pix.lr_factor(10, args), 1 / 6)


def test_psnr():
    y = torch.zeros(2, 1, 4, 4)
    assert torch.isclose(pix2pix.psnr(y + 0.2, y), torch.tensor(10 * math.log10(1 / 0.01)))


# -- the training loop: one step against the objective computed by hand -------------------------------

def fixed_batches(monkeypatch, x, y):
    """train() draws every batch as (x, y)."""
    def batches(*args, **kwargs):
        while True:
            yield x.clone(), y.clone()
    monkeypatch.setattr(datasets, "translation_batches", batches)


def built_nets(monkeypatch):
    """(copies of the nets as built, the nets train() goes on to train) for each call of pix2pix.build."""
    calls, original = [], pix2pix.build

    def build(*args, **kwargs):
        nets = original(*args, **kwargs)
        calls.append((copy.deepcopy(nets), nets))
        return nets
    monkeypatch.setattr(pix2pix, "build", build)
    return calls


@contextlib.contextmanager
def recorded_updates():
    """Every optimizer step train() takes (see wiring.record_updates)."""
    steps, stop = wiring.record_updates()
    try:
        yield steps
    finally:
        stop()


def assert_adam_first_step(step, what):
    """Adam's first step moves each parameter by −lr · g / (|g| + eps), g the gradient it stepped with."""
    lr = wiring.setting(step, "lr")
    wiring.assert_update(step, [wiring.adam_first_update(lr, g) for g in step["grads"]], what)


@pytest.mark.parametrize("extra", [[], ["--gan-mode", "lsgan", "--lambda-l1", "7"], ["--gan-mode", "none"]])
def test_one_step_follows_the_objective(tmp_path, monkeypatch, extra):
    """One step of train() against Eq. 1-4 on the same batch: D first, on (x, y) as real and (x, G(x)) as fake,
    its loss halved; then G on the non-saturating GAN term (D already updated) + λ L1; Adam's first step."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    fixed_batches(monkeypatch, x, y)
    nets = built_nets(monkeypatch)
    lr = 0.01   # large enough that D's update visibly changes G's gradient
    with recorded_updates() as steps:
        wiring.train_steps(pix2pix, tmp_path, 1, "--lr", str(lr), *extra)
    args = pix2pix.parse_args(["--dry-run", *extra])
    (G0, D0), (G1, D1) = nets[0]
    mode, lam = args.gan_mode, args.lambda_l1
    assert lam == (7 if "7" in extra else 100)

    def bce(logits, target):   # Eq. 1's log terms (vanilla) or least squares, a mean over D's patches
        if mode == "lsgan":
            return (logits - target).pow(2).mean()
        return -(target * torch.log(torch.sigmoid(logits)) + (1 - target) * torch.log(1 - torch.sigmoid(logits))).mean()

    if mode == "none":
        assert D1 is None and wiring.who_steps(steps, G=G1) == ["G"]
    else:
        assert wiring.who_steps(steps, G=G1, D=D1) == ["D", "G"]   # D first, each by its own optimizer
        d_step = steps[0]
        fake = G0(x).detach()
        loss_d = 0.5 * (bce(D0(x, y), 1.0) + bce(D0(x, fake), 0.0))   # conditional: D sees the input with each
        wiring.assert_same_gradients(d_step["grads"], wiring.grads(loss_d, D0), "D's gradient")
        assert wiring.setting(d_step, "lr") == lr
        assert_adam_first_step(d_step, "D's update")
        wiring.assert_same(d_step["after"], list(D1.parameters()), "D after its step")   # G's step left D alone
    g_step = steps[-1]
    fake = G0(x)
    loss_g = lam * (fake - y).abs().mean()
    if mode != "none":
        D_after = copy.deepcopy(D1)   # D as G's step saw it: after D's own step
        loss_g = loss_g + bce(D_after(x, fake), 1.0)
    wiring.assert_same_gradients(g_step["grads"], wiring.grads(loss_g, G0), "G's gradient")
    assert wiring.setting(g_step, "lr") == lr
    wiring.assert_same(g_step["before"], list(G0.parameters()), "G before its step")   # D's step left G alone
    assert_adam_first_step(g_step, "G's update")


def test_optimizers_and_learning_rate_decay(tmp_path, monkeypatch):
    """Adam 2e-4, β (0.5, 0.999) for G and for D, each over its own net; the lr constant for the first half of the
    steps, then lr · (1 − (step − n_const) / (n_decay + 1)) (official 'linear' policy, here per step)."""
    built = wiring.record_optimizers(monkeypatch)
    nets = built_nets(monkeypatch)
    with recorded_updates() as steps:
        wiring.train_steps(pix2pix, tmp_path, 4)
    _, (G, D) = nets[0]
    assert len(built) == 2
    for net in (G, D):   # one Adam over each net's parameters, and no other's
        [opt] = [b for b in built if {id(p) for p in b.params} == {id(p) for p in net.parameters()}]
        assert opt.type == "Adam" and opt.setting("betas") == (0.5, 0.999) and opt.setting("lr") == 2e-4
        seen = [wiring.setting(s, "lr") for s in steps if s["opt"] is opt.opt]   # 2 steps at the full lr, 2 decaying
        assert seen == pytest.approx([2e-4, 2e-4, 2e-4 * (1 - 1 / 3), 2e-4 * (1 - 2 / 3)])


def test_log_only_terms_leave_training_unchanged(tmp_path):
    """D's real and fake halves are computed only at log steps; the weights do not depend on the log interval."""
    a = wiring.train_steps(pix2pix, tmp_path, 3, name="every")
    b = pix2pix.main(["--dry-run", "--steps", "3", "--out", str(tmp_path / "rare"), "--log-every", "2",
                      "--sample-every", "0", "--ckpt-every", "0", "--eval-every", "0"])
    assert {"loss/D_real", "loss/D_fake"} <= set(a["losses"]) and {"loss/D_real", "loss/D_fake"} <= set(b["losses"])
    wa, wb = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("every", "rare"))
    helpers.assert_same(wa["models"], wb["models"])


# -- translating your own images ------------------------------------------------------------------------

def truncated_png(path, size=(24, 12)):
    """A PNG cut in half, as an interrupted download leaves it."""
    noise = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def read_png(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_sample_translates_the_input_half_of_pairs(tmp_path, direction):
    """--input on a folder of A|B pairs (the dataset layout) translates the half G was trained on, not the pair
    squashed into one square; the outputs go to <out>/translated/ and leave the run's grids alone."""
    out, _, _ = helpers.dry_run(pix2pix, tmp_path, "--direction", direction, "--steps", "1")
    run_files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    pairs = tmp_path / "pairs"
    write_pairs(pairs, 2, h=20)
    result = pix2pix.main(["--sample", str(out / "ckpt.pt"), "--input", str(pairs)])   # the default --out
    assert result["translated"] == 2
    assert all(p.read_bytes() == data for p, data in run_files.items())   # no training grid overwritten
    translated = sorted(Path(result["out"]).glob("*.png"))
    assert [p.name for p in translated] == ["000.png", "001.png"] and Path(result["out"]).name == "translated"
    state = torch.load(out / "ckpt.pt", weights_only=True)
    G = pix2pix.UNet(3, 3, 32, state["args"]["g_width"])
    G.load_state_dict(state["models"]["G"])
    a, b, _ = datasets.read_image_folder(pairs, 32, pairs=True, channels=3)
    halves = {"AtoB": a, "BtoA": b}
    want = pix2pix.translate(G, datasets.to_range(halves[direction], (-1, 1), True))   # 32 px: no dropout
    got = torch.stack([read_png(p) for p in translated])
    assert (got - want).abs().max() < 2 / 255
    squashed, _ = datasets.read_image_folder(pairs, 32, channels=3)   # what --input did before
    for x in (halves["BtoA" if direction == "AtoB" else "AtoB"], squashed):   # the test can tell them apart
        assert (got - pix2pix.translate(G, datasets.to_range(x, (-1, 1), True))).abs().max() > 6 / 255


def test_sample_translates_one_image(tmp_path):
    out, _, _ = helpers.dry_run(pix2pix, tmp_path, "--steps", "1")
    Image.new("RGB", (50, 37), (200, 10, 10)).save(tmp_path / "photo.jpg")
    result = pix2pix.main(["--sample", str(out / "ckpt.pt"), "--input", str(tmp_path / "photo.jpg"),
                           "--out", str(tmp_path / "o")])
    assert result["translated"] == 1
    with Image.open(tmp_path / "o" / "translated" / "photo.png") as img:
        assert img.size == (32, 32)


def assert_stops_or_skips(run, bad, capsys):
    """A bad image stops the run at start-up with one line naming it (exit 2, no traceback), or is skipped with
    a warning that names it."""
    try:
        run()
    except SystemExit as e:
        err = capsys.readouterr().err.strip()
        assert e.code == 2 and bad.name in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    else:
        assert bad.name in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["truncated.png", "notes.jpg"])
def test_a_bad_image_in_the_dataset_is_named_at_start_up(tmp_path, capsys, bad):
    root = tmp_path / "set"
    write_pairs(root / "train", 3)
    write_pairs(root / "test", 1)
    if bad == "truncated.png":
        truncated_png(root / "train" / bad)
    else:
        (root / "train" / bad).write_text("not an image")
    out = tmp_path / "run"
    assert_stops_or_skips(lambda: pix2pix.main(["--dry-run", "--dataset", str(root), "--out", str(out),
                                                "--steps", "1"]), root / "train" / bad, capsys)


def test_a_bad_image_given_to_translate_is_named(tmp_path, capsys):
    out, _, _ = helpers.dry_run(pix2pix, tmp_path, "--steps", "1")
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(mine / "ok.png")
    truncated_png(mine / "cut.png")
    capsys.readouterr()
    assert_stops_or_skips(lambda: pix2pix.main(["--sample", str(out / "ckpt.pt"), "--input", str(mine),
                                                "--out", str(tmp_path / "o")]), mine / "cut.png", capsys)
