import json
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

import gail
from common import checkpoint as ckpt_io
from tests import helpers


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


def test_line_search_backtracks_to_the_kl_bound_and_never_lowers_the_surrogate():
    # KL is quadratic at θ0 (Hessian 2I, what CG sees) but grows faster further out: the full step
    # overshoots the bound and the search must shrink it.
    theta = torch.nn.Parameter(torch.zeros(3))
    g = torch.tensor([1.0, 2.0, -1.0])
    kl = lambda: (theta.pow(2) + 50 * theta.pow(4)).sum()   # noqa: E731
    info = gail.trust_region_step([theta], lambda: g @ theta, kl, max_kl=0.01, damping=0.0)
    assert info["accepted"] and info["backtracks"] > 0
    assert float(kl().detach()) <= 0.01 and float(g @ theta.detach()) > 0
    # A surrogate that falls off a cliff beyond the tiniest step: no step is accepted, θ is unchanged.
    theta2 = torch.nn.Parameter(torch.zeros(3))
    surrogate = lambda: g @ theta2 - 1e9 * theta2.pow(2).sum()   # noqa: E731
    info = gail.trust_region_step([theta2], surrogate, lambda: theta2.pow(2).sum(), max_kl=0.01, damping=0.0)
    assert not info["accepted"] and torch.equal(theta2.detach(), torch.zeros(3))


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


def test_expert_dry_run_saves_policy_and_trajectories(expert_file):
    state = ckpt_io.load(expert_file.parent / "ckpt.pt", gail.SCRIPT)
    assert {"policy", "value", "D"} <= set(state["models"]) and state["step"] == 4
    with np.load(expert_file) as f:
        assert str(f["env"]) == "CartPole-v1" and f["obs"].shape[0] == 3 and f["returns"].shape == (3,)
        assert np.allclose(f["rewards"].sum(1), f["returns"])
    assert list((expert_file.parent / "samples").glob("*.png"))


def test_gail_dry_run(tmp_path, expert_file):
    out, summary, state = helpers.dry_run(gail, tmp_path, "--expert", str(expert_file))
    assert {"loss/D", "D/accuracy_expert", "trpo/kl", "return/true"} <= set(summary["losses"])
    assert 0 <= summary["losses"]["trpo/kl"] <= 0.01
    assert math.isfinite(summary["metrics"]["metric/scaled_return"])
    assert state["optimizers"].keys() == {"D"} and len(state["history"]) == 4


def test_bc_dry_run(tmp_path, expert_file):
    out, summary, state = helpers.dry_run(gail, tmp_path, "--mode", "bc", "--expert", str(expert_file))
    assert "loss/bc" in summary["losses"] and "metric/return" in summary["metrics"]
    assert "best" in state["models"]


def test_default_mode_trains_the_expert_first_and_the_pipeline_resumes(tmp_path):
    out, _, _ = helpers.dry_run(gail, tmp_path)   # no --expert: a (dry) expert is trained first, inside the run
    assert (out / "expert-dry" / "expert.npz").is_file()
    argv = ["--dry-run", "--mode", "pipeline", "--num-trajs", "1", "2", "--out", str(tmp_path / "pipe")]
    results = gail.main(argv)
    assert [(x["mode"], x["num_trajs"]) for x in results["runs"]] == [("bc", 1), ("gail", 1), ("bc", 2), ("gail", 2)]
    assert json.loads((tmp_path / "pipe" / "results.json").read_text())["env"] == "CartPole-v1"
    assert (tmp_path / "pipe" / "learning_curves.png").is_file()
    cached, first = tmp_path / "pipe" / "expert-dry" / "expert.npz", (tmp_path / "pipe" / "gail-2traj" / "ckpt.pt")
    stamps = cached.stat().st_mtime_ns, first.stat().st_mtime_ns
    assert gail.main(argv)["runs"] == results["runs"]       # run again: finished runs and the expert are reused
    assert (cached.stat().st_mtime_ns, first.stat().st_mtime_ns) == stamps


def test_resume_is_exact(tmp_path, monkeypatch, expert_file):
    helpers.assert_resume_exact(gail, tmp_path, monkeypatch, ["--expert", str(expert_file)],
                                n=2, state_keys=("models", "optimizers", "history"))


def test_sample_evaluates_the_policy(tmp_path, expert_file):
    written = helpers.sample_from(gail, expert_file.parent / "ckpt.pt", tmp_path, "--eval-episodes", "2")
    saved = json.loads((tmp_path / "sampled" / "evaluation.json").read_text())
    assert saved["episodes"] == 2 and saved["return"] == written["return"] > 0
    assert "rollout" in written


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        gail.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--env", "--mode", "--expert", "--num-trajs", "--steps", "--resume", "--sample", "--dry-run",
                 "--cuda", "--max-kl", "--gae-lambda", "--d-lr", "--entropy-lambda"):
        assert flag in text, flag
    for image_flag in ("--dataset", "--image-size", "--metrics", "--inception-weights", "--workers", "--amp"):
        assert image_flag not in text, image_flag


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
    helpers.expect_usage_error(gail, [*base, "--num-trajs", "1", "4"], capsys, "one --num-trajs")
    (tmp_path / "text.npz").write_text("not an archive")
    helpers.expect_usage_error(gail, [*base, "--expert", str(tmp_path / "text.npz")], capsys, "not a readable")
    helpers.expect_usage_error(gail, [*base, "--max-kl", "0"], capsys, "--max-kl")
    helpers.expect_usage_error(gail, [*base, "--bc-lr", "0.1"], capsys, "--bc-lr cannot act with --mode gail")
    helpers.expect_usage_error(gail, [*base, "--mode", "bc", "--expert", str(expert_file), "--steps", "9"], capsys,
                               "--steps cannot act")
    assert not out.exists() and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_gail_imitates_a_cartpole_expert_from_one_trajectory(tmp_path):
    """The paper's Table 3 row at CPU scale: with one expert trajectory, GAIL's policy reaches the
    expert's return (scaled return >= 0.9, random = 0, expert = 1) within 60 TRPO iterations."""
    gail.main(["--mode", "pipeline", "--num-trajs", "1", "--steps", "60", "--eval-episodes", "10",
               "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    runs = {r["mode"]: r for r in results["runs"]}
    assert results["expert_return"] > 400, results["expert_return"]   # the TRPO expert balances the pole
    assert runs["gail"]["scaled_return"] >= 0.9, runs["gail"]
