"""Generative Adversarial Imitation Learning — Jonathan Ho, Stefano Ermon, 2016. arXiv:1606.03476.

The idea: learn a policy from an expert's state-action pairs alone, without the expert's reward and
without first recovering it (inverse RL). A discriminator D(s, a) tells the policy's pairs from the
expert's, and the policy is trained by reinforcement learning to fool it: occupancy-measure matching
under the GAN divergence (Sec. 5). With D(s, a) the probability that (s, a) came from the policy π,

    min_π max_D  E_π[log D(s, a)] + E_πE[log(1 − D(s, a))] − λ H(π)                     (Eq. 16)

Algorithm 1, one iteration: sample trajectories of π; take an Adam step on D to increase the objective
(policy pairs labelled 1, expert pairs 0); take a TRPO step on π with the cost log D(s, a), i.e. the
reward r(s, a) = −log D(s, a) (the causal entropy H(π) enters as a bonus −λ log π(a|s) in the reward,
as the official code does; λ = 0 as the paper, except Reacher). Environments whose episodes end on
success (MountainCar, Acrobot) get r = log(1 − D) instead (the official `favor_zero_expert_reward`),
so that ending early is not penalised; the others get −log D > 0, which pays for surviving.

TRPO (Schulman et al. 2015; the paper's Appendix B, official policyopt/rl.py, optim.py): maximise
L(θ) = mean[π_θ(a|s)/π_old(a|s) · Â] subject to mean KL(π_old ‖ π_θ) ≤ 0.01: the natural gradient
(F + 0.1 I)⁻¹ g by 10 conjugate-gradient steps on Fisher-vector products (double backward on a random 10%
of the batch), scaled to the bound, then a line search (halving, ≤ 10 times) for the first step with
KL ≤ 0.01 and a gain ≥ 0.1 × the linear prediction. Â: GAE(γ 0.995, λ 0.97), standardised. The value
net is refitted each iteration on the discounted returns with a trust region of its own (mean squared
change of its normalised output ≤ 0.01; official rl.ValueFunc).

Networks (official scripts/imitate_mj.py): policy, value and D are 2 × 100 tanh MLPs on observations
standardised by running statistics that start from the expert data. D: Adam lr 0.01, 1 step per iteration
(`discriminator_step`). Per iteration 5000 pairs (whole episodes), 300 iterations (MuJoCo 50000 × 500).

Experts and data (official pipelines/im_classic_pipeline.yaml, im_pipeline.yaml): experts are TRPO
policies on the true reward (`--mode expert`) that save 10 stochastic trajectories; a run uses the first
`--num-trajs`, each subsampled to every k-th pair from a random offset (k = 10 CartPole, 5 MountainCar and
Acrobot, 20 MuJoCo). Behavioural cloning (`--mode bc`, the baseline): maximum likelihood of the expert's
actions, Adam lr 1e-3, minibatch 128, 1001 updates (MuJoCo 20001), 70/30 train/validation split, keeping
the policy with the best validation loss of those checked every 100 updates. Evaluation: the mean true
return of the policy acting deterministically over 50 episodes, also scaled so that the expert's mean
return is 1 and a uniformly random policy's 0 (Fig. 1).

Expert file (.npz, written by `--mode expert`, read by `--expert PATH`), full trajectories right-padded
with zeros to the longest, T: env (str, gymnasium id); obs (N, T, obs_dim) float32; actions (N, T) int64
or (N, T, act_dim) float32; rewards (N, T) float32 true rewards; lengths (N,) int64; returns (N,) float32;
random_return () float32, optional (a random policy's mean return, computed when absent).

An expert with a habit (`--mode expert --expert-hold-x X`, CartPole; not in the paper) is paid also
exp(−((x − X)/0.5)²) per step for keeping the cart near x = X: any positive reward keeps the pole up, so where
the cart stays shows whether GAIL copies what is specific to the expert. From 4 trajectories of such an expert
(x = 0.92) GAIL keeps the cart at x = 0.93 over seeds 0-3, TRPO on the true reward near 0 (docs/results.md).


Usage:
    python gail.py                            # CartPole-v1, 1 expert trajectory (Table 3); trains the expert
                                              # first, inside the run directory (<out>/expert/)
    python gail.py --mode expert --expert-hold-x 1 --steps 100 --out runs/habit   # an expert with a habit
    python gail.py --expert runs/habit/expert.npz --num-trajs 4       # GAIL from its trajectories
    python gail.py --mode bc --expert runs/habit/expert.npz           # behavioural cloning
    python gail.py --env Hopper-v5 --num-trajs 4    # MuJoCo, 50000 pairs x 500 iterations (gymnasium[mujoco])
    python gail.py --sample runs/gail/CartPole-v1-.../ckpt.pt          # its policy's evaluation.json

`--steps` counts TRPO iterations (BC: `--bc-steps`), `--batch-size` pairs per iteration. TensorBoard shows
the true return, D's accuracies and on CartPole the mean cart position (episode/cart_x; at the end
metric/cart_x beside metric/expert_cart_x); an expert trained first adds its own curves. Resume is exact:
every iteration collects whole episodes from seeds drawn from torch's RNG.

Differences from the paper (and its official code):
- gymnasium's CartPole-v1 (500 steps), Acrobot-v1, MountainCar-v0, Pendulum-v1 instead of gym's
  CartPole-v0 (200 steps), Acrobot-v0, MountainCar-v0; MuJoCo -v5 tasks instead of -v1. A CartPole-v1
  trajectory is 2.5 times a v0 one: subsampled alike, one trajectory gives BC and D 50 pairs instead of
  the paper's 20, so BC's Table 3 number (72 with 1 trajectory) is not comparable with a v1 run.
- Order within an iteration as Algorithm 1 (D's step, then TRPO on the new D's reward); the official code
  steps π on the previous D's reward and fits D afterwards.
- The line search's KL wall is the bound itself (the official one rejects only KL > 0.02); when no step
  passes, π stays (the official code takes the last, 2⁻¹⁰ step).
- GAE bootstraps episodes cut by the time limit with V of the last state; the official code ends every
  trajectory with 0 and feeds the time t/T to its value net instead.
- Experts: TRPO with the same 2 × 100 nets and `--steps`/`--batch-size` as GAIL (official classic experts:
  64-64 nets, 101 iterations × 5000 pairs); their normalisers start from one batch of the untrained policy.
- BC is validated from update 1 on (official "valacc": −validation loss; for continuous actions the
  squared error of the mean).
- Pendulum-v1 is not in the paper: its subsampling (10) and reward form (−log D) are our choice.
- Not offered: Reacher (λ > 0 in the paper), the linear-reward baselines (FEM, GTAL), torchrun,
  --amp/--compile (TRPO's conjugate gradient needs float32).
- The habit measurement takes 5 D steps per iteration and 150 iterations (the paper: 1 and 300).
"""
import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, Normal, kl_divergence
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.nn.utils.rnn import pad_sequence

