"""Image loading in every mode users throw at it, and the prompt helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harmon import processing
from harmon.processing import check_image_size, load_image, tensor_to_pil, understanding_input


def _save(tmp_path, image: Image.Image, name: str, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize("mode, name", [("RGBA", "a.png"), ("LA", "la.png"), ("P", "p.png"), ("L", "l.png"),
                                        ("CMYK", "c.jpg"), ("I;16", "g16.png"), ("1", "bw.png")])
def test_any_mode_becomes_rgb(tmp_path, mode, name):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    else:
        image = base.convert(mode)
    loaded = load_image(_save(tmp_path, image, name))
    assert loaded.mode == "RGB" and loaded.size == (30, 20)


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_save(tmp_path, image, "t.png")).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_range(tmp_path):
    image = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert load_image(_save(tmp_path, image, "w.png")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path, image, "r.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_bad_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(bad)
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="more than"):
        load_image(_save(tmp_path, Image.new("RGB", (20, 20)), "big.png"))


def test_understanding_input_pads_grey_and_scales():
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    pixels = understanding_input(image, 32)
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels[0, :, 0, 0], torch.full((3,), 2 * 127 / 255 - 1))  # grey band on top
    assert torch.allclose(pixels[0, :, 16, 16], torch.tensor([1.0, -1.0, -1.0]))


def test_tensor_to_pil_clamps_like_the_original():
    images = torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert np.asarray(tensor_to_pil(images)[0])[0, :, 0].tolist() == [0, 0, 128, 255]


@pytest.mark.parametrize("height, width", [(0, 16), (50, 64), (64, 17), (-16, 16)])
def test_sizes_must_be_multiples_of_16(height, width):
    with pytest.raises(ValueError, match="multiple of 16"):
        check_image_size(height, width)
    assert check_image_size(512, 768) == (32, 48)
