"""Browser tests of the explorer: headless Chromium (Debian's) driven by Playwright.

Each test opens a fresh page on the server from ``conftest.running_server``,
which serves the built store twice (stores 0 and 1).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from atlas.config import ServeConfig
from atlas.query import query_image
from server.state import MODEL_LOCK
from server import state
from tests.server.store_builder import CLASS_NAMES, BuiltStore

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1320, "height": 900}
TIMEOUT_MS = 60_000
BACKGROUND_RGB = (0x0E, 0x10, 0x14)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing; install Debian's chromium package"),
]

# The image renderer of the grid on screen (one per grid size, named icons-<size>).
VISIBLE_ICONS = """() => {
  const doc = window.Bokeh && Bokeh.documents[0];
  const plot = doc && doc.get_model_by_name('atlas');
  return plot ? plot.renderers.find(r => r.name && r.name.startsWith('icons-') && r.visible) : undefined;
}"""
ICONS_READY = f"() => {{ const icons = ({VISIBLE_ICONS})(); return icons != null && icons.data_source.data.image.length == 1 }}"
ICONS_SHAPE = f"() => ({VISIBLE_ICONS})().data_source.data.image[0].shape"

# Screen position of the plot frame and the visible data ranges.
FRAME = """() => {
  const plot = Bokeh.documents[0].get_model_by_name('atlas');
  const view = Bokeh.index.find_one(plot);
  const rect = view.el.getBoundingClientRect();
  const box = view.frame.bbox;
  return {left: rect.left + box.x0, top: rect.top + box.y0, width: box.width, height: box.height,
          x0: plot.x_range.start, x1: plot.x_range.end, y0: plot.y_range.start, y1: plot.y_range.end};
}"""


def model_text(page, name: str) -> str:
    return page.evaluate(f"() => Bokeh.documents[0].get_model_by_name('{name}').text")


def wait_for_text(page, name: str, *fragments: str) -> None:
    page.wait_for_function(
        "([name, fragments]) => { const text = Bokeh.documents[0].get_model_by_name(name).text;"
        " return fragments.every(fragment => text.includes(fragment)) }",
        arg=[name, list(fragments)], timeout=TIMEOUT_MS,
    )


def cell_centre_on_screen(frame: dict, size: int, i: int, j: int) -> tuple[float, float]:
    x, y = (j + 0.5) / size, (i + 0.5) / size
    screen_x = frame["left"] + (x - frame["x0"]) / (frame["x1"] - frame["x0"]) * frame["width"]
    screen_y = frame["top"] + (frame["y1"] - y) / (frame["y1"] - frame["y0"]) * frame["height"]
    return screen_x, screen_y


def grid_arrays(store: BuiltStore, size: int) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store.path), mode="r")
    grid = group[f"grids/{store.layer}/{size}"]
    return {name: np.asarray(grid[name][:]) for name in ("count", "top_class", "icons", "icon_done", "exemplars")} | {
        "min_count": np.asarray(grid.attrs["min_count"])
    }


def rendered_cell(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    cells = np.argwhere((arrays["count"] >= arrays["min_count"]) & arrays["icon_done"])
    return int(cells[len(cells) // 2][0]), int(cells[len(cells) // 2][1])


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(browser, running_server, built_store: BuiltStore, serve_config: ServeConfig):
    # Other test modules register other stores in the same process; restore the server's list.
    state.configure([str(built_store.path), str(built_store.path)], serve_config)
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    try:
        yield page
    finally:
        page.close()


def open_explorer(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function(ICONS_READY, timeout=TIMEOUT_MS)
    # Let the canvas paint the image once after the data arrived.
    page.wait_for_timeout(300)


def test_page_draws_icons(page, running_server, built_store: BuiltStore) -> None:
    open_explorer(page, running_server.url)
    size = built_store.sizes[0]
    arrays = grid_arrays(built_store, size)

    shape = page.evaluate(ICONS_SHAPE)
    icon_px = arrays["icons"].shape[2]
    assert shape == [size * icon_px, size * icon_px]

    frame = page.evaluate(FRAME)
    shot = page.screenshot(clip={"x": frame["left"], "y": frame["top"], "width": frame["width"], "height": frame["height"]})
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.float64)
    assert pixels.std() > 20, "the atlas canvas is blank"

    # A rendered cell shows its icon: compare mean colours of the inner 80 % of the cell.
    i, j = rendered_cell(arrays)
    cell_px = pixels.shape[0] / size
    top = (size - 1 - i) * cell_px
    inner = pixels[int(top + 0.1 * cell_px) : int(top + 0.9 * cell_px), int((j + 0.1) * cell_px) : int((j + 0.9) * cell_px)]
    icon = arrays["icons"][i, j].astype(np.float64)
    margin = int(0.1 * icon_px)
    expected = icon[margin : icon_px - margin, margin : icon_px - margin].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(inner.reshape(-1, 3).mean(axis=0), expected, atol=12)

    # An empty cell shows the plot background.
    empty = np.argwhere(arrays["count"] < arrays["min_count"])
    if len(empty):
        a, b = (int(v) for v in empty[0])
        top = (size - 1 - a) * cell_px
        patch = pixels[int(top + 0.3 * cell_px) : int(top + 0.7 * cell_px), int((b + 0.3) * cell_px) : int((b + 0.7) * cell_px)]
        np.testing.assert_allclose(patch.reshape(-1, 3).mean(axis=0), BACKGROUND_RGB, atol=3)


def test_hover_shows_count_and_classes(page, running_server, built_store: BuiltStore) -> None:
    open_explorer(page, running_server.url)
    size = built_store.sizes[0]
    arrays = grid_arrays(built_store, size)
    i, j = rendered_cell(arrays)

    x, y = cell_centre_on_screen(page.evaluate(FRAME), size, i, j)
    # The first move enters the canvas; the hover tool reacts to the following ones.
    page.mouse.move(x - 5, y - 5)
    page.mouse.move(x, y, steps=3)
    tooltip = page.locator(".bk-tooltip-content").filter(has_text=f"cell {i}, {j}")
    tooltip.first.wait_for(state="visible")
    text = tooltip.first.inner_text()
    assert f"{int(arrays['count'][i, j])} activations" in text
    assert CLASS_NAMES[int(arrays["top_class"][i, j, 0])] in text


def test_tap_shows_cell_details(page, running_server, built_store: BuiltStore) -> None:
    open_explorer(page, running_server.url)
    size = built_store.sizes[0]
    arrays = grid_arrays(built_store, size)
    i, j = rendered_cell(arrays)

    page.mouse.click(*cell_centre_on_screen(page.evaluate(FRAME), size, i, j))
    wait_for_text(page, "detail_panel", f"Cell {i}, {j}")
    exemplars = [int(row) for row in arrays["exemplars"][i, j] if row >= 0]
    # Patches load in a worker thread; wait until every exemplar has its crop.
    page.wait_for_function(
        "n => (Bokeh.documents[0].get_model_by_name('detail_panel').text.match(/<img/g) || []).length >= n",
        arg=len(exemplars) + 1,
    )
    text = model_text(page, "detail_panel")
    assert CLASS_NAMES[int(arrays["top_class"][i, j, 0])] in text
    for row in exemplars:
        assert Path(built_store.image_paths[row // 16]).name in text
    assert "detail_panel" in page.evaluate("() => Bokeh.documents[0].get_model_by_name('side_tabs').tabs[0].child.name")


def test_upload_highlights_cells_and_patches(page, running_server, built_store: BuiltStore) -> None:
    open_explorer(page, running_server.url)
    photo = built_store.image_paths[11]
    page.locator("input[type=file]").set_input_files(photo)
    wait_for_text(page, "upload_panel", "Nearest dataset patches")

    size = built_store.sizes[0]
    # The server explains the upload in a background thread on the same cached
    # model, so this direct query takes the server's model lock as the server does.
    with MODEL_LOCK:
        expected = query_image(built_store.path, Image.open(photo).convert("RGB"), k=10).cells[size]
    query_data = page.evaluate(
        "() => { const d = Bokeh.documents[0].get_model_by_name('query_cells').data_source.data;"
        " return {x: Array.from(d.x), y: Array.from(d.y), label: Array.from(d.label)} }"
    )
    assert query_data["label"][0] == "1"
    assert len(query_data["x"]) == min(10, len(expected))
    assert query_data["x"][0] == pytest.approx((expected[0].j + 0.5) / size)
    assert query_data["y"][0] == pytest.approx((expected[0].i + 0.5) / size)

    text = model_text(page, "upload_panel")
    assert text.count("<figure") >= 6
    # The photo is in the store, so the nearest patch comes from it.
    first_figure = text.split("<figure", 2)[1]
    assert Path(photo).name in first_figure
    assert "cosine 1.000" in first_figure or "cosine 0.99" in first_figure

    # Grad-CAM and saliency follow from a second background task.
    wait_for_text(page, "upload_panel", "Grad-CAM: ", "Saliency: ")


def test_bad_uploads_keep_session_working(page, running_server, built_store: BuiltStore, serve_config: ServeConfig) -> None:
    open_explorer(page, running_server.url)
    file_input = page.locator("input[type=file]")

    file_input.set_input_files(files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image at all"}])
    wait_for_text(page, "upload_message", "notes.txt: not an image file")

    file_input.set_input_files(files=[{"name": "empty.png", "mimeType": "image/png", "buffer": b""}])
    wait_for_text(page, "upload_message", "empty.png: the file is empty (0 bytes)")

    oversized = np.random.default_rng(0).integers(0, 256, int(serve_config.max_upload_mb * 1.5 * 2**20), dtype=np.uint8)
    file_input.set_input_files(files=[{"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": oversized.tobytes()}])
    wait_for_text(page, "upload_message", "huge.jpg: the file is 0.38 MB, above the 0.25 MB upload limit")

    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")
    file_input.set_input_files(files=[{"name": "bomb.png", "mimeType": "image/png", "buffer": bomb.getvalue()}])
    wait_for_text(page, "upload_message", "could not use bomb.png", "decompression")

    assert "message error" in model_text(page, "upload_message")
    file_input.set_input_files(built_store.image_paths[2])
    wait_for_text(page, "upload_panel", "Nearest dataset patches")
    assert "message info" in model_text(page, "upload_message")



def test_cancelled_file_chooser_keeps_results(page, running_server, built_store: BuiltStore, caplog) -> None:
    caplog.set_level(logging.WARNING)
    open_explorer(page, running_server.url)
    file_input = page.locator("input[type=file]")
    first, second = built_store.image_paths[11], built_store.image_paths[2]
    file_input.set_input_files(first)
    wait_for_text(page, "upload_panel", "Nearest dataset patches", Path(first).name)
    message = model_text(page, "upload_message")

    # Cancelling the chooser empties the input, so Bokeh sends an empty value and file name.
    with page.expect_file_chooser() as chooser:
        file_input.click()
    chooser.value.set_files([])
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('upload').filename === ''")
    # Give the server's callbacks of the empty value time to run before checking the page.
    page.wait_for_timeout(500)
    assert model_text(page, "upload_message") == message
    assert Path(first).name in model_text(page, "upload_panel")
    # The explanations of the first upload still arrive after the cancel.
    wait_for_text(page, "upload_panel", "Grad-CAM: ", "Saliency: ")

    file_input.set_input_files(second)
    wait_for_text(page, "upload_panel", "Nearest dataset patches", Path(second).name)
    assert "message info" in model_text(page, "upload_message")
    problems = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not problems, "\n".join(record.getMessage() for record in problems)


def test_wheel_zoom_switches_grid(page, running_server, built_store: BuiltStore) -> None:
    open_explorer(page, running_server.url)
    small, large = built_store.sizes
    frame = page.evaluate(FRAME)
    page.mouse.move(frame["left"] + frame["width"] / 2, frame["top"] + frame["height"] / 2)
    for _ in range(12):
        page.mouse.wheel(0, -240)
        page.wait_for_timeout(50)
    wait_for_text(page, "status", f"Grid {large} × {large}")
    shape = page.evaluate(ICONS_SHAPE)
    assert shape[0] % large == 0
    assert shape[0] // large <= shape[0] // small


def test_class_filter_from_autocomplete(page, running_server, built_store: BuiltStore) -> None:
    open_explorer(page, running_server.url)
    size = built_store.sizes[0]
    arrays = grid_arrays(built_store, size)
    filled = arrays["count"] >= arrays["min_count"]
    name = CLASS_NAMES[int(arrays["top_class"][filled][0, 0])]

    box = page.locator(".bk-input[placeholder^='type a class name']")
    box.click()
    box.type(name[:4], delay=50)
    page.locator(".bk-menu").get_by_text(name, exact=True).first.click()
    page.wait_for_function(
        "() => Bokeh.documents[0].get_model_by_name('cells').data_source.data.veil.some(v => v > 0)"
    )
    veils = page.evaluate("() => Array.from(Bokeh.documents[0].get_model_by_name('cells').data_source.data.veil)")
    i, j = np.nonzero(filled)
    matching = arrays["top_class"][i, j, 0] == CLASS_NAMES.index(name)
    assert all(veil == 0 for veil, match in zip(veils, matching) if match)
    assert all(veil > 0 for veil, match in zip(veils, matching) if not match)


def test_url_reopens_view(page, running_server, built_store: BuiltStore) -> None:
    size = built_store.sizes[1]
    arrays = grid_arrays(built_store, size)
    i, j = rendered_cell(arrays)
    open_explorer(page, f"{running_server.url}?store=1&zoom={size}&cell={i},{j}&class=espresso")

    wait_for_text(page, "detail_panel", f"Cell {i}, {j}")
    assert f"Grid {size} × {size}" in model_text(page, "status")
    assert page.evaluate("() => Bokeh.documents[0].get_model_by_name('class_filter').value") == "espresso"
    assert page.evaluate("() => Bokeh.documents[0].get_model_by_name('store_select').value") == "1"
    link = model_text(page, "link")
    assert f"zoom={size}" in link
    assert "class=espresso" in link


def test_screenshot_helper_writes_png(browser, built_store: BuiltStore, tmp_path) -> None:
    from server.screenshot import capture

    out = capture(
        [str(built_store.path)], tmp_path / "explorer.png", tap=(0.5, 0.5), viewport=(1000, 700), browser=browser,
    )
    image = Image.open(out)
    assert image.size == (1000, 700)
    pixels = np.asarray(image.convert("RGB")).astype(np.float64)
    assert pixels.std() > 20
