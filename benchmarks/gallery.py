"""The README's gallery: one small picture per script, drawn by the script's own --sample from a run
trained on a 2-core CPU (the commands of docs/results.md), and the commands that make them again.

    python benchmarks/digit_translation.py make data/mnist-test tasks     # pix2pix's and cyclegan's tasks
    python benchmarks/gallery.py train --digits data/mnist-test --tasks tasks --runs runs/gallery   # hours
    python benchmarks/gallery.py render --runs runs/gallery              # docs/gallery/<script>.png
    python benchmarks/gallery.py commands                                 # print every command, run nothing

`--digits` is the MNIST test split as a folder of idx files (see the README: "Datasets").
Each picture is what `python X.py --sample RUN/ckpt.pt` writes (gail: its learning curve, read from the
run's TensorBoard events), shrunk to a palette PNG of at most 150 KB. `train` skips a finished run and
resumes an interrupted one (--resume auto), so running it again continues where it stopped.
"""
import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "gallery"
MAX_BYTES = 150_000
MNIST = "--dataset {digits}"
# script -> [(run name, training flags)], the --sample flags, the grids to show (side by side) and a caption.
# The training flags are those of docs/results.md; the seed is 0 unless the caption says why not.
RUNS = {
    "gan": ([("gan", f"{MNIST} --steps 8000 --eval-every 2000")], "", ["samples"], "MNIST test digits, 8k steps"),
    "dcgan": ([("dcgan", "--dataset stacked:{digits} --image-size 32 --g-width 16 --d-width 16 --batch-size 64 "
                         "--steps 1500 --metrics modes,cfid --eval-samples 26000")], "", ["samples"],
              "Stacked MNIST (a digit per colour channel), 1.5k steps"),
    "improved_gan": ([("improved_gan", f"{MNIST} --test-size 2000 --labels 100 --epochs 40 --polyak 0.999")], "",
                     ["samples"], "feature-matching samples of the semi-supervised run, 100 labels, 40 epochs"),
    "wgan": ([("wgan", "--dataset ring8 --mlp-units 128 --steps 10000")], "", ["samples"],
             "ring of 8 Gaussians (red: the modes), 10k critic-clipped steps"),
    "wgan_gp": ([("wgan_gp", "--dataset grid25 --steps 2500")], "", ["samples"],
                "grid of 25 Gaussians (red: the modes), 2.5k steps"),
    "sngan": ([("sngan", f"{MNIST} --image-size 32 --arch cnn --g-width 64 --d-width 16 --steps 2000 "
                         "--metrics cfid --eval-samples 5000")], "", ["samples"],
              "MNIST test digits at 32 px, the CNN nets at reduced width, 2k steps"),
    "sagan": ([("sagan", f"{MNIST} --g-width 8 --d-width 8 --batch-size 32 --steps 3000 --metrics cfid,agree "
                         "--eval-every 1000 --eval-samples 5000")], "", ["samples", "attention"],
              "class-conditional digits (a row per class) and attention maps, 3k steps"),
    "progan": ([("progan", f"{MNIST} --image-size 32 --fmap-base 256 --fmap-max 32 --z-dim 32 --batch-size 16 "
                           "--stable-kimg 10 --fade-kimg 10 --gp-target 1 --ema 0.99 --steps 6250 --metrics cfid "
                           "--eval-every 625 --eval-samples 2000")], "", ["samples"],
               "grown from 4x4 to 32x32 on MNIST test digits, 100k images"),
    "stylegan": ([("stylegan", f"{MNIST} --image-size 32 --fmap-base 256 --fmap-max 32 --z-dim 32 --w-dim 32 "
                               "--batch-size 16 --batch-schedule '' --stable-kimg 10 --fade-kimg 10 --ema-kimg 1 "
                               "--steps 6250 --mixing-prob 0 --metrics cfid --eval-every 625 --eval-samples 2000")],
                 "", ["style_mixing_coarse"], "style mixing: B's coarse styles (4-8 px) on A's, grown 8 to 32 px"),
    "cgan": ([("cgan", f"{MNIST} --arch conv --width 16 --steps 1500")], "", ["samples"],
             "a row per label (the conv variant), 1.5k steps"),
    "pix2pix": ([("pix2pix", "--dataset {tasks}/masked --image-size 32 --load-size 36 --g-width 16 --d-width 16 "
                             "--d-layers 2 --steps 4000 --metrics none")], "", ["test_panel"],
                "test digits with the lower half masked: input, output, target"),
    "cyclegan": ([("cyclegan", "--dataset {tasks}/outline --image-size 32 --load-size 36 --g-width 16 --d-width 16 "
                               "--d-layers 2 --steps 2000 --metrics none")], "",
                 ["test_A_to_B_to_A", "test_B_to_A_to_B"],
                 "unpaired digits and stroke outlines: each input, its translation and its cycle"),
    "infogan": ([("infogan", f"{MNIST} --width 32 --steps 1500 --eval-every 500")], "", ["c1"],
                "varying the categorical code c1 along each row (fixed noise), 1.5k steps"),
    "bigbigan": ([("bigbigan", f"{MNIST} --g-width 8 --d-width 8 --e-width 16 --mlp-width 128 --batch-size 32 "
                               "--steps 2000 --metrics cfid,agree --eval-samples 2000 --eval-every 500")], "",
                 ["reconstructions"], "reconstructions G(E(x)) of held-out digits (pairs: x, then G(E(x)))"),
    "gmmn": ([("gmmn", f"{MNIST} --mode ae --steps 4000")], "", ["samples"],
             "GMMN+AE samples: moment matching on an autoencoder's codes"),
    "imle": ([("imle", f"{MNIST} --steps 1875")], "", ["samples"], "15 epochs of IMLE on the MNIST test digits"),
    "gail": ([("gail", "--steps 300")], None, ["curve"],
             "CartPole-v1 from one expert trajectory: mean return per iteration"),
    "vqgan": ([("vqgan", f"{MNIST} --image-size 32 --g-width 32 --ch-mult 1,2,2 --num-res-blocks 1 --norm-groups 8 "
                         "--embed-dim 64 --d-width 32 --batch-size 16 --steps 1000 --perceptual-weight 0 "
                         "--disc-start 100000 --restart-dead-codes 100 --metrics cfid,agree --eval-samples 1000 --eval-every 250"),
               ("vqgan-stage2", "--stage 2 --vqgan {runs}/vqgan/ckpt.pt --n-layer 4 --n-head 4 --n-embd 128 "
                                "--batch-size 32 --steps 2000 --metrics cfid --eval-samples 1000")],
              "", ["reconstructions", "samples"], "reconstructions (pairs) and samples of the GPT prior over the codes"),
}


