"""One browser session of the atlas explorer: the Bokeh models and their callbacks.

The callbacks are thin: they read the shared store data from
:mod:`server.state`, build columns with :mod:`server.cells`, HTML with
:mod:`server.panels`, and hand uploads to :mod:`server.upload` in a worker
thread. Results come back to the document through
``Document.add_next_tick_callback``, the thread-safe way to change a
session's models.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from bokeh.document import Document
from bokeh.events import DocumentReady, RangesUpdate
from bokeh.layouts import column, row
from bokeh.models import (
    AutocompleteInput,
    Button,
    CheckboxGroup,
    ColumnDataSource,
    CustomJS,
    Div,
    FileInput,
    GlyphRenderer,
    HoverTool,
    ImageRGBA,
    InlineStyleSheet,
    Range1d,
    Rect,
    Select,
    TabPanel,
    Tabs,
    TapTool,
)
from bokeh.plotting import figure

from atlas.errors import AtlasError, ImageDecodeError
from server import state
from server.cells import cell_columns, class_completions, query_columns
from server.mosaic import png_data_uri
from server.panels import PANEL_CSS, WIDGET_CSS, detail_html, message_html, upload_html
from server.upload import (
    MEGABYTE,
    PATCH_PX,
    UploadResult,
    display_name,
    explain_upload,
    format_megabytes,
    read_upload,
    search_upload,
)
from server.view import (
    ViewRequest,
    choose_level,
    parse_view_arguments,
    resolve_cell,
    resolve_class,
    resolve_layer,
    resolve_zoom,
    span_for_level,
    view_query,
)

logger = logging.getLogger(__name__)

PLOT_PX = 820
SIDE_PX = 440
BACKGROUND = "#0e1014"
HIGHLIGHT = "#ff9f1c"
CLASS_OUTLINE = "#7ee0ff"
# Minimum number of cells of the finest grid across the view. Zooming deeper would
# only magnify the mosaic's pixels, and the cell panel shows the full-size icon.
MIN_CELLS_ACROSS = 3

TOOLTIP = """
<div style="font: 12px/1.4 system-ui, sans-serif; max-width: 280px;">
  <div><b>cell @i, @j</b> &middot; <span class="atlas-count">@count</span> activations</div>
  <div>@top1</div>
  <div>@top2</div>
  <div>@top3</div>
  <div style="color: #c96f00;">@query</div>
