"""HTML of the explorer's side panels: cell details, upload results and messages.

Every value that comes from a store (class names, image paths) or from the
browser (file names) is escaped with :func:`html.escape` before it is placed
in the markup. Images are inline PNG data URIs.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import PurePath

from server.upload import CellHit, UploadResult

# Styles shared by every panel Div; Bokeh renders each Div in its own shadow
# root, so the sheet is attached to each Div through ``InlineStyleSheet``.
PANEL_CSS = """
:host { color: #d7dbe0; font: 13px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
.panel { padding: 4px 2px; }
h3 { font-size: 14px; font-weight: 600; margin: 6px 0 8px; color: #f1f3f5; }
h4 { font-size: 12px; font-weight: 600; margin: 12px 0 6px; color: #aab2bd; text-transform: uppercase; letter-spacing: .04em; }
.muted { color: #8b94a1; }
.message { padding: 8px 10px; border-radius: 6px; margin: 6px 0; }
.message.error { background: #4a1f24; color: #ffd7db; border: 1px solid #8a3440; }
.message.info { background: #1d2a3a; color: #cfe3ff; border: 1px solid #2f4b6e; }
.message.busy { background: #2b2a1c; color: #f3e6a6; border: 1px solid #6b6330; }
.classes { width: 100%; border-collapse: collapse; table-layout: fixed; }
.classes td { padding: 2px 4px; vertical-align: middle; }
.classes td.name { width: 50%; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.classes td.bar-cell { width: 34%; }
.bar { height: 8px; background: #f4a259; border-radius: 3px; }
.score { font-variant-numeric: tabular-nums; color: #aab2bd; text-align: right; width: 48px; }
.icon-large { width: 100%; max-width: 320px; border-radius: 4px; display: block; background: #000; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); gap: 8px; }
.gallery figure { margin: 0; background: #1b1e23; border-radius: 4px; padding: 4px; }
.gallery img, .gallery .missing { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 3px; display: block; }
.gallery .missing { background: #2a2e35; }
.gallery figcaption { font-size: 11px; line-height: 1.3; margin-top: 3px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.gallery .score { text-align: left; width: auto; }
.upload-head { display: flex; gap: 10px; align-items: flex-start; }
.upload-head img { width: 112px; border-radius: 4px; }
.cells { font-variant-numeric: tabular-nums; }
.cells td { padding: 1px 6px 1px 0; }
.explain { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
.explain figure { margin: 0; }
.explain img { width: 100%; border-radius: 4px; }
.explain figcaption { font-size: 11px; color: #aab2bd; text-align: center; }
a { color: #8cc4ff; }
"""


# Dark colours for Bokeh's widgets. Bokeh 3.9 defines the palette as CSS variables
# on each widget's shadow host, and a sheet attached later on the same host wins.
WIDGET_CSS = """
:host {
  --color: #e6e9ee; --background-color: #1b1f26; --hover-color: #262b33; --border-color: #3a414c;
  --divider-color: #3a414c; --placeholder-color: #7d8693; --surface-background-color: #20252c;
  --disabled-background-color: #20252c; --inactive-bg: #1b1f26; --inactive-fg: #8b94a1;
  --active-bg: #25364a; --active-fg: #cfe3ff; --active-border: #4d7ea8; --highlight-color: #4d7ea8;
  --default: #222831; --default-border: #3a414c; --default-hover: #2a313b; --default-hover-border: #4a525e;
  --default-active: #313944; --default-active-border: #4a525e;
  --file: #222831; --file-border: #3a414c; --file-hover: #2a313b; --file-hover-border: #4a525e;
  --file-active: #313944; --file-active-border: #4a525e;
  color: #d7dbe0;
}
label { color: #aab2bd; }
"""


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def short_name(path: str) -> str:
    """Return the last part of an image path (``sample:`` items keep photo and crop)."""
    if path.startswith("sample:"):
        return path[len("sample:"):]
    name = PurePath(path).name
    return name or path


def message_html(text: str, kind: str = "info") -> str:
    """Return a message box; ``kind`` is ``info``, ``error`` or ``busy``."""
    kind = kind if kind in {"info", "error", "busy"} else "info"
    return f'<div class="message {kind}">{_text(text)}</div>'


def classes_html(classes: Sequence[tuple[str, float]]) -> str:
    """Return a table of class names with bars scaled to the largest score."""
    if not classes:
        return '<p class="muted">No class attribution for this cell.</p>'
    top = max(abs(score) for _, score in classes) or 1.0
    rows = []
    for name, score in classes:
        width = max(2.0, 100.0 * abs(score) / top)
        rows.append(
            f'<tr><td class="name" title="{_text(name)}">{_text(name)}</td>'
            f'<td class="bar-cell"><div class="bar" style="width:{width:.0f}%"></div></td>'
            f'<td class="score">{score:.3g}</td></tr>'
        )
    return '<table class="classes">' + "".join(rows) + "</table>"


def gallery_html(items: Sequence[tuple[str | None, str, str]]) -> str:
    """Return a grid of image patches; each item is (data URI or None, name, caption line)."""
    if not items:
        return '<p class="muted">No patches.</p>'
    figures = []
    for uri, name, caption in items:
        picture = f'<img src="{uri}" alt="{_text(name)}">' if uri else '<div class="missing" title="image not available"></div>'
        figures.append(
            f'<figure title="{_text(name)}">{picture}'
            f'<figcaption>{_text(short_name(name))}<br><span class="score">{_text(caption)}</span></figcaption></figure>'
        )
    return '<div class="gallery">' + "".join(figures) + "</div>"


def detail_html(
    *,
    size: int,
    cell: tuple[int, int],
    count: int,
    min_count: int,
    icon_uri: str | None,
    classes: Sequence[tuple[str, float]],
    exemplars: Sequence[tuple[str | None, str]],
) -> str:
    """Return the panel of a tapped cell: large icon, top classes and exemplar patches."""
    i, j = cell
    parts = [f"<div class='panel'><h3>Cell {i}, {j} <span class='muted'>of the {size} × {size} grid</span></h3>"]
    if count < max(min_count, 1):
        parts.append(f"<p class='muted'>{count} activations: below the minimum of {min_count}, so the cell is empty.</p></div>")
        return "".join(parts)
    if icon_uri:
        parts.append(f'<img class="icon-large" src="{icon_uri}" alt="feature visualization of cell {i}, {j}">')
    else:
        parts.append("<p class='muted'>The icon of this cell is not rendered yet (run <code>atlas render</code>).</p>")
    parts.append(f"<p>{count:,} activations</p>")
    parts.append("<h4>Top classes (mean attribution)</h4>")
    parts.append(classes_html(classes))
    parts.append("<h4>Exemplar patches</h4>")
    parts.append(gallery_html([(uri, name, "") for uri, name in exemplars]))
    parts.append("</div>")
    return "".join(parts)


def _cells_table(cells: Sequence[CellHit], limit: int = 8) -> str:
    if not cells:
        return '<p class="muted">No cell of this grid holds a neighbour.</p>'
    rows = ["<tr class='muted'><td>#</td><td>cell</td><td>hits</td><td>mean cosine</td></tr>"]
    for rank, cell in enumerate(cells[:limit], start=1):
        rows.append(f"<tr><td>{rank}</td><td>{cell.i}, {cell.j}</td><td>{cell.count}</td><td>{cell.mean_score:.3f}</td></tr>")
    return '<table class="cells">' + "".join(rows) + "</table>"


def upload_html(result: UploadResult, size: int) -> str:
    """Return the upload panel: the image, its most-hit cells at ``size``, nearest patches, explanations."""
    height, width = result.map_shape
    parts = [
        "<div class='panel'>",
        f"<div class='upload-head'><img src='{result.thumbnail}' alt='uploaded image'>"
        f"<div><b>{_text(result.filename)}</b><br><span class='muted'>{height * width} positions searched "
        f"in {result.seconds:.2f} s</span></div></div>",
        f"<h4>Nearest cells ({size} × {size} grid)</h4>",
        _cells_table(result.cells.get(size, [])),
        "<h4>Nearest dataset patches</h4>",
        gallery_html([(match.uri, match.name, f"cosine {match.score:.3f}") for match in result.matches]),
    ]
    if result.explanations:
        parts.append("<h4>Why the model predicts its top class</h4><div class='explain'>")
        for label, uri in result.explanations:
            parts.append(f"<figure><img src='{uri}' alt='{_text(label)}'><figcaption>{_text(label)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)

