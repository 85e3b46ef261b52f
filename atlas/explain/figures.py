"""Matplotlib figures of explanations.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot, so
no global backend or figure registry is touched and saving uses the Agg
canvas.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from PIL import Image

from atlas.explain.base import KIND_HEATMAP, KIND_IMAGE, KIND_MAPS, KIND_SIGNED, KIND_TILES, Explanation

logger = logging.getLogger(__name__)

# Percentile of |attribution| mapped to the ends of the colour scale, so a few
# extreme pixels (common in raw gradients) do not wash out the map. When values
# lie beyond it, the colour bar gets arrow ends and a label naming the percentile.
CLIP_PERCENTILE = 99.5
HEATMAP_ALPHA = 0.55
MONTAGE_CHANNELS = 16


def short_class_name(name: str | None) -> str | None:
    """Return the first synonym of an ImageNet-style name (``tabby`` from ``tabby, tabby cat``)."""
    return name.split(",")[0].strip() if name else name


def describe(explanation: Explanation) -> str:
    """Return ``class name (probability)`` for titles, or ``class 3 (0.41)`` without names."""
    name = short_class_name(explanation.target_name) or f"class {explanation.target}"
    return f"{name} ({explanation.score:.2f})"


def montage(stack: np.ndarray, columns: int | None = None, pad: int = 1, fill: float = np.nan) -> np.ndarray:
    """Tile a stack of images into one grid image.

    Parameters
    ----------
    stack
        (n, h, w) or (n, h, w, C).
    columns
        Tiles per row; ``None`` makes the grid about square.
    pad
        Pixels between tiles, filled with ``fill``.

    Returns
    -------
    np.ndarray
        (rows * (h + pad) - pad, columns * (w + pad) - pad[, C]) float.
    """
    count, height, width = stack.shape[:3]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    shape = (rows * (height + pad) - pad, columns * (width + pad) - pad, *stack.shape[3:])
    grid = np.full(shape, fill, dtype=np.float32)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * (height + pad), column * (width + pad)
        grid[top : top + height, left : left + width] = stack[index]
    return grid


def _symmetric_limit(values: np.ndarray) -> float:
    limit = float(np.percentile(np.abs(values), CLIP_PERCENTILE)) if values.size else 0.0
    return limit if limit > 0 else 1.0


def _ordinal(number: float) -> str:
    # Return "99.5th", "1st" or "92nd" for a percentile label.
    text = f"{number:g}"
    if not text.isdigit() or 11 <= int(text) % 100 <= 13:
        return f"{text}th"
    return text + {1: "st", 2: "nd", 3: "rd"}.get(int(text) % 10, "th")


def colorbar_extend(values: np.ndarray, low: float, high: float) -> str:
    """Return matplotlib's colour-bar ``extend`` for ``values`` drawn on the scale ``low`` to ``high``.

    The result is ``min``, ``max`` or ``both`` for the ends beyond which some
    values lie and are drawn in the end colour, else ``neither``.
    """
    below = values.size > 0 and float(np.nanmin(values)) < low
    above = values.size > 0 and float(np.nanmax(values)) > high
    if below and above:
        return "both"
    if below:
        return "min"
    if above:
        return "max"
    return "neither"


def _draw_heatmap(ax: Axes, explanation: Explanation) -> tuple[AxesImage, str, str | None]:
    """Draw a heatmap over a grey copy of the image, with the colour scale clipped at ``CLIP_PERCENTILE``.

    Returns
    -------
    tuple
        The heatmap's image, the colour bar's ``extend`` (see
        :func:`colorbar_extend`), and a colour-bar label when the percentile
        limit clips some values, else ``None``.
    """
    values = explanation.attribution
    if explanation.image is not None:
        # A grey copy of the photo keeps the colours of the map readable.
        ax.imshow(explanation.image.mean(axis=2), cmap="gray", vmin=0, vmax=1)
    percentile = _ordinal(CLIP_PERCENTILE)

    if explanation.kind == KIND_SIGNED:
        limit = _symmetric_limit(values)
        mappable = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=HEATMAP_ALPHA + 0.15)
        extend = colorbar_extend(values, -limit, limit)
        label = f"|value| clipped at the {percentile} percentile" if extend != "neither" else None
        return mappable, extend, label

    top = float(np.percentile(values, CLIP_PERCENTILE)) if values.size else 0.0
    top = top if top > 0 else 1.0
    mappable = ax.imshow(values, cmap="inferno", vmin=0, vmax=top, alpha=HEATMAP_ALPHA)
    extend = colorbar_extend(values, 0.0, top)
    # Only the top of this scale comes from the percentile, the bottom is zero.
    label = f"clipped at the {percentile} percentile" if extend in ("max", "both") else None
    return mappable, extend, label


def draw_explanation(ax: Axes, explanation: Explanation, colorbar: bool = True, title: str | None = None) -> None:
    """Draw one explanation into ``ax``: a heatmap over the image, a feature-map grid, tiles or a rendering.

    A heatmap's colour scale ends at the ``CLIP_PERCENTILE`` percentile. When
    values lie beyond it, the colour bar gets arrow ends and a label naming the percentile.
    """
    figure = ax.figure
    values = explanation.attribution
    mappable = None
    extend = "neither"
    clip_label = None

    if explanation.kind in (KIND_HEATMAP, KIND_SIGNED):
        mappable, extend, clip_label = _draw_heatmap(ax, explanation)
    elif explanation.kind == KIND_MAPS:
        shown = values[:MONTAGE_CHANNELS]
        grid = montage(shown)
        limit = float(np.nanmax(np.abs(shown))) if shown.size else 0.0
        mappable = ax.imshow(grid, cmap="viridis", vmin=min(0.0, float(np.nanmin(shown))), vmax=limit if limit > 0 else 1.0)
    elif explanation.kind == KIND_TILES:
        tiles = values if values.shape[-1] == 3 else np.repeat(values, 3, axis=-1)
        ax.imshow(np.nan_to_num(montage(tiles, fill=1.0), nan=1.0), interpolation="nearest")
    elif explanation.kind == KIND_IMAGE:
        ax.imshow(values)
    else:
        raise ValueError(f"unknown explanation kind {explanation.kind!r}")

    if mappable is not None and colorbar:
        bar = figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03, extend=extend)
        if clip_label:
            bar.set_label(clip_label, fontsize=8)
    ax.set_title(title or explanation.method, fontsize=10)
    ax.set_axis_off()


def _panel_title(explanation: Explanation) -> str:
    extras = explanation.extras
    if explanation.kind == KIND_MAPS:
        return f"{explanation.method} {explanation.layer} (top {min(MONTAGE_CHANNELS, len(explanation.attribution))})"
    if explanation.kind == KIND_TILES:
        return f"{explanation.method} {explanation.layer}"
    if explanation.kind == KIND_IMAGE and "channel" in extras:
        where = f" at ({extras['y']}, {extras['x']})" if extras.get("y") is not None else ""
        return f"{explanation.method} {explanation.layer}:{extras['channel']}{where}"
    if explanation.layer:
        return f"{explanation.method} {explanation.layer}"
    return explanation.method


def plot_explanation(explanation: Explanation, size: float = 5.0) -> Figure:
    """Draw one explanation with a colour bar and the class and probability in the title."""
    figure = Figure(figsize=(size * 1.15, size), layout="constrained")
    ax = figure.add_subplot()
    draw_explanation(ax, explanation, title=f"{_panel_title(explanation)}: {describe(explanation)}")
    return figure


def plot_explanations(explanations: Mapping[str, Explanation], columns: int = 4, panel: float = 3.2) -> Figure:
    """Draw the input and several explanations of it side by side.

    Parameters
    ----------
    explanations
        Method name to explanation, all for the same image.
    columns
        Panels per row; the input image takes the first panel.
    panel
        Panel height in inches.
    """
    if not explanations:
        raise ValueError("no explanations to plot")
    items = list(explanations.values())
    count = len(items) + 1
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(columns * panel * 1.2, rows * panel + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()

    first = items[0]
    if first.image is not None:
        axes[0].imshow(first.image)
    axes[0].set_title("input", fontsize=10)
    axes[0].set_axis_off()
    for ax, explanation in zip(axes[1:], items):
        draw_explanation(ax, explanation, title=_panel_title(explanation))
    for ax in axes[count:]:
        ax.set_axis_off()

    targets = {(item.target, item.target_name) for item in items}
    if len(targets) == 1:
        figure.suptitle(f"explaining {describe(first)}", fontsize=12)
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 100, colors: int | None = None) -> Path:
    """Write ``figure`` to ``path`` (format from the suffix) and return the path.

    Parameters
    ----------
    colors
        Reduce a PNG to an adaptive palette of this many colours (at most
        256) with Floyd-Steinberg dithering, which makes figures of noisy
        gradient maps about three times smaller. ``None`` keeps full colour.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if colors is None:
        figure.savefig(path, dpi=dpi)
    else:
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=dpi, format="png")
        buffer.seek(0)
        with Image.open(buffer) as image:
            rgb = image.convert("RGB")
        # Pillow dithers only when mapping onto a given palette, so pick the palette first.
        palette = rgb.quantize(colors=colors, method=Image.Quantize.MAXCOVERAGE)
        rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, format="PNG", optimize=True)
    logger.debug("wrote %s", path)
    return path
