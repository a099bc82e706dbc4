"""Tools for the tests that guard a script's training loop rather than its losses alone: which batch D
sees as real, which loss terms reach the gradient and with what weight, the optimizers' settings, which
parameters a step may change, the EMA decay. They run the script's own train() for a step or two and
watch it from outside:

    built = wiring.record_optimizers(monkeypatch)        # every optimizer train() builds, as built
    nets = wiring.record_calls(monkeypatch, script, "build")   # what script.build returned
    wiring.train_steps(script, tmp_path, 1)               # one step of the dry-run configuration
    opt = wiring.optimizer_for(built, nets[0][1])          # the optimizer that owns G's parameters

A wiring test should fail when the loop is mis-wired; check each one by breaking the loop in a scratch
copy (swap real and fake, drop a term, change a learning rate or a decay) and watching it fail.
"""
import copy
import importlib
import inspect
import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from common import checkpoint as ckpt_io
from common import data as datasets
from common import run as runlib

OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop)


class Built:
    """An optimizer train() built: the object, and its settings and parameters at construction."""

    def __init__(self, opt):
        self.opt = opt
        self.type = type(opt).__name__
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.initial = [p.detach().clone() for p in self.params]

    def setting(self, key):
        """A setting shared by every parameter group (lr, betas, momentum, weight_decay, ...)."""
        values = {repr(g[key]) for g in self.groups}
        assert len(values) == 1, f"{self.type} groups differ in {key}: {values}"
        return self.groups[0][key]

    def owns(self, module):
        mine = {id(p) for p in self.params}
        return all(id(p) in mine for p in module.parameters() if p.requires_grad)

    def __repr__(self):
        return f"<{self.type} of {len(self.params)} tensors, {self.groups}>"


def record_optimizers(monkeypatch):
    """Patch the torch optimizers so that every one built from now on is appended (as a Built, its
    settings read at construction) to the returned list, in the order train() builds them."""
    built, seen = [], set()
    for cls in OPTIMIZERS:
        original = cls.__init__

        def init(self, params, *args, _original=original, **kwargs):
            _original(self, params, *args, **kwargs)
            if id(self) not in seen:   # AdamW may call Adam.__init__: record once
                seen.add(id(self))
                built.append(Built(self))
        monkeypatch.setattr(cls, "__init__", init)
    return built


def record_calls(monkeypatch, owner, name):
    """Patch owner.name (a function or class of a script or module) so that each call's arguments and
    result are recorded: returns the list of (args, kwargs, result)."""
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def optimizer_for(built, module):
    """The one recorded optimizer whose parameters include all of module's trainable parameters."""
    owners = [b for b in built if b.owns(module)]
    assert len(owners) == 1, f"{len(owners)} optimizers own {type(module).__name__}'s parameters: {owners}"
    return owners[0]