from common import checkpoint as ckpt_io
from common import run as runlib

SCRIPT = "gail"
MUJOCO = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
ENVS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1") + MUJOCO
# Every k-th expert pair is kept (official im_classic_pipeline.yaml, im_pipeline.yaml; Pendulum: ours).
SUBSAMPLE = {"CartPole-v1": 10, "Acrobot-v1": 5, "MountainCar-v0": 5, "Pendulum-v1": 10, **{e: 20 for e in MUJOCO}}
# Environments cut off on success get r = log(1 − D) (official cuts_off_on_success → favor_zero_expert_reward).
REWARD = {"Acrobot-v1": "log(1-D)", "MountainCar-v0": "log(1-D)"}
BC_VALID_EVERY = 100   # official --bclone_eval_freq in im_classic_pipeline.yaml
EVAL_SEED = 10_000     # evaluation episodes start from seeds EVAL_SEED + seed + i, the same for every policy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generative Adversarial Imitation Learning (Ho & Ermon 2016)")
    p.add_argument("--env", default="CartPole-v1", help=f"gymnasium environment: {', '.join(ENVS)}")
    p.add_argument("--mode", choices=["gail", "bc", "expert"], default="gail", help="gail: Algorithm 1; bc: "
                   "behavioural cloning; expert: TRPO on the true reward, then save its trajectories (expert.npz)")
    p.add_argument("--expert", default=None, metavar="NPZ", help="expert trajectories, a --mode expert run's "
                   "expert.npz; when not given, an expert is trained first into <out>/expert/")
    p.add_argument("--num-trajs", type=int, default=1, help="expert trajectories used")
    p.add_argument("--expert-trajs", type=int, default=10, help="trajectories saved by --mode expert (official 10)")
    p.add_argument("--expert-hold-x", type=float, default=None, metavar="X", help="CartPole: an expert with a habit, "
                   "paid also for keeping the cart near x = X (default: none, the paper's expert)")
    p.add_argument("--subsample", type=int, default=None, help="keep every k-th expert pair (default: 10 "
                   "CartPole and Pendulum, 5 Acrobot and MountainCar, 20 MuJoCo)")
    p.add_argument("--reward", choices=["-log(D)", "log(1-D)"], default=None,
                   help="policy reward from D (default: log(1-D) for Acrobot and MountainCar, else -log(D))")
    p.add_argument("--entropy-lambda", type=float, default=0.0, help="causal entropy weight λ (Eq. 16)")
    p.add_argument("--g-width", type=int, default=100, help="hidden units of the policy and value nets (2 layers)")
    p.add_argument("--d-width", type=int, default=100, help="hidden units of D (2 layers)")
    p.add_argument("--max-kl", type=float, default=0.01, help="TRPO's bound on the mean KL per step")
    p.add_argument("--cg-damping", type=float, default=0.1, help="damping added to the Fisher matrix")
    p.add_argument("--vf-max-kl", type=float, default=0.01, help="value net's trust region (mean squared change)")
    p.add_argument("--gamma", type=float, default=0.995, help="discount")
    p.add_argument("--gae-lambda", type=float, default=0.97, help="GAE λ")
    p.add_argument("--d-lr", type=float, default=0.01, help="D's Adam learning rate")
    p.add_argument("--d-steps", type=int, default=1, help="D's Adam steps per iteration")
    p.add_argument("--d-entropy", type=float, default=1e-3, help="D's entropy bonus weight")
    p.add_argument("--bc-steps", type=int, default=1001, help="behavioural cloning updates")
    p.add_argument("--bc-lr", type=float, default=1e-3, help="behavioural cloning Adam learning rate")
    p.add_argument("--bc-batch-size", type=int, default=128, help="behavioural cloning minibatch")
    p.add_argument("--eval-episodes", type=int, default=50, help="episodes per evaluation (official 50)")
    runlib.add_args(p, dataset=None, image_size=None, batch_size=5000, steps=300, log_every=10,
                    sample_every=0, ckpt_every=20, eval_every=0, images=False)
    args = runlib.parse(p, argv, dry_run_defaults={
        "g_width": 8, "d_width": 8, "expert_trajs": 3, "eval_episodes": 2, "bc_steps": 4, "bc_batch_size": 8},
        defaults=env_defaults)
    check_args(args)
    return args


