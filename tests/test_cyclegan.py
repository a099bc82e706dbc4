import argparse
import contextlib
import copy
import random
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

import cyclegan
from common import data as datasets
from common import metrics
from tests import helpers, wiring


class StubInception(nn.Module):
    """Stands in for the Inception network (its weights are not available offline): (features, logits)."""

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return f, f[:, :10]


def write_domain(folder, n, colour, size=(10, 10), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, size, colour).save(folder / f"{i:03d}.png")


def ns(path, direction="AtoB"):
    return argparse.Namespace(dataset=str(path), data_root="unused", direction=direction, download=False)


# -- the run ------------------------------------------------------------------------------------------

def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(cyclegan, tmp_path)
    assert summary["metrics"]["metric/cycle_l1"] > 0
    assert {"loss/G_GAN", "loss/F_GAN", "loss/cycle_A", "loss/cycle_B", "loss/identity_A", "loss/D_A",
            "loss/D_B", "loss/D_A_real", "loss/D_B_fake"} <= set(summary["losses"])
    assert set(state["models"]) == {"G", "F", "D_A", "D_B"} and set(state["optimizers"]) == {"G", "D"}
    assert len(state["pools"]["A"]) == 3   # full after 4 steps of 2 images
    assert len(list((out / "samples").glob("test_A_to_B_to_A-*.png"))) == 2


def test_fid_both_directions_is_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": StubInception())
    _, summary, _ = helpers.dry_run(cyclegan, tmp_path, "--metrics", "fid")
    assert summary["metrics"]["metric/fid_AtoB"] > 0 and summary["metrics"]["metric/fid_BtoA"] > 0


def test_resume_is_exact_with_the_image_pools(tmp_path, monkeypatch):
    a, b = helpers.assert_resume_exact(cyclegan, tmp_path, monkeypatch, ["--pool-size", "4"],
                                       state_keys=("models", "optimizers", "pools"))
    assert len(a["pools"]["B"]) == 4


def test_sample_both_directions_and_own_images(tmp_path):
    out, _, _ = helpers.dry_run(cyclegan, tmp_path)
    written = helpers.sample_from(cyclegan, out / "ckpt.pt", tmp_path, "--eval", "--metrics", "none")
    assert written["metric/cycle_l1"] > 0
    assert len(list((tmp_path / "sampled" / "AtoB").glob("*.png"))) == 8
    assert len(list((tmp_path / "sampled" / "BtoA").glob("*.png"))) == 6
    mine = tmp_path / "mine"
    write_domain(mine, 1, (0, 200, 0), size=(41, 23))
    Image.new("L", (5, 9), 30).save(mine / "grey.jpg")
    for direction in ("AtoB", "BtoA"):
        o = tmp_path / direction
        result = cyclegan.main(["--sample", str(out / "ckpt.pt"), "--input", str(mine), "--out", str(o),
                                "--direction", direction])
        assert result["translated"] == 2
        with Image.open(o / f"translated_{direction}" / "grey.png") as img:
            assert img.size == (16, 16)


def test_help(capsys):
    text = helpers.help_text(cyclegan, capsys)
    for flag in ("--lambda-cyc", "--lambda-identity", "--pool-size", "--direction", "--load-size", "--input"):
        assert flag in text


@pytest.mark.parametrize("argv, match", [
    (["--image-size", "18", "--load-size", "20"], "multiple of 4"),
    (["--image-size", "16", "--d-layers", "4"], "PatchGAN"),
    (["--input", "x"], "--sample"),
    (["--lambda-cyc", "-1"], ">= 0"),
    (["--identity-weight", "-1"], ">= 0"),
    (["--identity-weight", "2", "--lambda-identity", "0.2"], "give one of them"),
    (["--sample", "ckpt.pt", "--input", "no/such/folder"], "--input no/such/folder does not exist"),
])
def test_bad_flags(tmp_path, capsys, argv, match):
    out = tmp_path / "x"
    helpers.expect_usage_error(cyclegan, ["--dry-run", "--out", str(out), *argv], capsys, match)
    assert not out.exists()