def snapshot(module):
    """A copy of a module's parameters and buffers, by name."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module, before, params_only=True):
    """Names of the entries of module.state_dict() that differ from `before` (a snapshot)."""
    names = {n for n, _ in module.named_parameters()} if params_only else None
    return sorted(k for k, v in module.state_dict().items()
                  if (names is None or k in names) and not torch.equal(v, before[k]))


def train_steps(script, tmp_path, steps, *extra, name="wired"):
    """Run script.main for `steps` steps of the dry-run configuration (no samples, checkpoints or
    evaluation beyond the last step); returns the summary."""
    argv = ["--dry-run", "--steps", str(steps), "--out", str(tmp_path / name), "--log-every", "1",
            "--sample-every", "0", "--ckpt-every", "0", "--eval-every", "0", *extra]
    return script.main(argv)


def watch_builder(m, script, builder, name_nets, nets, on_forward):
    """While `m` (a monkeypatch context) lasts, script.<builder> keeps each net it builds in `nets` under the name
    name_nets(its result) gives it ({name: net}), and calls on_forward(name, module, inputs, output) on its passes."""
    original = getattr(script, builder)

    def build(*args, **kwargs):
        result = original(*args, **kwargs)
        for name, net in name_nets(result).items():
            nets[name] = net
            net.register_forward_hook(partial(on_forward, name))
        return result
    m.setattr(script, builder, build)


def script_and_bare_loop(script, tmp_path, monkeypatch, steps, flags, watch, ckpt_name="ckpt.pt"):
    """`steps` steps of the script's dry run with `flags` on one thread, then of its bare loop
    (benchmarks/bare/<script>.py, importable as bare.<script>) on the same settings, each while watch(m) records
    (m: a monkeypatch context). Returns a namespace: ckpt (the script's checkpoint), seen and seen_bare (what
    watch returned for each run), kept (what the bare loop kept), args, and the torch and Python RNG states
    right after the bare loop."""
    flags = [*flags, "--threads", "1"]
    with monkeypatch.context() as m:
        seen = watch(m)
        train_steps(script, tmp_path, steps, *flags)
    ckpt = ckpt_io.load(tmp_path / "wired" / ckpt_name, script.SCRIPT)
    bare = importlib.import_module(f"bare.{script.SCRIPT}")
    args = script.parse_args(["--dry-run", "--steps", str(steps), *flags])
    kept = {}
    with monkeypatch.context() as m:
        seen_bare = watch(m)
        times = bare.run(args, steps, keep=kept)
    rng, py_rng = torch.get_rng_state(), random.getstate()
    assert len(times) == steps
    return SimpleNamespace(ckpt=ckpt, seen=seen, seen_bare=seen_bare, kept=kept, args=args, rng=rng, py_rng=py_rng)


def adam_first_update(lr, grad, eps=1e-8):
    """The change Adam's first step makes for a gradient `grad` (any betas): −lr · g / (|g| + eps), i.e.
    −lr · sign(g) wherever |g| ≫ eps. Comparing a parameter's first change with this checks the sign of
    the gradient train() computed (which batch was real) and the learning rate together."""
    return -lr * grad / (grad.abs() + eps)


class Step:
    """One optimizer step train() took: the optimizer, its groups' settings then, every parameter's
    gradient before the step and (after `finish`) its value after it, by id(parameter)."""

    def __init__(self, opt):
        self.opt = opt
        self.settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.grads = {id(p): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                      if p.grad is not None}

    def finish(self):
        self.after = {id(p): p.detach().clone() for g in self.opt.param_groups for p in g["params"]}

    def owns(self, module):
        return all(id(p) in self.after for p in module.parameters())

    def lr_of(self, p):
        (lr,) = [s["lr"] for s, g in zip(self.settings, self.opt.param_groups) if any(q is p for q in g["params"])]
        return lr


def record_steps():
    """Start recording every optimizer step (a list of Step, in order); returns (steps, stop)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    taken = []
    handles = [register_optimizer_step_pre_hook(lambda opt, args, kwargs: taken.append(Step(opt))),
               register_optimizer_step_post_hook(lambda opt, args, kwargs: taken[-1].finish())]
    return taken, lambda: [h.remove() for h in handles]


