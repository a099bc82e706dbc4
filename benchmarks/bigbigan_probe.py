"""Baselines for bigbigan.py's linear probe: the same probe on a trained encoder, on randomly initialised
encoders of the same architecture, and on raw pixels.

    python bigbigan.py --dataset M --g-width 8 --d-width 8 --e-width 16 --mlp-width 128 --batch-size 32 \\
        --steps 2000 --metrics cfid,agree --eval-samples 2000 --eval-every 500 --out RUN
    python benchmarks/bigbigan_probe.py RUN/ckpt.pt --random-seeds 0 1 2

For the checkpoint's data (its --dataset at E's input size) and the probe sets train() uses (bigbigan.probe_sets:
the training images the probe is fitted on and the held-out images it is scored on), it prints JSON with the
probe accuracy on μ(E(x)) ("mu") and on the average-pooled ResNet features after BN + CReLU ("pool"), exactly as
train() logs them (metric/linear_probe, metric/linear_probe_pool), for
  checkpoint   the checkpoint's encoder (the value train() logged at that step),
  random       an encoder of the checkpoint's architecture freshly initialised with torch.manual_seed(s), per
               --random-seeds (BatchNorm in eval mode at its initial statistics, as encode() uses it),
  pixels       the raw pixels, standardised with the training images' statistics (no CReLU).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bigbigan  # noqa: E402
from common import checkpoint as ckpt_io  # noqa: E402
from common import data as datasets  # noqa: E402
from common.run import UsageError, friendly_errors  # noqa: E402


def probes(ckpt, random_seeds, data_root=None, pixels=True):
    state = ckpt_io.load(ckpt, bigbigan.SCRIPT)
    targs = argparse.Namespace(**state["args"])
    if data_root is not None:
        targs.data_root = data_root
    e_args = argparse.Namespace(**{**vars(targs), "image_size": targs.e_image_size})   # data at E's size
    data = datasets.load(e_args)
    probe = bigbigan.probe_sets(e_args, data, "cpu")
    if probe is None:
        raise UsageError(f"{targs.dataset} has no class labels: there is nothing to probe")
    torch.set_num_threads(1)   # the probe's L-BFGS sums in one order, as in a one-thread training run

    def encoder(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        return bigbigan.Encoder(targs.z_dim, state["data_shape"][0], targs.e_image_size, targs.e_width,
                                targs.mlp_width)

    def both(E):
        scores = bigbigan.linear_probe(E, probe, data.num_classes)
        return {"mu": scores["metric/linear_probe"], "pool": scores["metric/linear_probe_pool"]}

    trained = encoder()
    trained.load_state_dict(state["models"]["E"])
    (xa, ya), (xb, yb) = probe
    result = {"checkpoint": {"step": state["step"], **both(trained)},
              "random": {str(s): both(encoder(s)) for s in random_seeds},
              "probe_images": {"train": len(ya), "held_out": len(yb)}}
    if pixels:
        result["pixels"] = bigbigan.fit_linear_probe(xa.flatten(1), ya, xb.flatten(1), yb, data.num_classes)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="a bigbigan.py checkpoint (ckpt.pt)")
    p.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="seeds of the randomly initialised encoders")
    p.add_argument("--data-root", default=None, help="where the checkpoint's dataset is (default: as in training)")
    args = p.parse_args(argv)
    with friendly_errors():
        result = probes(args.ckpt, args.random_seeds, args.data_root)
        print(json.dumps(result, indent=2))
        return result


if __name__ == "__main__":
    main()
