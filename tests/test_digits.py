"""common/digits.py: the digit classifier, classifier FID, class agreement, Stacked MNIST modes and KL,
the stacked data set and its command line (evaluate.py), on synthetic separable digits (no MNIST needed)."""
import argparse
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common import data as datasets
from common import digits
from common import metrics
import evaluate
from common.run import UsageError

STEPS = 80  # enough for the synthetic classes; the real classifier trains longer


def synthetic_digits(n, seed=0, noise=0.15):
    """10 separable classes of 28x28 uint8 images: class k is a bright bar (horizontal for k < 5, vertical
    otherwise) at a class-specific offset, jittered by a pixel, on a noisy background. Returns (images, labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = noise * torch.rand(n, 1, 28, 28, generator=g)
    jitter = torch.randint(-1, 2, (n,), generator=g)
    for i, (k, j) in enumerate(zip(labels.tolist(), jitter.tolist())):
        at = 3 + 5 * (k % 5) + j
        if k < 5:
            x[i, 0, at:at + 3, 4:24] = 1
        else:
            x[i, 0, 4:24, at:at + 3] = 1
    return (x * 255).round().to(torch.uint8), labels


def prototypes():
    """One clean image per class, as floats in [-1, 1]: (10, 1, 28, 28)."""
    x, _ = synthetic_digits(10, noise=0.0)
    return x.float() / 127.5 - 1


@pytest.fixture(scope="module")
def clf():
    x, y = synthetic_digits(2000)
    return digits.train_classifier(x, y, steps=STEPS)


def stack(modes):
    """Stacked images (N, 3, 28, 28) whose channels are the prototypes of the digits of each mode id."""
    p, m = prototypes()[:, 0], torch.as_tensor(modes)
    return torch.stack([p[m // 100], p[m // 10 % 10], p[m % 10]], 1)


def test_classifier_reaches_high_accuracy_on_held_out_synthetic_digits(clf):
    x, y = synthetic_digits(1000, seed=1)
    assert digits.class_agreement(clf, x.float() / 127.5 - 1, y) >= 0.99
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())


def test_training_is_deterministic_and_leaves_the_callers_rng_alone():
    x, y = synthetic_digits(200)
    before = torch.get_rng_state()
    a, b = (digits.train_classifier(x, y, steps=3) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_features_are_float64_penultimate_of_any_size(clf):
    x = torch.rand(7, 1, 32, 32) * 2 - 1
    f = digits.features(clf, x)
    assert f.shape == (7, 128) and f.dtype == torch.float64
    stacked = digits.features(clf, x.repeat(1, 3, 1, 1))   # Stacked MNIST: each channel's, side by side
    assert stacked.shape == (7, 384) and torch.equal(stacked[:, 128:256], f)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        digits.features(clf, torch.zeros(2, 2, 28, 28))


def test_classifier_fid_is_zero_on_itself_and_grows_with_a_shift(clf):
    x, _ = synthetic_digits(600, seed=2)
    x = x.float() / 127.5 - 1
    assert abs(digits.classifier_fid(clf, x, x)) < 1e-6
    scores = [digits.classifier_fid(clf, (x + s).clamp(-1, 1), x) for s in (0.2, 0.5, 1.0)]
    assert 0 < scores[0] < scores[1] < scores[2], scores
    half = digits.classifier_fid(clf, x[:300], x[300:])   # same distribution: far below a real shift
    assert half < scores[1]


def test_class_agreement_on_hand_labelled_samples(clf):
    x = prototypes().repeat(3, 1, 1, 1)
    y = torch.arange(30) % 10
    assert digits.class_agreement(clf, x, y) == 1.0
    wrong = y.clone()
    wrong[:6] = (wrong[:6] + 1) % 10   # six of thirty mislabelled
    assert math.isclose(digits.class_agreement(clf, x, wrong), 0.8)


def test_stacked_modes_all_one_and_a_known_subset(clf):
    modes, kl = digits.stacked_mnist_modes(clf, stack(torch.arange(1000)))
    assert modes == 1000 and abs(kl) < 1e-12                   # uniform histogram: KL 0
    modes, kl = digits.stacked_mnist_modes(clf, stack([427] * 50))
    assert modes == 1 and math.isclose(kl, math.log(1000))     # one mode: KL = ln 1000
    subset = [7, 123, 123, 999, 999, 999, 999, 500]
    modes, kl = digits.stacked_mnist_modes(clf, stack(subset))
    p = np.array([1, 2, 4, 1]) / 8
    assert modes == 4 and math.isclose(kl, float((p * np.log(1000 * p)).sum()))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        digits.stacked_mnist_modes(clf, torch.zeros(2, 1, 28, 28))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.asarray(array, np.uint8).tobytes())


def _idx_folder(folder, n, shuffle_labels=False):
    x, y = synthetic_digits(n, seed=3)
    if shuffle_labels:
        y = y[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    folder.mkdir()
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", x[:, 0].numpy())
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", y.numpy())
    return x, y


def test_classifier_is_cached_by_data_and_refuses_a_poor_one(tmp_path, monkeypatch, capsys):
    train, steps = digits.train_classifier, [STEPS]
    monkeypatch.setattr(digits, "train_classifier", lambda x, y, **kw: train(x, y, steps=steps[0], **kw))
    x, _ = _idx_folder(tmp_path / "digits", 4400)
    a = digits.classifier(str(tmp_path / "digits"), tmp_path / "root")
    assert "trained" in capsys.readouterr().out
    assert len(list((tmp_path / "root" / "digit_classifier").glob("*.pt"))) == 1
    b = digits.classifier("stacked:" + str(tmp_path / "digits"), tmp_path / "root")   # the same source digits
    assert "loaded" in capsys.readouterr().out
    assert torch.equal(digits.features(a, x[:50]), digits.features(b, x[:50]))
    steps[0] = 5
    _idx_folder(tmp_path / "noise", 4400, shuffle_labels=True)    # labels unrelated to the images
    with pytest.raises(UsageError, match="accuracy"):
        digits.classifier(str(tmp_path / "noise"), tmp_path / "root")


def test_stacked_dataset_channels_are_labelled_digits(tmp_path):
    _, y = _idx_folder(tmp_path / "digits", 50)
    args = argparse.Namespace(dataset="stacked:" + str(tmp_path / "digits"), data_root=str(tmp_path),
                              image_size=28, seed=0)
    data = datasets._stacked(args, str(tmp_path / "digits"), "train", n=300)
    assert data.images.shape == (300, 3, 28, 28) and data.num_classes == 1000 and data.labels.max() < 1000
    source = datasets.load(argparse.Namespace(**{**vars(args), "dataset": str(tmp_path / "digits")}))
    digit_of = {bytes(img.numpy()): int(k) for img, k in zip(source.images[:, 0], source.labels)}
    for img, mode in zip(data.images[:20], data.labels[:20]):
        assert [digit_of[bytes(c.numpy())] for c in img] == [mode // 100, mode // 10 % 10, mode % 10]
    again = datasets._stacked(args, str(tmp_path / "digits"), "train", n=300)
    other = datasets._stacked(argparse.Namespace(**{**vars(args), "seed": 1}), str(tmp_path / "digits"), "train", n=300)
    assert torch.equal(again.images, data.images) and not torch.equal(other.images, data.images)


def test_command_line(tmp_path, monkeypatch, capsys, clf):
    monkeypatch.setattr(digits, "classifier", lambda *a, **kw: clf)
    x, y = synthetic_digits(300, seed=4)
    np.savez(tmp_path / "a.npz", images=x.numpy(), labels=y.numpy())
    np.savez(tmp_path / "s.npz", images=stack(torch.arange(1000)).numpy())
    evaluate.main(["cfid", str(tmp_path / "a.npz"), str(tmp_path / "a.npz")])
    evaluate.main(["agree", str(tmp_path / "a.npz")])
    evaluate.main(["modes", str(tmp_path / "s.npz")])
    out = capsys.readouterr().out
    assert "not Inception): 0.000000" in out and "class agreement: 1.000000" in out
    assert "stacked MNIST modes: 1000 / 1000" in out
    with pytest.raises(SystemExit) as e:
        evaluate.main(["agree", str(tmp_path / "s.npz")])
    assert e.value.code == 2 and "labels" in capsys.readouterr().err


def test_sample_folders_are_read_with_their_labels(tmp_path):
    from PIL import Image
    x, y = synthetic_digits(12, seed=5)
    for i, (img, k) in enumerate(zip(x[:, 0].numpy(), y.tolist())):
        (tmp_path / "by_class" / str(k)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(tmp_path / "by_class" / str(k) / f"{i:02d}.png")
    images, labels = evaluate._read_digits(tmp_path / "by_class", channels=1)
    order = sorted(range(12), key=lambda i: (y[i].item(), i))   # class folders in numeric order
    assert torch.equal(images, x[order]) and torch.equal(labels, y[order])
    flat, none = evaluate._read_digits(tmp_path / "by_class" / "0", channels=3)
    assert flat.shape == (2, 3, 28, 28) and none is None


def test_evaluate_and_prepare_for_scripts(clf):
    modes = torch.arange(1000)
    fake = stack(modes)
    data = datasets.Data("stacked", "image", (3, 28, 28), 1000, images=digits._prepare(fake.reshape(-1, 1, 28, 28))
                         .add(1).mul(127.5).round().to(torch.uint8).reshape(-1, 3, 28, 28), labels=modes)
    it = iter(range(0, 1000, 300))

    def generate(b):   # (images, labels) batches of the hand-made stacked samples, in order
        i = next(it)
        return fake[i:i + b], modes[i:i + b]
    out = digits.evaluate(clf, generate, 1000, data, ["cfid", "agree", "modes"], batch_size=300)
    assert out["metric/modes"] == 1000 and abs(out["metric/modes_kl"]) < 1e-12
    assert out["metric/agree"] == 1.0 and out["metric/cfid"] < 1e-6
    assert digits.prepare([], data, "unused") is None
    assert digits.score(clf, fake, data, ["agree"], labels=modes) == {"metric/agree": 1.0}
    for wanted, match in ((["modes"], "stacked-mnist"), (["agree"], "conditioned")):
        with pytest.raises(UsageError, match=match):
            digits.prepare(wanted, datasets.Data("x", "image", (1, 28, 28), 10), "unused")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """A folder of synthetic idx digits, and its classifier (quickly trained) cached under <folder>/../root."""
    folder = tmp_path_factory.mktemp("digit_folder") / "digits"
    _idx_folder(folder, 4400)
    train = digits.train_classifier
    with pytest.MonkeyPatch.context() as m:
        m.setattr(digits, "train_classifier", lambda x, y, **kw: train(x, y, steps=STEPS, **kw))
        digits.classifier(str(folder), folder.parent / "root")
    return str(folder)


def test_scripts_log_digit_metrics(tmp_path, digit_folder):
    import cgan
    import dcgan
    import gan
    root = ["--data-root", str(Path(digit_folder).parent / "root"), "--eval-samples", "200"]
    s = gan.main(["--dry-run", "--dataset", digit_folder, "--image-size", "28", "--metrics", "cfid",
                  "--out", str(tmp_path / "gan"), *root])
    assert s["metrics"]["metric/cfid"] > 0 and "metric/parzen_ll" in s["metrics"]
    s = cgan.main(["--dry-run", "--dataset", digit_folder, "--image-size", "28", "--metrics", "cfid,agree",
                   "--out", str(tmp_path / "cgan"), *root])
    assert 0 <= s["metrics"]["metric/agree"] <= 1 and s["metrics"]["metric/cfid"] > 0
    s = dcgan.main(["--dry-run", "--dataset", "stacked:" + digit_folder, "--metrics", "modes,cfid",
                    "--out", str(tmp_path / "dcgan"), *root])
    assert 1 <= s["metrics"]["metric/modes"] <= 200 and 0 <= s["metrics"]["metric/modes_kl"] <= math.log(1000)


def test_scripts_refuse_digit_metrics_that_cannot_act(tmp_path, capsys, digit_folder):
    import dcgan
    import gan
    from tests import helpers
    helpers.expect_usage_error(gan, ["--dry-run", "--metrics", "cfid", "--out", str(tmp_path / "a"),
                                     "--data-root", str(Path(digit_folder).parent / "root")], capsys,
                               "labelled one-channel")               # fake data are not digits
    helpers.expect_usage_error(gan, ["--dry-run", "--dataset", digit_folder, "--metrics", "agree",
                                     "--out", str(tmp_path / "b")], capsys, "conditioned")
    helpers.expect_usage_error(dcgan, ["--dry-run", "--dataset", digit_folder, "--metrics", "modes",
                                       "--out", str(tmp_path / "c")], capsys, "stacked-mnist")
    helpers.expect_usage_error(gan, ["--dry-run", "--metrics", "fid", "--out", str(tmp_path / "d")], capsys,
                               "--metrics takes cfid, agree, modes")  # gan.py has no Inception metrics
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_confident_classes_counts_sure_samples_and_the_classes_they_cover(clf):
    clean = prototypes()
    assert digits.confident_classes(clf, clean) == (1.0, 10)
    assert digits.confident_classes(clf, clean[[3] * 7 + [8] * 3]) == (1.0, 2)    # a collapsed G: two classes
    assert digits.confident_classes(clf, clean, threshold=1.01) == (0.0, 0)          # nothing is that sure
    data = datasets.Data("d", "image", (1, 28, 28), 10, images=metrics.to_uint8(clean), labels=torch.arange(10))
    out = digits.score(clf, clean, data, ["cfid"])
    assert (out["metric/confident"], out["metric/classes"]) == (1.0, 10)


@pytest.mark.parametrize("script, extra", [
    ("sagan", ["--metrics", "cfid,agree", "--image-size", "32"]),
    ("bigbigan", ["--metrics", "cfid,agree"]),
    ("progan", ["--metrics", "cfid"]),
    ("stylegan", ["--metrics", "cfid"]),
    ("vqgan", ["--metrics", "cfid,agree", "--image-size", "16"]),
])
def test_new_scripts_log_digit_metrics(tmp_path, digit_folder, script, extra):
    import importlib
    module = importlib.import_module(script)
    s = module.main(["--dry-run", "--dataset", digit_folder, "--eval-samples", "100", "--out", str(tmp_path / "a"),
                     "--data-root", str(Path(digit_folder).parent / "root"), *extra])
    m = s["metrics"]
    assert m["metric/cfid"] > 0 and 0 <= m["metric/confident"] <= 1 and 0 <= m["metric/classes"] <= 10
    if "cfid,agree" in extra:
        assert 0 <= m["metric/agree"] <= 1
    if script == "stylegan":   # --sample --eval: the figures' claims as numbers
        out = module.main(["--sample", str(tmp_path / "a" / "ckpt.pt"), "--eval", "--metrics", "cfid",
                           "--eval-samples", "100", "--out", str(tmp_path / "s")])
        claims = ("latent_std", "truncated_std", "mix_coarse_takes_B", "mix_middle_keeps_A", "noise_keeps_class")
        assert out["metric/cfid"] > 0 and all(f"metric/{k}" in out for k in claims), sorted(out)