def watch_training(script, tmp_path, steps, *flags):
    """For scripts with a G and a D built by script.build(args, shape) and stepped by Adam: run `steps` steps of the dry-run configuration and record what train() did: the real batches it
    drew (known random images), every call of G and D (input, level, α, output, and the gradient that
    reached a G output fed to D) and every optimizer step (its settings then, the gradients it applied,
    G's and D's parameters before and after). Returns the record, grouped by training step."""
    rec = SimpleNamespace(batches=[], events=[], nets=None, built=None)
    with pytest.MonkeyPatch.context() as mp:
        def iterate(data, batch_size, device, **kwargs):
            g = torch.Generator().manual_seed(1000 + batch_size)
            while True:
                x = torch.rand(batch_size, *data.shape, generator=g) * 2 - 1
                rec.batches.append(x)
                yield x.clone().to(device), torch.full((batch_size,), -1)
        mp.setattr(datasets, "iterate", iterate)

        def build(args, shape):
            G, D = original_build(args, shape)
            rec.nets = SimpleNamespace(G=G, D=D)
            for name, net in (("G", G), ("D", D)):
                net.register_forward_hook(partial(on_forward, name), with_kwargs=True)
            return G, D
        original_build = script.build
        mp.setattr(script, "build", build)

        def on_forward(name, module, args, kwargs, out):
            if module is not getattr(rec.nets, name):     # the EMA copy of G (Gs) shares the hook
                return
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            _, *rest = bound.arguments
            call = SimpleNamespace(net=name, x=args[0], out=out, grad=None, **{k: bound.arguments[k] for k in rest})
            if name == "D" and args[0].grad_fn is not None:      # a G output: keep the gradient D returns
                args[0].register_hook(lambda g: setattr(call, "grad", g.detach().clone()))
            rec.events.append(call)

        def step(opt, *args, **kwargs):
            params = [p for group in opt.param_groups for p in group["params"]]
            group = opt.param_groups[0]
            record = SimpleNamespace(net="step", opt=opt, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                     grads={id(p): p.grad.detach().clone() for p in params if p.grad is not None},
                                     before={k: snapshot(getattr(rec.nets, k)) for k in "GD"})
            result = original_step(opt, *args, **kwargs)
            record.after = {k: snapshot(getattr(rec.nets, k)) for k in "GD"}
            ids = {id(p) for p in params}
            record.owner = next((k for k in "GD" if {id(p) for p in getattr(rec.nets, k).parameters()} <= ids), "?")
            rec.events.append(record)
            return result
        original_step = torch.optim.Adam.step
        mp.setattr(torch.optim.Adam, "step", step)
        rec.built = record_optimizers(mp)
        rec.summary = train_steps(script, tmp_path, steps, *flags)
    rec.ckpt = ckpt_io.load(tmp_path / "wired" / "ckpt.pt", script.SCRIPT)
    rec.steps, current = [], SimpleNamespace(d_calls=[], g_calls=[], d_step=None, g_step=None)
    for e in rec.events:   # a training step: G and D calls, D's optimizer step, G and D calls, G's step
        if e.net == "step":
            setattr(current, f"{e.owner.lower()}_step", e)
            if e.owner == "G":
                rec.steps.append(current)
                current = SimpleNamespace(d_calls=[], g_calls=[], d_step=None, g_step=None)
        else:
            (current.g_calls if current.d_step else current.d_calls).append(e)
    return rec

# -- A loop replayed by hand: nets that record what they are fed, optimizer updates as lists, the data drawn.
# A test recomputes the docstring's losses on the recorded inputs and compares the gradients (gan.py's tests).

def watch(net):
    """Make `net` record, at every forward call, (its state dict, its inputs) in net.calls."""
    class Watched(type(net)):
        def forward(self, *inputs):
            self.calls.append(({k: v.detach().clone() for k, v in self.state_dict().items()},
                               [x.detach().clone() for x in inputs]))
            return super().forward(*inputs)
    net.__class__, net.calls = Watched, []
    return net


def replica(net, state, params=None):
    """A copy of a watched net in a recorded `state`, with `params` (in net.parameters() order) if given."""
    twin = copy.deepcopy(net, {id(net.calls): []})
    twin.load_state_dict(state)
    if params is not None:
        with torch.no_grad():
            for p, value in zip(twin.parameters(), params):
                p.copy_(value)
    return twin


