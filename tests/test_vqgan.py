import argparse
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import vqgan
from common import checkpoint as ckpt_io
from common import data as datasets
from common import digits
from common import lpips as lpips_lib
from tests import helpers, wiring


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 dry run (GAN on from step 3), shared by the stage-2 tests."""
    tmp = tmp_path_factory.mktemp("stage1")
    out, summary, state = helpers.dry_run(vqgan, tmp)
    return out / "ckpt.pt", summary, state


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

def test_stage1_dry_run(stage1):
    """The held-out scores the run logs are those of its checkpoint on the first tenth of `fake` (51 of its 512
    images, left out of training), computed here from their definitions."""
    _, summary, state = stage1
    assert state["stage"] == 1 and state["data_shape"] == [3, 16, 16]
    assert {"loss/rec", "loss/codebook", "loss/G", "loss/lambda", "loss/D"} <= set(summary["losses"])
    vq = vqgan.load_vqgan(state, "cpu")
    fake = datasets.load(argparse.Namespace(dataset="fake", image_size=16, seed=0, data_root="unused"))
    x = fake.images[:51].float() / 127.5 - 1
    with torch.no_grad():
        rec, _, idx = vq(x)
    rec = rec.clamp(-1, 1)
    mse = (rec - x).square().flatten(1).mean(1)
    counts = torch.bincount(idx.flatten(), minlength=32).double()
    p = counts[counts > 0] / counts.sum()
    m = summary["metrics"]
    assert m["metric/l1"] == pytest.approx((rec - x).abs().mean().item(), rel=1e-5)
    psnr = 10 * torch.log10(2 ** 2 / mse)   # the peak-to-peak of [−1, 1] is 2
    assert m["metric/psnr"] == pytest.approx(psnr.mean().item(), rel=1e-5)
    assert m["metric/usage"] == pytest.approx(len(p) / 32)
    assert m["metric/perplexity"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-6)


def write_idx_folder(folder, images, labels):
    """A folder of MNIST-format idx files (uint8 images (N, H, W), labels (N,))."""
    folder.mkdir()
    for name, t in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 8, t.dim()]) + b"".join(d.to_bytes(4, "big") for d in t.shape)
        (folder / name).write_bytes(header + t.to(torch.uint8).numpy().tobytes())


def test_a_folder_trains_without_its_held_out_tenth(tmp_path, monkeypatch):
    """A folder without a test split: its first tenth is scored and never trained on."""
    n = 40
    write_idx_folder(tmp_path / "digits", (torch.arange(n) * 5).view(n, 1, 1).expand(n, 28, 28), torch.arange(n) % 10)
    trained = wiring.record_calls(monkeypatch, datasets, "iterate")
    scored = wiring.record_calls(monkeypatch, vqgan, "evaluate_stage1")
    wiring.train_steps(vqgan, tmp_path, 1, "--dataset", str(tmp_path / "digits"))
    image_ids = lambda images: (images[:, 0, 0, 0].long() // 5).tolist()   # image i is the constant 5 i
    assert image_ids(trained[0][0][0].images) == list(range(4, n))
    assert image_ids(scored[0][0][1]) == list(range(4))


def test_held_out_images_are_apart_from_the_training_and_the_classifiers_ones():
    """MNIST's 10,000 test digits as a folder: the first 1,000 are held out, the digit classifier holds out the
    last 2,000 (common/digits.py), the VQGAN trains on the other 9,000; labels travel with their images."""
    n = 10_000
    ids = torch.arange(n)
    images = torch.stack([ids // 256, ids % 256], 1).to(torch.uint8).view(n, 1, 1, 2)   # image i encodes i
    data = datasets.Data("digits", "image", (1, 1, 2), 10, images=images, labels=ids % 10)
    train, held, labels = vqgan.split_held_out(argparse.Namespace(dataset="/data/digits"), data, 5000)
    decode = lambda x: set((x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist())
    assert decode(held) == set(range(1000)) and torch.equal(labels, ids[:1000] % 10)
    assert decode(train.images) == set(range(1000, n)) and torch.equal(train.labels, ids[1000:] % 10)
    assert not decode(held) & decode(images[-digits.HOLDOUT:])


def test_an_image_folder_holds_out_its_first_tenth(tmp_path):
    from PIL import Image
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (8, 8), (10 * i,) * 3).save(folder / f"{i:02d}.png")
    args = argparse.Namespace(dataset=str(folder), image_size=8, data_root="unused")
    train, held, _ = vqgan.split_held_out(args, datasets.load(args), 50)
    assert held[:, 0, 0, 0].tolist() == [0, 10]
    assert [round(255 * train.dataset[i][0][0, 0, 0].item()) for i in range(len(train))] == list(range(20, 200, 10))


def stage2_dry_run(tmp_path, *extra):
    """helpers.dry_run for stage 2, whose checkpoint is <out>/transformer.pt (and no ckpt.pt)."""
    out, summary, state = helpers.dry_run(vqgan, tmp_path, "--stage", "2", *extra, ckpt_name="transformer.pt")
    assert not (out / "ckpt.pt").exists()
    return out, summary, state


def test_stage2_dry_runs_and_sample(stage1, tmp_path):
    ckpt, _, _ = stage1
    out, summary, state = stage2_dry_run(tmp_path, "--vqgan", str(ckpt))
    assert state["stage"] == 2 and state["num_classes"] == 0 and "loss/ce" in summary["losses"]
    written = helpers.sample_from(vqgan, out / "transformer.pt", tmp_path)
    assert set(written) == {"reconstructions", "samples"}
    cond = tmp_path / "cond"
    cond.mkdir()
    out, summary, state = stage2_dry_run(cond, "--vqgan", str(ckpt), "--conditional")
    assert state["num_classes"] == 10
    assert state["models"]["gpt"]["tok_emb.weight"].shape[0] == 32 + 10   # codes, then one token per class


def test_stage2_takes_the_vqgans_data_and_size(tmp_path):
    """Stage 2 models the data the VQGAN was trained on, at its image size: --dataset, --data-root and --image-size
    default to the stage-1 run's; at 128 px or more the transformer defaults to the faces config's size (24 layers,
    16 heads, 1024 dims) with batch 2 and AdamW's β (0.9, 0.95); flags given explicitly win."""
    root = str(tmp_path / "root")
    wiring.train_steps(vqgan, tmp_path, 1, "--dataset", "fake:1", "--image-size", "32", "--data-root", root,
                       "--eval-samples", "0", name="vq32")
    wiring.train_steps(vqgan, tmp_path, 1, "--stage", "2", "--vqgan", str(tmp_path / "vq32" / "ckpt.pt"), name="gpt")
    state = ckpt_io.load(tmp_path / "gpt" / "transformer.pt", vqgan.SCRIPT)
    assert (state["args"]["dataset"], state["args"]["image_size"], state["args"]["data_root"]) == ("fake:1", 32, root)
    assert state["data_shape"] == [1, 32, 32] and state["models"]["gpt"]["pos_emb"].shape[1] == (32 // 4) ** 2

    state = ckpt_io.load(tmp_path / "vq32" / "ckpt.pt", vqgan.SCRIPT)
    state["args"]["image_size"] = 128                                   # as if trained at 128 px
    torch.save(state, tmp_path / "vq128.pt")
    args = vqgan.parse_args(["--stage", "2", "--vqgan", str(tmp_path / "vq128.pt"), "--n-head", "8"])   # not a dry run
    vqgan.read_vqgan(args)
    assert (args.dataset, args.image_size, args.n_layer, args.n_head, args.n_embd) == ("fake:1", 128, 24, 8, 1024)
    assert (args.batch_size, args.beta1, args.beta2) == (2, 0.9, 0.95) and args.lr == pytest.approx(4.5e-6 * 2)


def test_stages_keep_their_own_checkpoints_in_one_run_directory(tmp_path, capsys):
    """Stage 2 into the VQGAN's run directory leaves the VQGAN's checkpoint alone; --resume auto continues each
    stage from its own file; resuming the other stage's checkpoint is one line and changes nothing."""
    run = tmp_path / "run"
    common = ["--dry-run", "--out", str(run), "--ckpt-every", "0", "--sample-every", "0", "--eval-samples", "0"]
    stage2 = ["--stage", "2", "--vqgan", str(run / "ckpt.pt")]
    vqgan.main([*common, "--steps", "1"])
    vqgan.main([*common, *stage2, "--steps", "1"])
    files = {name: (run / name).read_bytes() for name in ("ckpt.pt", "transformer.pt", "args.json")}
    assert ckpt_io.load(run / "ckpt.pt", vqgan.SCRIPT)["stage"] == 1
    assert (run / "args-transformer.json").is_file() and (run / "summary-transformer.json").is_file()
    files["args-transformer.json"] = (run / "args-transformer.json").read_bytes()
    for argv, match in ((common, "--stage 2 (now 1)"), ([*common, *stage2], "--stage 1 (now 2)")):
        resume = "transformer.pt" if match.startswith("--stage 2") else "ckpt.pt"
        helpers.expect_usage_error(vqgan, [*argv, "--steps", "2", "--resume", str(run / resume)], capsys, match)
        assert all((run / name).read_bytes() == data for name, data in files.items())
    for argv, name, stage in ((common, "ckpt.pt", 1), ([*common, *stage2], "transformer.pt", 2)):
        assert vqgan.main([*argv, "--steps", "2", "--resume", "auto"])["step"] == 2
        state = ckpt_io.load(run / name, vqgan.SCRIPT)
        assert state["stage"] == stage and state["step"] == 2


def test_stage1_sample(stage1, tmp_path):
    written = helpers.sample_from(vqgan, stage1[0], tmp_path)
    assert set(written) == {"reconstructions"}


def test_resume_is_exact_stage1(tmp_path, monkeypatch):
    # the GAN term starts at step 3: the split at step 3 resumes into the adversarial phase
    helpers.assert_resume_exact(vqgan, tmp_path, monkeypatch, ["--disc-start", "3"],
                                state_keys=("models", "optimizers"))


def test_resume_is_exact_with_dead_code_restarts(tmp_path, monkeypatch):
    # codes unused in steps 1–4 restart at step 4: the use counts of steps 1–3 travel in the checkpoint
    a, _ = helpers.assert_resume_exact(vqgan, tmp_path, monkeypatch, ["--restart-dead-codes", "4"],
                                       state_keys=("models", "optimizers", "restart_counts"))
    assert a["restart_counts"].sum() > 0   # steps 5–6 counted since the restart


def test_dead_codes_move_onto_encoder_outputs():
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(8, 3)
    before = q.codebook.weight.detach().clone()
    z = torch.randn(50, 3)
    dead = torch.tensor([1, 5, 6])
    q.restart(dead, z)
    after = q.codebook.weight.detach()
    alive = torch.tensor([0, 2, 3, 4, 7])
    assert torch.equal(after[alive], before[alive])
    assert torch.cdist(after[dead], z).min(1).values.max() == 0   # each restarted code is one of the z rows
    _, _, idx = q(z.T.reshape(1, 3, 50, 1))
    assert set(dead.tolist()) <= set(idx.flatten().tolist())      # and is picked again


def test_resume_is_exact_stage2(stage1, tmp_path, monkeypatch):
    helpers.assert_resume_exact(vqgan, tmp_path, monkeypatch, ["--stage", "2", "--vqgan", str(stage1[0])],
                                state_keys=("models", "optimizers"), ckpt_name="transformer.pt")


def test_help(capsys):
    text = helpers.help_text(vqgan, capsys)
    for flag in ("--stage", "--vqgan", "--ch-mult", "--n-embed", "--disc-start", "--perceptual-weight",
                 "--lpips-weights", "--top-k", "--temperature", "--conditional", "--beta-on", "--restart-dead-codes"):
        assert flag in text


# ------------------------------------------------------------------------------------------------
# The training loops: one or two steps of train() against the update computed by hand
# ------------------------------------------------------------------------------------------------

class Steps:
    """Every optimizer step train() takes, in order, with the gradients it applies, every watched net's state
    just before and just after it (`nets`: name -> module, filled in as train() builds them) and how many inputs
    D had seen by then (`d_inputs`, filled in by D's forward hook)."""

    def __init__(self):
        self.nets, self.log, self.d_inputs = {}, [], []

    def pre(self, opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        self.log.append({"opt": opt, "grads": {p: p.grad.clone() for p in params if p.grad is not None},
                         "before": {k: wiring.snapshot(m) for k, m in self.nets.items()},
                         "d_calls": len(self.d_inputs)})

    def post(self, opt, args, kwargs):
        self.log[-1]["after"] = {k: wiring.snapshot(m) for k, m in self.nets.items()}

    def grads(self, i, net):
        """The gradients of step i by parameter name of `net` (a module in self.nets)."""
        return {n: self.log[i]["grads"][p] for n, p in self.nets[net].named_parameters() if p in self.log[i]["grads"]}


@pytest.fixture
def steps():
    s = Steps()
    handles = [register_optimizer_step_pre_hook(s.pre), register_optimizer_step_post_hook(s.post)]
    yield s
    for h in handles:
        h.remove()


def fixed_batches(monkeypatch, shape=(3, 16, 16), seed=1):
    """Feed train() known batches (uniform in [−1, 1], labels 0..9 cycling); returns the list of those drawn."""
    drawn, g = [], torch.Generator().manual_seed(seed)

    def iterate(data, batch_size, device, *args, **kwargs):
        while True:
            x = torch.rand(batch_size, *shape, generator=g) * 2 - 1
            drawn.append(x)
            yield x.to(device), torch.arange(batch_size, device=device) % 10
    monkeypatch.setattr(datasets, "iterate", iterate)
    return drawn


class TwoLayers(nn.Module):
    """A stand-in for VGG16: two feature maps of 4 channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


def stand_in_lpips(monkeypatch):
    """--perceptual-weight > 0 without the VGG16 weights: LPIPS on TwoLayers, heads ~ U(0, 1)."""
    torch.manual_seed(0)
    stub = lpips_lib.LPIPS(TwoLayers(), channels=(4, 4))
    stub.heads.apply(lambda m: nn.init.uniform_(m.weight) if isinstance(m, nn.Conv2d) else None)
    monkeypatch.setattr(lpips_lib, "load_lpips", lambda weights=None: stub)
    return stub


def watch_stage1(monkeypatch, steps, d_last_scale):
    """Record the VQGAN and D train() builds (D's last layer scaled by d_last_scale: a small ‖∇ L_GAN‖ makes δ
    and the clamp of λ show) and every input D sees."""
    build_vqgan, build_d, d_inputs = vqgan.build_vqgan, vqgan.PatchDiscriminator, steps.d_inputs

    def vq(*args):
        steps.nets["vq"] = build_vqgan(*args)
        return steps.nets["vq"]

    def discriminator(*args):
        D = build_d(*args)
        with torch.no_grad():
            D[-1].weight.mul_(d_last_scale)
        D.register_forward_hook(lambda m, inputs, out: d_inputs.append(inputs[0].detach().clone()))
        steps.nets["D"] = D
        return D
    monkeypatch.setattr(vqgan, "build_vqgan", vq)
    monkeypatch.setattr(vqgan, "PatchDiscriminator", discriminator)
    return d_inputs


def at(net, state):
    """A copy of net with the weights of a snapshot."""
    net = copy.deepcopy(net)
    net.load_state_dict(state)
    return net


def stage1_loss_by_hand(vq, D, x, lpips, w, gan_on):
    """The docstring's objective, written out: z = E(x), the nearest codes, straight-through z_q, x̂ = G(z_q);
    L = |x − x̂| + w_p LPIPS + w_cb (‖sg[z_q] − z‖² + β ‖z_q − sg[z]‖²) + λ w_disc f (−D(x̂)),
    λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + 1e-4) clamped to [0, 1e4], G_L = the decoder's output conv."""
    z = vq.quant_conv(vq.encoder(x))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codes = vq.quantizer.codebook.weight
    z_q = codes[torch.cdist(flat.detach(), codes.detach()).argmin(1)]
    commitment, codebook = (flat - z_q.detach()).square().mean(), (z_q - flat.detach()).square().mean()
    z_st = (flat + (z_q - flat).detach()).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    x_rec = vq.decoder(vq.post_quant_conv(z_st))
    rec = (x - x_rec).abs().mean() + w["perceptual"] * lpips(x, x_rec).mean()
    loss = rec + w["codebook"] * (commitment + w["beta"] * codebook)
    if gan_on:
        g = -D(x_rec).mean()
        last = vq.decoder[-1].weight
        norm = [torch.autograd.grad(t, last, retain_graph=True)[0].norm() for t in (rec, g)]
        lam = (norm[0] / (norm[1] + 1e-4)).clamp(max=1e4).detach()
        loss = loss + lam * w["disc_weight"] * w["disc_factor"] * g
    return loss, x_rec.detach(), lam if gan_on else None


def assert_grads(got, net, loss, what):
    """The gradients train() applied equal those of `loss` for every parameter of net, to float32 rounding: 1e-4
    of each tensor's largest entry, and at least 1e-6 of the net's (attention's key biases have no true gradient,
    only rounding)."""
    expected = dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters()))))
    assert got.keys() == expected.keys(), what
    floor = 1e-6 * max(g.abs().max().item() for g in expected.values())
    for n, g in expected.items():
        error = (got[n] - g).abs().max().item()
        assert error <= max(1e-4 * g.abs().max().item(), floor), f"{what}: {n} off by {error:.3g}"


