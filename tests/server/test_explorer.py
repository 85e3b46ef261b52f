"""Tests of one explorer session built on a plain Bokeh document, without a browser."""

from __future__ import annotations

import base64
import io
import logging
import shutil
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from bokeh.document import Document
from PIL import Image

from atlas.config import ServeConfig
from server import state
from server.explorer import Explorer
from server.view import span_for_level
from tests.server.store_builder import CLASS_NAMES, BuiltStore


@pytest.fixture()
def two_stores(built_store: BuiltStore, serve_config: ServeConfig) -> list[str]:
    paths = [str(built_store.path), str(built_store.path)]
    state.configure(paths, serve_config)
    return paths


def make_explorer(**arguments: str) -> Explorer:
    return Explorer(Document(), {name: [value.encode()] for name, value in arguments.items()})


def ranges_event(span: float) -> SimpleNamespace:
    return SimpleNamespace(x0=0.0, x1=span, y0=0.0, y1=span)


def test_session_starts_on_coarsest_grid(two_stores: list[str], built_store: BuiltStore) -> None:
    explorer = make_explorer()
    size = built_store.sizes[0]
    level = explorer.layer.levels[size]

    assert explorer.size == size
    image = explorer.level_sources[size].data["image"][0]
    assert image.dtype == np.uint32
    assert image.shape[0] % size == 0
    assert len(explorer.cell_source.data["i"]) == int(level.filled.sum())
    assert explorer.store_select.options == [("0", "0: served.zarr"), ("1", "1: served.zarr")]
    assert explorer.zoom_select.options == [("auto", "automatic")] + [(str(s), f"{s} × {s}") for s in built_store.sizes]
    assert "Link to this view" in explorer.link.text


def test_zoom_switches_grid_by_visible_span(two_stores: list[str], built_store: BuiltStore) -> None:
    explorer = make_explorer()
    small, large = built_store.sizes
    explorer._on_ranges(ranges_event(span_for_level(built_store.sizes, large)))
    assert explorer.size == large
    assert explorer.level_renderers[large].visible
    assert not explorer.level_renderers[small].visible
    # Both mosaics stay in their sources, so switching back sends no pixels again.
    assert len(explorer.level_sources[small].data["image"]) == 1
    assert len(explorer.level_sources[large].data["image"]) == 1
    assert len(explorer.cell_source.data["i"]) == int(explorer.layer.levels[large].filled.sum())
    explorer._on_ranges(ranges_event(1.0))
    assert explorer.size == small

    # A fixed zoom level ignores the visible span.
    explorer.zoom_select.value = str(large)
    explorer._on_ranges(ranges_event(1.0))
    assert explorer.size == large


def test_url_arguments_restore_view(two_stores: list[str], built_store: BuiltStore) -> None:
    large = built_store.sizes[1]
    level_filled = np.argwhere(
        state.get_store(1).layer(built_store.layer).levels[large].filled
    )
    i, j = (int(value) for value in level_filled[0])
    explorer = make_explorer(store="1", layer=built_store.layer, zoom=str(large), cell=f"{i},{j}", **{"class": "espresso"})

    assert explorer.store.index == 1
    assert explorer.size == large
    assert explorer.detail_cell == (large, i, j)
    assert f"Cell {i}, {j}" in explorer.detail_panel.text
    assert explorer.class_id == CLASS_NAMES.index("espresso")
    assert explorer.class_input.value == "espresso"
    span = explorer.x_range.end - explorer.x_range.start
    assert span == pytest.approx(span_for_level(built_store.sizes, large))
    centre = (j + 0.5) / large
    assert explorer.x_range.start <= centre <= explorer.x_range.end
    assert "store=1" in explorer.link.text
    assert f"cell={i}%2C{j}" in explorer.link.text
    assert explorer.notice.text == ""


def test_invalid_url_arguments_leave_a_notice(two_stores: list[str]) -> None:
    explorer = make_explorer(store="../../etc", zoom="7", **{"class": "<script>"})
    assert explorer.store.index == 0
    assert "store=&#x27;../../etc&#x27; ignored" in explorer.notice.text
    assert "zoom=7 ignored" in explorer.notice.text
    assert "<script>" not in explorer.notice.text
    assert "&lt;script&gt;" in explorer.notice.text


