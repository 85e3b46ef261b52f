from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from atlas.datasets import SAMPLE_PHOTOS, available_sample_photos, fingerprint, list_items, open_image, sample_crop_box
from atlas.errors import ConfigError, ImageDecodeError


def test_sample_photos_all_installed():
    assert available_sample_photos() == list(SAMPLE_PHOTOS)


def test_sample_items_deterministic():
    items = list_items("sample", crops_per_photo=3)
    assert len(items) == 3 * len(SAMPLE_PHOTOS)
    first = np.asarray(open_image(items[1]))
    again = np.asarray(open_image(items[1]))
    other = np.asarray(open_image(items[2]))
    assert first.shape == (256, 256, 3)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1


def test_crop_box_inside_photo():
    for crop in range(1, 50):
        box = sample_crop_box(451, 300, crop, seed=0, min_scale=0.08, photo="chelsea")
        assert box.left >= 0
        assert box.left + box.width <= 451
        assert box.top >= 0
        assert box.top + box.height <= 300
        assert box.width * box.height >= 0.05 * 451 * 300


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ["b/z.JPG", "a.png", "b/c.webp", "skip.txt"]:
        (tmp_path / name).write_bytes(b"x")
    items = list_items(str(tmp_path))
    assert [item.replace(str(tmp_path) + "/", "") for item in items] == ["a.png", "b/c.webp", "b/z.JPG"]


def test_list_file_and_glob(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    (tmp_path / "y.png").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# comment\nx.png\n\ny.png\n")
    assert list_items(str(tmp_path / "list.txt")) == [str(tmp_path / "x.png"), str(tmp_path / "y.png")]
    assert list_items(str(tmp_path / "*.png")) == [str(tmp_path / "x.png"), str(tmp_path / "y.png")]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        list_items(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="contains no image files"):
        list_items(str(tmp_path))


def test_fingerprint_changes_with_order():
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(["a", "b"]) == fingerprint(["a", "b"])


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def memory_root():
    """A fresh folder on fsspec's process-wide memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/atlas-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_url_folder_recursive_sorted(memory_root):
    fs, root = memory_root
    for name in ["b/z.JPG", "a.png", "b/c.webp", "b/d/e.png", "skip.txt"]:
        fs.pipe(f"{root}/{name}", b"x")
    items = list_items(f"memory://{root}")
    expected = ["a.png", "b/c.webp", "b/z.JPG", "b/d/e.png"]
    assert items == [f"memory://{root}/{name}" for name in expected]


def test_file_url_matches_plain_folder(tmp_path):
    (tmp_path / "b" / "d").mkdir(parents=True)
    for name in ["b/z.JPG", "a.png", "b/c.webp", "b/d/e.png", "skip.txt"]:
        (tmp_path / name).write_bytes(b"x")
    plain = list_items(str(tmp_path))
    assert list_items(f"file://{tmp_path}") == [f"file://{item}" for item in plain]


def test_url_glob_and_list_file(memory_root):
    fs, root = memory_root
    for name in ["x.png", "sub/y.png", "sub/w.jpg"]:
        fs.pipe(f"{root}/{name}", b"x")
    assert list_items(f"memory://{root}/**/*.png") == [f"memory://{root}/sub/y.png", f"memory://{root}/x.png"]
    assert list_items(f"memory://{root}/*.png") == [f"memory://{root}/x.png"]

    fs.pipe(f"{root}/list.txt", f"# comment\nx.png\n\n{root}/sub/w.jpg\nfile:///data/q.png\n".encode())
    assert list_items(f"memory://{root}/list.txt") == [
        f"memory://{root}/x.png",
        f"memory://{root}/sub/w.jpg",
        "file:///data/q.png",
    ]


def test_url_sources_missing_or_invalid(memory_root):
    fs, root = memory_root
    with pytest.raises(ConfigError, match="not found"):
        list_items(f"memory://{root}/nothing")
    fs.pipe(f"{root}/notes.txt.bak", b"x")
    with pytest.raises(ConfigError, match="contains no image files"):
        list_items(f"memory://{root}")
    with pytest.raises(ConfigError, match="not a valid fsspec URL"):
        list_items("nosuchprotocol://bucket/images")


def test_open_image_from_url(memory_root):
    fs, root = memory_root
    fs.pipe(f"{root}/red.png", _png_bytes((200, 10, 30)))
    fs.pipe(f"{root}/broken.png", b"not a png")
    image = open_image(f"memory://{root}/red.png")
    assert image.size == (16, 12)
    assert np.asarray(image)[5, 5].tolist() == [200, 10, 30]
    with pytest.raises(ImageDecodeError, match="file not found"):
        open_image(f"memory://{root}/missing.png")
    with pytest.raises(ImageDecodeError, match="not an image file"):
        open_image(f"memory://{root}/broken.png")


def test_url_image_over_size_cap_rejected(memory_root, monkeypatch):
    import atlas.datasets

    fs, root = memory_root
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="BMP")
    fs.pipe(f"{root}/big.bmp", buffer.getvalue())
    monkeypatch.setattr(atlas.datasets, "MAX_URL_BYTES", len(buffer.getvalue()) - 1)
    with pytest.raises(ImageDecodeError, match="larger than"):
        open_image(f"memory://{root}/big.bmp")

    monkeypatch.setattr(atlas.datasets, "MAX_URL_BYTES", len(buffer.getvalue()))
    assert open_image(f"memory://{root}/big.bmp").size == (64, 64)


def test_http_silent_server_times_out(monkeypatch):
    import socket

    import atlas.datasets

    monkeypatch.setattr(atlas.datasets, "URL_TIMEOUT_SECONDS", 0.5)
    # A socket that accepts connections and never responds.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with pytest.raises(ImageDecodeError, match=r"timed out after 0.5 s \(2 attempts\)"):
            open_image(f"http://127.0.0.1:{silent.getsockname()[1]}/photo.jpg")


def test_http_refused_connection_named():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now.
    with pytest.raises(ImageDecodeError, match=r"cannot connect: .*\(2 attempts\)"):
        open_image(f"http://127.0.0.1:{port}/photo.jpg")


def test_glob_skips_symlinked_folder_loop(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/x.png", "a/b/y.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "b" / "back").symlink_to(tmp_path / "a")

    expected = [str(tmp_path / "a" / "b" / "y.png"), str(tmp_path / "a" / "x.png")]
    assert list_items(str(tmp_path / "**" / "*.png")) == expected
    # Relative sources give absolute items, the same as the absolute source.
    monkeypatch.chdir(tmp_path)
    assert list_items("**/*.png") == expected
    assert list_items("a/") == list_items(str(tmp_path / "a"))
    assert list_items("a")[0].startswith(str(tmp_path))