WEIGHTS = {"perceptual": 0.5, "codebook": 0.7, "beta": 0.3, "disc_weight": 0.8, "disc_factor": 0.6}


def test_stage1_loop_against_the_objective_by_hand(tmp_path, monkeypatch, steps):
    """Two steps with the GAN term from step 2 (--disc-start 1): which optimizer steps when, each one's gradient
    against the objective by hand on the same batch and weights, which batch D takes as real, the optimizers."""
    built = wiring.record_optimizers(monkeypatch)
    batches = fixed_batches(monkeypatch)
    lpips = stand_in_lpips(monkeypatch)
    d_inputs = watch_stage1(monkeypatch, steps, d_last_scale=1e-3)
    w = WEIGHTS
    wiring.train_steps(vqgan, tmp_path, 2, "--disc-start", "1", "--perceptual-weight", str(w["perceptual"]),
                       "--codebook-weight", str(w["codebook"]), "--beta", str(w["beta"]),
                       "--disc-factor", str(w["disc_factor"]))
    vq, D, d_inputs = steps.nets["vq"], steps.nets["D"], list(d_inputs)   # (copies of D below add to the list)
    opt_vq, opt_d = wiring.optimizer_for(built, vq), wiring.optimizer_for(built, D)
    assert len(built) == 2 and not opt_vq.owns(D) and not opt_d.owns(vq)
    for opt in (opt_vq, opt_d):   # Adam β (0.5, 0.9), lr = 4.5e-6 × batch (8 in the dry run)
        assert opt.type == "Adam" and opt.setting("betas") == (0.5, 0.9)
        assert opt.setting("lr") == pytest.approx(4.5e-6 * 8, rel=1e-12)
    # step 1 trains the autoencoder alone, without D; step 2 the autoencoder, then D
    assert [s["opt"] for s in steps.log] == [opt_vq.opt, opt_vq.opt, opt_d.opt]
    assert steps.log[0]["d_calls"] == 0 and len(batches) == 2   # no D (nor L_GAN) before --disc-start
    log = steps.log
    x1, x2 = batches

    vq1 = at(vq, log[0]["before"]["vq"])
    loss, _, _ = stage1_loss_by_hand(vq1, None, x1, lpips, w, gan_on=False)
    assert_grads(steps.grads(0, "vq"), vq1, loss, "step 1 (no GAN term)")

    # nothing moves the codebook or any weight between the optimizers' steps (no restarts unless asked)
    assert all(torch.equal(log[0]["after"]["vq"][k], v) for k, v in log[1]["before"]["vq"].items())
    vq2 = at(vq, log[1]["before"]["vq"])
    D2 = at(D, log[1]["before"]["D"]).requires_grad_(False)
    loss, x_rec, _ = stage1_loss_by_hand(vq2, D2, x2, lpips, w, gan_on=True)
    assert_grads(steps.grads(1, "vq"), vq2, loss, "step 2 (with the GAN term)")

    # D's step: hinge loss with the batch as real and the reconstruction (before the update) as fake, × f;
    # it leaves the autoencoder as the autoencoder's step left it
    assert len(d_inputs) == 3 and torch.allclose(d_inputs[0], x_rec, atol=1e-5)        # G's step: D(x̂)
    assert torch.equal(d_inputs[1], x2) and torch.allclose(d_inputs[2], x_rec, atol=1e-5)   # D's step
    D3 = at(D, log[2]["before"]["D"])
    d_loss = w["disc_factor"] * 0.5 * (F.relu(1 - D3(x2)).mean() + F.relu(1 + D3(x_rec)).mean())
    assert_grads(steps.grads(2, "D"), D3, d_loss, "D's step")
    for k, v in log[1]["after"]["vq"].items():
        assert torch.equal(log[2]["before"]["vq"][k], v) and torch.equal(log[2]["after"]["vq"][k], v), k