def record_updates():
    """Start recording every optimizer step as a dict: the optimizer, its settings at that step, the gradients
    it stepped with (zeros where none) and its parameters before and after, as lists in the optimizer's
    parameter order. Returns (records, stop)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    record = []

    def pre(opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        record.append({"opt": opt, "settings": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                       "grads": [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params],
                       "before": [p.detach().clone() for p in params]})

    def post(opt, args, kwargs):
        record[-1]["after"] = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    return record, lambda: [h.remove() for h in hooks]


def record_batches(monkeypatch):
    """The batches train() draws from common.data.iterate, in order."""
    drawn, original = [], datasets.iterate

    def iterate(*args, **kwargs):
        for batch in original(*args, **kwargs):
            drawn.append([t.clone() for t in batch])
            yield batch
    monkeypatch.setattr(datasets, "iterate", iterate)
    return drawn


def who_steps(steps, **nets):
    """Which net each recorded step updates ("D", "G"; "GD" if one optimizer holds both)."""
    def owns(opt, net):
        mine = {id(p) for g in opt.param_groups for p in g["params"]}
        return any(id(p) in mine for p in net.parameters())
    return ["".join(name for name, net in nets.items() if owns(s["opt"], net)) for s in steps]


def setting(step, key):
    """A setting shared by every parameter group of a recorded update."""
    values = {repr(g[key]) for g in step["settings"]}
    assert len(values) == 1, values
    return step["settings"][0][key]


def grads(loss, net):
    return torch.autograd.grad(loss, list(net.parameters()))


def assert_same_gradients(recorded, expected, what):
    """The loop's gradients equal the replayed ones (to float rounding, relative to each tensor's scale)."""
    assert len(recorded) == len(expected), what
    for i, (a, b) in enumerate(zip(recorded, expected)):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * scale + 1e-12, \
            f"{what}: tensor {i} differs (max |diff| {(a - b).abs().max().item():.3g}, scale {scale:.3g})"


def assert_update(step, deltas, what):
    """The step moved its parameters by `deltas` (to float rounding of the parameters and the deltas)."""
    for i, (after, before, d) in enumerate(zip(step["after"], step["before"], deltas)):
        tol = 1e-4 * d.abs().max().item() + 4 * torch.finfo(before.dtype).eps * before.abs().max().item()
        assert (after - (before + d)).abs().max().item() <= tol, f"{what}: tensor {i} moved otherwise"


def assert_same(a, b, what):
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b), what


def assert_growing_adam(loop, schedule, applied, lr_at, new_optimizers_at, betas=(0.0, 0.99), eps=1e-8):
    """progan/stylegan: Adam(lr at the nets' resolution, betas, eps) for G and for D, built afresh at each new
    level of detail (the steps in new_optimizers_at); each recorded update is Adam's on the applied gradients,
    computed by hand. `applied(step, net)` gives {name: gradient} as the step applied it."""
    b1, b2 = betas
    for b in loop.built:
        assert (b.type, b.setting("betas"), b.setting("eps")) == ("Adam", betas, eps)
        assert len(b.params) == len(list(loop.nets.G.parameters() if b.owns(loop.nets.G) else loop.nets.D.parameters()))
    moments, first_used = {}, {}
    for k, (s, (_, r, _)) in enumerate(zip(loop.steps, schedule), 1):
        for step, name in ((s.d_step, "D"), (s.g_step, "G")):
            net = getattr(loop.nets, name)
            assert step.lr == lr_at[r] and step.betas == betas
            t, m, v = moments.get(step.opt, (0, {}, {}))
            t += 1
            first_used.setdefault(step.opt, (k, name))
            for n, g in applied(step, net).items():
                if g is None:
                    continue
                m[n] = b1 * m.get(n, 0) + (1 - b1) * g
                v[n] = b2 * v.get(n, 0) + (1 - b2) * g * g
                update = -lr_at[r] * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps)
                before = step.before[name][n]
                rounding = 1e-6 + 2.5e-7 * before.abs()                 # float32 steps on stored values up to ~100
                assert ((step.after[name][n] - before - update).abs() <= rounding).all(), (k, n)
            moments[step.opt] = (t, m, v)
    assert sorted(first_used.values()) == [(k, n) for k in new_optimizers_at for n in "DG"]


def in_loop(m):
    """While `m` (a monkeypatch context) lasts: a function that is True unless Run.end_step (a script's
    samples, evaluation and checkpoints) is running, so that hooks record only the training loop's calls."""
    inside, end_step = [], runlib.Run.end_step

    def paused_end_step(self, *args, **kwargs):
        inside.append(True)
        try:
            return end_step(self, *args, **kwargs)
        finally:
            inside.pop()
    m.setattr(runlib.Run, "end_step", paused_end_step)
    return lambda: not inside