def test_bad_folders(tmp_path, capsys):
    out = tmp_path / "x"
    root = tmp_path / "set"
    write_domain(root / "trainA", 3, (255, 0, 0))
    helpers.expect_usage_error(cyclegan, ["--dry-run", "--dataset", str(root), "--out", str(out)], capsys,
                               "{trainA,trainB,testA,testB}")
    (root / "trainB").mkdir()
    helpers.expect_usage_error(cyclegan, ["--dry-run", "--dataset", str(root), "--out", str(out)], capsys, "holds no images")
    write_domain(root / "trainB", 2, 100, mode="L")
    write_domain(root / "testA", 1, (255, 0, 0))
    write_domain(root / "testB", 1, 100, mode="L")
    helpers.expect_usage_error(cyclegan, ["--dry-run", "--dataset", str(root), "--out", str(out)], capsys,
                               "--lambda-identity 0")   # grey <-> colour: no identity loss
    assert not out.exists()
    assert cyclegan.main(["--dry-run", "--dataset", str(root), "--out", str(out), "--lambda-identity", "0",
                          "--steps", "1"])["step"] == 1


# -- data -----------------------------------------------------------------------------------------------

def test_unpaired_folders(tmp_path):
    write_domain(tmp_path / "s" / "trainA", 3, (255, 0, 0))
    write_domain(tmp_path / "s" / "trainB", 5, (0, 0, 255), size=(20, 14))
    d = datasets.load_translation(ns(tmp_path / "s"), "train", paired=False, size=8)
    assert not d.paired and d.a.shape == (3, 3, 8, 8) and d.b.shape == (5, 3, 8, 8)   # lengths differ
    assert d.a[:, 0].min() == 255 and d.b[:, 2].min() == 255
    back = datasets.load_translation(ns(tmp_path / "s", "BtoA"), "train", paired=False, size=8)
    assert len(back.a) == 5 and len(back.b) == 3


def test_unpaired_archive_is_downloaded(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for name in ("trainA", "trainB", "testA", "testB"):
        write_domain(src / name, 2, (9, 9, 9))
    with zipfile.ZipFile(tmp_path / "horse2zebra.zip", "w") as z:
        for f in src.rglob("*.png"):
            z.write(f, f"horse2zebra/{f.relative_to(src)}")
    monkeypatch.setattr(datasets, "UNPAIRED_URL", f"file://{tmp_path}/{{}}.zip")
    args = argparse.Namespace(dataset="horse2zebra", data_root=str(tmp_path / "data"), direction="AtoB", download=True)
    assert len(datasets.load_translation(args, "test", paired=False, size=8).b) == 2
    assert (tmp_path / "data" / "horse2zebra" / "trainB").is_dir()


# -- the paper's parts ----------------------------------------------------------------------------------

def test_image_pool_mixes_history_and_new_images(monkeypatch):
    pool = cyclegan.ImagePool(3)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first), first)           # filling up: stored and returned as they are
    assert len(pool.images) == 3
    draws = iter([0.9, 0.1])   # 0.9 > 0.5: swap with a stored image; 0.1: return the new one
    monkeypatch.setattr(random, "uniform", lambda a, b: next(draws))
    monkeypatch.setattr(random, "randint", lambda a, b: 1)
    out = pool.query(torch.tensor([10.0, 11.0]).view(2, 1, 1, 1))
    assert out.flatten().tolist() == [1.0, 11.0]          # the stored image 1 came back; 11 passed through
    assert [float(x) for x in pool.images] == [0.0, 10.0, 2.0]   # 10 took its place
    monkeypatch.undo()
    random.seed(0)
    pool.query(torch.full((200, 1, 1, 1), -1.0))
    assert all(float(x) == -1 for x in pool.images)          # new images replace the stored ones
    empty = cyclegan.ImagePool(0)
    assert torch.equal(empty.query(first), first) and empty.images == []


def test_patchgan_output_size_matches_the_net():
    """The 70x70 PatchGAN gives a 30x30 logit map on 256x256 images (official); the size check uses the same
    arithmetic as the net."""
    assert cyclegan.patch_output_size(256, 3) == 30
    for size, layers in ((32, 2), (36, 2), (64, 3)):
        D = cyclegan.PatchGAN(1, 4, layers)
        assert D(torch.zeros(1, 1, size, size)).shape[-1] == cyclegan.patch_output_size(size, layers)


def test_a_run_without_a_pool_trains(tmp_path):
    """--pool-size 0: D's step takes the newest generated images (detached from the G/F step's graph)."""
    out = cyclegan.main(["--dry-run", "--steps", "2", "--pool-size", "0", "--threads", "1", "--out", str(tmp_path / "r")])
    assert out["step"] == 2 and not out["interrupted"]


def test_image_pool_returns_old_images_half_the_time():
    random.seed(1)
    pool = cyclegan.ImagePool(50)
    pool.query(torch.zeros(50, 1, 1, 1))
    hits = sum(float(pool.query(torch.full((1, 1, 1, 1), float(i + 1)))) != i + 1 for i in range(1000))
    assert 430 < hits < 570