def test_adaptive_weight_clamp_and_dead_code_restarts_in_the_loop(tmp_path, monkeypatch, steps):
    """A D whose output barely depends on x̂ and a large perceptual term: λ = ‖∇L_rec‖ / (‖∇L_GAN‖ + δ)
    passes 1e4 and the clamp decides the GAN term's gradient. With --restart-dead-codes 1 the codes unused in step 1
    move onto encoder outputs of the batch after it, and the used ones stay as Adam left them."""
    batches = fixed_batches(monkeypatch)
    lpips = stand_in_lpips(monkeypatch)
    watch_stage1(monkeypatch, steps, d_last_scale=1e-6)
    w = {**WEIGHTS, "perceptual": 100.0}
    wiring.train_steps(vqgan, tmp_path, 1, "--disc-start", "0", "--perceptual-weight", "100",
                       "--codebook-weight", str(w["codebook"]), "--beta", str(w["beta"]),
                       "--disc-factor", str(w["disc_factor"]), "--restart-dead-codes", "1")
    vq, D, log = steps.nets["vq"], steps.nets["D"], steps.log
    (x,) = batches
    vq0 = at(vq, log[0]["before"]["vq"])
    D0 = at(D, log[0]["before"]["D"]).requires_grad_(False)
    loss, _, lam = stage1_loss_by_hand(vq0, D0, x, lpips, w, gan_on=True)
    assert lam == 1e4                                                    # the clamp acts
    assert_grads(steps.grads(0, "vq"), vq0, loss, "the clamped GAN term")

    with torch.no_grad():
        used = vq0.encode(x)[2].unique()
        z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, vq.quantizer.codebook.weight.shape[1])
    codes, stepped = vq.quantizer.codebook.weight.detach(), log[0]["after"]["vq"]["quantizer.codebook.weight"]
    dead = torch.ones(len(codes), dtype=torch.bool)
    dead[used] = False
    assert 0 < dead.sum() < len(codes)
    assert torch.equal(codes[~dead], stepped[~dead])
    gap = (codes[dead, None] - z[None]).abs().amax(-1).min(1).values
    assert gap.max() < 1e-6                                              # each one is an encoder output


