"""The bare loop of benchmarks/overhead.py for vqgan trains what the script trains, in both stages: from the same
seed, a few steps of the script's own loop and of the bare loop leave bit-identical weights, buffers (D's
BatchNorm statistics), optimizer states and dead-code counts, make the same forward passes in the same order,
restart the same codes and leave the random number generator in the same state, so the benchmark compares the
script's plumbing and nothing else.

Stage 1 runs 4 steps of the dry-run configuration on one thread with every term of its step: the perceptual
term (LPIPS on a small stand-in network, as the VGG16 weights are not at hand), the GAN term and D's step from
step 2 (--disc-start 1), and dead-code restarts at steps 2 and 4. Stage 2 runs 3 transformer steps on a
2-step stage-1 checkpoint, unconditional and class-conditional."""
import sys

import pytest
import torch
import torch.nn as nn

import vqgan
from common import lpips as lpips_lib
from tests import helpers, wiring
from tests.conftest import ROOT
from tests.test_vqgan import TwoLayers

sys.path.insert(0, str(ROOT / "benchmarks"))


def stand_in_lpips(m):
    """lpips.load_lpips returns, while `m` lasts, LPIPS on TwoLayers with heads ~ U(0, 1) (built on its own seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        stub = lpips_lib.LPIPS(TwoLayers(), channels=(4, 4))
        stub.heads.apply(lambda mod: nn.init.uniform_(mod.weight) if isinstance(mod, nn.Conv2d) else None)
    m.setattr(lpips_lib, "load_lpips", lambda weights=None: stub)
    return stub


def watch(m):
    """Record, while `m` (a monkeypatch context) lasts and outside Run.end_step (its samples and evaluation),
    every optimizer built, the forward passes of the VQGAN ("vq"), its encoder ("E", also run alone by a restart
    and by stage 2's encode), D, the perceptual net ("P") and the transformer ("gpt") and each gradient of D's
    weights ("grad D": none in the autoencoder's step, where D is frozen) in call order, and the codes each
    restart moves: (optimizers, {name: net}, passes, restarted code indices)."""
    built, nets, passes, restarts, looping = wiring.record_optimizers(m), {}, [], [], wiring.in_loop(m)

    def hook(name, net):
        nets[name] = net
        net.register_forward_hook(lambda *_: None if not looping() else passes.append(name))
        return net

    build_vqgan, build_d, build_gpt = vqgan.build_vqgan, vqgan.PatchDiscriminator, vqgan.build_gpt
    restart = vqgan.VectorQuantizer.restart

    def vq(*args):
        net = hook("vq", build_vqgan(*args))
        hook("E", net.encoder)
        return net

    def discriminator(*args):
        net = hook("D", build_d(*args))
        net[0].weight.register_hook(lambda _: None if not looping() else passes.append("grad D"))
        return net

    def recorded_restart(self, dead, z):
        restarts.append(dead.clone())
        return restart(self, dead, z)
    m.setattr(vqgan, "build_vqgan", vq)
    m.setattr(vqgan, "PatchDiscriminator", discriminator)
    m.setattr(vqgan, "build_gpt", lambda *args: hook("gpt", build_gpt(*args)))
    m.setattr(vqgan.VectorQuantizer, "restart", recorded_restart)
    hook("P", lpips_lib.load_lpips())
    return built, nets, passes, restarts


def script_and_bare_loop(tmp_path, monkeypatch, steps, flags):
    """(ckpt, kept, rng, script's record, bare loop's record) of wiring.script_and_bare_loop, LPIPS on a stand-in."""
    def watched(m):
        stand_in_lpips(m)
        return watch(m)
    stage = 2 if "--stage" in flags else 1
    run = wiring.script_and_bare_loop(vqgan, tmp_path, monkeypatch, steps, flags, watched, vqgan.CKPT_NAMES[stage])
    return run.ckpt, run.kept, run.rng, run.seen, run.seen_bare


def assert_trained(built, nets, names):
    """Each net in `names` is owned by one recorded optimizer, which moved its parameters."""
    for name in names:
        opt = wiring.optimizer_for(built, nets[name])
        assert any(not torch.equal(p, p0) for p, p0 in zip(opt.params, opt.initial)), f"{name} did not train"


def test_stage1_bare_loop_trains_the_same_vqgan_and_d(tmp_path, monkeypatch):
    steps = 4
    ckpt, kept, rng, (_, _, passes, restarts), (built, nets, passes_bare, restarts_bare) = script_and_bare_loop(
        tmp_path, monkeypatch, steps, ["--perceptual-weight", "0.5", "--disc-start", "1", "--restart-dead-codes", "2"])
    # the step is all there: the perceptual term every step, L_GAN and D's two passes from step 2, restarts
    assert passes.count("P") == steps and passes.count("D") == 3 * (steps - 1) and passes.count("grad D") == steps - 1
    assert len(restarts) == 2 and all(len(dead) for dead in restarts)
    assert passes_bare == passes   # the same passes in the same order: none extra, none missing
    assert len(restarts_bare) == len(restarts) and all(map(torch.equal, restarts_bare, restarts))
    assert kept["vqgan"] is nets["vq"] and kept["D"] is nets["D"]
    for name in ("vqgan", "D"):
        helpers.assert_same(kept[name].state_dict(), ckpt["models"][name], name)
        helpers.assert_same(kept[f"opt_{name}"].state_dict(), ckpt["optimizers"][name], f"optimizer of {name}")
    helpers.assert_same(kept["restart_counts"], ckpt["restart_counts"], "dead-code counts")
    assert torch.equal(rng, ckpt["rng"]["torch"]), "the bare loop drew other random numbers than the script"
    assert len(built) == 2
    assert_trained(built, nets, ("vq", "D"))


@pytest.fixture(scope="module")
def vqgan_ckpt(tmp_path_factory):
    """A 2-step stage-1 dry run's checkpoint (the VQGAN stage 2 trains on)."""
    tmp = tmp_path_factory.mktemp("stage1")
    wiring.train_steps(vqgan, tmp, 2, "--threads", "1")
    return tmp / "wired" / "ckpt.pt"


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_stage2_bare_loop_trains_the_same_transformer(conditional, vqgan_ckpt, tmp_path, monkeypatch):
    steps = 3
    flags = ["--stage", "2", "--vqgan", str(vqgan_ckpt), *(["--conditional"] if conditional else [])]
    ckpt, kept, rng, (_, _, passes, _), (built, nets, passes_bare, _) = script_and_bare_loop(
        tmp_path, monkeypatch, steps, flags)
    assert ckpt["num_classes"] == (10 if conditional else 0)
    assert passes == ["E", "gpt"] * steps   # the frozen VQGAN encodes, the transformer predicts
    assert passes_bare == passes
    assert kept["gpt"] is nets["gpt"]
    helpers.assert_same(kept["gpt"].state_dict(), ckpt["models"]["gpt"], "gpt")
    helpers.assert_same(kept["opt_gpt"].state_dict(), ckpt["optimizers"]["gpt"], "optimizer of gpt")
    assert torch.equal(rng, ckpt["rng"]["torch"]), "the bare loop drew other random numbers than the script"
    assert len(built) == 1
    assert_trained(built, nets, ("gpt",))