</div>
"""

# Checks an upload's size in the browser before FileInput reads and sends it,
# so a file far above the limit never reaches (and closes) the websocket. The
# server checks the size again in server.upload.decode_upload.
UPLOAD_GUARD_JS = r"""
const View = input.default_view
if (View != null && !View.prototype.__atlas_size_guard) {
  const original = View.prototype.load_files
  View.prototype.load_files = async function (files) {
    for (const file of files) {
      if (file.size > limit) {
        const name = String(file.name).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";")
        const megabytes = (file.size / 1048576).toFixed(2).replace(/\.?0+$/, "")
        message.text = '<div class="message error">could not use ' + name + ': the file is ' + megabytes +
          ' MB, above the ' + limit_text + ' upload limit (serve.max_upload_mb); choose a smaller image</div>'
        this.input_el.value = ""
        return
      }
    }
    return original.call(this, files)
  }
  View.prototype.__atlas_size_guard = true
}
"""


def _stylesheet() -> InlineStyleSheet:
    return InlineStyleSheet(css=PANEL_CSS)


class Explorer:
    """The models and callbacks of one session.

    Parameters
    ----------
    doc
        The session's document; the explorer adds its layout as the root.
    arguments
        The request's URL query arguments (name to list of bytes).
    """

    def __init__(self, doc: Document, arguments: Mapping[str, Sequence[bytes]] | None = None) -> None:
        self.doc = doc
        self.config = state.serve_config()
        self.n_stores = len(state.store_paths())
        self.upload_token = 0
        self.upload_pending = False
        self.detail_token = 0
        self.upload_result: UploadResult | None = None
        self.detail_cell: tuple[int, int, int] | None = None  # (size, i, j)
        self.class_id: int | None = None
        self.auto_zoom = True
        self.show_icons = True

        request = parse_view_arguments(arguments or {}, self.n_stores)
        self.store = state.get_store(request.store)
        self.layer_name = resolve_layer(request, self.store.layers)
        self.layer = self.store.layer(self.layer_name)
        self.size = self.layer.home_size()

        self._build_plot()
        self._build_widgets()
        self._build_layout()
        self._apply_request(request)

    # ------------------------------------------------------------------ building

    def _build_plot(self) -> None:
        self.x_range = Range1d(0, 1, bounds=(0, 1), min_interval=self._min_span())
        self.y_range = Range1d(0, 1, bounds=(0, 1), min_interval=self._min_span())
        plot = figure(
            frame_width=PLOT_PX, frame_height=PLOT_PX, x_range=self.x_range, y_range=self.y_range,
            tools="pan,wheel_zoom,reset", active_scroll="wheel_zoom", toolbar_location="above",
            background_fill_color=BACKGROUND, border_fill_color=BACKGROUND, outline_line_color=None,
            min_border=0, name="atlas",
            # The zoom level follows RangesUpdate, which BokehJS sends once an interaction
            # has been idle for lod_timeout ms (500 by default); no glyph needs decimation.
            lod_threshold=None, lod_interval=100, lod_timeout=150,
        )
        plot.axis.visible = False
        plot.grid.visible = False
        plot.toolbar.logo = None

        density = self.layer.density()
        self.density_source = ColumnDataSource({"image": [density] if density is not None else [], **_unit_square(density is not None)})
        self.density_renderer = plot.image_rgba(
            image="image", x="x", y="y", dw="dw", dh="dh", source=self.density_source, visible=False, name="density",
        )
        self.plot = plot
        self.level_sources: dict[int, ColumnDataSource] = {}
        self.level_renderers: dict[int, GlyphRenderer] = {}
        self._make_level_renderers()

        self.cell_source = ColumnDataSource(cell_columns(self.layer.levels[self.size], self.store.class_names))
        self.cells_renderer = plot.rect(
            x="x", y="y", width="w", height="w", source=self.cell_source, fill_color="black", fill_alpha="veil",
            line_color=CLASS_OUTLINE, line_alpha="outline", line_width=1.5, name="cells",
        )
        self.cells_renderer.selection_glyph = Rect(
            x="x", y="y", width="w", height="w", fill_color="black", fill_alpha="veil", line_color="white", line_alpha=1.0, line_width=3,
        )
        self.cells_renderer.nonselection_glyph = Rect(
            x="x", y="y", width="w", height="w", fill_color="black", fill_alpha="veil", line_color=CLASS_OUTLINE, line_alpha="outline", line_width=1.5,
        )
        self.cells_renderer.hover_glyph = Rect(
            x="x", y="y", width="w", height="w", fill_color="white", fill_alpha=0.12, line_color="white", line_alpha=0.9, line_width=1.5,
        )

        self.query_source = ColumnDataSource(query_columns([], self.size))
        self.query_renderer = plot.rect(
            x="x", y="y", width="w", height="w", source=self.query_source, fill_alpha=0,
            line_color=HIGHLIGHT, line_width="line_width", name="query_cells",
        )
        self.query_labels = plot.text(
            x="label_x", y="label_y", text="label", source=self.query_source, text_color=HIGHLIGHT,
            text_font_size="11px", text_font_style="bold", x_offset=2, y_offset=2, text_baseline="top",
        )

        hover = HoverTool(renderers=[self.cells_renderer], tooltips=TOOLTIP, point_policy="follow_mouse")
        tap = TapTool(renderers=[self.cells_renderer])
        plot.add_tools(hover, tap)
        plot.on_event(RangesUpdate, self._on_ranges)
        self.cell_source.selected.on_change("indices", self._on_select)

    def _make_level_renderers(self) -> None:
        """Create one icon renderer per grid size of the layer, drawn just above the density layer.

        Each level's mosaic is sent to the browser the first time it is shown
        and kept there, so zooming back to a level only toggles visibility.
        """
        renderers = [r for r in self.plot.renderers if r not in self.level_renderers.values()]
        self.level_sources = {size: ColumnDataSource({"image": [], **_unit_square(False)}) for size in self.layer.sizes}
        self.level_renderers = {
            size: GlyphRenderer(
                glyph=ImageRGBA(image="image", x="x", y="y", dw="dw", dh="dh"), data_source=source,
                name=f"icons-{size}", visible=False,
            )
            for size, source in self.level_sources.items()
        }
        position = renderers.index(self.density_renderer) + 1
        self.plot.renderers = renderers[:position] + list(self.level_renderers.values()) + renderers[position:]

    def _build_widgets(self) -> None:
        sheet = _stylesheet()
        dark = InlineStyleSheet(css=WIDGET_CSS)
        self.header = Div(width=SIDE_PX, stylesheets=[sheet], name="header")
        self.notice = Div(width=SIDE_PX, stylesheets=[sheet], name="notice")
        self.status = Div(width=SIDE_PX, stylesheets=[sheet], name="status")
        self.link = Div(width=SIDE_PX, stylesheets=[sheet], name="link")

        self.store_select = Select(
            title="Store", width=SIDE_PX // 2 - 10, name="store_select", stylesheets=[dark],
            options=[(str(index), f"{index}: {state.get_store(index).name}") for index in range(self.n_stores)],
        )
        self.layer_select = Select(title="Layer", width=SIDE_PX // 2 - 10, name="layer_select", stylesheets=[dark])
        self.zoom_select = Select(title="Zoom level", width=SIDE_PX // 2 - 10, name="zoom_select", stylesheets=[dark])
        self.layers_toggle = CheckboxGroup(labels=["icons", "density"], active=[0], inline=True, name="layers_toggle", stylesheets=[dark])
        self.class_input = AutocompleteInput(
            title="Class filter", placeholder="type a class name, e.g. cat", width=SIDE_PX - 80,
            case_sensitive=False, search_strategy="includes", min_characters=1, restrict=True,
            max_completions=12, name="class_filter", stylesheets=[dark],
        )
        self.class_clear = Button(label="clear", width=60, name="class_clear", align="end", stylesheets=[dark])

        self.file_input = FileInput(accept="image/*", width=SIDE_PX - 20, name="upload", stylesheets=[dark])
        self.upload_message = Div(width=SIDE_PX, stylesheets=[sheet], name="upload_message")
        self.upload_panel = Div(
            width=SIDE_PX, stylesheets=[sheet], name="upload_panel",
            text="<p class='muted'>Upload a photo to find the atlas cells and dataset patches nearest to its activations.</p>",
        )
        self.detail_panel = Div(
            width=SIDE_PX, stylesheets=[sheet], name="detail_panel",
            text="<p class='muted'>Tap a cell of the atlas to see its icon, top classes and exemplar patches.</p>",
        )

        self.store_select.on_change("value", self._on_store)
        self.layer_select.on_change("value", self._on_layer)
        self.zoom_select.on_change("value", self._on_zoom)
        self.layers_toggle.on_change("active", self._on_layers_toggle)
        self.class_input.on_change("value", self._on_class)
        self.class_clear.on_click(self._on_class_clear)
        # A zero-byte file leaves ``value`` empty, so a new file name alone also starts an upload.
        self.file_input.on_change("value", self._on_file)
        self.file_input.on_change("filename", self._on_file)

        guard = CustomJS(
            args={
                "input": self.file_input, "message": self.upload_message,
                "limit": self._max_upload_bytes(), "limit_text": format_megabytes(self._max_upload_bytes()),
            },
            code=UPLOAD_GUARD_JS,
        )
        self.doc.js_on_event(DocumentReady, guard)

    def _build_layout(self) -> None:
        self.tabs = Tabs(
            tabs=[
                TabPanel(title="Cell", child=self.detail_panel),
                TabPanel(title="Upload", child=column(self.file_input, self.upload_message, self.upload_panel)),
            ],
            width=SIDE_PX, name="side_tabs", stylesheets=[InlineStyleSheet(css=WIDGET_CSS)],
        )
        controls = column(
            self.header,
            row(self.store_select, self.layer_select),
            row(self.zoom_select, column(Div(text="Show", stylesheets=[_stylesheet()]), self.layers_toggle)),
            row(self.class_input, self.class_clear),
            self.status,
            self.notice,
            self.tabs,
            self.link,
            width=SIDE_PX,
        )
        layout = row(self.plot, controls, name="explorer", styles={"gap": "18px"})
        self.doc.add_root(layout)
        self.doc.title = f"Activation Atlas · {self.store.name}"

    # ------------------------------------------------------------------ view state

    def _apply_request(self, request: ViewRequest) -> None:
        self.store_select.value = str(self.store.index)
        self._reset_store_widgets()
        # Without a zoom argument the session opens on the home grid, which is
        # the coarsest grid with the whole layout visible unless that grid has no icons.
        zoom = resolve_zoom(request, self.layer.sizes) or self.layer.home_size()
        class_id = resolve_class(request.class_text, self.store.class_names, request)
        cell = resolve_cell(request, zoom)

        span = span_for_level(self.layer.sizes, zoom)
        centre = ((cell[1] + 0.5) / zoom, (cell[0] + 0.5) / zoom) if cell else (0.5, 0.5)
        self._set_view(centre, span)
        self._show_level(zoom)
        if class_id is not None:
            self.class_input.value = self.store.class_names[class_id]
        if cell is not None:
            self._select_cell(*cell)
        if request.problems:
            self.notice.text = "".join(message_html(problem, "info") for problem in request.problems)
            logger.info("session URL arguments ignored: %s", "; ".join(request.problems))

    def _reset_store_widgets(self) -> None:
        self.layer_select.options = list(self.store.layers)
        self.layer_select.value = self.layer_name
        self.zoom_select.options = [("auto", "automatic")] + [(str(size), f"{size} × {size}") for size in self.layer.sizes]
        self.zoom_select.value = "auto"
        self.class_input.completions = class_completions(self.layer, self.store.class_names)
        density = self.layer.density()
        self.density_source.data = {"image": [density] if density is not None else [], **_unit_square(density is not None)}
        self.header.text = (
            f"<div class='panel'><h3>Activation Atlas</h3><span class='muted'>{html.escape(self.store.name)} · "
            f"model {html.escape(self.store.model_spec)} · layer {html.escape(self.layer_name)}</span><br>"
            "<span class='muted'>Scroll to zoom, drag to pan, tap a cell for details.</span></div>"
        )

    def _show_home(self) -> None:
        """Show the layer's home grid (``LayerData.home_size``), zoomed so that automatic zoom keeps it."""
        size = self.layer.home_size()
        self._set_view((0.5, 0.5), span_for_level(self.layer.sizes, size))
        self._show_level(size)

    def _set_view(self, centre: tuple[float, float], span: float) -> None:
        span = min(1.0, max(self._min_span(), span))
        x0 = min(max(centre[0] - span / 2, 0.0), 1.0 - span)
        y0 = min(max(centre[1] - span / 2, 0.0), 1.0 - span)
        self.x_range.update(start=x0, end=x0 + span)
        self.y_range.update(start=y0, end=y0 + span)

    def _show_level(self, size: int) -> None:
        """Draw grid ``size``: its mosaic, its cells and the upload's cells at that size."""
        self.size = size
        level = self.layer.levels[size]
        source = self.level_sources[size]
        if not source.data["image"]:
            source.data = {"image": [self.layer.mosaic(size, self.config.mosaic_max_px)], **_unit_square(True)}
        for level_size, renderer in self.level_renderers.items():
            renderer.visible = self.show_icons and level_size == size
        self._refresh_cells()
        self.cell_source.selected.indices = []
        if self.detail_cell is not None and self.detail_cell[0] == size:
            self._mark_selected(self.detail_cell[1], self.detail_cell[2])
        self._refresh_query()
        self.status.text = (
            f"<span class='muted'>Grid {size} × {size} · {int(level.filled.sum()):,} cells with at least "
            f"{level.min_count} activations · {int(level.count.sum()):,} activations</span>"
        )
        self._refresh_link()

    def _refresh_cells(self) -> None:
        level = self.layer.levels[self.size]
        query_cells = self.upload_result.cells.get(self.size, []) if self.upload_result else []
        self.cell_source.data = cell_columns(level, self.store.class_names, self.class_id, query_cells)

    def _refresh_query(self) -> None:
        cells = self.upload_result.cells.get(self.size, []) if self.upload_result else []
        self.query_source.data = query_columns(cells, self.size)
        if self.upload_result is not None:
            self.upload_panel.text = upload_html(self.upload_result, self.size)

    def _refresh_link(self) -> None:
        cell = None
        if self.detail_cell is not None and self.detail_cell[0] == self.size:
            cell = self.detail_cell[1:]
        class_name = self.store.class_names[self.class_id] if self.class_id is not None else None
        query = view_query(self.store.index, self.layer_name, self.size, cell, class_name)
        self.link.text = f"<p class='muted'><a href='{html.escape(query)}' target='_self'>Link to this view</a></p>"

    def _switch_layer(self, store_index: int, layer_name: str) -> None:
        self.store = state.get_store(store_index)
        self.layer_name = layer_name
        self.layer = self.store.layer(layer_name)
        self.size = self.layer.home_size()
        self.upload_result = None
        self.detail_cell = None
        self.class_id = None
        self.upload_token += 1
        self.class_input.value = ""
        self.upload_panel.text = "<p class='muted'>Upload a photo to search this store.</p>"
        self.detail_panel.text = "<p class='muted'>Tap a cell of the atlas to see its details.</p>"
        self._make_level_renderers()
        self._reset_store_widgets()
        self.x_range.min_interval = self._min_span()
        self.y_range.min_interval = self._min_span()
        self.auto_zoom = True
        self._show_home()
        self.doc.title = f"Activation Atlas · {self.store.name}"

    # ------------------------------------------------------------------ callbacks

    def _on_ranges(self, event: RangesUpdate) -> None:
        if not self.auto_zoom or event.x0 is None or event.x1 is None:
            return
        span = max(abs(event.x1 - event.x0), abs((event.y1 or 0) - (event.y0 or 0)))
        size = choose_level(self.layer.sizes, span)
        if size != self.size:
            logger.debug("visible span %.3f: switching to the %d grid", span, size)
            self._show_level(size)

    def _on_zoom(self, _attr: str, _old: str, new: str) -> None:
        if new == "auto":
            self.auto_zoom = True
            span = max(self.x_range.end - self.x_range.start, self.y_range.end - self.y_range.start)
            self._show_level(choose_level(self.layer.sizes, span))
        elif new.isdigit() and int(new) in self.layer.levels:
            self.auto_zoom = False
            self._show_level(int(new))

    def _on_store(self, _attr: str, old: str, new: str) -> None:
        if not new.isdigit() or not 0 <= int(new) < self.n_stores or int(new) == self.store.index:
            return
        store = state.get_store(int(new))
        self._switch_layer(store.index, store.layers[0])

    def _on_layer(self, _attr: str, _old: str, new: str) -> None:
        if new == self.layer_name or new not in self.store.layers:
            return
        self._switch_layer(self.store.index, new)

    def _on_layers_toggle(self, _attr: str, _old: list[int], new: list[int]) -> None:
        self.show_icons = 0 in new
        self.level_renderers[self.size].visible = self.show_icons
        self.density_renderer.visible = 1 in new

    def _on_class(self, _attr: str, _old: str, new: str) -> None:
        self.class_id = resolve_class(new or None, self.store.class_names)
        self._refresh_cells()
        self._refresh_link()

    def _on_class_clear(self) -> None:
        self.class_input.value = ""

    def _on_select(self, _attr: str, _old: list[int], new: list[int]) -> None:
        if not new:
            return
        index = new[0]
        cell = (self.size, int(self.cell_source.data["i"][index]), int(self.cell_source.data["j"][index]))
        if cell != self.detail_cell:
            self._show_detail(*cell)

    def _mark_selected(self, i: int, j: int) -> None:
        for index, (a, b) in enumerate(zip(self.cell_source.data["i"], self.cell_source.data["j"])):
            if a == i and b == j:
                self.cell_source.selected.indices = [index]
                return

    def _select_cell(self, i: int, j: int) -> None:
        self._show_detail(self.size, i, j)
        self._mark_selected(i, j)

    def _show_detail(self, size: int, i: int, j: int) -> None:
        """Fill the cell panel: icon and classes now, exemplar patches from a worker thread."""
        self.detail_cell = (size, i, j)
        self.detail_token += 1
        token = self.detail_token
        level = self.layer.levels[size]
        icon = level.icon(i, j)
        icon_uri = png_data_uri(icon) if icon is not None else None
        classes = [
            (self.store.class_name(int(c)), float(s))
            for c, s in zip(level.top_class[i, j], level.top_score[i, j])
            if c >= 0
        ]
        rows = [int(r) for r in level.exemplars[i, j] if r >= 0] if level.filled[i, j] else []
        names = [self.store.image_path(self.store.image_of_row(r)) for r in rows]

        def render(exemplars: list[tuple[str | None, str]]) -> str:
            return detail_html(
                size=size, cell=(i, j), count=int(level.count[i, j]), min_count=level.min_count,
                icon_uri=icon_uri, classes=classes, exemplars=exemplars,
            )

        self.detail_panel.text = render([(None, name) for name in names])
        self.tabs.active = 0
        self._refresh_link()
        if not rows:
            return

        store, layer = self.store, self.layer_name

        def load_patches() -> list[tuple[str | None, str]]:
            patches = [store.patch(r, PATCH_PX, layer) for r in rows]
            return [(png_data_uri(p) if p is not None else None, name) for p, name in zip(patches, names)]

        def apply(future: Future) -> None:
            if token != self.detail_token:
                return
            try:
                self.detail_panel.text = render(future.result())
            except Exception:  # noqa: BLE001 - the panel keeps its names-only version
                logger.exception("loading exemplar patches of cell %d, %d failed", i, j)

        self._submit(load_patches, apply)

    def _on_file(self, _attr: str, _old: Any, _new: Any) -> None:
        # value, filename and mime_type arrive as separate changes of one message,
        # so the upload starts once, on the next tick, after all of them are applied.
        if not self.upload_pending:
            self.upload_pending = True
            self.doc.add_next_tick_callback(self._start_upload)

    def _start_upload(self) -> None:
        self.upload_pending = False
        value = self.file_input.value
        if not value and not self.file_input.filename:
            # A cancelled file chooser clears the input, so keep the shown upload and its pending explanations.
            return
        filename = display_name(self.file_input.filename)
        self.upload_token += 1
        token = self.upload_token
        self.tabs.active = 1
        if not value:
            self._upload_error(f"could not use {filename}: the file is empty (0 bytes); choose an image file")
            return
        self.upload_message.text = message_html(f"Searching the atlas for {filename}…", "busy")
        store, layer = self.store, self.layer_name
        max_bytes = self._max_upload_bytes()
        neighbors = self.config.neighbors

        def work() -> tuple[UploadResult, Any]:
            image = read_upload(value, max_bytes, name=filename)
            return search_upload(store, layer, image, filename, neighbors), image

        def apply(future: Future) -> None:
            if token != self.upload_token:
                return
            try:
                result, image = future.result()
            except (AtlasError, ImageDecodeError) as error:
                self._upload_error(f"could not use {filename}: {error}")
                return
            except Exception as error:  # noqa: BLE001 - report in the page, keep the session alive
                logger.exception("query of upload %r failed", filename)
                self._upload_error(f"the query of {filename} failed ({type(error).__name__}: {error})")
                return
            self.upload_result = result
            self.upload_message.text = message_html(
                f"{len(result.matches)} nearest patches; outlined cells are numbered by hits.", "info"
            )
            self._refresh_cells()
            self._refresh_query()
            if self.config.explanations:
                self._submit(lambda: explain_upload(store, image), lambda done: self._apply_explanations(done, token))

        self._submit(work, apply)

    def _apply_explanations(self, future: Future, token: int) -> None:
        if token != self.upload_token or self.upload_result is None:
            return
        try:
            self.upload_result.explanations = future.result()
        except Exception:  # noqa: BLE001 - explanations are optional
            logger.exception("explaining the upload failed")
            return
        self._refresh_query()

    def _upload_error(self, text: str) -> None:
        logger.info("upload rejected: %s", text)
        self.upload_message.text = message_html(text, "error")

    # ------------------------------------------------------------------ helpers

    def _min_span(self) -> float:
        return min(1.0, MIN_CELLS_ACROSS / self.layer.sizes[-1])

    def _max_upload_bytes(self) -> int:
        return int(self.config.max_upload_mb * MEGABYTE)

    def _submit(self, work: Callable[[], Any], apply: Callable[[Future], None]) -> None:
        """Run ``work`` in the shared pool, then ``apply`` its future on this session's event loop."""
        future = state.executor().submit(work)

        def schedule(done: Future) -> None:
            try:
                self.doc.add_next_tick_callback(lambda: apply(done))
            except Exception:  # noqa: BLE001 - the session closed before the work finished
                logger.debug("session closed before a background result arrived", exc_info=True)

        future.add_done_callback(schedule)


def _unit_square(present: bool) -> dict[str, list[float]]:
    # image_rgba placement of the whole [0, 1] layout.
    count = 1 if present else 0
    return {"x": [0.0] * count, "y": [0.0] * count, "dw": [1.0] * count, "dh": [1.0] * count}