def test_stage2_loop_is_next_code_prediction_on_the_frozen_vqgan(stage1, tmp_path, monkeypatch, steps):
    """One transformer step: its gradient is that of the cross-entropy of each code given the start token and the
    codes before it (row by row) of the frozen VQGAN's codes of the batch; AdamW β (0.9, 0.95), lr 4.5e-6 × batch,
    weight decay on the linear layers' weights alone (cond_transformer.py); the VQGAN is in no optimizer and
    unchanged."""
    ckpt, _, stage1_state = stage1
    built = wiring.record_optimizers(monkeypatch)
    batches = fixed_batches(monkeypatch)
    vqs = wiring.record_calls(monkeypatch, vqgan, "load_vqgan")
    build_gpt = vqgan.build_gpt

    def gpt(*args):
        steps.nets["gpt"] = build_gpt(*args)
        return steps.nets["gpt"]
    monkeypatch.setattr(vqgan, "build_gpt", gpt)
    wiring.train_steps(vqgan, tmp_path, 1, "--stage", "2", "--vqgan", str(ckpt))
    vq, gpt = vqs[0][2], steps.nets["gpt"]
    (opt,) = built
    assert opt.type == "AdamW" and opt.owns(gpt) and len(opt.params) == len(list(gpt.parameters()))
    assert opt.setting("betas") == (0.9, 0.95) and opt.setting("lr") == pytest.approx(4.5e-6 * 8, rel=1e-12)
    linear = {id(m.weight) for m in gpt.modules() if isinstance(m, nn.Linear)}
    decays = {id(p): g["weight_decay"] for g in opt.opt.param_groups for p in g["params"]}
    assert decays == {id(p): 0.01 if id(p) in linear else 0.0 for p in gpt.parameters()}
    assert not any(p.requires_grad for p in vq.parameters())
    for k, v in vq.state_dict().items():
        assert torch.equal(v, stage1_state["models"]["vqgan"][k]), k

    (x,) = batches
    with torch.no_grad():
        codes = vq.encode(x)[2].flatten(1)                          # (B, h·w), row by row
    start = torch.full((len(x), 1), vq.n_embed)                     # the unconditional start token
    gpt0 = at(gpt, steps.log[0]["before"]["gpt"])
    logits = gpt0(torch.cat([start, codes[:, :-1]], 1))             # position i sees the start and codes < i
    loss = F.cross_entropy(logits.reshape(-1, vq.n_embed), codes.reshape(-1))
    assert_grads(steps.grads(0, "gpt"), gpt0, loss, "the transformer's step")


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--image-size", "18"], "not a multiple of 4"),                     # f = 4 cannot downsample 18
    (["--image-size", "16", "--disc-layers", "3"], "PatchGAN needs images of at least 24"),
    (["--norm-groups", "3"], "GroupNorm"),
    (["--attn-resolutions", "5"], "not a resolution"),
    (["--stage", "2"], "needs the VQGAN's checkpoint"),
    (["--n-layer", "2"], "does not act in stage 1"),
    (["--temperature", "0.5"], "does not act in stage 1"),               # sampling flags act in stage 2 alone
    (["--perceptual-weight", "0", "--lpips-weights", "x.pth"], "does nothing"),
    (["--restart-dead-codes", "-1"], "must be >= 0"),
])
def test_bad_input(tmp_path, capsys, argv, match):
    out = tmp_path / "x"
    helpers.expect_usage_error(vqgan, ["--dry-run", *argv, "--out", str(out)], capsys, match)
    assert not out.exists()