def test_cycle_and_identity_losses_on_hand_made_tensors():
    a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    rec_a = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]])        # |F(G(a)) − a| = 0.25
    rec_b = torch.full((1, 1, 2, 2), 0.0)                     # |G(F(b)) − b| = 1
    d_fake_b, d_fake_a = torch.full((1, 1, 3, 3), 1.0), torch.full((1, 1, 3, 3), 0.0)   # (D − 1)²: 0 and 1
    total, terms = cyclegan.generator_loss(d_fake_b, d_fake_a, rec_a, a, rec_b, b, 10.0)
    assert float(terms["cycle_A"]) == 0.25 and float(terms["cycle_B"]) == 1.0
    assert float(terms["G_GAN"]) == 0 and float(terms["F_GAN"]) == 1
    assert torch.isclose(total, torch.tensor(1 + 10 * 1.25))
    idt_b, idt_a = b * 0.5, a + 0.1                            # ‖G(b) − b‖ = 0.5, ‖F(a) − a‖ = 0.1
    total_id, terms = cyclegan.generator_loss(d_fake_b, d_fake_a, rec_a, a, rec_b, b, 10.0, 5.0, idt_b, idt_a)
    assert torch.isclose(terms["identity_B"], torch.tensor(0.5)) and torch.isclose(terms["identity_A"], torch.tensor(0.1))
    assert torch.isclose(total_id, total + 5.0 * 0.6)   # λ_id L_identity, λ_id its own weight
    assert torch.isclose(cyclegan.d_loss(torch.full((4,), 0.5), torch.full((4,), 0.5)), torch.tensor(0.25))


