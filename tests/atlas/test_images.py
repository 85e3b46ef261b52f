from __future__ import annotations

import io
import logging
import struct

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
    assert pixels[2, 10, 0] > 200
    assert pixels[2, 10, 2] < 60
    assert pixels[37, 10, 2] > 200
    assert pixels[37, 10, 0] < 60


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


# TIFF field type codes.
BYTE, SHORT, LONG, RATIONAL = 1, 3, 4, 5
GPS_POINTER = 0x8825


def _ifd(entries: list[tuple[int, int, int, bytes]], start: int) -> bytes:
    """Pack a little-endian IFD at offset ``start``, with values over 4 bytes stored after it."""
    data_offset = start + 2 + 12 * len(entries) + 4
    table = struct.pack("<H", len(entries))
    data = b""
    for tag, kind, count, payload in sorted(entries):
        if len(payload) <= 4:
            table += struct.pack("<HHI", tag, kind, count) + payload.ljust(4, b"\0")
        else:
            table += struct.pack("<HHII", tag, kind, count, data_offset + len(data))
            data += payload
    return table + struct.pack("<I", 0) + data


def _exif_block(ifd0: list[tuple[int, int, int, bytes]], gps: list | None = None, gps_offset: int | None = None) -> bytes:
    """Build an APP1 EXIF payload by hand, so it can hold what Pillow's writer would not.

    ``gps`` adds a GPS IFD after IFD0, and an empty list gives an IFD with zero
    entries. ``gps_offset`` instead points the GPS tag at an arbitrary offset.
    """
    entries = list(ifd0)
    if gps is not None or gps_offset is not None:
        entries.append((GPS_POINTER, LONG, 1, struct.pack("<I", 0)))
    first = _ifd(entries, 8)
    blocks = b""
    if gps is not None:
        gps_offset = 8 + len(first)
        blocks = _ifd(gps, gps_offset)
    if gps_offset is not None:
        entries[-1] = (GPS_POINTER, LONG, 1, struct.pack("<I", gps_offset))
        first = _ifd(entries, 8)
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + first + blocks


def _write_red_blue_jpeg(path, exif: bytes) -> None:
    """A 40x20 JPEG, red left half and blue right half, with the given raw EXIF block."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


ORIENTATION_6 = (0x0112, SHORT, 1, struct.pack("<H", 6))
GPS_VERSION = (0x0000, BYTE, 4, bytes([2, 3, 0, 0]))


def _xresolution(numerator: int, denominator: int) -> tuple[int, int, int, bytes]:
    return (0x011A, RATIONAL, 1, struct.pack("<II", numerator, denominator))


@pytest.mark.parametrize(
    ("ifd0", "gps", "gps_offset", "reason"),
    [
        ([ORIENTATION_6, _xresolution(1, 0)], None, None, "zero denominator"),
        ([ORIENTATION_6, _xresolution(72, 1)], [], None, "GPS IFD is empty"),
        ([ORIENTATION_6], None, 50_000, "GPS IFD is empty or unreadable"),
        ([ORIENTATION_6, _xresolution(72, 1)], [GPS_VERSION, (0x0002, RATIONAL, 1, struct.pack("<II", 0, 0))], None, "zero denominator"),
    ],
    ids=["xresolution-1-over-0", "empty-gps-ifd", "gps-offset-past-end", "gps-rational-0-over-0"],
)
def test_malformed_exif_loads_unrotated(tmp_path, caplog, ifd0, gps, gps_offset, reason):
    path = tmp_path / "bad_exif.jpg"
    _write_red_blue_jpeg(path, _exif_block(ifd0, gps, gps_offset))
    # The file really carries Orientation 6, so rotation was possible.
    with Image.open(path) as opened:
        assert opened.getexif().get(0x0112) == 6

    with caplog.at_level(logging.WARNING, logger="atlas.images"):
        decoded = decode_image(path)
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 20)
    pixels = np.asarray(decoded).astype(int)
    assert pixels[10, 5, 0] > 200
    assert pixels[10, 5, 2] < 60
    assert pixels[10, 35, 2] > 200
    assert pixels[10, 35, 0] < 60
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "malformed EXIF" in message
    assert str(path) in message
    assert reason in message


def test_wellformed_handmade_exif_rotated(tmp_path, caplog):
    path = tmp_path / "good_exif.jpg"
    _write_red_blue_jpeg(path, _exif_block([ORIENTATION_6, _xresolution(72, 1)], [GPS_VERSION]))
    with caplog.at_level(logging.WARNING, logger="atlas.images"):
        decoded = decode_image(path)
    # Orientation 6 turns the 40x20 image upright: red on top, blue at the bottom.
    assert decoded.size == (20, 40)
    pixels = np.asarray(decoded).astype(int)
    assert pixels[2, 10, 0] > 200
    assert pixels[2, 10, 2] < 60
    assert pixels[37, 10, 2] > 200
    assert pixels[37, 10, 0] < 60
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def _deny(path):
    """Return a stand-in for ``Image.open`` that raises EACCES for ``path``, as chmod 000 does for a non-root user."""
    real_open = Image.open

    def fake_open(source, *args, **kwargs):
        if str(source) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(source, *args, **kwargs)

    return fake_open


def test_unreadable_file_permission_denied(tmp_path, monkeypatch):
    # The suite runs as root in CI, where chmod 000 does not stop reads, so the
    # kernel's EACCES is raised by a stand-in for Pillow's open instead.
    path = tmp_path / "locked.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(path)
    monkeypatch.setattr(Image, "open", _deny(path))

    with pytest.raises(ImageDecodeError, match="permission denied"):
        decode_image(path)
