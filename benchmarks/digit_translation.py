"""The two 32x32 digit translation tasks behind the README's pix2pix and CycleGAN numbers, and their scoring.

    python benchmarks/digit_translation.py make MNIST_DIR tasks/     # MNIST_DIR: the MNIST test set's idx files
    python pix2pix.py --dataset tasks/masked --image-size 32 --load-size 36 --g-width 16 --d-width 16 \\
        --d-layers 2 --steps 4000 --metrics none
    python benchmarks/digit_translation.py score RUN/ckpt.pt --tasks tasks/ --classifier MNIST_DIR

`make` writes, from MNIST_DIR (a folder holding only the 10k test digits' t10k-images/labels idx files, e.g.
`mkdir mnist-test && cp data/MNIST/raw/t10k-* mnist-test/` after any MNIST run has downloaded them),
zero-padded to 32x32:
  tasks/masked/{train,test}/   pix2pix's layout: each PNG is input | target side by side, the input being the
                               digit with its lower half (rows 16-31) blanked, the target the whole digit;
  tasks/outline/{trainA,trainB,testA,testB}/   CycleGAN's layout: A digits, B stroke outlines (dilation minus
                               erosion, 3x3) of *other* digits, so no pair exists;
and labels.txt (file name, digit) in each folder. Training uses the first 8,000 images, testing the last
2,000: the images the digit classifier of common/digits.py holds out, so it never saw the test digits.

`score` translates the test split with a checkpoint and measures, with that classifier (on the 28x28 digit
inside the padding), for pix2pix: L1 to the target, PSNR, classifier FID against the targets, and the share of
outputs classified as the input's digit, with G as the official test runs it (one image at a time, BN in train
mode, so each output is normalised by its own statistics; dropout would stay on, but the 32x32 U-Net has none)
and again with G in eval mode (BN's running averages); for CycleGAN: the share of F(outline) classified as the
outline's digit and of G(digit) as the digit's, the cycle L1 both ways, and the classifier FID of each
direction. Prints JSON.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import checkpoint as ckpt_io  # noqa: E402
from common import data as datasets  # noqa: E402
from common import digits  # noqa: E402
from common.run import UsageError, friendly_errors  # noqa: E402

N_TRAIN, N_TEST = 8000, 2000


def write_folder(folder, images, labels, first):
    """images (N, H, W) in [0, 1] -> folder/NNNNN.png (N from `first`) and folder/labels.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, label) in enumerate(zip(images, labels), start=first):
        Image.fromarray((img * 255).round().byte().numpy()).save(folder / f"{i:05d}.png")
        lines.append(f"{i:05d}.png {int(label)}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")


def make(mnist_dir, out):
    if not any(Path(mnist_dir).glob("*images-idx3-ubyte*")):
        raise UsageError(f"{mnist_dir} holds no MNIST idx files (*images-idx3-ubyte[.gz] and *labels-idx1-ubyte[.gz])")
    images, labels = datasets.read_idx_folder(mnist_dir)
    if len(images) != N_TRAIN + N_TEST:   # then the classifier's held-out images are exactly the test split
        raise UsageError(f"{mnist_dir} has {len(images)} images; the tasks take a folder of exactly "
                         f"{N_TRAIN + N_TEST} (the MNIST test set's t10k-* files alone)")
    x = F.pad(images.float() / 255, (2, 2, 2, 2))   # (N, 1, 32, 32) in [0, 1]
    masked = x.clone()
    masked[:, :, 16:] = 0
    pairs = torch.cat([masked, x], -1)[:, 0]                              # input | target, (N, 32, 64)
    train, test = slice(0, N_TRAIN), slice(N_TRAIN, N_TRAIN + N_TEST)
    for split, s in (("train", train), ("test", test)):
        write_folder(out / "masked" / split, pairs[s], labels[s], s.start)
    outline = (F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)).clamp(0, 1)   # morphological gradient
    half, quarter = N_TRAIN // 2, N_TEST // 2
    for name, s, source in (("trainA", slice(0, half), x), ("trainB", slice(half, N_TRAIN), outline),
                            ("testA", slice(N_TRAIN, N_TRAIN + quarter), x),
                            ("testB", slice(N_TRAIN + quarter, N_TRAIN + N_TEST), outline)):
        write_folder(out / "outline" / name, source[s, 0], labels[s], s.start)
    print(f"wrote {out / 'masked'} (pix2pix) and {out / 'outline'} (CycleGAN)")


