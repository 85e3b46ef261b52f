"""Take a screenshot of the running explorer with Playwright and Debian's Chromium.

Used to make ``docs/images/explorer.png``::

    python -m server.screenshot stores/demo.zarr --upload photo.jpg --out docs/images/explorer.png

It starts the explorer in a thread on a free port, opens it in headless
Chromium, optionally uploads a photo and taps a cell, and saves the page.
Playwright (the ``test`` extra) and ``/usr/bin/chromium`` must be installed;
no browser is downloaded.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from atlas.config import ServeConfig
from server.serve import start_in_thread

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
READY = (
    "() => { const d = window.Bokeh && Bokeh.documents[0]; const plot = d && d.get_model_by_name('atlas');"
    " const icons = plot && plot.renderers.find(r => r.name && r.name.startsWith('icons-') && r.visible);"
    " return icons != null && icons.data_source.data.image.length == 1 }"
)
TIMEOUT_MS = 180_000


def capture(
    store_paths: list[str],
    out: str | Path,
    *,
    upload: str | Path | None = None,
    tap: tuple[float, float] | None = None,
    query: str = "",
    viewport: tuple[int, int] = (1320, 900),
    full_page: bool = False,
    browser=None,
) -> Path:
    """Serve ``store_paths``, open the explorer and save a PNG screenshot.

    Parameters
    ----------
    store_paths
        Stores to serve.
    out
        PNG file to write.
    upload
        A photo to upload before the screenshot; the page waits for its results.
    tap
        A point (x, y) of the layout in [0, 1] to tap, opening its cell's panel.
    query
        URL query string such as ``?zoom=40``.
    viewport
        Browser window (width, height) in CSS pixels.
    full_page
        Capture the whole scrollable page instead of the window.
    browser
        A Playwright ``Browser`` to open the page in; ``None`` launches Chromium.
        A sync Playwright context cannot be nested, so a caller that already
        runs one passes its browser.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server = start_in_thread(list(store_paths), ServeConfig(port=0))
    try:
        if browser is not None:
            _shoot(browser, server.url + query, out, upload, tap, viewport, full_page)
        else:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as playwright:
                launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    _shoot(launched, server.url + query, out, upload, tap, viewport, full_page)
                finally:
                    launched.close()
    finally:
        server.stop()
    logger.info("saved a screenshot of the explorer to %s", out)
    return out


def _shoot(browser, url: str, out: Path, upload, tap, viewport: tuple[int, int], full_page: bool) -> None:
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    try:
        page.goto(url)
        page.wait_for_function(READY, timeout=TIMEOUT_MS)
        if tap is not None:
            _tap(page, *tap)
        if upload is not None:
            page.locator("input[type=file]").set_input_files(str(upload))
            page.wait_for_function(
                "() => Bokeh.documents[0].get_model_by_name('upload_panel').text.includes('Nearest dataset patches')",
                timeout=TIMEOUT_MS,
            )
        # Let the explanations and the canvas settle.
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out), full_page=full_page)
    finally:
        page.close()


def _tap(page, x: float, y: float) -> None:
    frame = page.evaluate(
        "() => { const plot = Bokeh.documents[0].get_model_by_name('atlas'); const view = Bokeh.index.find_one(plot);"
        " const rect = view.el.getBoundingClientRect(); const box = view.frame.bbox;"
        " return {left: rect.left + box.x0, top: rect.top + box.y0, width: box.width, height: box.height} }"
    )
    page.mouse.click(frame["left"] + x * frame["width"], frame["top"] + (1 - y) * frame["height"])
    page.wait_for_function(
        "() => Bokeh.documents[0].get_model_by_name('detail_panel').text.includes('<h3>Cell')", timeout=TIMEOUT_MS
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and take the screenshot."""
    parser = argparse.ArgumentParser(description="Screenshot the atlas explorer.")
    parser.add_argument("stores", nargs="+", help="feature stores to serve")
    parser.add_argument("--out", default="docs/images/explorer.png", help="PNG file to write")
    parser.add_argument("--upload", help="photo to upload before the screenshot")
    parser.add_argument("--tap", nargs=2, type=float, metavar=("X", "Y"), help="layout point in [0, 1] to tap")
    parser.add_argument("--query", default="", help="URL query string, e.g. '?zoom=40'")
    parser.add_argument("--full-page", action="store_true", help="capture the whole page, not only the window")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    capture(
        arguments.stores, arguments.out, upload=arguments.upload,
        tap=tuple(arguments.tap) if arguments.tap else None, query=arguments.query, full_page=arguments.full_page,
    )


if __name__ == "__main__":
    main()
