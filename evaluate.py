"""Scores of samples on disk, and the reference statistics of datasets, from the command line:

    python dcgan.py --sample RUN/ckpt.pt --num-samples 50000         # writes RUN/samples/samples-<step>-50000.npz
    python evaluate.py stats cifar10 --image-size 64                 # the training images' statistics (cached):
                                                                     # data/fid_stats/cifar10-train-64-legacy-50000.npz
    python evaluate.py fid RUN/samples/samples-0009750-50000.npz data/fid_stats/cifar10-train-64-legacy-50000.npz
    python evaluate.py is samples/      # a folder of images, or an .npz of samples
    python evaluate.py kid A B          # and pr REAL FAKE: folders, .npz samples, or .npz files written by stats
    python evaluate.py cfid samples.npz data/mnist-idx --classifier data/mnist-idx   # classifier FID; a folder of
                                        # MNIST idx files is a reference set as it is (no statistics to build)
    python evaluate.py agree samples.npz   # labelled: an .npz with 'labels', or class subfolders 0/ ... 9/
    python evaluate.py modes samples.npz --classifier mnist                          # Stacked-MNIST modes / KL

fid, is, kid, pr and stats run the Inception network of common/metrics.py; cfid, agree and modes the digit
classifier of common/digits.py. An .npz of samples holds "arr_0" (N, H, W, C) uint8 (what --num-samples
writes, and what the reference FID tools read) or "images" ((N, [C,] H, W), uint8 or in [-1, 1]), and
optional "labels".
"""
import argparse
import os
from pathlib import Path

import numpy as np
import torch

from common import data as datasets
from common import digits
from common.metrics import (FID_WEIGHTS_URL, frechet_distance, gaussian_stats, inception_features,
                            inception_score, kid, load_stats, precision_recall, reference_stats, stats_path,
                            to_uint8)
from common.run import UsageError, as_usage_error, friendly_errors


def _open(path, channels):
    try:
        return datasets.open_image(path, channels)
    except datasets.BAD_IMAGE as e:   # scores of a folder with a file missing would mislead: stop
        raise UsageError(f"{path} is not a readable image ({datasets.why_unreadable(e)}); remove or replace it") from None


def _npz_images(path):
    """uint8 (N, C, H, W) images and labels (or None) of an .npz of samples: "arr_0" (N, H, W, C) uint8, the
    layout the scripts' --sample --num-samples write and the reference FID tools read, or "images"
    ((N, [C,] H, W), uint8 or in [-1, 1]); None when the file holds statistics instead."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files if k in ("arr_0", "images", "labels")}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path} ({e})") from None
    if "arr_0" in arrays:
        x = torch.from_numpy(arrays["arr_0"])
        x = x[..., None] if x.dim() == 3 else x
        x = x.permute(0, 3, 1, 2)
    elif "images" in arrays:
        x = torch.from_numpy(arrays["images"])
        x = x[:, None] if x.dim() == 3 else x
    else:
        return None
    x = x if x.dtype == torch.uint8 else to_uint8(x)
    return x.contiguous(), (torch.from_numpy(arrays["labels"]) if "labels" in arrays else None)


def _read_input(path, args):
    """An .npz of statistics, or {"features", "logits"} of an .npz of samples or a folder of images (sorted by name)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        samples = _npz_images(path)
        if samples is None:
            return load_stats(path)
        x = samples[0]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        pool3, logits = inception_features((x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)),
                                           args.device, args.mode, weights=args.inception_weights)
        return {"features": pool3, "logits": logits}
    if not path.is_dir():
        raise UsageError(f"{path} is neither a folder of images nor an .npz file of samples or statistics")
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in datasets.IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"{path} holds no images ({', '.join(datasets.IMAGE_EXTENSIONS)})")

    def batches():
        for i in range(0, len(files), args.batch_size):
            images = [torch.from_numpy(np.array(_open(f, 3))).permute(2, 0, 1) for f in files[i:i + args.batch_size]]
            if len({t.shape for t in images}) > 1:
                raise UsageError(f"the images in {path} differ in size; resize them first")
            yield torch.stack(images)
    pool3, logits = inception_features(batches(), args.device, args.mode, weights=args.inception_weights)
    return {"features": pool3, "logits": logits}


