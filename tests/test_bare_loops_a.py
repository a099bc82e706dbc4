"""The bare loops of benchmarks/overhead.py for dcgan, cgan, wgan, wgan_gp and sngan train what the scripts
train: from the same seed, a few steps of the script's own loop and of its bare loop leave bit-identical G,
D and optimizer states, make the same forward passes of G and D in the same order and leave the random
number generator in the same state, so the benchmark compares the scripts' plumbing and nothing else.

Each case runs the dry-run configuration on one thread, with flags that reach the parts of the loop a step
count alone would miss: cgan's SGD schedule (a visible lr decay, the momentum ramp at the 4th step) and its
conv variant with Adam; wgan's critic boost (its constants shrunk so that 5 G iterations hold two boosted
ones: 7 critic updates at the 1st and 4th, 2 otherwise); wgan_gp's linear lr decay and n_critic; sngan's
ResNet with n_dis 3 and the lr decay, and the standard CNN with the non-saturating loss."""
import sys

import pytest
import torch

import cgan
import dcgan
import sngan
import wgan
import wgan_gp
from tests import helpers, wiring
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

# script, its builders (each: the names of the nets it returns), steps, extra flags, module constants to set
CASES = {
    "dcgan": (dcgan, {"build": "GD"}, 2, [], {}),
    # 480 training images, batch 200: the momentum ramp (epoch 1 → 2) starts at the 4th step
    "cgan-mlp": (cgan, {"build": "GD"}, 4, ["--batch-size", "200", "--lr-decay", "1.5", "--momentum-epochs", "2",
                                            "--final-momentum", "0.9"], {}),
    "cgan-conv": (cgan, {"build": "GD"}, 2, ["--arch", "conv"], {}),
    "wgan-boost": (wgan, {"build_generator": "G", "build_critic": "D"}, 5, ["--boost-critic", "--n-critic", "2"],
                   {"BOOST_ITERS": 7, "BOOST_FIRST": 1, "BOOST_EVERY": 3}),
    "wgan_gp": (wgan_gp, {"build": "GD"}, 2, ["--image-size", "16", "--n-critic", "3"], {}),
    "sngan-resnet": (sngan, {"build_generator": "G", "build_discriminator": "D"}, 2,
                     ["--n-dis", "3", "--lr-decay", "linear"], {}),
    "sngan-cnn": (sngan, {"build_generator": "G", "build_discriminator": "D"}, 2,
                  ["--arch", "cnn", "--loss", "nonsaturating"], {}),
}


def watch(m, script, builders):
    """Record, while `m` (a monkeypatch context) lasts, every optimizer built and each forward pass of the nets
    the script's builders return, outside Run.end_step (its samples and evaluation): (optimizers,
    {"G": net, "D": net}, list of "G"/"D" in call order)."""
    built, nets, passes, looping = wiring.record_optimizers(m), {}, [], wiring.in_loop(m)

    def on_forward(name, *_):
        if looping():
            passes.append(name)
    for builder, names in builders.items():
        def name_nets(result, names=names):
            return dict(zip(names, result if isinstance(result, tuple) else (result,)))
        wiring.watch_builder(m, script, builder, name_nets, nets, on_forward)
    return built, nets, passes


@pytest.mark.parametrize("case", CASES)
def test_bare_loop_trains_the_same_weights_as_the_script(case, tmp_path, monkeypatch):
    script, builders, steps, extra, constants = CASES[case]
    for name, value in constants.items():
        monkeypatch.setattr(script, name, value)
    run = wiring.script_and_bare_loop(script, tmp_path, monkeypatch, steps, extra, lambda m: watch(m, script, builders))
    (_, _, passes), (built, nets, passes_bare), kept, ckpt = run.seen, run.seen_bare, run.kept, run.ckpt

    assert passes_bare == passes   # the same passes of G and D in the same order: none extra, none missing
    for name in "GD":
        assert kept[name] is nets[name]
        helpers.assert_same(kept[name].state_dict(), ckpt["models"][name], name)
        helpers.assert_same(kept[f"opt_{name}"].state_dict(), ckpt["optimizers"][name], f"optimizer of {name}")
    assert torch.equal(run.rng, ckpt["rng"]["torch"]), "the bare loop drew other random numbers than the script"

    # the weights compared are trained ones: both optimizers moved their net's parameters
    assert len(built) == 2
    for opt, name in zip(built, "GD" if built[0].owns(nets["G"]) else "DG"):
        assert opt.owns(nets[name])
        assert any(not torch.equal(p, p0) for p, p0 in zip(opt.params, opt.initial)), f"{case}: {name} did not train"
