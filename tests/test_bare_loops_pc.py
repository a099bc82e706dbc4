"""The bare loops of benchmarks/overhead.py for pix2pix and cyclegan train what the scripts train: from the
same seed, a few steps of the script's own loop and of its bare loop leave bit-identical nets and Adam states
(and cyclegan's image pools), make the same forward passes of the nets in the same order (the Ds frozen for
the generators' step in both), and leave the random number generators (torch's, and Python's that the pools
draw from) in the same state, so the benchmark compares the scripts' plumbing and nothing else.

Each case runs the dry-run configuration on one thread, with flags that reach the parts of the loop a step
count alone would miss. pix2pix: a 64x64 U-Net (the smallest with a dropout layer, G's noise), 3 steps of
which the last two decay the learning rate; the least-squares PixelGAN without flips; L1 alone (no D).
cyclegan: 4 steps with the identity term and pools of 3 images at batch 2 (full after the 2nd step, then
Python's random swaps), the last two decaying the learning rate; and no identity term with a pool of one
image (swaps from the first step)."""
import sys

import pytest
import torch

import cyclegan
import pix2pix
from tests import helpers, wiring
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

# script, steps, extra flags
CASES = {
    "pix2pix-dropout": (pix2pix, 3, ["--image-size", "64", "--load-size", "72"]),
    "pix2pix-lsgan-pixel": (pix2pix, 2, ["--gan-mode", "lsgan", "--netD", "pixel", "--no-flip"]),
    "pix2pix-l1-alone": (pix2pix, 2, ["--gan-mode", "none"]),
    "cyclegan": (cyclegan, 4, []),
    "cyclegan-no-identity": (cyclegan, 2, ["--lambda-identity", "0", "--pool-size", "1"]),
}


def named_nets(built):
    """{name: net} from what script.build returns: pix2pix's (G, D or None), cyclegan's dict."""
    return built if isinstance(built, dict) else {k: v for k, v in zip("GD", built) if v is not None}


def watch(m, script):
    """Record, while `m` (a monkeypatch context) lasts, every optimizer built and each forward pass of the
    nets script.build returns, outside Run.end_step (its samples and evaluation): (optimizers, {name: net},
    list in call order of (net name, whether its weights took gradients: a D frozen for G's step does not))."""
    built, nets, passes, looping = wiring.record_optimizers(m), {}, [], wiring.in_loop(m)

    def on_forward(name, module, *_):
        if looping():
            passes.append((name, next(module.parameters()).requires_grad))
    wiring.watch_builder(m, script, "build", named_nets, nets, on_forward)
    return built, nets, passes


@pytest.mark.parametrize("case", CASES)
def test_bare_loop_trains_the_same_weights_as_the_script(case, tmp_path, monkeypatch):
    script, steps, extra = CASES[case]
    run = wiring.script_and_bare_loop(script, tmp_path, monkeypatch, steps, extra, lambda m: watch(m, script))
    (_, _, passes), (built, nets, passes_bare), kept, ckpt = run.seen, run.seen_bare, run.kept, run.ckpt

    assert len(passes) >= steps * len(nets)
    assert passes_bare == passes   # the same passes in the same order, the same nets frozen: none extra or missing
    assert nets.keys() == ckpt["models"].keys()
    for name, net in nets.items():
        assert kept[name] is net
        helpers.assert_same(net.state_dict(), ckpt["models"][name], name)
    assert ckpt["optimizers"].keys() == ({"G", "D"} if "D" in ckpt["models"] or "D_A" in ckpt["models"] else {"G"})
    for name in ckpt["optimizers"]:
        helpers.assert_same(kept[f"opt_{name}"].state_dict(), ckpt["optimizers"][name], f"optimizer of {name}")
    if script is cyclegan:
        for k, images in ckpt["pools"].items():
            helpers.assert_same(kept["pools"][k].state_dict()["images"], images, f"pool {k}")
        assert len(ckpt["pools"]["A"]) == min(run.args.pool_size, steps * run.args.batch_size)
    assert torch.equal(run.rng, ckpt["rng"]["torch"]), "the bare loop drew other random numbers than the script"
    assert run.py_rng == tuple(ckpt["rng"]["python"]), "the bare loop drew other Python random numbers than the script"

    # the weights compared are trained ones: every optimizer moved its parameters
    assert len(built) == len(ckpt["optimizers"])
    for opt in built:
        assert any(not torch.equal(p, p0) for p, p0 in zip(opt.params, opt.initial)), f"{case}: {opt} did not train"
