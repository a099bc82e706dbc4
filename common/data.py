"""Datasets as tensors, and infinite batch iterators.

    data = load(args)                       # validates and reads the data (CPU); before run.setup
    batches = iterate(data, args.batch_size, device, value_range=(-1, 1))
    x, y = next(batches)                    # x: (B, C, H, W) float on `device`; y: labels (or mode ids)

Small sets (MNIST, Fashion-MNIST, CIFAR, SVHN, `fake`, a folder of MNIST idx files) are held as one
uint8 tensor on the training device and batches are drawn by indexing it. Large ones (STL-10, CelebA,
LSUN, an image folder) stream through a DataLoader with workers. `fake` (or `fake:1` for one
channel) is deterministic synthetic data for dry runs and benchmarks. `ring8` and `grid25` are the 2D
Gaussian mixtures of the PacGAN protocol, sampled afresh for every batch.
"""
import gzip
import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common.run import UsageError, available_cores

IN_MEMORY = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")
STREAMED = ("stl10", "celeba", "lsun")
SYNTHETIC = ("fake", "ring8", "grid25")
NAMES = IN_MEMORY + STREAMED + SYNTHETIC
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
NATIVE_SIDE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32, "svhn": 32, "stl10": 96,
               "celeba": 178}   # CelebA: the 178x178 face crop


@dataclass
class Data:
    name: str
    kind: str                       # "image" or "toy"
    shape: tuple                    # (C, H, W), or (2,) for toys
    num_classes: int                # 0 when unlabelled
    images: torch.Tensor = None     # in-memory sets: uint8 (N, C, H, W)
    labels: torch.Tensor = None     # int64 (N,), -1 where unlabelled
    dataset: object = None          # streamed sets: a torch Dataset of (float [0, 1] image, label)
    centers: torch.Tensor = None    # toys: the mixture's means (K, 2)
    std: float = 0.0                # toys: the mixture's standard deviation

    def __len__(self):  # toys have no fixed size: 0
        return 0 if self.kind == "toy" else len(self.images) if self.images is not None else len(self.dataset)

    def __str__(self):  # for the start-up line
        if self.kind == "toy":
            return f"{self.name}: a 2D mixture of {len(self.centers)} Gaussians"
        where = "in memory" if self.images is not None else "streamed"
        return f"{self.name}: {len(self)} images {'x'.join(map(str, self.shape))}, {where}"


# 2D toys (PacGAN protocol)

def toy_mixture(name):
    """Means and sigma of ring8 (8 modes on the unit circle, 0.01) or grid25 ({-4, -2, 0, 2, 4}^2, 0.05)."""
    if name == "ring8":
        angle = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        return torch.stack([angle.cos(), angle.sin()], 1).float(), 0.01
    if name == "grid25":
        g = torch.arange(-4, 5, 2, dtype=torch.float32)
        return torch.cartesian_prod(g, g), 0.05
    raise UsageError(f"unknown toy dataset {name!r}")


# Loading

def load(args, split="train"):
    """args.dataset at args.image_size (CPU tensors, or a Dataset when streamed); UsageError when missing."""
    name, root, size = args.dataset, Path(args.data_root), args.image_size
    download = getattr(args, "download", True)
    if name in ("ring8", "grid25"):
        centers, std = toy_mixture(name)
        return Data(name, "toy", (2,), len(centers), centers=centers, std=std)
    if name == "fake" or name.startswith("fake:"):  # "fake:1" for one channel
        channels = int(name.split(":")[1]) if ":" in name else 3
        return _fake(size, seed=getattr(args, "seed", 0), channels=channels)
    if name == "stacked-mnist" or name.startswith("stacked:"):
        return _stacked(args, name.split(":", 1)[1] if ":" in name else "mnist", split)
    if name in IN_MEMORY:
        images, labels = _torchvision_tensors(name, root, split, download)
        return _in_memory(name, images, labels, size)
    if name in STREAMED or name.startswith("lsun:"):
        return _streamed(name, root, size, split, download)
    path = Path(name).expanduser()
    if path.is_dir():
        if sorted(path.glob("*images-idx3-ubyte*")):
            images, labels = read_idx_folder(path)
            return _in_memory(str(path), images, labels, size)
        return _image_folder(path, size)
    if os.sep in name or name.startswith("."):
        raise UsageError(f"dataset folder {name} does not exist")
    raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}, lsun:<category>, "
                     "or give the path of an image folder")