def test_stage2_refuses_other_checkpoints(stage1, tmp_path, capsys):
    import dcgan
    dcgan.main(["--dry-run", "--steps", "1", "--out", str(tmp_path / "d")])
    capsys.readouterr()
    out = tmp_path / "x"
    helpers.expect_usage_error(vqgan, ["--dry-run", "--stage", "2", "--vqgan", str(tmp_path / "d" / "ckpt.pt"),
                                       "--out", str(out)], capsys, "not vqgan.py")
    ckpt2 = tmp_path / "s2"
    vqgan.main(["--dry-run", "--stage", "2", "--vqgan", str(stage1[0]), "--steps", "1", "--out", str(ckpt2)])
    capsys.readouterr()
    helpers.expect_usage_error(vqgan, ["--dry-run", "--stage", "2", "--vqgan", str(ckpt2 / "transformer.pt"),
                                       "--out", str(out)], capsys, "stage-2 checkpoint")
    helpers.expect_usage_error(vqgan, ["--dry-run", "--stage", "2", "--vqgan", str(stage1[0]), "--image-size", "32",
                                       "--out", str(out)], capsys, "trained at 16 px")
    helpers.expect_usage_error(vqgan, ["--dry-run", "--stage", "2", "--vqgan", str(stage1[0]), "--disc-start", "5",
                                       "--out", str(out)], capsys, "does not act in stage 2")
    assert not out.exists()