def env_defaults(args):
    """Per environment (official pipelines): subsampling, the reward form and, for MuJoCo, 50000 pairs x 500
    iterations, 50 expert trajectories, 20001 BC updates. A dry run keeps every pair (short episodes)."""
    if args.env not in ENVS:
        return {}   # check_args says so
    d = {"subsample": 1 if args.dry_run else SUBSAMPLE[args.env], "reward": REWARD.get(args.env, "-log(D)")}
    if args.env in MUJOCO and not args.dry_run:
        d.update(steps=500, batch_size=50_000, expert_trajs=50, bc_steps=20_001)
    return d


# Start-up errors, one line each: the numeric flags' ranges, and the flags that cannot act in a mode (with
# --expert, neither can the expert's own flags, nor TRPO's in --mode bc).
RANGES = [(("num_trajs", "expert_trajs", "subsample", "g_width", "d_width", "d_steps", "bc_steps", "bc_batch_size",
            "eval_episodes"), ">= 1", lambda v: v >= 1),
          (("entropy_lambda", "d_entropy"), ">= 0", lambda v: v >= 0),
          (("max_kl", "cg_damping", "vf_max_kl"), "> 0", lambda v: v > 0),
          (("gamma",), "in (0, 1]", lambda v: 0 < v <= 1),
          (("gae_lambda",), "in [0, 1]", lambda v: 0 <= v <= 1)]
D_FLAGS, BC_FLAGS = ("reward", "d_lr", "d_steps", "d_entropy", "d_width"), ("bc_steps", "bc_lr", "bc_batch_size")
IDLE = {"expert": ("expert", "num_trajs", "subsample", *D_FLAGS, *BC_FLAGS), "gail": BC_FLAGS, "bc": D_FLAGS}
RL_FLAGS = ("steps", "batch_size", "max_kl", "cg_damping", "vf_max_kl", "gamma", "gae_lambda", "entropy_lambda")


def check_args(args):
    """What can be checked from the command line alone (nothing is written before this)."""
    if args.env not in ENVS:
        raise runlib.UsageError(f"unknown environment {args.env!r}; choose one of {', '.join(ENVS)}")
    for names, rule, ok in RANGES:
        for n in names:
            if not ok(getattr(args, n)):
                raise runlib.UsageError(f"--{n.replace('_', '-')} must be {rule}, got {getattr(args, n)}")
    if args.expert_hold_x is not None and args.env != "CartPole-v1":
        raise runlib.UsageError("--expert-hold-x trains a CartPole expert; give --env CartPole-v1")
    idle = IDLE[args.mode] + (("expert_trajs", "expert_hold_x") + RL_FLAGS * (args.mode == "bc") if args.expert else ())
    given = [n for n in idle if n in args.explicit]
    if given:
        raise runlib.UsageError(f"--{given[0].replace('_', '-')} cannot act with --mode {args.mode}"
                                + (" and --expert" if args.expert and args.mode != "expert" else ""))
    if not args.expert and args.mode != "expert" and args.num_trajs > args.expert_trajs:
        raise runlib.UsageError(f"--num-trajs {args.num_trajs} is more than the {args.expert_trajs} "
                                "trajectories the expert saves (--expert-trajs)")


# ---- Models ------------------------------------------------------------------------------------

class RunningNorm(nn.Module):
    """x ↦ (x − mean) / (std + 1e-6) with the mean and std of every point seen so far (official
    nn.Standardizer: a count-weighted running mean of x and x²; the identity until the first update)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("meansq", torch.ones(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x):
        x = x.reshape(-1, self.mean.numel()).double()
        a = self.count / (self.count + len(x))
        self.mean.mul_(a).add_((1 - a) * x.mean(0))
        self.meansq.mul_(a).add_((1 - a) * x.pow(2).mean(0))
        self.count += len(x)

    def std(self):
        return (self.meansq - self.mean.pow(2)).clamp_min(0).sqrt()

    def forward(self, x):
        return ((x - self.mean) / (self.std() + self.eps)).to(x.dtype)

    def inverse(self, y):
        return (y * (self.std() + self.eps) + self.mean).to(y.dtype)


def mlp(n_in, width, n_out):
    """n_in → width → width → n_out with tanh, Glorot-uniform hidden layers and a zero output layer
    (official nn.FeedforwardNet / AffineLayer with SIMPLE_ARCHITECTURE)."""
    layers = [nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, n_out)]
    for layer in layers[:-1:2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class Policy(nn.Module):
    """π(a|s): a softmax over `n_actions` (discrete) or a Gaussian N(μ(s), diag σ²) with a state-independent
    log σ (continuous), on standardised observations. `params(obs)` gives the distribution's parameters
    (logits, or μ and log σ side by side) and `distribution(params)` builds it: TRPO keeps the old
    parameters to measure the KL of a step."""

    def __init__(self, obs_dim, act_dim, discrete, width=100):
        super().__init__()
        self.discrete, self.act_dim = discrete, act_dim
        self.norm = RunningNorm(obs_dim)
        self.net = mlp(obs_dim, width, act_dim)
        self.log_std = None if discrete else nn.Parameter(torch.zeros(act_dim))

    def params(self, obs):
        out = self.net(self.norm(obs))
        return out if self.discrete else torch.cat([out, self.log_std.expand_as(out)], -1)

    def distribution(self, params):
        if self.discrete:
            return Categorical(logits=params)
        mean, log_std = params.chunk(2, -1)
        return Independent(Normal(mean, log_std.exp()), 1)

    def log_prob(self, obs, actions):
        return self.distribution(self.params(obs)).log_prob(actions)

    @torch.no_grad()
    def act(self, obs, deterministic=False):
        """One action for one observation; sampled by inverse CDF / reparameterisation from torch's RNG."""
        p = self.params(obs[None])[0]
        if self.discrete:
            if deterministic:
                return p.argmax()
            cdf = p.softmax(-1).cumsum(-1)
            return torch.searchsorted(cdf, torch.rand(1, device=p.device) * cdf[-1]).clamp_max(len(cdf) - 1)[0]
        mean, log_std = p.chunk(2)
        return mean if deterministic else mean + log_std.exp() * torch.randn(self.act_dim, device=p.device)


