from __future__ import annotations

import numpy as np
import pytest

from atlas.datasets import SAMPLE_PHOTOS, available_sample_photos, fingerprint, list_items, open_image, sample_crop_box
from atlas.errors import ConfigError


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
        assert 0 <= box.left and box.left + box.width <= 451
        assert 0 <= box.top and box.top + box.height <= 300
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
    with pytest.raises(ConfigError, match="holds no image files"):
        list_items(str(tmp_path))


def test_fingerprint_changes_with_order():
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(["a", "b"]) == fingerprint(["a", "b"])
