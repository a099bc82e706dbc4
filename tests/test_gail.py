import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call
import torch.nn.functional as F
from torch.distributions import kl_divergence
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import gail
from common import checkpoint as ckpt_io
from tests import helpers, wiring


# ---------------------------------------------------------------------------------------------
# TRPO's pieces
# ---------------------------------------------------------------------------------------------

def test_conjugate_gradient_solves_an_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = gail.conjugate_gradient(lambda v: A @ v, b, iters=6, tol=0)   # exact in n steps for n x n
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
    x3 = gail.conjugate_gradient(lambda v: A @ v, b, iters=3, tol=0)
    assert not torch.allclose(x3, torch.linalg.solve(A, b), atol=1e-3)   # fewer steps: not yet there


@pytest.mark.parametrize("discrete", [True, False])
def test_fisher_vector_product_is_the_hessian_of_the_mean_kl(discrete):
    torch.manual_seed(0)
    policy = gail.Policy(3, 2, discrete, width=4)
    for p in policy.parameters():   # non-zero output layer, so the Fisher is not degenerate
        torch.nn.init.normal_(p, std=0.5)
    obs = torch.randn(7, 3)
    with torch.no_grad():
        old = policy.params(obs)
    names = [n for n, _ in policy.named_parameters()]
    shapes = [p.shape for p in policy.parameters()]
    theta0 = parameters_to_vector(policy.parameters()).detach()

    def kl_of(theta):   # mean KL(π_old ‖ π_θ) as a function of the flat parameters
        chunks, i = {}, 0
        for n, s in zip(names, shapes):
            chunks[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        p = functional_call(policy.net, {k[4:]: v for k, v in chunks.items() if k.startswith("net.")}, (policy.norm(obs),))
        if not discrete:
            p = torch.cat([p, chunks["log_std"].expand_as(p)], -1)
        return torch.distributions.kl_divergence(policy.distribution(old), policy.distribution(p)).mean()

    H = torch.autograd.functional.hessian(kl_of, theta0)
    v = torch.randn_like(theta0)
    kl = torch.distributions.kl_divergence(policy.distribution(old), policy.distribution(policy.params(obs))).mean()
    fvp = gail.fisher_vector_product(kl, list(policy.parameters()), damping=0.0)
    assert torch.allclose(fvp(v), H @ v, atol=1e-5, rtol=1e-4)
    assert torch.allclose(gail.fisher_vector_product(kl, list(policy.parameters()), 0.1)(v), H @ v + 0.1 * v, atol=1e-5)
    assert (H @ v).abs().max() > 1e-3


def test_line_search_rejects_steps_whose_kl_exceeds_the_bound():
    """A KL that is quadratic at θ0 (Hessian 2I, what conjugate gradient sees) but grows faster further out:
    the full step, scaled so that the quadratic model's KL is the bound, has a true KL of 0.0125 > 0.01
    (|s|² = 0.01, 50 Σ s⁴ = 0.0025); the search must reject it and take the half step (KL 0.00266)."""
    theta = torch.nn.Parameter(torch.zeros(3))
    g = torch.tensor([1.0, 2.0, -1.0])
    kl = lambda: (theta.pow(2) + 50 * theta.pow(4)).sum()   # noqa: E731
    info = gail.trust_region_step([theta], lambda: g @ theta, kl, max_kl=0.01, damping=0.0)
    full = 0.1 * g / g.norm()                                # natural gradient g/2, scaled to |s|² = max_kl
    assert math.isclose(float((full.pow(2) + 50 * full.pow(4)).sum()), 0.0125, rel_tol=1e-5)
    assert info["accepted"] and info["backtracks"] == 1
    assert torch.allclose(theta.detach(), full / 2, atol=1e-6) and math.isclose(info["kl"], 0.00265625, rel_tol=1e-4)
    # A KL with a kink at θ0 (invisible to the Fisher-vector products): every halving of the step still has
    # KL > 0.01, so no step is taken, although each one raises the surrogate.
    theta2 = torch.nn.Parameter(torch.zeros(3))
    info = gail.trust_region_step([theta2], lambda: g @ theta2, lambda: theta2.pow(2).sum() + 1e3 * theta2.abs().sum(),
                                  max_kl=0.01, damping=0.0)
    assert not info["accepted"] and torch.equal(theta2.detach(), torch.zeros(3))
    # A surrogate that falls off a cliff beyond the tiniest step: no step is accepted, θ is unchanged.
    theta3 = torch.nn.Parameter(torch.zeros(3))
    surrogate = lambda: g @ theta3 - 1e9 * theta3.pow(2).sum()   # noqa: E731
    info = gail.trust_region_step([theta3], surrogate, lambda: theta3.pow(2).sum(), max_kl=0.01, damping=0.0)
    assert not info["accepted"] and torch.equal(theta3.detach(), torch.zeros(3))


def test_policy_step_improves_the_surrogate_within_the_kl_bound():
    torch.manual_seed(1)
    policy = gail.Policy(4, 3, True, width=8)
    obs, actions, adv = torch.randn(200, 4), torch.randint(3, (200,)), torch.randn(200)
    with torch.no_grad():
        old = policy.params(obs)
    info = gail.policy_step(policy, obs, actions, adv, max_kl=0.01, damping=0.1)
    with torch.no_grad():
        kl = torch.distributions.kl_divergence(policy.distribution(old), policy.distribution(policy.params(obs))).mean()
        ratio = torch.exp(policy.log_prob(obs, actions) - policy.distribution(old).log_prob(actions))
    assert info["accepted"] and 0 < float(kl) <= 0.01
    assert float((ratio * adv).mean()) > float(adv.mean()) and math.isclose(info["kl"], float(kl), rel_tol=1e-4)


def test_gae_by_hand_terminal_and_truncated():
    r, v = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 1.5])
    # terminal: V after the end is 0. δ = (1.4, 2.35, 1.5); Â_t = δ_t + 0.72 Â_{t+1}
    adv, ret = gail.gae(r, v, 0.0, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([3.8696, 3.43, 1.5]), atol=1e-5)
    assert torch.allclose(ret, torch.tensor([5.23, 4.7, 3.0]), atol=1e-5)
    # truncated by the time limit: bootstrapped with V(s_3) = 2. δ_2 = 3 + 0.9·2 − 1.5 = 3.3
    adv, ret = gail.gae(r, v, 2.0, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([4.80272, 4.726, 3.3]), atol=1e-5)
    assert torch.allclose(ret, torch.tensor([6.688, 6.32, 4.8]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# D, the reward, BC
# ---------------------------------------------------------------------------------------------

def test_discriminator_loss_labels_policy_1_expert_0():
    lp, le = torch.tensor([0.0, math.log(3)]), torch.tensor([-math.log(3)])   # D = 0.5, 0.75 | 0.25
    want = -(math.log(0.5) + math.log(0.75)) / 2 - math.log(0.75)            # −E_π log D − E_E log(1 − D)
    assert math.isclose(float(gail.discriminator_loss(lp, le, 0.0)), want, rel_tol=1e-6)
    assert float(gail.discriminator_loss(lp, le, 0.0)) < float(gail.discriminator_loss(le, lp, 0.0))
    # the entropy bonus: − w (mean H(D_policy) + mean H(D_expert)), H(0.5) = ln 2
    h = lambda p: -p * math.log(p) - (1 - p) * math.log(1 - p)   # noqa: E731
    bonus = (h(0.5) + h(0.75)) / 2 + h(0.25)
    assert math.isclose(float(gail.discriminator_loss(lp, le, 0.1)), want - 0.1 * bonus, rel_tol=1e-6)


def test_a_d_step_raises_d_on_policy_pairs_and_lowers_it_on_expert_pairs():
    torch.manual_seed(0)
    D = gail.Discriminator(3, 2, True, width=8)
    obs_p, obs_e = torch.randn(64, 3) + 1, torch.randn(64, 3) - 1
    a_p, a_e = torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)
    opt = torch.optim.Adam(D.parameters(), lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        gail.discriminator_loss(D(obs_p, a_p), D(obs_e, a_e)).backward()
        opt.step()
    assert D(obs_p, a_p).mean() > 0 > D(obs_e, a_e).mean()   # D = P(policy) > 1/2 on the policy's pairs


def test_policy_reward_is_minus_log_d_or_log_one_minus_d():
    logits = torch.tensor([0.0, math.log(3), -math.log(3)])   # D = 0.5, 0.75, 0.25
    d = torch.tensor([0.5, 0.75, 0.25])
    assert torch.allclose(gail.policy_reward(logits), -torch.log(d), atol=1e-6)
    assert torch.allclose(gail.policy_reward(logits, "log(1-D)"), torch.log(1 - d), atol=1e-6)
    assert (gail.policy_reward(logits) > 0).all() and (gail.policy_reward(logits, "log(1-D)") < 0).all()
    with pytest.raises(ValueError):
        gail.policy_reward(logits, "D")


def test_bc_lowers_the_nll_of_expert_actions():
    torch.manual_seed(0)
    policy = gail.Policy(4, 2, True, width=16)
    obs = torch.randn(128, 4)
    actions = (obs[:, 0] > 0).long()
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    before = float(gail.bc_loss(policy, obs, actions).detach())
    for _ in range(50):
        opt.zero_grad()
        gail.bc_loss(policy, obs, actions).backward()
        opt.step()
    assert math.isclose(before, math.log(2), rel_tol=1e-5)   # zero output layer: uniform at start
    assert float(gail.bc_loss(policy, obs, actions).detach()) < 0.5 * before


def test_running_norm_matches_the_statistics_of_everything_seen():
    norm = gail.RunningNorm(2)
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    assert torch.allclose(norm(x), x)                    # identity (up to the 1e-6) before the first update
    a, b = torch.randn(10, 2) * 3 + 1, torch.randn(30, 2)
    norm.update(a)
    norm.update(b)
    both = torch.cat([a, b]).double()
    assert torch.allclose(norm.mean, both.mean(0)) and torch.allclose(norm.std(), both.std(0, unbiased=False))


# ---------------------------------------------------------------------------------------------
# Expert files
# ---------------------------------------------------------------------------------------------

def fake_batch(lengths, obs_dim=4, discrete=True):
    n = sum(lengths)
    return {"obs": torch.arange(n * obs_dim, dtype=torch.float32).view(n, obs_dim),
            "actions": torch.arange(n) % 2 if discrete else torch.randn(n, 1),
            "rewards": torch.ones(n), "lengths": lengths, "returns": torch.tensor([float(l) for l in lengths])}


def test_expert_npz_round_trip_and_subsampling(tmp_path):
    import gymnasium
    env = gymnasium.make("CartPole-v1")
    batch = fake_batch([5, 3, 7])
    gail.save_expert(tmp_path / "e.npz", "CartPole-v1", batch, 12.5)
    data = gail.load_expert(tmp_path / "e.npz", "CartPole-v1", env)
    assert data["obs"].shape == (3, 7, 4) and data["actions"].shape == (3, 7) and data["actions"].dtype == np.int64
    assert data["lengths"].tolist() == [5, 3, 7] and float(data["random_return"]) == 12.5
    obs, act = gail.expert_pairs(data, 3, every=1)
    assert torch.equal(obs, batch["obs"]) and torch.equal(act, batch["actions"])
    obs, act = gail.expert_pairs(data, 2, every=2)      # first 2 trajectories, every 2nd pair from an offset
    assert len(obs) in (3, 4, 5) and all(any(torch.equal(o, b) for b in batch["obs"][:8]) for o in obs)


def test_scaled_return_only_where_the_expert_beats_a_random_policy():
    """Fig. 1's scale (random policy 0, expert 1), and none when both returns are equal (a short Acrobot
    expert that never reaches the goal): a NaN there would stop the run at its final evaluation."""
    import gymnasium
    env = gymnasium.make("CartPole-v1")
    act = lambda o: torch.tensor(0)   # noqa: E731
    ev = gail.evaluate(env, act, 2, 0, expert={"expert_return": 30.0, "random_return": 10.0})
    assert ev["scaled_return"] == (ev["return"] - 10) / 20 and ev["return"] > 0
    same = gail.evaluate(env, act, 2, 0, expert={"expert_return": 20.0, "random_return": 20.0})
    assert "scaled_return" not in same and same["return"] == ev["return"]


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    """A dry-run expert (TRPO on the true reward) and its saved trajectories."""
    out = tmp_path_factory.mktemp("expert") / "run"
    summary = gail.main(["--dry-run", "--mode", "expert", "--out", str(out)])
    assert summary["mode"] == "expert" and (out / "expert.npz").is_file()
    return out / "expert.npz"


def run_dir_ok(out, summary):
    """A finished run: args, checkpoint, summary and TensorBoard events, finite logged values."""
    for name in ("args.json", "ckpt.pt", "summary.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert json.loads((out / "summary.json").read_text())["step"] == summary["step"] > 0
    assert all(math.isfinite(v) for v in summary["losses"].values()), summary["losses"]
    return ckpt_io.load(out / "ckpt.pt", gail.SCRIPT)


def test_expert_dry_run_saves_policy_and_trajectories(expert_file):
    state = ckpt_io.load(expert_file.parent / "ckpt.pt", gail.SCRIPT)
    assert {"policy", "value", "D"} <= set(state["models"]) and state["step"] == 4
    with np.load(expert_file) as f:
        assert str(f["env"]) == "CartPole-v1" and f["obs"].shape[0] == 3 and f["returns"].shape == (3,)
        assert np.allclose(f["rewards"].sum(1), f["returns"])


def test_gail_dry_run(tmp_path, expert_file):
    out = tmp_path / "dry"
    summary = gail.main(["--dry-run", "--out", str(out), "--expert", str(expert_file)])
    state = run_dir_ok(out, summary)
    assert {"loss/D", "D/accuracy_expert", "trpo/kl", "return/true", "episode/cart_x"} <= set(summary["losses"])
    assert {"metric/return", "metric/scaled_return", "metric/cart_x", "metric/expert_cart_x"} <= set(summary["metrics"])
    assert state["optimizers"].keys() == {"D"}


def test_bc_dry_run(tmp_path, expert_file):
    out = tmp_path / "dry"
    summary = gail.main(["--dry-run", "--mode", "bc", "--out", str(out), "--expert", str(expert_file)])
    state = run_dir_ok(out, summary)
    assert "loss/bc" in summary["losses"] and "metric/return" in summary["metrics"] and "best" in state["models"]


def test_without_expert_one_is_trained_first_inside_the_run(tmp_path, capsys):
    out = tmp_path / "dry"
    summary = gail.main(["--dry-run", "--out", str(out)])
    run_dir_ok(out, summary)
    assert (out / "expert" / "expert.npz").is_file() and list((out / "expert").glob("events.out.tfevents.*"))
    said = capsys.readouterr().out
    assert "training one first" in said and f"--expert {out / 'expert' / 'expert.npz'}" in said
    # the expert's start-up and progress lines come first, then GAIL's own start-up line
    assert said.index("training one first") < said.index(f"gail: {out / 'expert'} |") < said.index("step 1/4") \
        < said.index(f"gail: {out} |")


def test_resume_is_exact(tmp_path, monkeypatch, expert_file):
    helpers.assert_resume_exact(gail, tmp_path, monkeypatch, ["--expert", str(expert_file)], n=2,
                                state_keys=("models", "optimizers"))


def test_sample_evaluates_the_policy(tmp_path, expert_file):
    result = gail.main(["--sample", str(expert_file.parent / "ckpt.pt"), "--out", str(tmp_path / "s"),
                        "--eval-episodes", "2"])
    saved = json.loads((tmp_path / "s" / "evaluation.json").read_text())
    assert saved["episodes"] == 2 and saved["return"] == result["return"] > 0 and len(saved["obs_mean"]) == 4


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        gail.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--env", "--mode", "--expert", "--num-trajs", "--steps", "--resume", "--sample", "--dry-run",
                 "--cuda", "--max-kl", "--gae-lambda", "--d-lr", "--entropy-lambda", "--expert-hold-x"):
        assert flag in text, flag
    for image_flag in ("--dataset", "--image-size", "--metrics", "--inception-weights", "--workers", "--amp"):
        assert image_flag not in text, image_flag
    assert "default: None" not in text and text.count("MuJoCo) (default") == 0
    assert "(default: 10 CartPole and Pendulum, 5 Acrobot and MountainCar, 20 MuJoCo)" in text


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, expert_file):
    out = tmp_path / "never"
    base = ["--dry-run", "--out", str(out), "--data-root", str(tmp_path / "data")]
    err = helpers.expect_usage_error(gail, [*base, "--env", "CartPole-v9"], capsys, "unknown environment")
    assert "Acrobot-v1" in err
    other = tmp_path / "other.npz"
    with np.load(expert_file) as f:
        np.savez(other, **{**{k: f[k] for k in f.files}, "env": np.array("Acrobot-v1")})
    helpers.expect_usage_error(gail, [*base, "--expert", str(other)], capsys, "not CartPole-v1")
    bad = tmp_path / "bad.npz"
    with np.load(expert_file) as f:
        np.savez(bad, **{**{k: f[k] for k in f.files}, "obs": f["obs"][..., :3]})
    helpers.expect_usage_error(gail, [*base, "--expert", str(bad)], capsys, "expected obs")
    helpers.expect_usage_error(gail, [*base, "--expert", str(expert_file), "--num-trajs", "9"], capsys, "holds 3")
    # files that are no expert archive: one line saying what --expert takes
    with np.load(expert_file) as f:
        np.save(tmp_path / "obs.npy", f["obs"])
    ckpt = (expert_file.parent / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(ckpt[:len(ckpt) // 2])
    (tmp_path / "text.npz").write_text("not an archive")
    whole = expert_file.read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
    for name in ("obs.npy", "cut.pt", "text.npz", "cut.npz"):
        helpers.expect_usage_error(gail, [*base, "--expert", str(tmp_path / name)], capsys,
                                   "--expert takes the expert.npz that --mode expert writes")
    helpers.expect_usage_error(gail, [*base, "--expert", str(expert_file.parent / "ckpt.pt")], capsys,
                               "lacks actions, env, lengths, obs, returns")
    helpers.expect_usage_error(gail, [*base, "--d-steps", "0"], capsys, "--d-steps must be >= 1")
    helpers.expect_usage_error(gail, [*base, "--max-kl", "0"], capsys, "--max-kl")
    helpers.expect_usage_error(gail, [*base, "--gamma", "1.5"], capsys, "--gamma must be in (0, 1], got 1.5")
    helpers.expect_usage_error(gail, [*base, "--gae-lambda", "-0.1"], capsys, "--gae-lambda must be in [0, 1]")
    helpers.expect_usage_error(gail, [*base, "--expert", str(tmp_path / "none.npz")], capsys, "does not exist")
    long = tmp_path / "long.npz"   # a length beyond the padded T
    with np.load(expert_file) as f:
        np.savez(long, **{**{k: f[k] for k in f.files}, "lengths": f["lengths"] + f["obs"].shape[1]})
    helpers.expect_usage_error(gail, [*base, "--expert", str(long)], capsys, "lengths (N,) in [1, T]")
    helpers.expect_usage_error(gail, [*base, "--bc-lr", "0.1"], capsys, "--bc-lr cannot act with --mode gail")
    helpers.expect_usage_error(gail, [*base, "--mode", "bc", "--expert", str(expert_file), "--steps", "9"], capsys,
                               "--steps cannot act")
    helpers.expect_usage_error(gail, [*base, "--expert", str(expert_file), "--expert-hold-x", "1"], capsys,
                               "--expert-hold-x cannot act")
    helpers.expect_usage_error(gail, [*base, "--env", "Acrobot-v1", "--expert-hold-x", "1"], capsys, "CartPole")
    assert not out.exists() and not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------
# The training loop's wiring: one iteration of train(), recorded from outside
# ---------------------------------------------------------------------------------------------

def one_pair_expert(path, obs=(0.5, -0.2, 0.03, 0.1), action=1, length=40):
    """An expert file whose every pair is the same (s, a): whatever D's minibatch draws from it is known."""
    o = np.tile(np.array(obs, np.float32), (1, length, 1))
    np.savez(path, env=np.array("CartPole-v1"), obs=o, actions=np.full((1, length), action, np.int64),
             rewards=np.ones((1, length), np.float32), lengths=np.array([length]), returns=np.array([length], np.float32),
             random_return=np.float32(20))
    return path


def spy(monkeypatch, name, before=None, after=None):
    """Record gail.<name>'s calls: args, result, what before(*args) saw ahead of the call and what
    after(result, *args) saw right after it (e.g. copies of networks that training changes in place later)."""
    calls, original = [], getattr(gail, name)

    def wrapper(*args, **kwargs):
        seen = before(*args) if before else None
        result = original(*args, **kwargs)
        calls.append({"args": args, "kwargs": kwargs, "result": result, "before": seen,
                      "after": after(result, *args) if after else None})
        return result
    monkeypatch.setattr(gail, name, wrapper)
    return calls


def gail_iteration(tmp_path, monkeypatch, *extra, expert=None):
    """One GAIL iteration on the one-pair expert, with D's optimizer, the nets, the policy batch, D's step and
    TRPO's inputs recorded."""
    expert = expert or one_pair_expert(tmp_path / "expert.npz")
    built = wiring.record_optimizers(monkeypatch)
    nets = spy(monkeypatch, "build", after=lambda nets, *args: [copy.deepcopy(m) for m in nets])
    rollouts = wiring.record_calls(monkeypatch, gail, "rollout")
    d_losses = wiring.record_calls(monkeypatch, gail, "discriminator_loss")
    snap = lambda policy, obs, *rest: policy.params(obs).detach()   # noqa: E731
    trpo = spy(monkeypatch, "policy_step", before=snap, after=lambda info, *args: snap(*args))
    vfit = spy(monkeypatch, "value_step", before=lambda value, *rest: wiring.snapshot(value))
    summary = wiring.train_steps(gail, tmp_path, 1, "--expert", str(expert), *extra)
    policy, value, D = nets[0]["result"]
    batch = rollouts[0][2]   # the iteration's policy batch (evaluation comes after)
    return {"built": built, "policy": policy, "value": value, "D": D, "D0": nets[0]["after"][2], "batch": batch,
            "d_losses": d_losses,
            "trpo": trpo[0], "vfit": vfit[0], "summary": summary}


def test_loop_d_step_labels_policy_pairs_1_expert_pairs_0_with_its_adam(tmp_path, monkeypatch):
    """D's first Adam step moves each parameter by −lr·sign(∂loss/∂θ) of the docstring's loss, the policy's
    pairs labelled 1 and the expert's 0. D's zero output layer is the only one with a gradient at step 1:
    its row for action a gets a gradient only from pairs with action a."""
    run = gail_iteration(tmp_path, monkeypatch)
    (opt,) = [b for b in run["built"] if b.owns(run["D"])]
    assert opt.type == "Adam" and opt.setting("lr") == 0.01 and opt.setting("betas") == (0.9, 0.999)
    D, batch = run["D"], run["batch"]
    n = len(batch["obs"])
    e_obs, e_act = torch.tensor([[0.5, -0.2, 0.03, 0.1]]).expand(n, 4), torch.ones(n, dtype=torch.long)
    start = copy.deepcopy(D)   # D's normaliser as it was for the step (updated before it), its weights as built
    vector_to_parameters(parameters_to_vector(run["D0"].parameters()), start.parameters())
    loss_p = F.binary_cross_entropy_with_logits(start(batch["obs"], batch["actions"]), torch.ones(n))
    loss_e = F.binary_cross_entropy_with_logits(start(e_obs, e_act), torch.zeros(n))
    grads = torch.autograd.grad(loss_p + loss_e, list(start.parameters()))   # the entropy's gradient is 0 at logit 0
    out_w, out_b = D.net[-1].weight, D.net[-1].bias
    for p, p0, g in ((out_w, run["D0"].net[-1].weight, grads[-2]), (out_b, run["D0"].net[-1].bias, grads[-1])):
        assert g.abs().min() > 1e-4
        assert torch.allclose(p.detach() - p0.detach(), wiring.adam_first_update(0.01, g), atol=1e-7)
    # action 0 appears only among the policy's pairs: label 1 raises its score on them
    assert (batch["actions"] == 0).any() and out_b[0] > 0


def test_loop_d_loss_carries_the_entropy_bonus_with_its_weight(tmp_path, monkeypatch):
    """At D's zero start every logit is 0: loss = 2 ln 2 − w (H(½) + H(½)) = (2 − 2w) ln 2."""
    run = gail_iteration(tmp_path, monkeypatch, "--d-entropy", "0.25")
    assert math.isclose(run["summary"]["losses"]["loss/D"], (2 - 2 * 0.25) * math.log(2), rel_tol=1e-5)
    assert run["d_losses"][0][0][2] == 0.25


def hand_advantages(rewards, lengths, gamma, lam):
    """GAE with V = 0 everywhere (the value net's zero output layer at iteration 1), standardised."""
    advs, s = [], 0
    for n in lengths:
        a, out = 0.0, []
        for t in reversed(range(n)):
            a = float(rewards[s + t]) + gamma * lam * a
            out.append(a)
        advs += out[::-1]
        s += n
    adv = torch.tensor(advs)
    return (adv - adv.mean()) / (adv.std() + 1e-8)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_loop_feeds_trpo_minus_log_d_of_the_new_d_plus_the_entropy_bonus(tmp_path, monkeypatch, lam):
    """TRPO's advantages are GAE(γ, λ) of r = −log D(s, a) under D after its step (Algorithm 1), plus
    λ_H·(−log π(a|s)) with π before its step (Eq. 16), standardised."""
    run = gail_iteration(tmp_path, monkeypatch, "--entropy-lambda", str(lam), "--gamma", "0.9", "--gae-lambda", "0.8")
    policy, obs, actions, adv = run["trpo"]["args"][:4]
    batch = run["batch"]
    assert torch.equal(obs, batch["obs"]) and torch.equal(actions, batch["actions"])
    with torch.no_grad():
        d = torch.sigmoid(run["D"](obs, actions))
        old = torch.distributions.Categorical(logits=run["trpo"]["before"])
        rewards = -torch.log(d) - lam * old.log_prob(actions)
    assert d.std() > 1e-4   # D's step made the reward depend on the pair
    want = hand_advantages(rewards, batch["lengths"], 0.9, 0.8)
    assert torch.allclose(adv, want, atol=1e-4), (adv[:5], want[:5])


def test_loop_trpo_step_stays_within_the_kl_bound_it_is_given(tmp_path, monkeypatch):
    """Measured from the policy before and after the loop's step, on the batch: 0 < KL(π_old ‖ π_new) ≤
    --max-kl, for the default bound and a tighter one (a bound lost on its way to TRPO fails one of them)."""
    for max_kl in (None, 0.002):
        extra = ["--max-kl", str(max_kl)] if max_kl else []
        (tmp_path / str(max_kl)).mkdir()
        with monkeypatch.context() as m:
            run = gail_iteration(tmp_path / str(max_kl), m, *extra)
        policy, obs = run["trpo"]["args"][:2]
        with torch.no_grad():
            kl = kl_divergence(torch.distributions.Categorical(logits=run["trpo"]["before"]),
                               torch.distributions.Categorical(logits=run["trpo"]["after"])).mean()
        bound = max_kl or 0.01
        assert 0.2 * bound < float(kl) <= bound * (1 + 1e-5), (float(kl), bound)
        assert math.isclose(run["trpo"]["result"]["kl"], float(kl), rel_tol=1e-4)


def test_loop_fits_the_value_net_to_the_discounted_returns_within_its_trust_region(tmp_path, monkeypatch):
    run = gail_iteration(tmp_path, monkeypatch, "--gamma", "0.9", "--vf-max-kl", "1e-4")
    value, obs, returns = run["vfit"]["args"][:3]
    batch, before = run["batch"], run["vfit"]["before"]
    with torch.no_grad():
        rewards = -torch.log(torch.sigmoid(run["D"](obs, batch["actions"])))
    want, s = [], 0
    for n, ended in zip(batch["lengths"], batch["terminated"]):
        g, out = 0.0, []
        assert ended   # the dry run's short episodes fall: nothing to bootstrap
        for t in reversed(range(n)):
            g = float(rewards[s + t]) + 0.9 * g
            out.append(g)
        want += out[::-1]
        s += n
    assert torch.allclose(returns, torch.tensor(want), atol=1e-4)
    with torch.no_grad():
        target = value.target_norm(returns[:, None])[:, 0]
        raw_after = value.raw(obs)
        start = copy.deepcopy(value)   # the normalisers as the fit used them, the weights from before it
        start.load_state_dict({**value.state_dict(), **{k: v for k, v in before.items() if k.startswith("net.")}})
        raw_start = start.raw(obs)
    assert (raw_after - target).pow(2).mean() < (raw_start - target).pow(2).mean()   # the fit moved towards R
    change = float((raw_after - raw_start).pow(2).mean())   # a tight --vf-max-kl: the step reaches the bound
    assert 0.2e-4 < change <= 1e-4 * (1 + 1e-5), change


def test_loop_bc_minimises_the_nll_of_training_pairs_with_adam(tmp_path, monkeypatch, expert_file):
    built = wiring.record_optimizers(monkeypatch)
    losses = wiring.record_calls(monkeypatch, gail, "bc_loss")
    pairs = wiring.record_calls(monkeypatch, gail, "expert_pairs")
    summary = gail.main(["--dry-run", "--mode", "bc", "--expert", str(expert_file), "--bc-steps", "1",
                         "--bc-batch-size", "16", "--out", str(tmp_path / "bc")])
    (opt,) = list(built)
    assert opt.type == "Adam" and opt.setting("lr") == 1e-3 and opt.setting("betas") == (0.9, 0.999)
    policy, obs, actions = losses[0][0]
    all_obs = pairs[0][2][0]
    n_train = int(0.7 * len(all_obs))
    perm = torch.randperm(len(all_obs), generator=torch.Generator().manual_seed(0))
    train_rows, valid_rows = all_obs[perm[:n_train]], all_obs[perm[n_train:]]
    assert len(obs) == 16 and all((train_rows == o).all(1).any() for o in obs)
    _, v_obs, _ = losses[1][0]   # the validation loss at update 1: the other 30%
    assert len(v_obs) == len(valid_rows) and torch.equal(v_obs, valid_rows)
    # step 1 moves only the zero-initialised output layer (no gradient reaches the hidden ones through it)
    start = copy.deepcopy(policy)
    for p in start.net[-1].parameters():
        torch.nn.init.zeros_(p)
    nll = -start.log_prob(obs, actions).mean()
    g_w, g_b = torch.autograd.grad(nll, [start.net[-1].weight, start.net[-1].bias])
    assert torch.allclose(policy.net[-1].bias.detach(), wiring.adam_first_update(1e-3, g_b), atol=1e-8)
    assert torch.allclose(policy.net[-1].weight.detach(), wiring.adam_first_update(1e-3, g_w), atol=1e-8)
    assert summary["best_step"] == 1


def test_expert_mode_adds_the_habit_bonus_to_the_true_reward(tmp_path, monkeypatch):
    """--expert-hold-x X: TRPO's reward is CartPole's 1 per step plus exp(−((x − X)/0.5)²)."""
    rollouts = wiring.record_calls(monkeypatch, gail, "rollout")
    trpo = spy(monkeypatch, "policy_step")
    wiring.train_steps(gail, tmp_path, 1, "--mode", "expert", "--expert-hold-x", "0.05")
    batch = rollouts[1][2]   # the first is the extra batch that starts the normalisers
    adv = trpo[0]["args"][3]
    want_r = batch["rewards"] + torch.exp(-((batch["obs"][:, 0] - 0.05) / 0.5) ** 2)
    assert torch.equal(batch["rewards"], torch.ones_like(batch["rewards"]))
    assert torch.allclose(adv, hand_advantages(want_r, batch["lengths"], 0.995, 0.97), atol=1e-4)
    assert not torch.allclose(adv, hand_advantages(batch["rewards"], batch["lengths"], 0.995, 0.97), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The paper's claim at CPU scale (slow)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gail_copies_a_cartpole_experts_habit_not_only_its_survival(tmp_path):
    """Imitation beyond survival: an expert trained to keep the cart near x = 1 (--expert-hold-x); GAIL from
    4 of its trajectories, with 5 D steps per iteration (gail.py's "Measured here": with the paper's one step
    the cart's position oscillates around the expert's), must keep the pole up (return >= 450 of 500) and the
    cart where the expert keeps it.
    Surviving alone proves little on CartPole (an untrained D already pays −log ½ > 0 per step, and TRPO on
    the true reward keeps the cart near x = 0); the cart's position is what only the demonstrations say."""
    expert = tmp_path / "expert"
    common = ["--threads", "1", "--eval-episodes", "10", "--log-every", "50"]
    shown = gail.main(["--mode", "expert", "--expert-hold-x", "1", "--steps", "60", "--out", str(expert),
                       *common])["metrics"]
    assert shown["metric/return"] >= 450 and shown["metric/cart_x"] > 0.6, shown   # the expert has its habit
    summary = gail.main(["--expert", str(expert / "expert.npz"), "--num-trajs", "4", "--d-steps", "5", "--steps", "100",
                         "--out", str(tmp_path / "gail"), *common])
    m = summary["metrics"]
    assert m["metric/return"] >= 450, m
    assert abs(m["metric/cart_x"] - m["metric/expert_cart_x"]) < 0.35, m
