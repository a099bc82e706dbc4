"""The bare loops of benchmarks/overhead.py for sagan and bigbigan train what the scripts train: from the same
seed, a few steps of the script's own loop and of its bare loop leave bit-identical nets (weights and
buffers: batch-norm statistics, spectral-norm vectors), optimizer states and (sagan --ema-decay) moving
average of G, make the same forward passes in the same order and leave the random number generator in the
same state, so the benchmark compares the scripts' plumbing and nothing else.

Each case runs the dry-run configuration on one thread, with flags that reach the parts of the loop a step
count alone would miss: sagan's class-conditional nets with an EMA of G whose decay (0.5) moves it visibly,
and the unconditional nets without attention; bigbigan with two D steps per E/G step and E at twice G's side
(the resize for D), and the BiGAN ablation (--no-unary, a deterministic E)."""
import sys

import pytest
import torch

import bigbigan
import sagan
from tests import helpers, wiring
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

# script, the names of the nets its build() returns, steps, extra flags
CASES = {
    "sagan-ema": (sagan, "GD", 3, ["--ema-decay", "0.5"]),
    "sagan-unconditional": (sagan, "GD", 2, ["--no-labels", "--attn-res", "0"]),
    "bigbigan": (bigbigan, "GED", 2, ["--n-dis", "2", "--e-image-size", "64"]),
    "bigbigan-no-unary": (bigbigan, "GED", 2, ["--no-unary", "--deterministic-e"]),
}


def watch(m, script, names):
    """Record, while `m` (a monkeypatch context) lasts, every optimizer built, the nets script.build returns
    ({name: net}) and each of their forward passes outside Run.end_step (its samples and evaluation), as a
    list of names in call order; a copy of a net (G's moving average) is not counted."""
    built, nets, passes, looping = wiring.record_optimizers(m), {}, [], wiring.in_loop(m)

    def on_forward(name, module, *_):
        if module is nets[name] and looping():
            passes.append(name)
    wiring.watch_builder(m, script, "build", lambda result: dict(zip(names, result)), nets, on_forward)
    return built, nets, passes


@pytest.mark.parametrize("case", CASES)
def test_bare_loop_trains_the_same_weights_as_the_script(case, tmp_path, monkeypatch):
    script, names, steps, extra = CASES[case]
    run = wiring.script_and_bare_loop(script, tmp_path, monkeypatch, steps, extra, lambda m: watch(m, script, names))
    (_, _, passes), (built, nets, passes_bare), kept, ckpt = run.seen, run.seen_bare, run.kept, run.ckpt

    assert passes and passes_bare == passes   # the same passes of the nets in the same order
    for name in names:
        assert kept[name] is nets[name]
        helpers.assert_same(kept[name].state_dict(), ckpt["models"][name], name)
        helpers.assert_same(kept[f"opt_{name}"].state_dict(), ckpt["optimizers"][name], f"optimizer of {name}")
    assert torch.equal(run.rng, ckpt["rng"]["torch"]), "the bare loop drew other random numbers than the script"

    # the weights compared are trained ones: each optimizer moved its net's parameters
    assert len(built) == len(names)
    for name in names:
        opt = wiring.optimizer_for(built, nets[name])
        assert any(not torch.equal(p, p0) for p, p0 in zip(opt.params, opt.initial)), f"{case}: {name} did not train"

    if script is sagan:
        if "--ema-decay" not in extra:
            assert kept["ema"] is None and "ema" not in ckpt
        else:   # G's moving average, buffers included: the script's, and neither G's start nor G
            helpers.assert_same(kept["ema"].state_dict(), ckpt["ema"], "EMA of G")
            g0 = wiring.optimizer_for(built, nets["G"]).initial
            averaged = list(kept["ema"].module.parameters())
            assert any(not torch.equal(a, p0) for a, p0 in zip(averaged, g0))
            assert any(not torch.equal(a, p) for a, p in zip(averaged, nets["G"].parameters()))
