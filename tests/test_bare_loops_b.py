"""The bare loops of benchmarks/overhead.py for improved_gan, infogan, gmmn and imle train what the scripts
train: from the same seed, a few steps of the script's own loop and of its bare loop leave bit-identical
weights and buffers, so the benchmark compares the scripts' plumbing and nothing else. Each case runs the
dry-run configuration on one thread, with flags that reach the parts of the loop a step count alone would
miss (a learning-rate decay or switch, Q's own learning rate and λ, a second nearest-neighbour search, the
autoencoder stage)."""
import importlib
import sys

import pytest
import torch

import gmmn
import imle
import improved_gan
import infogan
from tests import wiring
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def script_modules(calls):
    """{name: module} from the recorded builder calls of a script (see CASES)."""
    out = {}
    for names, recorded in calls:
        ((_, _, result),) = recorded
        out.update(zip(names, result if isinstance(result, tuple) else (result,)))
    return out


# script, its builders (each: the names of what it returns), steps of the script (--steps), steps of the
# bare loop, extra flags. improved_gan's dry run has 448 training images in batches of 8: 56 steps an epoch.
CASES = {
    "improved_gan-semi-mlp": (improved_gan, {"build_generator": ("G",), "build_discriminator": ("D",),
                                             "AveragedModel": ("D_avg",)},
                              3, 3, ["--dataset", "fake:1", "--decay-epochs", str(2 / 56)]),
    "improved_gan-generate-conv": (improved_gan, {"build_generator": ("G",), "build_discriminator": ("D",),
                                                  "AveragedModel": ("D_avg",)}, 2, 2, ["--mode", "generate"]),
    "infogan": (infogan, {"build": ("G", "D")}, 3, 3, ["--q-lr", "5e-4", "--lambda-cont", "0.5"]),
    "gmmn-pixels": (gmmn, {"build": ("G", "AE")}, 3, 3, ["--switch-step", "2"]),
    # 3 x 50 autoencoder steps (a fresh SGD per phase; the fine-tuning's momentum 0, then 0.5 at its 50th
    # step; a clipping norm small enough to act), then 2 GMMN steps on the codes
    "gmmn-ae": (gmmn, {"build": ("G", "AE")}, 2, 152, ["--mode", "ae", "--ae-steps", "50", "--switch-step", "2",
                                                     "--ae-max-grad-norm", "0.01", "--log-every", "0"]),
    # 480 training images in batches of 150: 3 steps an epoch (450 images), searches at steps 1 and 7
    "imle": (imle, {"build": ("G",)}, 7, 7, ["--batch-size", "150", "--staleness", "2"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bare_loop_trains_the_same_weights_as_the_script(case, tmp_path, monkeypatch):
    script, builders, script_steps, bare_steps, extra = CASES[case]
    flags = [*extra, "--threads", "1"]
    with monkeypatch.context() as m:
        built = wiring.record_optimizers(m)
        calls = [(names, wiring.record_calls(m, script, builder)) for builder, names in builders.items()]
        wiring.train_steps(script, tmp_path, script_steps, *flags)
    trained = script_modules(calls)
    for opt in built:   # the weights compared below are trained ones, not the initial ones
        assert any(not torch.equal(p, p0) for p, p0 in zip(opt.params, opt.initial)), f"{opt} did not train"

    bare = importlib.import_module(f"bare.{script.SCRIPT}")
    args = script.parse_args(["--dry-run", "--steps", str(script_steps), *flags])
    kept = {}
    times = bare.run(args, bare_steps, keep=kept)
    assert len(times) == bare_steps
    assert set(kept) == set(trained)
    for name, module in trained.items():
        if module is None:
            assert kept[name] is None, name
            continue
        mine, theirs = kept[name].state_dict(), module.state_dict()
        assert mine.keys() == theirs.keys(), name
        differ = [k for k in theirs if not torch.equal(mine[k], theirs[k])]
        assert not differ, f"{case}: the bare loop's {name} differs from the script's in {differ}"