def test_generator_is_the_papers():
    G = cyclegan.Generator(3, 3, 64, 9)
    assert sum(isinstance(m, cyclegan.ResidualBlock) for m in G.modules()) == 9
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in G.modules()) == 2 + 2 * 9
    norms = [m for m in G.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and not any(m.affine or m.track_running_stats for m in norms)
    convs = [m for m in G.net if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [m.out_channels for m in convs] == [64, 128, 256, 128, 64, 3]
    assert convs[0].kernel_size == (7, 7) and convs[-1].kernel_size == (7, 7)
    # the official code prints 11.378 M parameters for resnet_9blocks and 2.765 M for the PatchGAN
    assert round(sum(p.numel() for p in G.parameters()) / 1e6, 3) == 11.378
    assert round(sum(p.numel() for p in cyclegan.PatchGAN(3).parameters()) / 1e6, 3) == 2.765
    x = torch.randn(1, 3, 32, 32)
    assert cyclegan.Generator(3, 1, 8, 6)(x).shape == (1, 1, 32, 32)
    assert cyclegan.parse_args(["--image-size", "128", "--load-size", "143"]).n_blocks == 6
    assert cyclegan.parse_args([]).n_blocks == 9


def test_patchgan_receptive_field_is_70():
    torch.manual_seed(0)
    D = cyclegan.PatchGAN(1, 4, 3)   # instance norm mixes positions: measure the patch with it removed
    for i, m in enumerate(D.net):
        if isinstance(m, nn.InstanceNorm2d):
            D.net[i] = nn.Identity()
    x = torch.randn(1, 1, 128, 128, requires_grad=True)
    out = D(x)
    out[0, 0, out.shape[-2] // 2, out.shape[-1] // 2].backward()
    hit = x.grad[0, 0] != 0
    rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
    assert (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)) == (70, 70)
    assert hit.sum() == 70 * 70


def test_learning_rate_decays_linearly():
    args = argparse.Namespace(steps=200, decay_fraction=0.5)
    assert cyclegan.lr_factor(100, args) == 1.0
    assert cyclegan.lr_factor(101, args) == pytest.approx(1 - 1 / 101)
    assert cyclegan.lr_factor(200, args) == pytest.approx(1 / 101)


# -- the training loop: one step against the objective computed by hand -------------------------------

def fixed_batches(monkeypatch, a, b):
    """train() draws every batch as (a, b)."""
    def batches(*args, **kwargs):
        while True:
            yield a.clone(), b.clone()
    monkeypatch.setattr(datasets, "translation_batches", batches)


@contextlib.contextmanager
def recorded_steps():
    """Yields a list that gets each optimizer step, as (optimizer, its gradients, its learning rate) just
    before the step."""
    steps = []

    def hook(opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        steps.append((opt, [None if p.grad is None else p.grad.clone() for p in params], opt.param_groups[0]["lr"]))
    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


def built_nets(monkeypatch):
    """(copies of the nets as built, the nets train() goes on to train) for each call of cyclegan.build."""
    calls, original = [], cyclegan.build

    def build(*args, **kwargs):
        nets = original(*args, **kwargs)
        calls.append((copy.deepcopy(nets), nets))
        return nets
    monkeypatch.setattr(cyclegan, "build", build)
    return calls


def params(nets, *names):
    return [p for name in names for p in nets[name].parameters()]


def assert_grads(got, want, what):
    for g, w in zip(got, want, strict=True):
        assert g is not None, f"{what}: a parameter got no gradient"
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()) + 1e-12), what


def assert_adam_first_step(after, before, grads, lr, what):
    """Adam's first step moves each parameter by −lr · g / (|g| + eps)."""
    for p, p0, g in zip(after, before, grads, strict=True):
        assert torch.allclose(p.detach() - p0.detach(), wiring.adam_first_update(lr, g), atol=lr * 1e-3), what


@pytest.mark.parametrize("extra, lam, lam_id", [
    ([], 10.0, 5.0),                                        # the defaults: λ = 10, λ_id = 0.5 λ
    (["--lambda-cyc", "3", "--lambda-identity", "0.1"], 3.0, 0.3),
    (["--lambda-cyc", "0", "--identity-weight", "5"], 0.0, 5.0),   # the cycle term off, the identity term kept
])
def test_one_step_follows_the_objective(tmp_path, monkeypatch, extra, lam, lam_id):
    """One step of train() against Eq. 3 on the same batch: G and F first on the LSGAN terms (targets 1) through
    D_B(G(a)) and D_A(F(b)), λ times both cycles and λ_id times both identities; then each D, halved, on its own
    domain's real images (target 1) against what its history pool returned for the other G's fakes (target 0)."""
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1 for _ in "ab")
    fixed_batches(monkeypatch, a, b)
    nets = built_nets(monkeypatch)
    queried = []

    def query(self, images):   # a stand-in history: returns other images than it was given (mirrored)
        queried.append((self, images.detach().clone()))
        return images.detach().flip(-1)
    monkeypatch.setattr(cyclegan.ImagePool, "query", query)
    pools = wiring.record_calls(monkeypatch, cyclegan, "ImagePool")
    lr = 0.01   # large enough that an update before the other's step visibly changes its gradient
    with recorded_steps() as steps:
        wiring.train_steps(cyclegan, tmp_path, 1, "--lr", str(lr), "--pool-size", "5", *extra)
    (n0, n1), = nets
    G, F_, D_A, D_B = (n0[k] for k in ("G", "F", "D_A", "D_B"))

    def mse(scores, target):
        return (scores - target).pow(2).mean()

    def l1(x, y):
        return (x - y).abs().mean()

    assert [o for o, _, _ in steps] == [steps[0][0], steps[1][0]] and steps[0][0] is not steps[1][0]
    (_, grads_g, lr_g), (_, grads_d, lr_d) = steps   # G and F first, then the Ds
    fake_b, fake_a = G(a), F_(b)
    loss_g = (mse(D_B(fake_b), 1) + mse(D_A(fake_a), 1) + lam * (l1(F_(fake_b), a) + l1(G(fake_a), b))
              + lam_id * (l1(G(b), b) + l1(F_(a), a)))
    assert_grads(grads_g, torch.autograd.grad(loss_g, params(n0, "G", "F")), "G's and F's gradient")
    assert lr_g == lr
    assert_adam_first_step(params(n1, "G", "F"), params(n0, "G", "F"), grads_g, lr, "G's and F's update")

    assert [args for args, _, _ in pools] == [(5,), (5,)]   # --pool-size
    assert len(queried) == 2 and queried[0][0] is not queried[1][0]   # one history per domain
    for fake in (fake_b, fake_a):   # each G's fakes from before G's update go into a pool
        assert sum(torch.allclose(x, fake.detach(), atol=1e-6) for _, x in queried) == 1
    fake_b, fake_a = fake_b.detach().flip(-1), fake_a.detach().flip(-1)   # what the stand-in pools return
    loss_d = 0.5 * (mse(D_B(b), 1) + mse(D_B(fake_b), 0)) + 0.5 * (mse(D_A(a), 1) + mse(D_A(fake_a), 0))
    assert_grads(grads_d, torch.autograd.grad(loss_d, params(n0, "D_A", "D_B")), "the Ds' gradient")
    assert lr_d == lr
    assert_adam_first_step(params(n1, "D_A", "D_B"), params(n0, "D_A", "D_B"), grads_d, lr, "the Ds' update")


