"""Explorer responsiveness in headless Chromium: page ready and upload-to-results times.

Page ready is the time from navigation start until the icons of an 80 × 80
grid are drawn, with "drawn" as in ``tests/server/test_browser.py``: the
visible ``icons-<size>`` renderer contains its mosaic, then one more animation
frame for the canvas to paint it. The store is built with the tests' store
builder (tiny model, synthetic icons) and has one grid, 80 × 80, so it is the
level a fresh page shows.

Upload-to-results is the time from setting the file input until the
nearest-patches list shows the new file, on ``stores/demo.zarr``
(EfficientNet-Lite0, the real index). It has an 80 × 80 grid, but icons only
for the 20 × 20 grid, so it does not serve the page-ready measure. The first upload
loads the model and index and is reported apart as the warm-up. Each upload
then waits for its Grad-CAM and saliency maps, which a session computes after
the results, so the next upload does not share the CPU with them.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from atlas.config import ServeConfig
from benchmarks.common import machine

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEMO_STORE = ROOT / "stores" / "demo.zarr"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1320, "height": 900}
TIMEOUT_MS = 180_000
GRID_SIZE = 80
RUNS = 5
PAGE_GOAL_S = 2.0
QUERY_GOAL_S = 1.0

# Once the visible icon renderer contains its mosaic, return the time since navigation start in ms.
ICONS_READY_AT = """() => {
  const doc = window.Bokeh && Bokeh.documents[0];
  const plot = doc && doc.get_model_by_name('atlas');
  const icons = plot && plot.renderers.find(r => r.name && r.name.startsWith('icons-') && r.visible);
  return icons != null && icons.data_source.data.image.length == 1 ? performance.now() : false;
}"""
NEXT_FRAME = "() => new Promise(done => requestAnimationFrame(() => done(performance.now())))"
ICONS_SHAPE = """() => Bokeh.documents[0].get_model_by_name('atlas').renderers
  .find(r => r.name && r.name.startsWith('icons-') && r.visible).data_source.data.image[0].shape"""
PANEL_SHOWS = """([name, fragments]) => { const text = Bokeh.documents[0].get_model_by_name(name).text;
  return fragments.every(fragment => text.includes(fragment)) }"""


def _build_grid_store(folder: Path) -> Path:
    from tests.server.store_builder import build_store

    # 6400 activations over 6400 cells. With min_count 1, every cell the layout reaches is filled.
    built = build_store(folder, n_images=400, per_image=16, sizes=(GRID_SIZE,), min_count=1)
    return built.path


def _page_ready(browser, url: str, runs: int) -> tuple[list[float], list[int]]:
    times, shape = [], []
    for _ in range(runs):
        page = browser.new_page(viewport=VIEWPORT)
        try:
            page.goto(url)
            page.wait_for_function(ICONS_READY_AT, timeout=TIMEOUT_MS, polling="raf")
            times.append(page.evaluate(NEXT_FRAME) / 1000)
            shape = page.evaluate(ICONS_SHAPE)
        finally:
            page.close()
    return times, shape


def _chelsea_png() -> bytes:
    from skimage.data import chelsea

    buffer = io.BytesIO()
    Image.fromarray(chelsea()).save(buffer, format="PNG")
    return buffer.getvalue()


def _uploads(browser, url: str, runs: int) -> tuple[list[float], list[float]]:
    photo = _chelsea_png()
    results, explained = [], []
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(url)
        page.wait_for_function(ICONS_READY_AT, polling="raf")
        file_input = page.locator("input[type=file]")
        for run in range(runs):
            # A new name per upload distinguishes its results from the previous upload's.
            name = f"chelsea-{run}.png"
            start = time.perf_counter()
            file_input.set_input_files(files=[{"name": name, "mimeType": "image/png", "buffer": photo}])
            page.wait_for_function(PANEL_SHOWS, arg=["upload_panel", [name, "Nearest dataset patches"]], polling="raf")
            results.append(time.perf_counter() - start)
            page.wait_for_function(PANEL_SHOWS, arg=["upload_panel", [name, "Grad-CAM: ", "Saliency: "]], polling=100)
            explained.append(time.perf_counter() - start)
    finally:
        page.close()
    return results, explained


def run(runs: int = RUNS) -> dict:
    """Measure page ready on an 80 × 80 grid and upload-to-results on the demo store.

    Returns
    -------
    dict
        ``page_s`` (runs,), ``upload_s`` and ``explained_s`` (runs + 1, warm-up first), the
        mosaic ``shape`` in pixels, ``build_s`` of the grid store and the ``load`` averages.
    """
    from playwright.sync_api import sync_playwright

    from server.serve import start_in_thread

    if not DEMO_STORE.exists():
        raise FileNotFoundError(f"{DEMO_STORE} is missing; build it first with `atlas demo --no-serve`")
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-explorer-"))
    config = ServeConfig(port=0)
    try:
        started = time.perf_counter()
        grid_store = _build_grid_store(work)
        build_s = time.perf_counter() - started
        server = start_in_thread([str(grid_store), str(DEMO_STORE)], config)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    # One page first so the server has read the store and tiled its mosaic once.
                    _page_ready(browser, server.url, 1)
                    page_s, shape = _page_ready(browser, server.url, runs)
                    upload_s, explained_s = _uploads(browser, f"{server.url}?store=1", runs + 1)
                finally:
                    browser.close()
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"page_s": page_s, "upload_s": upload_s, "explained_s": explained_s, "shape": shape,
            "build_s": build_s, "load": os.getloadavg()}


def _verdict(value: float, goal: float) -> str:
    return "meets" if value <= goal else "misses"


def report(result: dict) -> str:
    """Format the measurements as the report section."""
    page = statistics.median(result["page_s"])
    warm_up, uploads = result["upload_s"][0], result["upload_s"][1:]
    upload = statistics.median(uploads)
    explained = statistics.median(result["explained_s"][1:])
    runs = len(result["page_s"])
    times = ", ".join(f"{value:.2f}" for value in result["page_s"])
    upload_times = ", ".join(f"{value:.2f}" for value in uploads)
    load = ", ".join(f"{value:.2f}" for value in result["load"])
    height, width = result["shape"]
    return f"""## Explorer

`python -m benchmarks.run explorer`: the Bokeh server in this process, headless Chromium through Playwright.

| measure | median of {runs} (s) | runs (s) | goal (s) | |
| --- | ---: | --- | ---: | --- |
| page ready, 80 × 80 grid | {page:.2f} | {times} | {PAGE_GOAL_S:.0f} | {_verdict(page, PAGE_GOAL_S)} |
| upload to results, chelsea | {upload:.2f} | {upload_times} | {QUERY_GOAL_S:.0f} | {_verdict(upload, QUERY_GOAL_S)} |

- Page ready: navigation start until the visible icon renderer contains its {width} × {height} px mosaic, plus
  one animation frame; a new page each run, after one unmeasured page. The store comes from
  `tests/server/store_builder.py` (tiny model, 6,400 activations, synthetic icons; built in {result['build_s']:.0f} s)
  with one 80 × 80 grid. The `stores/demo.zarr` used for this run has an 80 × 80 grid but icons only for the 20 × 20 grid.
- Upload to results: setting the file input until the nearest-patches list shows the file, on
  `stores/demo.zarr` (EfficientNet-Lite0, `blocks.4`), skimage's chelsea photo as PNG. The first upload,
  which loads the model and index, took {warm_up:.2f} s and is left out of the median. Grad-CAM and
  saliency follow in {explained:.2f} s (median, from setting the input).
- Load average (1, 5, 15 min) at the end: {load}.

Machine: {machine()}.
"""