def _in_memory(name, images, labels, size):
    if images.shape[-1] != size or images.shape[-2] != size:
        images = resize_uint8(images, size)
    num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    return Data(name, "image", tuple(images.shape[1:]), num_classes, images=images.contiguous(), labels=labels)


def _stacked(args, source, split, n=128000):
    """Stacked MNIST (VEEGAN; PacGAN's 128,000 images): each channel a random digit of `source` (seeded by
    args.seed); label = the mode 100 d0 + 10 d1 + d2 of 1000."""
    import argparse
    digits = load(argparse.Namespace(**{**vars(args), "dataset": source}), split)
    if digits.images is None or digits.shape[0] != 1 or digits.num_classes != 10:
        raise UsageError(f"stacked:{source}: the source must be a labelled one-channel digit set (mnist, "
                         "fashion-mnist or a folder of MNIST idx files)")
    g = torch.Generator().manual_seed(getattr(args, "seed", 0) * 2 + (split != "train"))
    idx = torch.randint(len(digits.images), (n, 3), generator=g)
    images = digits.images[:, 0][idx]                                     # (n, 3, H, W)
    labels = digits.labels[idx] @ torch.tensor([100, 10, 1])
    name = "stacked-mnist" if source == "mnist" else f"stacked:{source}"
    return Data(name, "image", tuple(images.shape[1:]), 1000, images=images, labels=labels)


def resize_uint8(images, size, chunk=4096):
    """Resize a uint8 (N, C, H, W) tensor to size x size (bilinear, antialiased), in chunks."""
    from torchvision.transforms.v2 import functional as F
    return torch.cat([F.resize(images[i:i + chunk], [size, size], antialias=True)
                      for i in range(0, len(images), chunk)])


