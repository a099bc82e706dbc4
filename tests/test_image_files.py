"""Real image folders: every PIL mode loads by its real range, and a few unreadable files (truncated, not
an image) never crash a run: streamed folders skip them with one warning each, folders read at start-up
leave them out and name them."""
import numpy as np
import pytest
import torch
from PIL import Image

import dcgan
from common import data as datasets
from common.run import UsageError


def _png(path, array, mode=None):
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _truncated(path):
    good = path.with_name("whole.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_16_bit_png_is_scaled_from_its_range(tmp_path):
    """A 0-65535 ramp in a 16-bit PNG must come out as a 0-255 ramp (not clipped to white)."""
    ramp = (np.arange(64 * 64).reshape(64, 64) * 65535 / (64 * 64 - 1)).round().astype(np.uint16)
    path = _png(tmp_path / "ramp16.png", ramp)
    assert Image.open(path).mode.startswith("I")
    grey = np.asarray(datasets.open_image(path, 1)).astype(int)
    expected = (ramp / 257).round()
    assert np.abs(grey - expected).max() <= 1
    assert (grey == 255).mean() < 0.01 and abs(np.median(grey) - 127.5) < 2
    rgb = np.asarray(datasets.open_image(path, 3))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == grey).all()


def test_palette_alpha_and_grey_modes(tmp_path):
    p = Image.new("P", (4, 4))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png")
    x = np.asarray(datasets.open_image(tmp_path / "p.png"))
    assert tuple(x[1, 1]) == (10, 200, 30) and tuple(x[0, 0]) == (0, 0, 0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255          # one opaque red pixel; the rest fully transparent
    _png(tmp_path / "rgba.png", rgba)
    x = np.asarray(datasets.open_image(tmp_path / "rgba.png"))
    assert tuple(x[0, 0]) == (200, 0, 0) and tuple(x[2, 2]) == (255, 255, 255)   # transparency on white
    grey = _png(tmp_path / "grey.png", np.full((4, 4), 77, np.uint8))
    assert datasets.open_image(grey, None).mode == "L" and tuple(np.asarray(datasets.open_image(grey))[0, 0]) == (77,) * 3
    assert datasets.open_image(tmp_path / "rgba.png", None).mode == "RGB"


def _folder_with_bad_files(root):
    root.mkdir(parents=True)
    for i in range(4):
        _png(root / f"good{i}.png", np.full((8, 8, 3), 60 * i, np.uint8))
    _truncated(root / "cut.png")
    (root / "notes.jpg").write_text("not an image\n")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_skips_unreadable_files_with_one_warning_each(tmp_path, capfd, workers):
    folder = _folder_with_bad_files(tmp_path / "imgs")
    data = datasets._image_folder(folder, 8)
    assert len(data) == 6
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=3, num_workers=workers)
    for _ in range(2):   # two epochs: a file is named once, not once per epoch or per worker
        x = torch.cat([b for b, _ in loader])
        assert x.shape == (6, 3, 8, 8)
        levels = {round(float(v) * 255) for v in x[:, 0, 0, 0]}
        assert levels <= {0, 60, 120, 180}   # the bad files' places are taken by readable images
    err = capfd.readouterr().err
    assert err.count("cut.png") == 1 and err.count("notes.jpg") == 1, err
    assert "truncated" in err and "not an image file" in err and "2 skipped so far" in err


def test_class_folders_keep_labels_and_skip_bad_files(tmp_path, capfd):
    for label, name in enumerate(("cat", "dog")):
        _folder_with_bad_files(tmp_path / "classes" / name)
    data = datasets._image_folder(tmp_path / "classes", 8)
    assert data.num_classes == 2 and len(data) == 12
    labels = [data.dataset[i][1] for i in range(len(data))]
    assert sorted(set(labels)) == [0, 1]
    assert capfd.readouterr().err.count("skipping unreadable image") == 4


def test_a_folder_of_only_bad_files_is_one_clear_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_text("x")
    data = datasets._image_folder(folder, 8)
    with pytest.raises(UsageError, match="none of the 1 images"):
        data.dataset[0]


def test_training_on_a_folder_with_bad_files_finishes(tmp_path, capfd):
    folder = _folder_with_bad_files(tmp_path / "imgs")
    summary = dcgan.main(["--dry-run", "--dataset", str(folder), "--image-size", "16", "--steps", "3",
                          "--batch-size", "3", "--out", str(tmp_path / "run")])
    assert summary["step"] == 3
    err = capfd.readouterr().err
    assert "cut.png" in err and "notes.jpg" in err


def test_folder_read_at_start_up_leaves_bad_files_out_and_names_them(tmp_path, capfd):
    folder = _folder_with_bad_files(tmp_path / "imgs")
    images, names = datasets.read_image_folder(folder, 8)
    assert images.shape == (4, 3, 8, 8) and names == [f"good{i}.png" for i in range(4)]
    err = capfd.readouterr().err
    assert "cut.png" in err and "notes.jpg" in err
    grey, _ = datasets.read_image_folder(folder, 8, channels=None)
    assert grey.shape[1] == 3   # RGB files stay RGB
    (tmp_path / "g").mkdir()
    _png(tmp_path / "g" / "a.png", np.full((8, 8), 9, np.uint8))
    assert datasets.read_image_folder(tmp_path / "g", 8)[0].shape == (1, 1, 8, 8)   # grey files: one channel