def test_optimizers_and_learning_rate_decay(tmp_path, monkeypatch):
    """One Adam (2e-4, β (0.5, 0.999)) over G and F, one over both Ds; the lr constant for the first half of the
    steps, then lr · (1 − (step − n_const) / (n_decay + 1)) (official 'linear' policy, here per step)."""
    built = wiring.record_optimizers(monkeypatch)
    nets = built_nets(monkeypatch)
    with recorded_steps() as steps:
        wiring.train_steps(cyclegan, tmp_path, 4)
    (_, n), = nets
    assert len(built) == 2
    for names in (("G", "F"), ("D_A", "D_B")):
        [opt] = [o for o in built if {id(p) for p in o.params} == {id(p) for p in params(n, *names)}]
        assert opt.type == "Adam" and opt.setting("betas") == (0.5, 0.999)
        seen = [lr for o, _, lr in steps if o is opt.opt]   # 4 steps: 2 at the full lr, 2 decaying (n_decay = 2)
        assert seen == pytest.approx([2e-4, 2e-4, 2e-4 * (1 - 1 / 3), 2e-4 * (1 - 2 / 3)])


def test_log_only_terms_leave_training_unchanged(tmp_path):
    """Each D's real and fake halves are computed only at log steps; the weights and pools do not depend on the
    log interval."""
    a = wiring.train_steps(cyclegan, tmp_path, 4, "--pool-size", "1", name="every")   # a pool draw per image
    b = cyclegan.main(["--dry-run", "--steps", "4", "--pool-size", "1", "--out", str(tmp_path / "rare"),
                       "--log-every", "3", "--sample-every", "0", "--ckpt-every", "0", "--eval-every", "0"])
    logged = {"loss/D_A_real", "loss/D_A_fake", "loss/D_B_real", "loss/D_B_fake"}
    assert logged <= set(a["losses"]) and logged <= set(b["losses"])
    wa, wb = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("every", "rare"))
    helpers.assert_same(wa["models"], wb["models"])
    helpers.assert_same(wa["pools"], wb["pools"])


# -- translating your own images; bad images ------------------------------------------------------------

def truncated_png(path, size=(12, 12)):
    """A PNG cut in half, as an interrupted download leaves it."""
    noise = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_translations_of_own_images_leave_the_run_alone(tmp_path):
    out, _, _ = helpers.dry_run(cyclegan, tmp_path, "--steps", "1")
    run_files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    mine = tmp_path / "mine"
    write_domain(mine, 2, (0, 200, 0))
    result = cyclegan.main(["--sample", str(out / "ckpt.pt"), "--input", str(mine)])   # the default --out
    assert sorted(p.name for p in Path(result["out"]).glob("*.png")) == ["000.png", "001.png"]
    assert Path(result["out"]).name == "translated_AtoB"
    assert all(p.read_bytes() == data for p, data in run_files.items())   # no training grid overwritten


def test_sample_translates_one_image(tmp_path):
    out, _, _ = helpers.dry_run(cyclegan, tmp_path, "--steps", "1")
    Image.new("RGB", (50, 37), (200, 10, 10)).save(tmp_path / "photo.jpg")
    result = cyclegan.main(["--sample", str(out / "ckpt.pt"), "--input", str(tmp_path / "photo.jpg"),
                            "--out", str(tmp_path / "o")])
    assert result["translated"] == 1
    with Image.open(tmp_path / "o" / "translated_AtoB" / "photo.png") as img:
        assert img.size == (16, 16)


@pytest.mark.parametrize("bad", ["truncated.png", "notes.jpg"])
def test_a_bad_image_in_the_dataset_is_named_at_start_up(tmp_path, capsys, bad):
    """It stops the run at start-up with one line naming it (exit 2, no traceback), or is skipped with a warning
    that names it."""
    root = tmp_path / "set"
    for name in ("trainA", "trainB", "testA", "testB"):
        write_domain(root / name, 2, (9, 9, 9))
    if bad == "truncated.png":
        truncated_png(root / "trainB" / bad)
    else:
        (root / "trainB" / bad).write_text("not an image")
    try:
        cyclegan.main(["--dry-run", "--dataset", str(root), "--out", str(tmp_path / "run"), "--steps", "1"])
    except SystemExit as e:
        err = capsys.readouterr().err.strip()
        assert e.code == 2 and bad in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    else:
        assert bad in capsys.readouterr().err