class ValueNet(nn.Module):
    """V(s) on standardised observations, predicting standardised returns (official rl.ValueFunc's
    obsnorm and vnorm); `forward` returns values in return units."""

    def __init__(self, obs_dim, width=100):
        super().__init__()
        self.norm, self.target_norm = RunningNorm(obs_dim), RunningNorm(1)
        self.net = mlp(obs_dim, width, 1)

    def raw(self, obs):
        return self.net(self.norm(obs))[..., 0]

    def forward(self, obs):
        return self.target_norm.inverse(self.raw(obs)[..., None])[..., 0]


class Discriminator(nn.Module):
    """The logit of D(s, a), the probability that (s, a) is the policy's (the paper's convention). For
    discrete actions the net scores every action of a standardised state and a's score is picked; for
    continuous ones it reads the standardised concatenation (s, a) (official TransitionClassifier)."""

    def __init__(self, obs_dim, act_dim, discrete, width=100):
        super().__init__()
        self.discrete = discrete
        n_in = obs_dim if discrete else obs_dim + act_dim
        self.norm = RunningNorm(n_in)
        self.net = mlp(n_in, width, act_dim if discrete else 1)

    def inputs(self, obs, actions):
        return obs if self.discrete else torch.cat([obs, actions], -1)

    def forward(self, obs, actions):
        scores = self.net(self.norm(self.inputs(obs, actions)))
        if self.discrete:
            return scores.gather(-1, actions.long()[..., None])[..., 0]
        return scores[..., 0]


# ---- Losses and TRPO ---------------------------------------------------------------------------

def bernoulli_entropy(logits):
    """Entropy of Bernoulli(sigmoid(l)) in nats: softplus(−l) + (1 − σ(l)) l."""
    return F.softplus(-logits) + (1 - torch.sigmoid(logits)) * logits


def discriminator_loss(logits_policy, logits_expert, entropy_weight=1e-3):
    """D ascends E_π log D + E_πE log(1 − D) (Eq. 16): a cross-entropy with the policy's pairs labelled 1
    and the expert's 0, each class averaged, minus the official entropy bonus on D's outputs."""
    loss_p = F.binary_cross_entropy_with_logits(logits_policy, torch.ones_like(logits_policy))
    loss_e = F.binary_cross_entropy_with_logits(logits_expert, torch.zeros_like(logits_expert))
    entropy = bernoulli_entropy(logits_policy).mean() + bernoulli_entropy(logits_expert).mean()
    return loss_p + loss_e - entropy_weight * entropy


def policy_reward(logits, form="-log(D)"):
    """The policy's reward from D's logit: −log D (the cost log D of Algorithm 1), or log(1 − D) for
    environments that end on success (official favor_zero_expert_reward)."""
    if form == "-log(D)":
        return F.softplus(-logits)       # −log σ(l)
    if form == "log(1-D)":
        return -F.softplus(logits)       # log(1 − σ(l))
    raise ValueError(f"unknown reward form {form!r}")


def gae(rewards, values, last_value, gamma, lam):
    """GAE(γ, λ) of one episode (Schulman et al. 2016): δ_t = r_t + γ V(s_{t+1}) − V(s_t) with V(s_T) =
    `last_value` (0 when the episode terminated, V of the final state when it was truncated),
    Â_t = Σ_k (γλ)^k δ_{t+k}. Returns (Â, discounted returns R_t = Σ_k γ^k r_{t+k} + γ^{T−t} last_value)."""
    r, v = rewards.tolist(), values.tolist() + [float(last_value)]
    adv, ret = [0.0] * len(r), [0.0] * len(r)
    a, g = 0.0, float(last_value)
    for t in reversed(range(len(r))):
        a = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * a     # Â_t = δ_t + γλ Â_{t+1}
        g = r[t] + gamma * g
        adv[t], ret[t] = a, g
    return torch.tensor(adv), torch.tensor(ret)


def flat_grad(y, params, **kwargs):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(y, params, **kwargs)])