def _read_digits(path, channels):
    """uint8 (N, C, H, W) images and labels (None if absent) of an .npz ("images" (N, [C,] H, W), uint8 or in
    [-1, 1]; optional "labels"), a folder of MNIST idx files, or a folder of images (labels: subfolders 0/, 1/...)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        samples = _npz_images(path)
        if samples is None:
            raise UsageError(f"{path} holds no images ('arr_0' or 'images')")
        x, y = samples
        if x.shape[1] != channels:   # grey digits stored as RGB, or the reverse
            x = x.float().mean(1, keepdim=True).round().to(torch.uint8) if channels == 1 else x.expand(-1, 3, -1, -1)
        return x, y
    if not path.is_dir():
        raise UsageError(f"{path} is neither a folder of images nor an .npz file of samples")
    if sorted(path.glob("*images-idx3-ubyte*")):
        return datasets.read_idx_folder(path)
    subdirs = sorted((d for d in path.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    files = [(f, int(d.name)) for d in subdirs for f in sorted(d.iterdir())] or [(f, -1) for f in sorted(path.iterdir())]
    files = [(f, y) for f, y in files if f.suffix.lower() in datasets.IMAGE_EXTENSIONS]
    if not files:
        raise UsageError(f"{path} holds no images ({', '.join(datasets.IMAGE_EXTENSIONS)})")
    arrays = [np.asarray(_open(f, channels)) for f, _ in files]
    if len({a.shape for a in arrays}) > 1:
        raise UsageError(f"the images in {path} differ in size; resize them first")
    x = torch.from_numpy(np.stack(arrays))
    return (x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)).contiguous(), \
        (torch.tensor([y for _, y in files]) if subdirs else None)


def _digit_command(args):
    clf = digits.classifier(args.classifier, args.data_root, args.device)
    sets = [_read_digits(p, 3 if args.command == "modes" else 1) for p in args.inputs]
    with as_usage_error():
        if args.command == "cfid":
            print(f"classifier FID (digit-classifier features, not Inception): "
                  f"{digits.classifier_fid(clf, sets[0][0], sets[1][0]):.6f}")
        elif args.command == "agree":
            images, labels = sets[0]
            if labels is None or (labels < 0).any():
                raise UsageError("agree needs labels: an .npz with a 'labels' array, or class subfolders 0/ ... 9/")
            print(f"class agreement: {digits.class_agreement(clf, images, labels):.6f}")
        else:
            modes, kl = digits.stacked_mnist_modes(clf, sets[0][0])
            print(f"stacked MNIST modes: {modes} / 1000\nKL(p_model || uniform): {kl:.6f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python evaluate.py", description="FID, IS, KID and precision/recall "
                                "of folders of images or .npz statistics, and cached reference statistics of datasets")
    p.add_argument("command", choices=("fid", "is", "kid", "pr", "stats", "cfid", "agree", "modes"),
                   help="fid A B | is A | kid A B | pr REAL FAKE | stats DATASET (compute and cache its statistics); "
                        "digit metrics: cfid A B (classifier FID) | agree A (labelled) | modes A (Stacked MNIST)")
    p.add_argument("inputs", nargs="+", help="folders of images or .npz statistics; a dataset name for stats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--inception-weights", metavar="PATH", help="the FID Inception weights "
                   f"(default: $FID_INCEPTION_WEIGHTS, else the torch hub cache, else {FID_WEIGHTS_URL})")
    p.add_argument("--mode", choices=("legacy", "clean"), default="legacy", help="resize as the TF code, or clean-fid")
    p.add_argument("--data-root", default=os.environ.get("GAN_DATA_ROOT", "data"), help="stats: where datasets are")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="stats: download a missing torchvision dataset (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="stats: the size the scripts train at (default: 32)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="stats: the split (default: train)")
    p.add_argument("--max-images", type=int, default=50000, help="stats: at most this many images (default: 50000)")
    p.add_argument("--classifier", default="mnist", metavar="DATASET", help="cfid, agree, modes: the digits the "
                   "classifier is trained on (mnist, fashion-mnist, a folder of MNIST idx files) (default: mnist)")
    args = p.parse_args(argv)
    with friendly_errors():
        wanted = {"fid": 2, "is": 1, "kid": 2, "pr": 2, "stats": 1, "cfid": 2, "agree": 1, "modes": 1}[args.command]
        if len(args.inputs) != wanted:
            raise UsageError(f"{args.command} takes {wanted} input(s), got {len(args.inputs)}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda was given but CUDA is not available")
        if args.command in ("cfid", "agree", "modes"):
            return _digit_command(args)
        if args.command == "stats":
            data = datasets.load(argparse.Namespace(**vars(args), dataset=args.inputs[0], seed=0), split=args.split)
            stats = reference_stats(data, args.data_root, args.device, args.batch_size, args.split, args.mode,
                                    args.max_images, weights=args.inception_weights)
            where = stats_path(args.data_root, data.name, args.split, data.shape[-1], args.mode, int(stats["n"]))
            return print(f"{where}: {int(stats['n'])} images")
        inputs = [_read_input(path, args) for path in args.inputs]
        if args.command == "fid":
            stats = [(s["mu"], s["sigma"]) if "mu" in s else gaussian_stats(s["features"]) for s in inputs]
            print(f"FID: {frechet_distance(*stats[0], *stats[1]):.6f}")
        elif args.command == "is":
            if "logits" not in inputs[0]:
                raise UsageError("the Inception score needs a folder of images, not statistics")
            print("IS: {:.6f} ± {:.6f}".format(*inception_score(inputs[0]["logits"])))
        elif any("features" not in s for s in inputs):
            raise UsageError(f"{args.command} needs features: folders, or .npz files written by the stats command")
        elif args.command == "kid":
            print("KID: {:.6f} ± {:.6f}".format(*kid(*(s["features"] for s in inputs))))
        else:
            print("precision: {:.6f}\nrecall: {:.6f}".format(*precision_recall(*(s["features"] for s in inputs))))


if __name__ == "__main__":
    main()
