from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from atlas.errors import ImageDecodeError
from atlas.images import MAX_PIXELS, decode_image
from tests.conftest import write_bad_folder, write_exif_rotated_jpeg


def test_bad_folder_outcomes(tmp_path):
    expected = write_bad_folder(tmp_path)
    for name, outcome in expected.items():
        if outcome == "ok":
            assert decode_image(tmp_path / name).mode == "RGB", name
        else:
            with pytest.raises(ImageDecodeError, match=outcome):
                decode_image(tmp_path / name)


def test_16bit_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], np.uint16).repeat(8, 0).repeat(8, 1)
    Image.fromarray(values).save(tmp_path / "g.png")
    decoded = np.asarray(decode_image(tmp_path / "g.png"))[..., 0]
    assert decoded[0, 0] == 0
    assert decoded[0, 15] == 64
    assert decoded[15, 0] == 128
    assert decoded[15, 15] == 255


def test_exif_rotation_applied(tmp_path):
    write_exif_rotated_jpeg(tmp_path / "r.jpg")
    decoded = decode_image(tmp_path / "r.jpg")
    # Stored 40 wide x 20 high with red left, blue right; orientation 6 turns it upright.
    assert decoded.size == (20, 40)
    pixels = np.asarray(decoded).astype(int)
    assert pixels[2, 10, 0] > 200 and pixels[2, 10, 2] < 60
    assert pixels[37, 10, 2] > 200 and pixels[37, 10, 0] < 60


def test_transparent_composited_on_white(tmp_path):
    write_bad_folder(tmp_path)
    pixels = np.asarray(decode_image(tmp_path / "rgba.png"))
    assert (pixels == 255).all()


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(decode_image(tmp_path / "p.png"))
    assert tuple(pixels[0, 0]) == (10, 200, 30)
    assert tuple(pixels[0, 15]) == (255, 255, 255)


def test_tiny_image_rejected(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with pytest.raises(ImageDecodeError, match="1x1 pixels"):
        decode_image(tmp_path / "one.png")


def test_decompression_bomb_rejected(monkeypatch, tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr("atlas.images.MAX_PIXELS", 5_000)
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image(tmp_path / "big.png")
    assert MAX_PIXELS > 5_000


def test_broken_symlink_and_loop(tmp_path):
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="not found"):
        decode_image(tmp_path / "dangling.jpg")
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(ImageDecodeError):
        decode_image(tmp_path / "a.jpg")


def test_bytes_input_and_empty_bytes():
    buffer = io.BytesIO()
    Image.new("L", (12, 10), 90).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).size == (12, 10)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_malformed_exif_loads_unrotated(tmp_path, caplog):
    image = Image.new("RGB", (30, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x8825] = {}  # an empty GPS IFD beside the Orientation tag
    image.save(tmp_path / "gps.jpg", exif=exif)
    decoded = decode_image(tmp_path / "gps.jpg")
    assert decoded.size in {(30, 20), (20, 30)}
    assert decoded.mode == "RGB"