def conjugate_gradient(matvec, b, iters=10, tol=1e-10):
    """Solve A x = b for symmetric positive definite A given only x ↦ A x (Hestenes–Stiefel)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(iters):
        Ap = matvec(p)
        alpha = rr / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = r @ r
        if rr_new < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fisher_vector_product(kl, params, damping):
    """v ↦ (∇²_θ KL + damping I) v by double backward; `kl` is the mean KL(π_old ‖ π_θ) as a function of θ
    at θ = θ_old, where its Hessian is the Fisher information matrix."""
    grad_kl = flat_grad(kl, params, create_graph=True)

    def fvp(v):
        return flat_grad(grad_kl @ v, params, retain_graph=True) + damping * v
    return fvp


def trust_region_step(params, surrogate, kl, max_kl, damping, kl_for_fvp=None, cg_iters=10,
                      accept_ratio=0.1, backtracks=10):
    """One TRPO step (Appendix B): maximise surrogate() subject to kl() ≤ max_kl. The full step x·sqrt(2 max_kl /
    xᵀ(F + dI)x), x ≈ (F + dI)⁻¹ g, is halved until the bound holds and the gain is ≥ accept_ratio × the linear
    prediction, or undone. `kl_for_fvp` (default `kl`) may use a subsample for the Fisher-vector products."""
    params = list(params)
    theta0 = parameters_to_vector(params).detach().clone()
    info = {"kl": 0.0, "improvement": 0.0, "backtracks": 0, "accepted": False}
    L0 = surrogate()
    g = flat_grad(L0, params)
    L0 = float(L0.detach())
    if g.abs().max() < 1e-6:  # official grad_stop_tol
        return info
    fvp = fisher_vector_product((kl_for_fvp or kl)(), params, damping)
    x = conjugate_gradient(fvp, g, cg_iters)
    step = x * torch.sqrt(2 * max_kl / (x @ fvp(x)).clamp_min(1e-12)).detach()
    expected = float(g @ step)
    with torch.no_grad():
        for k in range(backtracks):
            t = 0.5 ** k
            vector_to_parameters(theta0 + t * step, params)
            gain, d = float(surrogate()) - L0, float(kl())
            if d <= max_kl and gain >= accept_ratio * t * expected and gain > 0:
                info.update(kl=d, improvement=gain, backtracks=k, accepted=True)
                return info
        vector_to_parameters(theta0, params)
    info["backtracks"] = backtracks
    return info


def policy_step(policy, obs, actions, advantages, max_kl, damping, fvp_fraction=0.1):
    """TRPO on the policy: surrogate mean[exp(log π_θ − log π_old) Â], KL(π_old ‖ π_θ) ≤ max_kl, Fisher-vector
    products on a random `fvp_fraction` of the batch (official subsample_hvp_frac)."""
    with torch.no_grad():
        old = policy.params(obs)
        old_logp = policy.distribution(old).log_prob(actions)
    sub = torch.randint(len(obs), (max(1, int(fvp_fraction * len(obs))),))

    def surrogate():
        return (torch.exp(policy.log_prob(obs, actions) - old_logp) * advantages).mean()

    def kl(idx=slice(None)):
        return kl_divergence(policy.distribution(old[idx]), policy.distribution(policy.params(obs[idx]))).mean()

    params = [p for p in policy.parameters() if p.requires_grad]
    return trust_region_step(params, surrogate, kl, max_kl, damping, kl_for_fvp=lambda: kl(sub))


def value_step(value, obs, returns, max_kl, damping, fvp_fraction=0.1):
    """Refit V on this batch's returns with a trust region (official rl.ValueFunc.fit): update the
    normalisers, then maximise −mean (V_raw − R_std)² subject to mean (V_raw − V_raw_old)² ≤ max_kl."""
    value.norm.update(obs)
    value.target_norm.update(returns[:, None])
    target = value.target_norm(returns[:, None])[:, 0]
    with torch.no_grad():
        old = value.raw(obs)
    sub = torch.randint(len(obs), (max(1, int(fvp_fraction * len(obs))),))

    def surrogate():
        return -(value.raw(obs) - target).pow(2).mean()

    def kl(idx=slice(None)):
        return (value.raw(obs[idx]) - old[idx]).pow(2).mean()

    info = trust_region_step(list(value.parameters()), surrogate, kl, max_kl, damping, kl_for_fvp=lambda: kl(sub))
    return info, -float(surrogate().detach())


def bc_loss(policy, obs, actions):
    """Behavioural cloning: the negative log-likelihood of the expert's actions."""
    return -policy.log_prob(obs, actions).mean()


# ---- Training ----------------------------------------------------------------------------------

def build(spec, args):
    """The policy, value net and D of an environment with spec = (obs_dim, act_dim, discrete)."""
    return Policy(*spec, args.g_width), ValueNet(spec[0], args.g_width), Discriminator(*spec, args.d_width)


def train(args):
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise runlib.UsageError("gail.py runs in one process (no torchrun)")
    env = make_env(args.env)
    args.out = str(runlib.resolve_out(args, SCRIPT))   # fixed now: an expert trained first lives inside it
    data = expert_data(args, env) if args.mode != "expert" else None
    if args.mode != "expert" and data is None:   # interrupted while training its expert
        return {"interrupted": True}
    if args.mode == "bc":   # BC counts its own updates (the expert above trained for --steps iterations)
        args = argparse.Namespace(**{**vars(args), "steps": args.bc_steps})
    r = runlib.setup(args, SCRIPT)
    return (train_bc if args.mode == "bc" else train_rl)(args, r, env, env_spec(env), data)