def training_commands(runs, digits, tasks):
    for script, (stages, *_) in RUNS.items():
        for name, flags in stages:
            flags = flags.format(digits=digits, tasks=tasks, runs=runs)
            yield name, [sys.executable, f"{script}.py", *shlex.split(flags), "--threads", "1",
                         "--out", str(Path(runs) / name)]


def finished(runs, name):
    """Whether the run wrote its summary at its last step (summary.json, or summary-<checkpoint>.json)."""
    import json
    return any(not json.loads(f.read_text()).get("interrupted", True) for f in (Path(runs) / name).glob("summary*.json"))


def checkpoint(runs, name):
    run = Path(runs) / name
    return next(iter(sorted(run.glob("*.pt"))), None) if run.is_dir() else None


def shrink(images, path, caption_height=0):
    """Put the images side by side, then save a palette PNG of at most MAX_BYTES (halving the size until it fits)."""
    from PIL import Image
    parts = [Image.open(p).convert("RGB") for p in images]
    height = max(p.height for p in parts)
    canvas = Image.new("RGB", (sum(p.width for p in parts) + 8 * (len(parts) - 1), height + caption_height), "white")
    x = 0
    for p in parts:
        canvas.paste(p, (x, 0))
        x += p.width + 8
    while True:
        canvas.quantize(256).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            return path
        canvas = canvas.resize((canvas.width * 3 // 4, canvas.height * 3 // 4))


def curve(events_dir, path, tag="return/true"):
    """A learning curve (tag against step) from TensorBoard events, drawn with PIL."""
    from PIL import Image, ImageDraw
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    tag = tag if tag in tags else next(t for t in tags if "return" in t)   # gail: return/true
    points = [(e.step, e.value) for e in acc.Scalars(tag)]
    w, h, pad = 480, 240, 36
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    (x0, x1), (y0, y1) = (min(p[0] for p in points), max(p[0] for p in points)), (0, max(p[1] for p in points))
    xy = [(pad + (s - x0) / max(x1 - x0, 1) * (w - 2 * pad), h - pad - (v - y0) / max(y1 - y0, 1e-9) * (h - 2 * pad))
          for s, v in points]
    draw.line([(pad, pad), (pad, h - pad), (w - pad, h - pad)], fill="black")
    draw.line(xy, fill=(200, 30, 30), width=2)
    draw.text((pad + 4, 4), f"{tag} (max {y1:.0f})", fill="black")
    draw.text((w - pad - 60, h - pad + 6), f"step {x1}", fill="black")
    img.save(path)
    return path


def render(runs):
    OUT.mkdir(parents=True, exist_ok=True)
    for script, (stages, sample_flags, grids, caption) in RUNS.items():
        name = stages[-1][0]
        ckpt = checkpoint(runs, name)
        if ckpt is None:
            print(f"{script}: no checkpoint in {Path(runs) / name}; train it first")
            continue
        target = OUT / f"{script}.png"
        if sample_flags is None:   # no images to sample: the learning curve of the run
            with tempfile.TemporaryDirectory() as tmp:
                shrink([curve(Path(runs) / name, Path(tmp) / "curve.png")], target)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, f"{script}.py", "--sample", str(ckpt), "--out", tmp, *shlex.split(sample_flags)]
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    print(f"{script}: {shlex.join(cmd[1:])} failed: {done.stderr.strip().splitlines()[-1]}")
                    continue
                pngs = {p.name.rsplit("-", 2)[0]: p for p in Path(tmp).glob("*.png")}
                if set(grids) - set(pngs):
                    print(f"{script}: --sample wrote {sorted(pngs)}, not {sorted(set(grids) - set(pngs))}")
                    continue
                shrink([pngs[g] for g in grids], target)
        print(f"{target.relative_to(ROOT)}: {target.stat().st_size / 1000:.0f} KB  ({caption})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["train", "render", "commands"])
    p.add_argument("--runs", default="runs/gallery", help="where the training runs go (default: %(default)s)")
    p.add_argument("--digits", default="data/mnist-test", help="the MNIST test split as an idx folder")
    p.add_argument("--tasks", default="tasks", help="benchmarks/digit_translation.py's tasks folder")
    p.add_argument("scripts", nargs="*", help="only these scripts (default: all)")
    args = p.parse_intermixed_args(argv)
    wanted = set(args.scripts or RUNS)
    commands = [(n, c) for n, c in training_commands(args.runs, args.digits, args.tasks) if n.split("-")[0] in wanted]
    if args.action == "commands":
        for _, cmd in commands:
            print(shlex.join(["python", *cmd[1:]]))
    elif args.action == "train":
        for name, cmd in commands:
            if not finished(args.runs, name):
                cmd += ["--resume", "auto"] if checkpoint(args.runs, name) else []
                print(shlex.join(["python", *cmd[1:]]), flush=True)
                subprocess.run(cmd, cwd=ROOT, check=True)
    else:
        render(args.runs)


if __name__ == "__main__":
    main()
