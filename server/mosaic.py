"""Pixel data for the explorer's atlas: icon mosaics, the density layer and PNG data URIs.

Bokeh draws an ``image_rgba`` array with its first row at the bottom of the
plot, which matches the grid: cell row ``i`` covers layout y in
[i/S, (i+1)/S), so it sits at array rows ``i * tile`` up to ``(i + 1) * tile``.
Icons are stored top row first, so each one is flipped vertically when placed.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

logger = logging.getLogger(__name__)

# RGBA of a non-empty cell whose icon is not rendered yet: dark grey, opaque,
# so it reads as "data here" against the transparent empty cells.
PLACEHOLDER_RGBA = (58, 62, 70, 255)
# Brightness of a cell drawn from the coarser grid's icon, so it reads as borrowed.
FALLBACK_BRIGHTNESS = 0.7


def tile_size(size: int, icon_px: int, max_px: int) -> int:
    """Return the side in pixels of one cell in a mosaic of at most ``max_px`` pixels a side."""
    return max(1, min(icon_px, max_px // max(size, 1)))


def pack_rgba(rgba: np.ndarray) -> np.ndarray:
    """View (H, W, 4) uint8 pixels as (H, W) uint32, the layout ``image_rgba`` takes."""
    contiguous = np.ascontiguousarray(rgba, dtype=np.uint8)
    return contiguous.view(np.uint32).reshape(contiguous.shape[:2])


def build_mosaic(
    read_icon_row: Callable[[int], np.ndarray] | None,
    size: int,
    icon_px: int,
    filled: np.ndarray,
    done: np.ndarray,
    max_px: int,
    fallback: np.ndarray | None = None,
) -> np.ndarray:
    """Tile the icons of one grid into an RGBA mosaic for ``image_rgba``.

    Parameters
    ----------
    read_icon_row
        Returns the icons of grid row ``i``, shape (S, P, P, 3) uint8;
        ``None`` when the grid has no icons.
    size
        Grid size S.
    icon_px
        Icon side P.
    filled, done
        Shape (S, S) bool: non-empty cells, and cells whose icon is rendered.
    max_px
        Largest mosaic side; icons are shrunk (area-averaged) to fit.
    fallback
        Optional (S·t, S·t, 4) uint8 pixels for cells without an icon: the
        mosaic of a coarser grid scaled to this one (see :func:`upscale_mosaic`).
        Such a cell shows its part of the coarser icon, dimmed to
        :data:`FALLBACK_BRIGHTNESS`, as a map shows the parent tile until the
        finer one is loaded.

    Returns
    -------
    numpy.ndarray
        Shape (S·t, S·t) uint32 RGBA with t = :func:`tile_size`; row 0 is the
        bottom of the plot. Empty cells are transparent. Non-empty cells
        without an icon show the fallback where it is opaque, and
        :data:`PLACEHOLDER_RGBA` elsewhere.
    """
    tile = tile_size(size, icon_px, max_px)
    rgba = np.zeros((size * tile, size * tile, 4), dtype=np.uint8)
    if fallback is not None and fallback.shape != rgba.shape:
        raise ValueError(f"fallback pixels have shape {fallback.shape}, expected {rgba.shape}")
    with_icon = filled & done if read_icon_row is not None else np.zeros_like(filled)
    for i in range(size):
        block = rgba[i * tile : (i + 1) * tile]
        for j in np.flatnonzero(filled[i] & ~with_icon[i]):
            cell = np.s_[:, j * tile : (j + 1) * tile]
            borrowed = None if fallback is None else fallback[i * tile : (i + 1) * tile][cell]
            if borrowed is not None and (borrowed[..., 3] > 0).all():
                block[cell][..., :3] = (borrowed[..., :3] * FALLBACK_BRIGHTNESS).round().astype(np.uint8)
                block[cell][..., 3] = 255
            else:
                block[cell] = PLACEHOLDER_RGBA
        columns = np.flatnonzero(with_icon[i])
        if len(columns) == 0:
            continue
        icons = np.asarray(read_icon_row(i))[columns]  # (n, P, P, 3)
        if tile != icon_px:
            icons = _shrink(icons, tile)
        for column, icon in zip(columns, icons):
            block[:, column * tile : (column + 1) * tile, :3] = icon[::-1]
            block[:, column * tile : (column + 1) * tile, 3] = 255
    return pack_rgba(rgba)


def upscale_mosaic(mosaic: np.ndarray, side: int) -> np.ndarray:
    """Scale a packed (H, H) uint32 mosaic to (side, side, 4) uint8 RGBA, nearest pixel.

    Nearest-pixel scaling keeps transparent cells transparent, so a cell of
    the coarser grid that is empty stays unusable as a fallback.
    """
    rgba = np.ascontiguousarray(mosaic).view(np.uint8).reshape(*mosaic.shape, 4)
    image = Image.fromarray(rgba, mode="RGBA").resize((side, side), Image.Resampling.NEAREST)
    return np.asarray(image)


def _shrink(icons: np.ndarray, tile: int) -> np.ndarray:
    # (n, P, P, 3) uint8 -> (n, 3, P, P) float for torch, area-averaged to (n, 3, t, t).
    tensor = torch.from_numpy(np.ascontiguousarray(icons)).permute(0, 3, 1, 2).float()
    small = torch.nn.functional.interpolate(tensor, size=(tile, tile), mode="area")
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def density_histogram(chunks: Iterable[np.ndarray], bins: int) -> np.ndarray:
    """Count layout points per bin of a ``bins`` × ``bins`` grid over [0, 1]².

    Parameters
    ----------
    chunks
        An iterable of (n, 2) float arrays of x, y; NaN rows are skipped.
    bins
        Bins per axis.

    Returns
    -------
    numpy.ndarray
        Shape (bins, bins) float64, row ``r`` covering y in [r/bins, (r+1)/bins).
    """
    counts = np.zeros((bins, bins), dtype=np.float64)
    for points in chunks:
        points = np.asarray(points, dtype=np.float64)
        finite = np.isfinite(points).all(axis=1)
        # histogram2d(y, x) puts y on the first axis, so rows run along y.
        hist, _, _ = np.histogram2d(
            points[finite, 1], points[finite, 0], bins=bins, range=[[0.0, 1.0], [0.0, 1.0]]
        )
        counts += hist
    return counts


def density_rgba(counts: np.ndarray, colormap: str = "magma") -> np.ndarray:
    """Colour log-scaled bin counts; empty bins are transparent.

    Returns
    -------
    numpy.ndarray
        Shape (bins, bins) uint32 RGBA for ``image_rgba``.
    """
    scaled = np.log1p(counts)
    top = float(scaled.max()) if scaled.size else 0.0
    if top > 0:
        scaled = scaled / top
    # Start the colour ramp above the map's near-black end so sparse bins show on a dark plot.
    rgba = (colormaps[colormap](0.25 + 0.75 * scaled) * 255).round().astype(np.uint8)
    rgba[..., 3] = np.where(counts > 0, 220, 0).astype(np.uint8)
    return pack_rgba(rgba)


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    """Encode an image as a ``data:image/png;base64,...`` URI for HTML ``<img>`` tags."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_overlay(image: Image.Image, attribution: np.ndarray, colormap: str = "inferno", alpha: float = 0.55) -> Image.Image:
    """Blend a per-pixel attribution map over an image.

    Parameters
    ----------
    image
        RGB image, any size.
    attribution
        Shape (H, W) float, any scale; it is resized to the image and
        rescaled to [0, 1] by its minimum and maximum.

    Returns
    -------
    PIL.Image.Image
        RGB, the size of ``image``.
    """
    values = np.nan_to_num(np.asarray(attribution, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    heat = (colormaps[colormap](values)[..., :3] * 255).round().astype(np.uint8)
    heat_image = Image.fromarray(heat).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat_image, alpha)