def discriminator_step(D, opt, obs, actions, ex_obs, ex_act, steps, entropy_weight):
    """Algorithm 1's D update: the iteration's policy pairs (label 1) against as many expert pairs drawn with
    replacement (label 0); D's normaliser first takes in both (official TransitionClassifier.fit)."""
    idx = torch.randint(len(ex_obs), (len(obs),))
    e_obs, e_act = ex_obs[idx], ex_act[idx]
    D.norm.update(torch.cat([D.inputs(obs, actions), D.inputs(e_obs, e_act)]))
    for _ in range(steps):
        loss = discriminator_loss(D(obs, actions), D(e_obs, e_act), entropy_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return loss, (D(obs, actions) > 0).float().mean(), (D(e_obs, e_act) < 0).float().mean()


def advantages(rewards, value, batch, gamma, lam):
    """GAE per episode (V bootstrapped only where the time limit cut the episode), standardised (official
    util.standardized); also the discounted returns the value net is fitted to."""
    with torch.no_grad():
        values, last = value(batch["obs"]), value(batch["final_obs"])
    advs, rets, s = [], [], 0
    for i, n in enumerate(batch["lengths"]):
        a, g = gae(rewards[s:s + n], values[s:s + n], 0.0 if batch["terminated"][i] else float(last[i]), gamma, lam)
        advs.append(a)
        rets.append(g)
        s += n
    adv, ret = torch.cat(advs).to(rewards.device), torch.cat(rets).to(rewards.device)
    return (adv - adv.mean()) / (adv.std() + 1e-8), ret


def train_rl(args, r, env, spec, data):
    """Algorithm 1 (--mode gail), or TRPO on the true reward (--mode expert)."""
    policy, value, D = (m.to(r.device) for m in build(spec, args))
    d_opt = torch.optim.Adam(D.parameters(), lr=args.d_lr, foreach=True)
    if data is not None:
        ex_obs, ex_act = (t.to(r.device) for t in expert_pairs(data, args.num_trajs, args.subsample))
        for norm in (policy.norm, value.norm):   # official --obsnorm_mode expertdata
            norm.update(ex_obs)
        D.norm.update(D.inputs(ex_obs, ex_act))
    start = r.resume({"policy": policy, "value": value, "D": D}, {"D": d_opt})
    if start == 0 and data is None:   # expert: an extra batch of the untrained policy starts the normalisers
        b0 = rollout(env, policy.act, min_steps=args.batch_size, device=r.device)
        for norm in (policy.norm, value.norm):
            norm.update(b0["obs"])
    r.restore_rng()
    step = start

    def state():
        return {"models": {"policy": policy.state_dict(), "value": value.state_dict(), "D": D.state_dict()},
                "optimizers": {"D": d_opt.state_dict()}, "env": args.env, "spec": list(spec),
                "expert_stats": expert_stats(data, args.env)}

    for step in range(start + 1, args.steps + 1):
        batch = rollout(env, policy.act, min_steps=args.batch_size, device=r.device)
        obs, actions = batch["obs"], batch["actions"]
        scalars = {"return/true": batch["returns"].mean(), "episode/length": float(np.mean(batch["lengths"]))}
        if args.env == "CartPole-v1":
            scalars["episode/cart_x"] = obs[:, 0].mean()
        if data is not None:   # GAIL: D's step, then the reward of the new D
            loss_d, acc_p, acc_e = discriminator_step(D, d_opt, obs, actions, ex_obs, ex_act, args.d_steps,
                                                      args.d_entropy)
            with torch.no_grad():
                rewards = policy_reward(D(obs, actions), args.reward)                # r = −log D (Alg. 1)
            scalars.update({"loss/D": loss_d, "D/accuracy_policy": acc_p, "D/accuracy_expert": acc_e,
                            "return/imitation": rewards.sum() / len(batch["lengths"])})
        else:                  # the expert: the true reward, plus exp(−((x − X)/0.5)²) for a habit (not the paper's)
            rewards = batch["rewards"]
            if args.expert_hold_x is not None:
                rewards = rewards + torch.exp(-((obs[:, 0] - args.expert_hold_x) / 0.5) ** 2)
        if args.entropy_lambda > 0:   # causal entropy H(π) = E[−log π(a|s)] (Eq. 16; official policy_ent_reg)
            with torch.no_grad():
                rewards = rewards - args.entropy_lambda * policy.log_prob(obs, actions)
        adv, ret = advantages(rewards, value, batch, args.gamma, args.gae_lambda)
        # ---- TRPO on π, then its normaliser's update and the value fit (official order)
        info = policy_step(policy, obs, actions, adv, args.max_kl, args.cg_damping)
        policy.norm.update(obs)
        vinfo, vloss = value_step(value, obs, ret, args.vf_max_kl, args.cg_damping)
        with torch.no_grad():
            entropy = policy.distribution(policy.params(obs)).entropy().mean()
        scalars.update({"trpo/kl": info["kl"], "trpo/improvement": info["improvement"],
                        "trpo/backtracks": info["backtracks"], "policy/entropy": entropy, "loss/value": vloss,
                        "value/kl": vinfo["kl"]})
        if r.end_step(step, scalars, evaluate=lambda: final_evaluation(env, policy, args, data, r.device),
                      state=state):
            break
    if args.mode == "expert" and not r.stop_requested:
        # the expert's trajectories: stochastic policy (official deterministic_expert: false)
        with r.side_rng():
            trajs = rollout(env, policy.act, episodes=args.expert_trajs, device=r.device)
            rand = random_policy_return(env, args.eval_episodes, args.seed)
        save_expert(r.out / "expert.npz", args.env, trajs, rand)
        print(f"wrote {r.out / 'expert.npz'}: {args.expert_trajs} trajectories, mean return "
              f"{float(trajs['returns'].mean()):.1f} (random policy {rand:.1f})", flush=True)
    return r.finish(step, mode=args.mode, env=args.env)


def train_bc(args, r, env, spec, data):
    """Behavioural cloning on the subsampled expert pairs (official BehavioralCloningOptimizer)."""
    policy = Policy(*spec, args.g_width).to(r.device)
    obs, acts = (t.to(r.device) for t in expert_pairs(data, args.num_trajs, args.subsample))
    if len(obs) < 2:
        raise runlib.UsageError(f"{len(obs)} expert pair after subsampling: BC needs at least 2 (train and validation)")
    policy.norm.update(obs)                       # official --obsnorm_mode expertdata
    perm = torch.randperm(len(obs), generator=torch.Generator().manual_seed(args.seed))
    n_train = max(1, min(len(obs) - 1, int(0.7 * len(obs))))   # official --bclone_train_frac 0.7
    tr, va = perm[:n_train], perm[n_train:]
    opt = torch.optim.Adam(policy.parameters(), lr=args.bc_lr, foreach=True)
    start = r.resume({"policy": policy}, {"policy": opt})
    best = (r.resume_state["best"] if start
            else {"loss": float("inf"), "step": 0, "policy": copy.deepcopy(policy.state_dict())})
    r.restore_rng()
    step = start

    def evaluate_best():
        final = Policy(*spec, args.g_width).to(r.device)
        final.load_state_dict(best["policy"])
        return final_evaluation(env, final, args, data, r.device)

    def checkpoint():
        return {"models": {"policy": policy.state_dict(), "best": best["policy"]},
                "optimizers": {"policy": opt.state_dict()}, "best": best,
                "env": args.env, "spec": list(spec), "expert_stats": expert_stats(data, args.env)}

    for step in range(start + 1, args.steps + 1):
        idx = tr[torch.randint(len(tr), (args.bc_batch_size,))]
        loss = bc_loss(policy, obs[idx], acts[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scalars = {"loss/bc": loss}
        if step == 1 or step % BC_VALID_EVERY == 0 or step == args.steps:
            with torch.no_grad():
                if spec[2]:
                    val = float(bc_loss(policy, obs[va], acts[va]))
                else:   # official "valacc" for continuous actions: squared error of the mean action
                    val = float((policy.params(obs[va])[:, :spec[1]] - acts[va]).pow(2).sum(1).mean())
            scalars["loss/bc_valid"] = val
            if val < best["loss"]:
                best = {"loss": val, "step": step, "policy": copy.deepcopy(policy.state_dict())}
        # BC evaluates only the policy with the best validation loss, at the end
        if r.end_step(step, scalars, evaluate=evaluate_best if step == args.steps else None, state=checkpoint):
            break
    return r.finish(step, mode="bc", env=args.env, best_step=best["step"])


# ---- Environments, rollouts, evaluation, expert data -------------------------------------------

def make_env(env_id):
    import gymnasium as gym
    if env_id in MUJOCO:
        try:
            import mujoco  # noqa: F401
        except ImportError:
            raise runlib.UsageError(f'{env_id} needs MuJoCo: pip install "gymnasium[mujoco]"') from None
    return gym.make(env_id)


def env_spec(env):
    """(obs_dim, act_dim, discrete); act_dim is the number of actions when discrete."""
    discrete = hasattr(env.action_space, "n")
    act_dim = int(env.action_space.n) if discrete else int(env.action_space.shape[0])
    return int(env.observation_space.shape[0]), act_dim, discrete


def rollout(env, act, min_steps=0, episodes=0, seeds=None, device="cpu"):
    """Whole episodes until there are ≥ `min_steps` pairs and ≥ `episodes` episodes. Each episode starts
    from `seeds[i]`, or from a seed drawn from torch's RNG, so a run's randomness is torch's alone.
    Returns a dict of stacked tensors (on `device`) and one list entry per episode."""
    obs_l, act_l, rew_l, lengths, terminated, final_obs, returns = [], [], [], [], [], [], []
    low = torch.as_tensor(env.action_space.low) if not hasattr(env.action_space, "n") else None
    high = torch.as_tensor(env.action_space.high) if low is not None else None
    while sum(lengths) < min_steps or len(lengths) < episodes:
        seed = seeds[len(lengths)] if seeds is not None else int(torch.randint(2 ** 31 - 1, ()))
        o, _ = env.reset(seed=seed)
        start, term, trunc = len(rew_l), False, False
        while not (term or trunc):
            o = torch.as_tensor(o, dtype=torch.float32, device=device)
            a = act(o)
            obs_l.append(o)
            act_l.append(a)
            o, r, term, trunc, _ = env.step(int(a) if low is None else torch.clamp(a.cpu(), low, high).numpy())
            rew_l.append(float(r))
        lengths.append(len(rew_l) - start)
        terminated.append(bool(term))
        final_obs.append(torch.as_tensor(o, dtype=torch.float32, device=device))
        returns.append(sum(rew_l[start:]))
    return {"obs": torch.stack(obs_l), "actions": torch.stack(act_l), "rewards": torch.tensor(rew_l, device=device),
            "lengths": lengths, "terminated": terminated, "final_obs": torch.stack(final_obs),
            "returns": torch.tensor(returns)}


def evaluate(env, act, episodes, seed, device="cpu", expert=None):
    """The mean return of `act` over `episodes` episodes from fixed seeds (the same for every policy) and the
    mean observation; given the expert's statistics (`expert_stats`), also the return scaled as Fig. 1
    (random policy 0, expert 1); on CartPole the mean cart position x."""
    b = rollout(env, act, episodes=episodes, seeds=[EVAL_SEED + seed + i for i in range(episodes)], device=device)
    out = {"return": float(b["returns"].mean()), "return_std": float(b["returns"].std(unbiased=False)),
           "length": float(np.mean(b["lengths"])), "obs_mean": b["obs"].mean(0).tolist(), **(expert or {})}
    if expert and expert["expert_return"] != expert["random_return"]:   # else the scale has no unit
        span = expert["expert_return"] - expert["random_return"]
        out["scaled_return"] = (out["return"] - expert["random_return"]) / span
    if env.spec.id == "CartPole-v1":
        out["cart_x"] = out["obs_mean"][0]
    return out


def final_evaluation(env, policy, args, data, device):
    """The metrics logged at the end of a run: the policy acting deterministically (see `evaluate`)."""
    ev = evaluate(env, lambda o: policy.act(o, deterministic=True), args.eval_episodes, args.seed, device,
                  expert_stats(data, args.env))
    return {f"metric/{k}": v for k, v in ev.items() if k not in ("return_std", "obs_mean")}


def random_policy_return(env, episodes, seed):
    """A uniformly random policy's mean return (the 0 of Fig. 1's scale)."""
    gen, space = torch.Generator().manual_seed(0), env.action_space
    if hasattr(space, "n"):
        return evaluate(env, lambda o: torch.randint(int(space.n), (), generator=gen), episodes, seed)["return"]
    low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
    return evaluate(env, lambda o: low + (high - low) * torch.rand(low.shape, generator=gen), episodes, seed)["return"]


def save_expert(path, env_id, batch, random_return):
    """The expert file (see the docstring) of a `rollout` batch."""
    def padded(key):   # (N, T, ...): each trajectory right-padded with zeros to the longest
        return pad_sequence(batch[key].cpu().split(batch["lengths"]), batch_first=True).numpy()
    np.savez(path, env=np.array(env_id), obs=padded("obs"), actions=padded("actions"), rewards=padded("rewards"),
             lengths=np.array(batch["lengths"], dtype=np.int64), returns=batch["returns"].numpy(),
             random_return=np.float32(random_return))


def load_expert(path, env_id, env):
    """Read and check an expert file (see the docstring): a UsageError says what is wrong."""
    what = "--expert takes the expert.npz that --mode expert writes (see gail.py's docstring)"
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:   # missing, a .npy, a truncated archive, a checkpoint, text, a folder, no permission...
        said = "does not exist" if isinstance(e, FileNotFoundError) else "is not a readable .npz of expert trajectories"
        raise runlib.UsageError(f"{path} {said}; {what}") from None
    missing = {"env", "obs", "actions", "lengths", "returns"} - set(data)
    if missing:
        raise runlib.UsageError(f"{path} lacks {', '.join(sorted(missing))}; {what}")
    if str(data["env"]) != env_id:
        raise runlib.UsageError(f"{path} holds trajectories of {data['env']}, not {env_id} (--env)")
    obs_dim, act_dim, discrete = env_spec(env)
    n, T, lengths = len(data["lengths"]), data["obs"].shape[1] if data["obs"].ndim == 3 else -1, data["lengths"]
    want = {"obs": (n, T, obs_dim), "actions": (n, T) if discrete else (n, T, act_dim), "returns": (n,)}
    if (any(data[k].shape != v for k, v in want.items()) or (discrete and data["actions"].dtype.kind not in "iu")
            or lengths.ndim != 1 or (lengths < 1).any() or (lengths > T).any()):
        acts = "integer (N, T)" if discrete else f"(N, T, {act_dim})"
        got = ", ".join(f"{k} {data[k].shape} {data[k].dtype}" for k in ("obs", "actions", "returns", "lengths"))
        raise runlib.UsageError(f"{path}: expected obs (N, T, {obs_dim}), actions {acts}, returns (N,) and lengths "
                                f"(N,) in [1, T] for {env_id}, got {got}")
    return data


def expert_pairs(data, num_trajs, every):
    """The first `num_trajs` trajectories, each subsampled to every `every`-th pair from a random offset
    (official load_dataset: offsets from a fixed seed 0). Returns (obs, actions) tensors."""
    offsets = torch.randint(every, (num_trajs,), generator=torch.Generator().manual_seed(0))
    keep = [slice(int(o), int(n), every) for o, n in zip(offsets, data["lengths"])]
    obs = torch.cat([torch.as_tensor(o[k], dtype=torch.float32) for o, k in zip(data["obs"], keep)])
    acts = torch.cat([torch.as_tensor(a[k]) for a, k in zip(data["actions"], keep)])
    return obs, acts.long() if acts.dtype in (torch.int32, torch.int64) else acts.float()


def expert_stats(data, env_id):
    """The expert's mean return over its trajectories, a random policy's, and on CartPole the mean cart x."""
    if data is None:
        return {}
    stats = {"expert_return": float(np.mean(data["returns"])), "random_return": float(data["random_return"])}
    if env_id == "CartPole-v1":
        stats["expert_cart_x"] = float(np.concatenate([o[:n, 0] for o, n in zip(data["obs"], data["lengths"])]).mean())
    return stats


def expert_data(args, env):
    """The expert's trajectories: --expert, or else an expert this run trains first, a --mode expert run in
    <out>/expert/ (its progress on the console, its curves in the run's TensorBoard)."""
    path = Path(args.expert or Path(args.out) / "expert" / "expert.npz")
    if not args.expert and not path.is_file():
        ckpt_io.check_start(args, SCRIPT, args.out)   # nothing is written before the run's own checks
        habit = f" plus the bonus for x near {args.expert_hold_x}" if args.expert_hold_x is not None else ""
        print(f"no --expert given: training one first, TRPO on the true reward{habit} ({args.steps} iterations "
              f"x {args.batch_size} pairs, minutes on a CPU) in {path.parent}", flush=True)
        sub = argparse.Namespace(**{**vars(args), "mode": "expert", "out": str(path.parent), "resume": "auto"})
        if train(sub).get("interrupted"):
            return None
        print(f"expert ready; later runs can reuse it with --expert {path}", flush=True)
    data = load_expert(path, args.env, env)
    if args.num_trajs > len(data["lengths"]):
        raise runlib.UsageError(f"--num-trajs {args.num_trajs} but {path} holds {len(data['lengths'])} trajectories")
    if "random_return" not in data:
        data["random_return"] = np.float32(random_policy_return(env, args.eval_episodes, args.seed))
    return data


# ---- Evaluating a checkpoint -------------------------------------------------------------------

def sample(args):
    """--sample CKPT: the checkpoint's policy acting deterministically (see `evaluate`), into evaluation.json."""
    state, targs, device, out = runlib.load_for_sampling(args, SCRIPT)
    env = make_env(state["env"])
    policy = Policy(*state["spec"], targs.g_width)
    policy.load_state_dict(state["models"]["best" if "best" in state["models"] else "policy"])
    policy.to(device).eval()
    result = {"env": state["env"], "step": state["step"], "episodes": args.eval_episodes,
              **evaluate(env, lambda o: policy.act(o, deterministic=True), args.eval_episodes, args.seed, device,
                         state.get("expert_stats"))}
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    scores = "".join(f", {k} {result[k]:.2f}" for k in ("scaled_return", "cart_x") if k in result)
    print(f"{state['env']}: mean return {result['return']:.1f} ± {result['return_std']:.1f} over "
          f"{args.eval_episodes} episodes{scores}; wrote {out / 'evaluation.json'}")
    return result


def main(argv=None):
    with runlib.friendly_errors():
        args = parse_args(argv)
        return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