def test_missing_lpips_weights_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))   # nothing cached, no network
    def offline(*args, **kwargs):
        raise OSError("offline")
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    out = tmp_path / "x"
    helpers.expect_usage_error(vqgan, ["--dry-run", "--perceptual-weight", "1", "--out", str(out)], capsys,
                               "--perceptual-weight 0")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# The paper's math
# ------------------------------------------------------------------------------------------------

def test_quantiser_picks_nearest_code_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(16, 3)
    nn.init.normal_(q.codebook.weight)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, _, idx = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(flat, q.codebook.weight.detach()).argmin(1)
    assert torch.equal(idx.flatten(), nearest)
    assert torch.allclose(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3), q.codebook.weight.detach()[nearest])
    w = torch.randn_like(z)
    (z_q * w).sum().backward()        # the straight-through estimator: ∂L/∂z = ∂L/∂z_q
    assert torch.equal(z.grad, w)


@pytest.mark.parametrize("beta_on", ["codebook", "commitment"])
def test_codebook_and_commitment_terms(beta_on):
    """z = (1, 0) with codes (0, 0), (3, 3): z_q = (0, 0), ‖z − z_q‖² / 2 = 0.5 per element mean.
    The codebook term moves only the codes, the commitment term only the encoder output."""
    q = vqgan.VectorQuantizer(2, 2, beta=0.25, beta_on=beta_on)
    with torch.no_grad():
        q.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 3.0]]))
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).requires_grad_()
    _, loss, idx = q(z)
    assert idx.item() == 0
    assert math.isclose(loss.item(), 1.25 * 0.5)      # (1 + β) · mean((z − z_q)²), both terms have the same value
    loss.backward()
    enc_weight, code_weight = (1.0, 0.25) if beta_on == "codebook" else (0.25, 1.0)
    # d/dz mean((z − sg z_q)²) = 2 (z − z_q) / 2 elements
    assert torch.allclose(z.grad.flatten(), enc_weight * torch.tensor([1.0, 0.0]))
    assert torch.allclose(q.codebook.weight.grad[0], code_weight * torch.tensor([-1.0, 0.0]))
    assert torch.equal(q.codebook.weight.grad[1], torch.zeros(2))


