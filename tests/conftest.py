"""Shared fixtures: a tiny model, generated images, and a folder of broken files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlas.config import load_config
from atlas.testing import make_images, save_tiny_model

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    """A ``file:`` spec of a seeded TinyNet (10 classes, layer2 has 16 channels)."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Twenty generated 64 px PNG images."""
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 20)
    return folder


def tiny_config(tiny_spec: str, images: str | Path, store: str | Path, *overrides: str):
    """A configuration for the tiny model running in-process (threads, not worker processes)."""
    return load_config(
        overrides=[
            "compute.processes=false",
            "compute.n_workers=1",
            "compute.threads_per_worker=1",
            "extract.positions=random",
            "extract.per_image=6",
            "extract.shard_size=4",
            "extract.batch_size=3",
            *overrides,
        ],
        images=str(images),
        store=str(store),
        model=tiny_spec,
        layer="layer2",
    )


def write_exif_rotated_jpeg(path: Path) -> None:
    """A 40x20 JPEG with EXIF Orientation 6: displayed after a 90-degree clockwise rotation."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


def write_bad_folder(folder: Path) -> dict[str, str]:
    """Write one file per awkward input kind; return name -> expected outcome ("ok" or a reason word)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))

    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, not a JPEG\n")

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: composites to the white background
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")

    photo.convert("CMYK").save(folder / "cmyk.jpg")

    gray16 = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")

    write_exif_rotated_jpeg(folder / "rotated.jpg")
    return {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty",
        "notes.jpg": "not an image",
        "rgba.png": "ok",
        "cmyk.jpg": "ok",
        "gray16.png": "ok",
        "rotated.jpg": "ok",
    }