def read(folder, pairs=False):
    """The images of a task folder in [-1, 1] (a pair folder: input and target) and their labels."""
    if not (folder / "labels.txt").is_file():
        raise UsageError(f"{folder}/labels.txt not found: make the tasks with `digit_translation.py make`")
    *images, names = datasets.read_image_folder(folder, 32, pairs=pairs, channels=1)
    label_of = dict(line.split() for line in (folder / "labels.txt").read_text().splitlines() if line)
    labels = torch.tensor([int(label_of[name]) for name in names])
    return [datasets.to_range(t, (-1, 1), True) for t in images], labels


def digit(x):
    """The 28x28 digit inside the 2-pixel padding the tasks added."""
    return x[..., 2:30, 2:30]


def score_pix2pix(state, tasks, clf):
    import pix2pix
    a = state["args"]
    G = pix2pix.UNet(1, 1, 32, a["g_width"], skips=a["netG"] == "unet", dropout=a["dropout"])
    G.load_state_dict(state["models"]["G"])
    (x, y), labels = read(tasks / "masked" / "test", pairs=True)
    out = {"step": state["step"]}
    for tag, noise in (("", True), (" (G in eval mode)", False)):
        torch.manual_seed(0)   # the test-time dropout (a 32x32 U-Net has none)
        fake = pix2pix.translate(G, x, noise=noise)
        out.update({f"l1{tag}": float((fake - y).abs().mean()), f"psnr{tag}": float(pix2pix.psnr(fake, y)),
                    f"cfid{tag}": digits.classifier_fid(clf, digit(fake), digit(y)),
                    f"agree{tag}": digits.class_agreement(clf, digit(fake), labels)})
    out["reference: cfid(masked inputs, targets)"] = digits.classifier_fid(clf, digit(x), digit(y))
    out["reference: agree(masked inputs)"] = digits.class_agreement(clf, digit(x), labels)
    return out


def score_cyclegan(state, tasks, clf):
    import cyclegan
    a = state["args"]
    G, F_ = (cyclegan.Generator(1, 1, a["g_width"], a["n_blocks"]).eval() for _ in range(2))
    G.load_state_dict(state["models"]["G"])
    F_.load_state_dict(state["models"]["F"])
    ([digits_a], la), ([outlines_b], lb) = read(tasks / "outline" / "testA"), read(tasks / "outline" / "testB")
    with torch.no_grad():
        g_a, f_b = cyclegan.translate(G, digits_a), cyclegan.translate(F_, outlines_b)
        return {"step": state["step"],
                "agree: F(outline) as its source digit": digits.class_agreement(clf, digit(f_b), lb),
                "agree: G(digit) as its source digit": digits.class_agreement(clf, digit(g_a), la),
                "cycle L1 A->B->A": float((cyclegan.translate(F_, g_a) - digits_a).abs().mean()),
                "cycle L1 B->A->B": float((cyclegan.translate(G, f_b) - outlines_b).abs().mean()),
                "cfid(F(outlines), digits)": digits.classifier_fid(clf, digit(f_b), digit(digits_a)),
                "cfid(G(digits), outlines)": digits.classifier_fid(clf, digit(g_a), digit(outlines_b)),
                "reference: agree(outlines)": digits.class_agreement(clf, digit(outlines_b), lb)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write the two tasks from a folder of MNIST idx files")
    m.add_argument("mnist_dir")
    m.add_argument("out")
    s = sub.add_parser("score", help="score a pix2pix or CycleGAN checkpoint on a task's test split")
    s.add_argument("ckpt")
    s.add_argument("--tasks", required=True, help="the folder `make` wrote")
    s.add_argument("--classifier", required=True, help="the MNIST idx folder the tasks came from (its digit "
                                                         "classifier, trained once and cached under --data-root)")
    s.add_argument("--data-root", default="data")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with friendly_errors():
        if args.cmd == "make":
            return make(args.mnist_dir, Path(args.out))
        try:
            state = ckpt_io.load(args.ckpt, "pix2pix")
        except ckpt_io.CheckpointError as e:   # a CycleGAN checkpoint, or the error says what it is
            if "not pix2pix.py" not in str(e):
                raise
            state = ckpt_io.load(args.ckpt, "cyclegan")
        script = state["script"]
        if state["args"]["image_size"] != 32:
            raise UsageError(f"{args.ckpt} was trained at {state['args']['image_size']} px; the tasks are 32x32")
        clf = digits.classifier(args.classifier, args.data_root)
        scores = (score_pix2pix if script == "pix2pix" else score_cyclegan)(state, Path(args.tasks), clf)
        print(json.dumps(scores, indent=1))
        return scores


if __name__ == "__main__":
    main()