def test_adaptive_weight_on_a_tiny_decoder():
    """λ = ‖∇_W L_rec‖ / (‖∇_W L_GAN‖ + 1e-4) for a one-layer decoder y = W h, computed by hand."""
    torch.manual_seed(0)
    h = torch.randn(5, 3)
    last = nn.Linear(3, 2, bias=False)
    x, d = torch.randn(5, 2), torch.randn(2)
    y = last(h)
    rec = (x - y).abs().mean()
    gan = -(y @ d).mean()
    lam = vqgan.adaptive_weight(rec, gan, last.weight)
    rec_grad = -(torch.sign(x - y.detach())).T @ h / 10       # ∂ mean|x − Wh| / ∂W
    gan_grad = -d[:, None] * h.mean(0)[None, :]               # ∂ −mean(dᵀ W h) / ∂W
    assert torch.isclose(lam, rec_grad.norm() / (gan_grad.norm() + 1e-4))
    assert not lam.requires_grad
    big = vqgan.adaptive_weight(1e3 * rec, 1e-12 * gan, last.weight)
    assert big.item() == 1e4                                  # clamped as the code


def test_hinge_d_loss():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert math.isclose(vqgan.hinge_d_loss(real, fake).item(), expected, rel_tol=1e-6)


def test_codebook_usage():
    used, ppl = vqgan.codebook_usage(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert used.item() == 0.5 and math.isclose(ppl.item(), 2.0, rel_tol=1e-9)
    used, ppl = vqgan.codebook_usage(torch.tensor([7.0, 0.0, 0.0, 0.0]))
    assert used.item() == 0.25 and math.isclose(ppl.item(), 1.0)


def test_autoencoder_shapes_and_architecture():
    vq = vqgan.VQGAN(3, 32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=16, embed_dim=4, groups=4)
    x = torch.randn(2, 3, 32, 32)
    x_rec, loss, idx = vq(x)
    assert x_rec.shape == x.shape and idx.shape == (2, 8, 8) and vq.side == 8     # f = 4
    assert loss.dim() == 0
    attn = [m for m in vq.encoder if isinstance(m, vqgan.AttnBlock)]
    assert len(attn) == 2   # one after the lowest-resolution block, one in the middle block
    assert sum(isinstance(m, vqgan.Downsample) for m in vq.encoder) == 2
    assert sum(isinstance(m, vqgan.ResnetBlock) for m in vq.decoder) == 2 + 3 * 2   # middle + (blocks + 1) per level
    assert vq.last_layer() is vq.decoder[-1].weight and vq.decoder[-1].out_channels == 3
    assert torch.equal(vq.decode_indices(idx), vq.decode(vq.quantizer.lookup(idx)))
    cb = vq.quantizer.codebook.weight
    assert cb.abs().max() <= 1 / 16       # U(−1/K, 1/K), quantize.py


def test_patch_discriminator_matches_pix2pix():
    D = vqgan.PatchDiscriminator(3, ndf=8, n_layers=3)
    convs = [m for m in D if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [8, 16, 32, 64, 1]
    assert [m.stride[0] for m in convs] == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D) == 3
    assert D(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6) and vqgan.patch_output_size(64, 3) == 6


def test_gpt_is_causal():
    torch.manual_seed(0)
    gpt = vqgan.GPT(vocab=12, n_codes=10, block_size=8, n_layer=2, n_head=2, n_embd=16).eval()
    tokens = torch.randint(10, (3, 8))
    changed = tokens.clone()
    changed[:, 5] = (tokens[:, 5] + 1) % 10
    a, b = gpt(tokens), gpt(changed)
    assert a.shape == (3, 8, 10)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)   # no logit before position 5 sees token 5
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_gpt_loss_is_next_code_cross_entropy():
    torch.manual_seed(0)
    gpt = vqgan.GPT(vocab=11, n_codes=10, block_size=4, n_layer=1, n_head=1, n_embd=8)
    codes = torch.randint(10, (2, 4))
    first = torch.full((2,), 10)
    logits = gpt(torch.tensor([[10, *codes[0, :3]], [10, *codes[1, :3]]]))
    expected = F.cross_entropy(logits.reshape(-1, 10), codes.reshape(-1))
    assert torch.isclose(vqgan.gpt_loss(gpt, first, codes), expected)


def test_top_k_never_samples_outside_the_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top = logits.topk(5, dim=1).indices
    filtered = vqgan.top_k_filter(logits, 5)
    assert (filtered > float("-inf")).sum(1).tolist() == [5] * 4
    draws = torch.multinomial(filtered.softmax(-1), 2000, replacement=True)
    assert all(set(draws[i].tolist()) <= set(top[i].tolist()) for i in range(4))

    class Fixed(nn.Module):      # a "GPT" whose next-code logits are always `logits[0]`
        def forward(self, tokens):
            return logits[:1].expand(len(tokens), tokens.shape[1], -1)
    codes = vqgan.sample_codes(Fixed(), torch.zeros(64, dtype=torch.long), 6, top_k=3, temperature=0.5)
    assert set(codes.flatten().tolist()) <= set(logits[0].topk(3).indices.tolist())
