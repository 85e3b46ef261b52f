"""View state of a session: the zoom level choice and the URL query arguments.

A link such as ``/app?store=1&layer=blocks.4&zoom=40&cell=12,7&class=espresso``
reopens a view. Every argument is validated against the stores the server was
started with: ``store`` is a position in that list, never a path, and a value
that does not fit is dropped with a message instead of failing the session.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode

logger = logging.getLogger(__name__)

# Longest URL argument read; anything longer is cut before parsing.
MAX_ARGUMENT_CHARS = 200
# Auto zoom picks the finest grid that shows at most this many cells across the
# visible x or y span, counted in cells of the coarsest grid (1.5 x 20 = 30 for 20/40/80).
CELLS_ACROSS_FACTOR = 1.5


@dataclass
class ViewRequest:
    """A view asked for in the URL, checked for syntax and store range only.

    Attributes
    ----------
    store
        Position of the store in the server's list.
    layer, zoom, cell, class_text
        Raw requests, resolved against the store by the ``resolve_*`` functions.
    problems
        One message per argument that was dropped.
    """

    store: int = 0
    layer: str | None = None
    zoom: int | None = None
    cell: tuple[int, int] | None = None
    class_text: str | None = None
    problems: list[str] = field(default_factory=list)


def _argument(arguments: Mapping[str, Sequence[bytes | str]], name: str) -> str | None:
    values = arguments.get(name) or []
    if not values:
        return None
    value = values[-1]
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    text = text.strip()[:MAX_ARGUMENT_CHARS]
    return text or None


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if not text or len(text) > 9 or not text.lstrip("-").isdigit():
        return None
    return int(text)


def parse_view_arguments(arguments: Mapping[str, Sequence[bytes | str]], n_stores: int) -> ViewRequest:
    """Read ``store``, ``layer``, ``zoom``, ``cell`` and ``class`` from a request's query arguments.

    Parameters
    ----------
    arguments
        The request's arguments, as Tornado gives them: name to a list of byte strings.
    n_stores
        How many stores the server has.

    Returns
    -------
    ViewRequest
        Invalid values are left at their defaults and explained in ``problems``.
    """
    request = ViewRequest()

    store_text = _argument(arguments, "store")
    if store_text is not None:
        store = _parse_int(store_text)
        if store is None or not 0 <= store < n_stores:
            request.problems.append(f"store={store_text!r} ignored: expected a number from 0 to {n_stores - 1}")
        else:
            request.store = store

    request.layer = _argument(arguments, "layer")

    zoom_text = _argument(arguments, "zoom")
    if zoom_text is not None:
        zoom = _parse_int(zoom_text)
        if zoom is None or zoom < 1:
            request.problems.append(f"zoom={zoom_text!r} ignored: expected a grid size such as 20")
        else:
            request.zoom = zoom

    cell_text = _argument(arguments, "cell")
    if cell_text is not None:
        parts = cell_text.split(",")
        numbers = [_parse_int(part) for part in parts] if len(parts) == 2 else [None]
        if any(number is None or number < 0 for number in numbers):
            request.problems.append(f"cell={cell_text!r} ignored: expected two numbers, row and column, as 12,7")
        else:
            request.cell = (numbers[0], numbers[1])

    request.class_text = _argument(arguments, "class")
    return request


def resolve_layer(request: ViewRequest, layers: Sequence[str]) -> str:
    """Return the requested layer if the store has grids for it, else the first layer."""
    if request.layer is None:
        return layers[0]
    if request.layer not in layers:
        request.problems.append(f"layer={request.layer!r} ignored: this store has grids for {', '.join(layers)}")
        return layers[0]
    return request.layer


def resolve_zoom(request: ViewRequest, sizes: Sequence[int]) -> int | None:
    """Return the requested grid size if the layer has it, else ``None`` (automatic zoom)."""
    if request.zoom is None:
        return None
    if request.zoom not in sizes:
        request.problems.append(f"zoom={request.zoom} ignored: grid sizes are {', '.join(map(str, sizes))}")
        return None
    return request.zoom


def resolve_cell(request: ViewRequest, size: int) -> tuple[int, int] | None:
    """Return the requested cell if it lies inside a grid of ``size``, else ``None``."""
    if request.cell is None:
        return None
    i, j = request.cell
    if not (0 <= i < size and 0 <= j < size):
        request.problems.append(f"cell={i},{j} ignored: the {size} x {size} grid has rows and columns 0 to {size - 1}")
        return None
    return request.cell


def resolve_class(text: str | None, class_names: Sequence[str], request: ViewRequest | None = None) -> int | None:
    """Return the class index named by ``text``: an exact name (case-insensitive) or an index.

    An unknown name or out-of-range index gives ``None``, with a message in
    ``request.problems`` when a request is given.
    """
    if text is None:
        return None
    lowered = text.strip().lower()
    for index, name in enumerate(class_names):
        if name.lower() == lowered:
            return index
    number = _parse_int(text)
    if number is not None and 0 <= number < len(class_names):
        return number
    if request is not None:
        request.problems.append(f"class={text!r} ignored: not a class name or index of this store's model")
    return None


def choose_level(sizes: Sequence[int], span: float) -> int:
    """Pick the grid size to draw when ``span`` of the [0, 1] layout is visible.

    Parameters
    ----------
    sizes
        Available grid sizes.
    span
        Visible fraction of the layout along its longer axis, in (0, ∞).

    Returns
    -------
    int
        The largest size showing at most ``CELLS_ACROSS_FACTOR`` × the
        smallest size cells across the view; the smallest size when none does.
    """
    ordered = sorted(sizes)
    if not math.isfinite(span) or span <= 0:
        return ordered[-1]
    limit = CELLS_ACROSS_FACTOR * ordered[0]
    fitting = [size for size in ordered if size * span <= limit + 1e-9]
    return fitting[-1] if fitting else ordered[0]


def span_for_level(sizes: Sequence[int], size: int) -> float:
    """Return a visible span at which :func:`choose_level` picks ``size``."""
    ordered = sorted(sizes)
    return min(1.0, CELLS_ACROSS_FACTOR * ordered[0] / size)


def view_query(store: int, layer: str, zoom: int | None, cell: tuple[int, int] | None, class_name: str | None) -> str:
    """Return the URL query string (with ``?``) that reopens a view."""
    pairs: list[tuple[str, str]] = [("store", str(store)), ("layer", layer)]
    if zoom is not None:
        pairs.append(("zoom", str(zoom)))
    if cell is not None:
        pairs.append(("cell", f"{cell[0]},{cell[1]}"))
    if class_name:
        pairs.append(("class", class_name))
    return "?" + urlencode(pairs)