def test_class_filter_veils_cells(two_stores: list[str]) -> None:
    explorer = make_explorer()
    level = explorer.layer.levels[explorer.size]
    first_classes = level.top_class[level.filled][:, 0]
    name = CLASS_NAMES[int(first_classes[0])]

    explorer.class_input.value = name
    veils = np.asarray(explorer.cell_source.data["veil"])
    outline = np.asarray(explorer.cell_source.data["outline"])
    matching = first_classes == CLASS_NAMES.index(name)
    assert (veils[matching] == 0).all()
    assert (outline[matching] == 1).all()
    assert (veils[~matching] > 0).all()

    explorer._on_class_clear()
    assert explorer.class_id is None
    assert (np.asarray(explorer.cell_source.data["veil"]) == 0).all()


def test_tap_fills_detail_panel(two_stores: list[str], built_store: BuiltStore) -> None:
    explorer = make_explorer()
    explorer.cell_source.selected.indices = [0]
    i, j = explorer.cell_source.data["i"][0], explorer.cell_source.data["j"][0]
    level = explorer.layer.levels[explorer.size]
    text = explorer.detail_panel.text
    assert f"Cell {i}, {j}" in text
    assert f"{int(level.count[i, j]):,} activations" in text
    first = int(level.top_class[i, j, 0])
    assert CLASS_NAMES[first] in text
    exemplar_row = int(level.exemplars[i, j, 0])
    image_path = built_store.image_paths[exemplar_row // 16]
    assert image_path.rsplit("/", 1)[-1] in text


def test_store_switch_resets_view(two_stores: list[str], built_store: BuiltStore) -> None:
    explorer = make_explorer(zoom=str(built_store.sizes[1]))
    explorer.class_input.value = CLASS_NAMES[0] if CLASS_NAMES[0] in explorer.class_input.completions else ""
    explorer.store_select.value = "1"
    assert explorer.store.index == 1
    assert explorer.size == built_store.sizes[0]
    assert explorer.class_id is None
    assert explorer.x_range.start == 0
    assert explorer.x_range.end == 1


def test_layer_toggles(two_stores: list[str]) -> None:
    explorer = make_explorer()
    assert explorer.level_renderers[explorer.size].visible
    assert not explorer.density_renderer.visible
    explorer.layers_toggle.active = [1]
    assert not explorer.level_renderers[explorer.size].visible
    assert explorer.density_renderer.visible
    assert len(explorer.density_source.data["image"]) == 1


def add_grid_layer(store_path: str, layer: str, size: int) -> None:
    """Add a layer with one random grid of ``size`` (no icons) to a store."""
    group = zarr.open_group(store_path, mode="r+")
    rng = np.random.default_rng(size)
    count = rng.integers(0, 12, size=(size, size)).astype(np.int32)
    grid = group.require_group(f"grids/{layer}/{size}")
    grid.create_array("count", shape=count.shape, dtype="int32")[:] = count
    top_class = rng.integers(0, len(CLASS_NAMES), size=(size, size, 2)).astype(np.int16)
    grid.create_array("top_class", shape=top_class.shape, dtype="int16")[:] = top_class
    grid.create_array("top_score", shape=top_class.shape, dtype="float32")[:] = rng.random(top_class.shape)
    grid.create_array("exemplars", shape=(size, size, 1), dtype="int64")[:] = np.zeros((size, size, 1), np.int64)
    grid.attrs["min_count"] = 4
    group.attrs["layers"] = [*group.attrs["layers"], layer]


def test_layer_switch_changes_grid_sizes(built_store: BuiltStore, serve_config: ServeConfig, tmp_path) -> None:
    copy = tmp_path / "two_layers.zarr"
    shutil.copytree(built_store.path, copy)
    add_grid_layer(str(copy), "extra", 5)
    state.configure([str(copy)], serve_config)

    explorer = make_explorer(zoom=str(built_store.sizes[1]))
    assert explorer.layer_select.options == [built_store.layer, "extra"]
    explorer.class_input.value = explorer.class_input.completions[0]
    explorer.layer_select.value = "extra"

    assert explorer.layer_name == "extra"
    assert explorer.size == 5
    assert explorer.class_id is None
    assert explorer.zoom_select.options == [("auto", "automatic"), ("5", "5 × 5")]
    level = explorer.layer.levels[5]
    assert len(explorer.cell_source.data["i"]) == int((level.count >= 4).sum())
    # Without icons every non-empty cell is drawn as a placeholder.
    assert list(explorer.level_renderers) == [5]
    assert explorer.level_renderers[5] in explorer.plot.renderers
    assert explorer.level_sources[5].data["image"][0].shape == (5, 5)
    assert explorer.density_source.data["image"] == []


def drop_icons(store_path: str, layer: str, size: int) -> None:
    """Mark every icon of grid ``size`` as not rendered, as if the render stage had skipped it."""
    group = zarr.open_group(store_path, mode="r+")
    done = group[f"grids/{layer}/{size}/icon_done"]
    done[:] = np.zeros(done.shape, bool)


def test_session_opens_on_grid_with_icons(two_stores: list[str], built_store: BuiltStore) -> None:
    explorer = make_explorer()

    assert explorer.layer.has_own_icons(explorer.size)
    assert explorer.size == built_store.sizes[0]
    assert explorer.layer.home_size() == built_store.sizes[0]
    assert explorer.x_range.start == 0
    assert explorer.x_range.end == 1


def test_session_skips_coarsest_without_icons(built_store: BuiltStore, serve_config: ServeConfig, tmp_path) -> None:
    copy = tmp_path / "fine_icons.zarr"
    shutil.copytree(built_store.path, copy)
    small, large = built_store.sizes
    drop_icons(str(copy), built_store.layer, small)
    add_grid_layer(str(copy), "extra", 5)
    state.configure([str(copy)], serve_config)

    explorer = make_explorer()

    assert explorer.size == large
    assert explorer.layer.has_own_icons(large)
    assert not explorer.layer.has_own_icons(small)
    span = explorer.x_range.end - explorer.x_range.start
    assert span == pytest.approx(span_for_level(built_store.sizes, large))
    assert span < 1.0
    # Automatic zoom keeps the grid at the opening span.
    explorer._on_ranges(ranges_event(span))
    assert explorer.size == large
    assert f"zoom={large}" in explorer.link.text

    # Switching layers back and forth opens on the same grid.
    explorer.layer_select.value = "extra"
    assert explorer.size == 5
    explorer.layer_select.value = built_store.layer
    assert explorer.size == large
    assert explorer.x_range.end - explorer.x_range.start == pytest.approx(span)


def run_now(work, apply) -> None:
    """Run an explorer's background work and its callback in the calling thread."""
    future: Future = Future()
    try:
        future.set_result(work())
    except Exception as error:  # noqa: BLE001 - the callback reads the error from the future
        future.set_exception(error)
    apply(future)


def half_jpeg() -> bytes:
    """Return the first half of a 64 x 64 noise JPEG, a truncated file."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("filename", "data", "reason"),
    [
        ("notes.png", b"plain text, not pixels", "not an image file"),
        ("cut.jpg", half_jpeg(), "truncated image file"),
    ],
)
def test_upload_rejection_names_file(
    two_stores: list[str], caplog: pytest.LogCaptureFixture, filename: str, data: bytes, reason: str
) -> None:
    explorer = make_explorer()
    explorer._submit = run_now
    explorer.file_input = SimpleNamespace(value=base64.b64encode(data).decode("ascii"), filename=filename)

    with caplog.at_level(logging.INFO, logger="server.explorer"):
        explorer._start_upload()

    rejected = [record.getMessage() for record in caplog.records if "upload rejected" in record.getMessage()]
    assert len(rejected) == 1
    assert f"could not use {filename}: {reason}" in rejected[0]
    assert filename in explorer.upload_message.text
    assert explorer.upload_result is None
