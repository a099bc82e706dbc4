"""GAIL's experiment (the paper's Fig. 1 and Table 3) with gail.py's own modes: one expert, then behavioural
cloning and GAIL for each count of expert trajectories and each seed, and a table of the learned policies'
true returns. With `--expert-hold-x X` (CartPole) the expert has a habit of its own, keeping the cart near
x = X, and the table also gives each policy's mean cart position, next to TRPO on CartPole's true reward:
what imitation beyond survival looks like (any positive reward keeps the pole up; only the expert's
demonstrations say where the cart should be).

    python benchmarks/gail_pipeline.py --num-trajs 1 4 10 --seeds 0               # Table 3 / Fig. 1, CartPole
    python benchmarks/gail_pipeline.py --expert-hold-x 1 --seeds 0 1 2 3 --steps 150 --d-steps 5   # beyond survival
    python benchmarks/gail_pipeline.py --env Acrobot-v1 --num-trajs 1 4 --steps 100

Every run is a gail.py run of its own under --out (expert/, bc-<n>traj-s<seed>/, gail-<n>traj-s<seed>/,
trpo-s<seed>/ for TRPO on the true reward), resumed if interrupted and reused when finished, so running
the same command again only prints the table. The expert is trained once (seed 0, --expert-steps
iterations) and shared by every seed. Policies are evaluated as gail.py does at the end of a run: acting
deterministically for --eval-episodes episodes from fixed seeds. Writes <out>/results.json.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gail  # noqa: E402
from common.run import HelpFormatter, UsageError, friendly_errors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--env", default="CartPole-v1", help="gymnasium environment (see gail.py)")
    p.add_argument("--num-trajs", type=int, nargs="+", default=[1], help="expert trajectories, one count per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the BC, GAIL and TRPO runs")
    p.add_argument("--steps", type=int, default=300, help="GAIL's (and TRPO's) iterations (the paper: 300)")
    p.add_argument("--d-steps", type=int, default=1, help="GAIL's D steps per iteration (the paper: 1)")
    p.add_argument("--expert-steps", type=int, default=100, help="the expert's TRPO iterations (official: 101)")
    p.add_argument("--expert-hold-x", type=float, default=None, metavar="X",
                   help="CartPole: an expert that keeps the cart near x = X; adds TRPO on the true reward")
    p.add_argument("--eval-episodes", type=int, default=50, help="evaluation episodes per policy")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (1: the same numbers on any machine)")
    p.add_argument("--out", default="runs/gail-pipeline", help="where the runs go (default: %(default)s)")
    return p.parse_args(argv)


def run(argv, out):
    """gail.py with argv into `out`; a finished run is read back, an interrupted one resumed."""
    done = out / "summary.json"
    if done.is_file() and not json.loads(done.read_text()).get("interrupted"):
        return {**json.loads(done.read_text()), "out": str(out)}
    summary = gail.main([*argv, "--out", str(out), "--resume", "auto"])
    if summary.get("interrupted"):
        raise SystemExit("interrupted; run the same command again to continue")
    return {**summary, "out": str(out)}


def spread(values):
    return f"{np.mean(values):7.2f} [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else f"{values[0]:7.2f}"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    env = ["--env", args.env, "--eval-episodes", str(args.eval_episodes), "--threads", str(args.threads)]
    habit = ["--expert-hold-x", str(args.expert_hold_x)] if args.expert_hold_x is not None else []
    with friendly_errors():
        if args.expert_hold_x is not None and args.env != "CartPole-v1":
            raise UsageError("--expert-hold-x needs --env CartPole-v1")
        expert = run(["--mode", "expert", *env, *habit, "--steps", str(args.expert_steps),
                      "--expert-trajs", str(max(10, *args.num_trajs))], out / "expert")
        expert_file = str(out / "expert" / "expert.npz")
        rows = {("expert", 0): [expert]}
        for seed in args.seeds:
            for n in args.num_trajs:
                for mode in ("bc", "gail"):
                    own = [] if mode == "bc" else ["--steps", str(args.steps), "--d-steps", str(args.d_steps)]
                    name = f"{mode}-{n}traj-s{seed}" + (f"-dsteps{args.d_steps}" * (mode == "gail" and args.d_steps != 1))
                    rows.setdefault((mode, n), []).append(
                        run(["--mode", mode, *env, "--expert", expert_file, "--num-trajs", str(n), "--seed", str(seed),
                             *own], out / name))
            if habit:   # the control: TRPO on CartPole's true reward alone
                rows.setdefault(("trpo", 0), []).append(
                    run(["--mode", "expert", *env, "--steps", str(args.steps), "--seed", str(seed)],
                        out / f"trpo-s{seed}"))
    stats = gail.expert_stats(gail.load_expert(expert_file, args.env, gail.make_env(args.env)), args.env)
    results = {"env": args.env, "expert_hold_x": args.expert_hold_x, "seeds": args.seeds, "steps": args.steps,
               "d_steps": args.d_steps,
               "expert_trajectories": stats, "runs": []}
    cart = args.env == "CartPole-v1"
    print(f"\n{args.env}: expert's trajectories: return {stats['expert_return']:.1f}"
          + (f", mean cart x {stats['expert_cart_x']:.2f}" if cart else "")
          + f"; random policy {stats['random_return']:.1f}. Deterministic evaluation, {args.eval_episodes} episodes, "
          f"mean [min, max] over seeds {args.seeds}:")
    print(f"{'policy':14s} {'return':>22s}" + (f" {'mean cart x':>22s}" if cart else ""))
    for (mode, n), summaries in rows.items():
        returns = [s["metrics"]["metric/return"] for s in summaries]
        xs = [s["metrics"]["metric/cart_x"] for s in summaries] if cart else []
        name = {"expert": "expert", "trpo": "TRPO, true r"}.get(mode, f"{mode.upper()} {n} traj")
        print(f"{name:14s} {spread(returns):>22s}" + (f" {spread(xs):>22s}" if cart else ""))
        results["runs"].append({"policy": mode, "num_trajs": n, "returns": returns, "cart_x": xs,
                                "dirs": [s["out"] for s in summaries]})
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