def _fake(size, seed=0, n=512, channels=3, classes=10):
    """Deterministic smooth random images (low-resolution noise upsampled), with random labels."""
    g = torch.Generator().manual_seed(1234 + seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    images = (images * 255).round().to(torch.uint8)
    labels = torch.randint(classes, (n,), generator=g)
    return Data(f"fake:{channels}", "image", (channels, size, size), classes, images=images, labels=labels)


def _missing(name, root, e):
    return UsageError(f"{name} is not under {root} and downloading is off or failed ({e}); "
                      f"run with --download and internet access, or point --data-root at a copy")


def _torchvision_tensors(name, root, split, download):
    import torchvision.datasets as tvd
    train = split == "train"
    try:
        if name in ("mnist", "fashion-mnist"):
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            ds = cls(root, train=train, download=download)
            return ds.data[:, None].clone(), ds.targets.long().clone()
        if name in ("cifar10", "cifar100"):
            ds = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(root, train=train, download=download)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
        if name == "svhn":
            ds = tvd.SVHN(root, split="train" if train else "test", download=download)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
    except Exception as e:  # torchvision raises RuntimeError when missing, URLError etc. when offline
        raise _missing(name, root, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    raise UsageError(f"unknown dataset {name!r}")


def _transform(size, center_crop=None):
    import torchvision.transforms as T
    steps = [T.CenterCrop(center_crop)] if center_crop else []
    return T.Compose(steps + [T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor()])


def _streamed(name, root, size, split, download):
    import torchvision.datasets as tvd
    try:
        if name == "stl10":  # the GAN papers train on the 100k unlabelled images (+ 5k train)
            ds = tvd.STL10(root, split="train+unlabeled" if split == "train" else "test",
                           download=download, transform=_transform(size))
            return Data(name, "image", (3, size, size), 10, dataset=ds)
        if name == "celeba":  # the usual 178x178 face crop, then resize
            ds = tvd.CelebA(root, split="train" if split == "train" else "test", target_type="identity",
                            download=download, transform=_transform(size, center_crop=178))
            return Data(name, "image", (3, size, size), 0, dataset=ds)
        categories = name.split(":", 1)[1] if ":" in name else "bedroom"
        classes = [f"{c}_{'train' if split == 'train' else 'val'}" for c in categories.split(",")]
        try:
            ds = tvd.LSUN(str(root / "lsun"), classes=classes, transform=_transform(size))
        except ImportError:
            raise UsageError("LSUN needs the lmdb package: pip install lmdb") from None
        return Data(name, "image", (3, size, size), len(classes), dataset=ds)
    except UsageError:
        raise
    except Exception as e:
        hint = " (LSUN is not downloadable by torchvision: fetch it with the LSUN tools)" if "lsun" in name else ""
        raise _missing(name, root, (str(e).splitlines()[0] if str(e) else type(e).__name__) + hint) from None


BAD_IMAGE = (OSError, SyntaxError, ValueError, EOFError)   # what PIL raises for truncated, corrupt or foreign files


def open_image(path, channels=3):
    """An image file in RGB (channels=3), L (1) or whichever it is (None), by its real range: 16- and 32-bit grey
    from 0-65535 (when above 255), float grey from [0, 1]; transparency on white. Raises one of BAD_IMAGE."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as img:
        img.load()
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and a.max(initial=0) <= 1 else 255.0 if a.max(initial=0) <= 255 else 65535.0
        img = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if channels is None:
        channels = 1 if img.mode in ("L", "1") else 3
    return img.convert("L" if channels == 1 else "RGB")


def why_unreadable(e):
    """A short reason for one of BAD_IMAGE, without the file name PIL repeats."""
    from PIL import UnidentifiedImageError
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


class ImageFiles(torch.utils.data.Dataset):
    """Image files with labels, streamed. An unreadable file is skipped with one warning naming it (the record is
    in shared memory: one warning among all workers) and the next readable file stands in."""

    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform
        self.bad = torch.zeros(len(files), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        for k in (j % len(self.files) for j in range(i, i + len(self.files))):
            if self.bad[k]:
                continue
            try:
                return self.transform(open_image(self.files[k])), self.labels[k]
            except BAD_IMAGE as e:
                self.bad[k] = 1
                print(f"warning: skipping unreadable image {self.files[k]} ({why_unreadable(e)}); "
                      f"{int(self.bad.sum())} skipped so far", file=sys.stderr, flush=True)
        raise UsageError(f"none of the {len(self.files)} images in {Path(self.files[0]).parent} can be read")


def _image_folder(path, size):
    """A folder of images: class subfolders (labelled as ImageFolder does), or images directly inside it."""
    import torchvision.datasets as tvd
    subdirs = [d for d in path.iterdir() if d.is_dir()]
    if subdirs:
        classes, index = tvd.folder.find_classes(str(path))
        samples = tvd.folder.make_dataset(str(path), index, extensions=IMAGE_EXTENSIONS)
        files, labels = [f for f, _ in samples], [y for _, y in samples]
    else:
        classes, labels = [], None
        files = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    ds = ImageFiles(files, labels or [-1] * len(files), _transform(size))
    return Data(str(path), "image", (3, size, size), len(classes), dataset=ds)


def native_side(dataset):
    """The side of a dataset's images (a folder: the largest shorter side of its first 16); None if unknown."""
    if dataset in NATIVE_SIDE:
        return NATIVE_SIDE[dataset]
    folder = Path(dataset).expanduser()
    if not folder.is_dir():
        return None
    if any(folder.glob("*images-idx3-ubyte*")):
        return read_idx_folder(folder)[0].shape[-1]
    from PIL import Image
    sides = []
    for f in itertools.islice((f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS), 16):
        try:
            with Image.open(f) as img:
                sides.append(min(img.size))
        except OSError:   # an unreadable file: the loader deals with it
            pass
    return max(sides, default=None)


def read_idx(path):
    """Read an idx file (MNIST format), gzipped or not, as a tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def read_idx_folder(path):
    """uint8 images (N, 1, 28, 28) and labels of a folder of MNIST idx files (train files first)."""
    path = Path(path)
    image_files = sorted(path.glob("*images-idx3-ubyte*"), key=lambda p: ("t10k" in p.name, p.name))
    images = read_idx(image_files[0])[:, None]
    label_file = sorted(path.glob(image_files[0].name.split("-images")[0] + "-labels-idx1-ubyte*"))
    labels = read_idx(label_file[0]).long() if label_file else torch.full((len(images),), -1)
    return images, labels


def split_held_out(args, data, n_valid, shuffle=False):
    """(train, valid, test) of an in-memory set: valid = `n_valid` training images (the last ones, or a fixed
    random draw); test = the test split, or the second half of valid when there is none. valid, test: uint8."""
    import dataclasses
    n = len(data)
    n_valid = n_valid if n > 2 * n_valid else max(n // 5, 2)
    if shuffle:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        keep, held = perm[n_valid:], perm[:n_valid]
    else:
        keep, held = torch.arange(n - n_valid), torch.arange(n - n_valid, n)
    train = dataclasses.replace(data, images=data.images[keep], labels=data.labels[keep])
    valid = data.images[held]
    test = load(args, split="test").images if args.dataset in IN_MEMORY else None
    if test is None:
        valid, test = valid[: n_valid // 2], valid[n_valid // 2:]
    return train, valid, test


# Batches

def to_range(x_uint8_or_unit, value_range, from_uint8):
    lo, hi = value_range
    x = x_uint8_or_unit.float()
    if from_uint8:
        x = x / 255
    return x * (hi - lo) + lo


def iterate(data, batch_size, device, value_range=(-1, 1), rank=0, world_size=1, workers=4):
    """Infinite (x, y) batches on `device`; under torchrun each rank draws from its own shard."""
    device = torch.device(device)
    if data.kind == "toy":
        centers = data.centers.to(device)
        while True:
            y = torch.randint(len(centers), (batch_size,), device=device)
            yield centers[y] + data.std * torch.randn(batch_size, 2, device=device), y
    if data.images is not None:
        images = data.images[rank::world_size].to(device)
        labels = (data.labels if data.labels is not None else torch.full((len(data.images),), -1))
        labels = labels[rank::world_size].to(device)
        while True:
            idx = torch.randint(len(images), (batch_size,), device=device)
            yield to_range(images[idx], value_range, True), labels[idx]
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(data.dataset, world_size, rank, shuffle=True)
    loader = torch.utils.data.DataLoader(
        data.dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            yield (to_range(x.to(device, non_blocking=True), value_range, False),
                   torch.as_tensor(y).to(device, non_blocking=True))
        epoch += 1


# Image-to-image translation (pix2pix.py, cyclegan.py): the archives of the official download scripts
# (junyanz/pytorch-CycleGAN-and-pix2pix datasets/), their folder layouts; cityscapes is not downloadable.
PAIRED_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/{}.tar.gz"
UNPAIRED_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{}.zip"
PAIRED_SETS = ("facades", "maps", "edges2shoes", "edges2handbags", "night2day")
UNPAIRED_SETS = ("apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo", "cezanne2photo",
                 "ukiyoe2photo", "vangogh2photo", "maps", "facades", "iphone2dslr_flower", "ae_photos")


@dataclass
class Translation:
    """Two image domains, uint8 (N, C, S, S) CPU tensors, and their file names. Paired: b[i] is a[i]'s target."""
    name: str
    a: torch.Tensor
    b: torch.Tensor
    paired: bool
    names: list
    names_b: list

    def __str__(self):  # for the start-up line
        return (f"{self.name}: {len(self.a)} {'pairs' if self.paired else f'A and {len(self.b)} B images'} "
                f"{'x'.join(map(str, self.a.shape[1:]))}")


def _layout(root, split, paired):
    """The folders of `split` in the standard layout (paired test: test/, else val/), or None."""
    options = ([["train"]] if split == "train" else [["test"], ["val"]]) if paired else [[split + "A", split + "B"]]
    for option in options:
        if all((root / d).is_dir() for d in option):
            return [root / d for d in option]
    return None


def load_translation(args, split, paired, size):
    """`split` of args.dataset at size x size (A, B swapped by --direction BtoA): paired {train,val,test}/ of
    A | B images, unpaired {trainA,trainB,testA,testB}/. Standard names download on first use."""
    name = args.dataset
    expect = "{train,val,test}/ with A and B side by side in each image" if paired else "{trainA,trainB,testA,testB}/"
    if name == "fake" or name.startswith("fake:"):  # synthetic; paired: B is A upside down
        channels, seed = int(name.split(":")[1]) if ":" in name else 3, 0 if split == "train" else 1
        a = _fake(size, seed=seed, n=32 if split == "train" else 8, channels=channels).images
        b = a.flip(-2) if paired else _fake(size, seed=seed + 2, n=len(a) * 3 // 4, channels=channels).images
        data = Translation(name, a, b, paired, *([f"{i:04d}.png" for i in range(len(x))] for x in (a, b)))
    else:
        if name == "cityscapes":
            raise UsageError("cityscapes cannot be downloaded (licence): get it from cityscapes-dataset.com, "
                             "prepare it with the official datasets/prepare_cityscapes_dataset.py, then --dataset PATH")
        standard = name in (PAIRED_SETS if paired else UNPAIRED_SETS)
        root = Path(args.data_root) / name if standard else Path(name).expanduser()
        if standard and _layout(root, split, paired) is None and getattr(args, "download", True):
            _download((PAIRED_URL if paired else UNPAIRED_URL).format(name), name, Path(args.data_root))
        if not standard and not root.is_dir():
            if os.sep in name or name.startswith("."):
                raise UsageError(f"dataset folder {name} does not exist (expected the layout PATH/{expect})")
            raise UsageError(f"unknown dataset {name!r}: give one of {', '.join(PAIRED_SETS if paired else UNPAIRED_SETS)}"
                             f" or a folder PATH/{expect}")
        folders = _layout(root, split, paired)
        if folders is None:
            raise UsageError(f"{root} has no {split} split (no images in {root}/{expect})")
        if paired:
            a, b, names = read_image_folder(folders[0], size, pairs=True)
            names_b = names
        else:
            (a, names), (b, names_b) = (read_image_folder(f, size) for f in folders)
        data = Translation(str(name), a, b, paired, names, names_b)
    if getattr(args, "direction", "AtoB") == "BtoA":
        data.a, data.b, data.names, data.names_b = data.b, data.a, data.names_b, data.names
    return data


def read_image_folder(folder, size, pairs=False, channels=None):
    """The images in `folder` (or the file `folder`) resized to size x size (bicubic, as the official code), uint8
    (N, C, size, size) (C = 1 when all are grey, or `channels`), and their names; pairs=True splits each into its
    left (A) and right (B) square: A, B, names. Decoded on a thread per core, taken in name order."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def read(f):   # the resized image(s) of f, or what went wrong: reported below, in name order
        try:
            img = open_image(f, channels)
        except BAD_IMAGE as e:
            return e
        if pairs and img.width != 2 * img.height:
            return img.size
        h = img.height
        halves = [img.crop((0, 0, h, h)), img.crop((h, 0, 2 * h, h))] if pairs else [img]
        return [x.resize((size, size), Image.BICUBIC) for x in halves]
    images, kept = [], []
    with ThreadPoolExecutor(min(len(files), available_cores())) as pool:
        for f, out in zip(files, pool.map(read, files)):
            if isinstance(out, BAD_IMAGE):   # read at start-up: a bad file is named and left out, nothing else is lost
                print(f"warning: skipping unreadable image {f} ({why_unreadable(out)})", file=sys.stderr, flush=True)
                continue
            if isinstance(out, tuple):
                pool.shutdown(cancel_futures=True)   # stop reading: the run cannot start
                raise UsageError(f"{f} is {out[0]}x{out[1]}: a paired image holds A and B side by side, "
                                 "so its width must be twice its height")
            images.append(out)
            kept.append(f.name)
    if not images:
        raise UsageError(f"none of the images in {folder} can be read")
    if channels is None:
        channels = 1 if all(x.mode == "L" for pair in images for x in pair) else 3
    stacks = [torch.from_numpy(np.stack([np.asarray(pair[k].convert("L" if channels == 1 else "RGB"), np.uint8)
                                         for pair in images])).reshape(len(images), size, size, channels)
              .permute(0, 3, 1, 2).contiguous() for k in range(len(images[0]))]
    return (*stacks, kept)


def _download(url, name, root):
    """Fetch and unpack a standard archive into root/ (root/name/ afterwards)."""
    import shutil
    import tarfile
    import urllib.request
    import zipfile
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f".{name}-{os.getpid()}.download"
    try:
        print(f"downloading {url} into {root}", flush=True)
        with urllib.request.urlopen(url) as response, open(archive, "wb") as f:
            shutil.copyfileobj(response, f)
        if url.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(root)
        else:
            with tarfile.open(archive) as t:
                t.extractall(root, filter="data")
    except Exception as e:  # offline, moved URL, truncated archive
        raise _missing(name, root, f"{url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        archive.unlink(missing_ok=True)


def translation_batches(data, batch_size, device, crop, flip=True, rank=0, world_size=1):
    """Infinite (a, b) batches in [-1, 1] on `device`, each image cut by a random crop x crop window and flipped
    with p = 0.5 (flip=True); a pair shares its window and flip (official data/base_dataset.py)."""

    a_all, b_all = data.a[rank::world_size].to(device), data.b[rank::world_size].to(device)
    n, window = torch.arange(batch_size, device=device), torch.arange(crop, device=device)

    def cutter(size):  # a random window and flip per image: (B, C, size, size) -> (B, C, crop, crop)
        top, left = torch.randint(size - crop + 1, (2, batch_size, 1), device=device)
        flipped = (torch.rand(batch_size, 1, device=device) < 0.5) & flip
        rows, cols = top + window, torch.where(flipped, left + crop - 1 - window, left + window)
        # the gather yields (B, crop, crop, C); contiguous NCHW (a channels-last batch would run every CPU
        # convolution of the nets channels-last, 7% slower for pix2pix's U-Net at 256 px)
        return lambda x: x[n[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    while True:
        i = torch.randint(len(a_all), (batch_size,), device=device)
        j = i if data.paired else torch.randint(len(b_all), (batch_size,), device=device)
        cut_a = cutter(a_all.shape[-1])
        cut_b = cut_a if data.paired else cutter(b_all.shape[-1])
        yield to_range(cut_a(a_all[i]), (-1, 1), True), to_range(cut_b(b_all[j]), (-1, 1), True)


def save_images(x, folder, names):
    """Write each image of x (N, C, H, W) in [-1, 1] as folder/<name stem>.png."""
    import torchvision.utils as vutils
    Path(folder).mkdir(parents=True, exist_ok=True)
    for img, name in zip(x, names):
        vutils.save_image(img.float().cpu() * 0.5 + 0.5, Path(folder) / (Path(name).stem + ".png"))
