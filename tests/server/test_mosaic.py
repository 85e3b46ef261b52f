"""Tests of the explorer's pixel preparation: mosaics, density and data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from server.mosaic import (
    FALLBACK_BRIGHTNESS,
    PLACEHOLDER_RGBA,
    build_mosaic,
    density_histogram,
    density_rgba,
    heatmap_overlay,
    pack_rgba,
    png_data_uri,
    tile_size,
    upscale_mosaic,
)


def unpack(mosaic: np.ndarray) -> np.ndarray:
    return mosaic.view(np.uint8).reshape(*mosaic.shape, 4)


def random_icons(size: int, icon_px: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, icon_px, icon_px, 3), dtype=np.uint8)


def test_tile_size_caps_mosaic_side() -> None:
    assert tile_size(20, 80, 2048) == 80
    assert tile_size(80, 80, 2048) == 25
    assert tile_size(4096, 80, 2048) == 1


def test_pack_rgba_round_trip() -> None:
    rgba = np.random.default_rng(1).integers(0, 256, size=(5, 7, 4), dtype=np.uint8)
    packed = pack_rgba(rgba)
    assert packed.shape == (5, 7)
    assert packed.dtype == np.uint32
    np.testing.assert_array_equal(unpack(packed), rgba)


def test_mosaic_places_flipped_icons_by_cell() -> None:
    size, icon_px = 3, 4
    icons = random_icons(size, icon_px)
    filled = np.ones((size, size), bool)
    done = np.ones((size, size), bool)
    mosaic = unpack(build_mosaic(lambda i: icons[i], size, icon_px, filled, done, max_px=1000))

    assert mosaic.shape == (size * icon_px, size * icon_px, 4)
    for i in range(size):
        for j in range(size):
            block = mosaic[i * icon_px : (i + 1) * icon_px, j * icon_px : (j + 1) * icon_px]
            # Row 0 of the array is the bottom of the plot, so each icon is stored upside down.
            np.testing.assert_array_equal(block[..., :3], icons[i, j][::-1])
            assert (block[..., 3] == 255).all()


def test_mosaic_empty_and_unrendered_cells() -> None:
    size, icon_px = 2, 3
    icons = random_icons(size, icon_px)
    filled = np.array([[True, True], [False, True]])
    done = np.array([[True, False], [False, True]])
    mosaic = unpack(build_mosaic(lambda i: icons[i], size, icon_px, filled, done, max_px=1000))

    empty = mosaic[icon_px:, :icon_px]
    placeholder = mosaic[:icon_px, icon_px:]
    assert (empty[..., 3] == 0).all()
    assert (placeholder == np.array(PLACEHOLDER_RGBA, np.uint8)).all()


def test_mosaic_without_icons_shows_placeholders() -> None:
    filled = np.array([[True, False], [False, False]])
    mosaic = unpack(build_mosaic(None, 2, 8, filled, np.ones((2, 2), bool), max_px=1000))
    assert (mosaic[:8, :8] == np.array(PLACEHOLDER_RGBA, np.uint8)).all()
    assert (mosaic[8:, 8:, 3] == 0).all()


def test_unrendered_cells_borrow_coarser_icon() -> None:
    # A 1 x 1 parent grid with one 4 px icon, and a 2 x 2 child grid of 4 px cells where
    # only cell (1, 1) has its own icon and cell (1, 0) is empty.
    parent_icons = random_icons(1, 4, seed=5)
    parent = build_mosaic(lambda i: parent_icons[i], 1, 4, np.ones((1, 1), bool), np.ones((1, 1), bool), max_px=1000)
    fallback = upscale_mosaic(parent, 8)
    assert fallback.shape == (8, 8, 4)

    icons = random_icons(2, 4, seed=6)
    filled = np.array([[True, True], [False, True]])
    done = np.array([[False, False], [False, True]])
    mosaic = unpack(build_mosaic(lambda i: icons[i], 2, 4, filled, done, max_px=1000, fallback=fallback))

    # Cell (0, 0) shows the bottom-left quarter of the parent icon, dimmed.
    expected = (fallback[:4, :4, :3] * FALLBACK_BRIGHTNESS).round().astype(np.uint8)
    np.testing.assert_array_equal(mosaic[:4, :4, :3], expected)
    assert (mosaic[:4, :4, 3] == 255).all()
    np.testing.assert_array_equal(mosaic[4:, 4:, :3], icons[1, 1][::-1])
    assert (mosaic[4:, :4, 3] == 0).all()


def test_fallback_with_other_shape_rejected() -> None:
    filled = np.ones((2, 2), bool)
    with pytest.raises(ValueError, match="fallback pixels have shape"):
        build_mosaic(None, 2, 4, filled, filled, max_px=1000, fallback=np.zeros((4, 4, 4), np.uint8))


def test_mosaic_shrinks_icons_by_area_mean() -> None:
    size, icon_px = 2, 8
    icons = random_icons(size, icon_px, seed=3)
    full = np.ones((size, size), bool)
    mosaic = unpack(build_mosaic(lambda i: icons[i], size, icon_px, full, full, max_px=8))

    tile = 4
    assert mosaic.shape[:2] == (size * tile, size * tile)
    # Area interpolation by 2 is the mean of each 2 x 2 block.
    flipped = icons[1, 0][::-1].astype(np.float64)
    expected = flipped.reshape(tile, 2, tile, 2, 3).mean(axis=(1, 3))
    block = mosaic[tile:, :tile, :3].astype(np.float64)
    np.testing.assert_allclose(block, expected, atol=0.51)


def test_density_histogram_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    points = rng.random((500, 2))
    points[:5] = np.nan
    counts = density_histogram([points[:200], points[200:]], bins=8)

    finite = points[5:]
    expected, _, _ = np.histogram2d(finite[:, 1], finite[:, 0], bins=8, range=[[0, 1], [0, 1]])
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == 495


def test_density_rgba_transparent_where_empty() -> None:
    counts = np.array([[0.0, 1.0], [10.0, 0.0]])
    rgba = unpack(density_rgba(counts))
    assert rgba[0, 0, 3] == 0
    assert rgba[1, 1, 3] == 0
    assert rgba[0, 1, 3] > 0
    assert rgba[1, 0, 3] > 0
    # More points give a brighter colour on the magma map.
    assert rgba[1, 0, :3].astype(int).sum() > rgba[0, 1, :3].astype(int).sum()


def test_png_data_uri_decodes_to_same_pixels() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    uri = png_data_uri(pixels)
    assert uri.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("attribution", [np.zeros((7, 7)), np.arange(49.0).reshape(7, 7)])
def test_heatmap_overlay_keeps_image_size(attribution: np.ndarray) -> None:
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    overlay = heatmap_overlay(image, attribution)
    assert overlay.size == (40, 30)
    assert overlay.mode == "RGB"
