"""The bare loops of benchmarks/overhead.py for progan and stylegan train what the scripts train: from the same
seed, the script's own loop and its bare loop leave bit-identical G, D, EMA of G (with stylegan's w̄), Adam
states and schedule, so the benchmark compares the scripts' plumbing and nothing else.

Each case runs 9 steps of the dry-run configuration (4 → 16 px, phases of 8 stable and 16 fading images) with
flags that reach every part of the schedule: the level of detail re-evaluated every 2 minibatches, a
minibatch of 4 and a learning rate of 2e-3 at 8 px, mirrored reals. The steps: 4 px stable (minibatch 8),
8 px fading in (α 0.5, Adam reset), 8 px stable (reset), 16 px fading in (reset). stylegan mixes styles with
the dry run's p 0.9 and has a short EMA half-life (10 images), so that its EMA moves visibly."""
import sys
from functools import partial

import pytest
import torch

import progan
import stylegan
from tests import helpers, wiring
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

STEPS = 9
SCHEDULE = ["--minibatch-repeats", "2", "--batch-schedule", "8:4", "--lr-schedule", "8:0.002", "--flip"]
CASES = {"progan": (progan, SCHEDULE), "stylegan": (stylegan, [*SCHEDULE, "--ema-kimg", "0.01"])}


def watch(m, script):
    """Record, while `m` (a monkeypatch context) lasts, every Adam built and each forward pass of the G and D
    that script.build returns (not of G's EMA copy, which shares G's hook): a list of "G"/"D" in call order."""
    built, passes = wiring.record_optimizers(m), []
    original = script.build

    def build(args, shape):
        nets = original(args, shape)
        for name, net in zip("GD", nets):
            net.register_forward_hook(partial(on_forward, id(net), name))   # an id: deepcopy keeps it
        return nets

    def on_forward(net_id, name, module, *_):
        if id(module) == net_id:
            passes.append(name)
    m.setattr(script, "build", build)
    return built, passes


@pytest.mark.parametrize("case", CASES)
def test_bare_loop_trains_the_same_weights_as_the_script(case, tmp_path, monkeypatch):
    script, extra = CASES[case]
    run = wiring.script_and_bare_loop(script, tmp_path, monkeypatch, STEPS, extra, lambda m: watch(m, script))
    (built, passes), (built_bare, passes_bare), kept, ckpt = run.seen, run.seen_bare, run.kept, run.ckpt
    schedule = ckpt["schedule"]
    assert (schedule["resolution"], schedule["alpha"], schedule["nimg"]) == (16, 0.5, 48), schedule
    # G's and D's Adam before the loop, then afresh at 4 px, the fade-in to 8 px, 8 px and the fade-in to 16 px
    assert len(built) == 10 and len(built_bare) == 8
    assert len(passes) >= 5 * STEPS
    assert passes_bare == passes   # the same passes of G and D in the same order: none extra, none missing
    for name in ("G", "D", "Gs"):
        helpers.assert_same(kept[name].state_dict(), ckpt["models"][name], name)
    for name in ("G", "D"):
        helpers.assert_same(kept[f"opt_{name}"].state_dict(), ckpt["optimizers"][name], f"optimizer of {name}")
    helpers.assert_same(kept["schedule"], {k: schedule[k] for k in ("nimg", "lod", "prev_lod")}, "schedule")

    # the weights compared are trained ones: G and D moved, and G's EMA is neither G's start nor G
    G, D, Gs = kept["G"], kept["D"], kept["Gs"]
    g0, d0 = (b.initial for b in built_bare[:2])
    assert built_bare[0].owns(G) and built_bare[1].owns(D)
    assert any(not torch.equal(p, p0) for p, p0 in zip(G.parameters(), g0))
    assert any(not torch.equal(p, p0) for p, p0 in zip(D.parameters(), d0))
    assert any(not torch.equal(a, p0) for a, p0 in zip(Gs.parameters(), g0))
    assert any(not torch.equal(a, p) for a, p in zip(Gs.parameters(), G.parameters()))
