"""The render stage: one icon per non-empty grid cell, saved batch by batch, then a mosaic PNG.

For each grid size S of a layer, the stage reads ``grids/<layer>/<S>/``
(``count``, ``whitened_mean`` or ``mean``, attribute ``min_count``) and writes

- ``icons`` (S, S, P, P, 3) uint8, white where a cell is empty or not yet rendered;
- ``icon_done`` (S, S) bool, set after each batch's icons are written, so a
  killed run resumes with the cells still missing;
- ``sidecar/mosaic-<layer>-<S>.png``, the icons tiled in one image.

The settings that change an icon are stored in the ``icons`` attributes; a
rerun with different settings raises instead of mixing icons of two runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from PIL import Image

from atlas.config import RenderConfig
from atlas.errors import StageNotReadyError, StoreError
from atlas.models import LoadedModel, load_model
from atlas.render.render import iter_direction_batches, to_uint8
from atlas.store import clear_stage, default_layer, mark_stage, open_store, sidecar_path, stage_done

logger = logging.getLogger(__name__)

# Pixel value of empty cells in the icons array and the mosaic (white).
EMPTY_VALUE = 255


def grid_sizes(group: zarr.Group, layer: str) -> list[int]:
    """Return the grid sizes stored under ``grids/<layer>/``, ascending."""
    try:
        grids = group[f"grids/{layer}"]
    except KeyError:
        return []
    return sorted(int(name) for name in grids.group_keys() if name.isdigit())


def filled_cells(grid: zarr.Group) -> np.ndarray:
    """Return the (S, S) bool mask of a grid's non-empty cells, those with at least ``min_count`` rows."""
    count = np.asarray(grid["count"][:])
    min_count = int(grid.attrs.get("min_count", 1))
    return count >= max(min_count, 1)


def budget_sizes(icon_counts: dict[int, int], max_icons: int) -> tuple[list[int], list[int]]:
    """Pick grid sizes from the coarsest up while their total of icons stays within ``max_icons``.

    The coarsest size is always picked, even above the budget, and picking
    stops at the first size that would exceed it.

    Parameters
    ----------
    icon_counts
        Grid size to its number of non-empty cells, one icon each.
    max_icons
        Icon budget over the picked sizes.

    Returns
    -------
    tuple of list of int
        ``(picked, skipped)``, both ascending.
    """
    ordered = sorted(icon_counts)
    picked = ordered[:1]
    total = sum(icon_counts[size] for size in picked)
    for size in ordered[1:]:
        if total + icon_counts[size] > max_icons:
            break
        picked.append(size)
        total += icon_counts[size]
    return picked, ordered[len(picked):]


def _choose_sizes(group: zarr.Group, layer: str, available: list[int], config: RenderConfig) -> list[int]:
    """Return the grid sizes to render: ``config.grid_sizes`` found in the store, or those within ``config.max_icons``."""
    if config.grid_sizes is not None:
        requested = sorted(set(config.grid_sizes))
        missing = [size for size in requested if size not in available]
        sizes = [size for size in requested if size in available]
        if not sizes:
            raise StoreError(
                f"none of the grid sizes {missing} is in the store for layer {layer}; it has {available}: "
                "set render.grid_sizes to some of them, or null to pick them by render.max_icons"
            )
        if missing:
            logger.warning("render: grid sizes %s are not in the store for layer %s; rendering %s", missing, layer, sizes)
        return sizes

    icon_counts = {size: int(filled_cells(group[f"grids/{layer}/{size}"]).sum()) for size in available}
    sizes, skipped = budget_sizes(icon_counts, config.max_icons)
    total = sum(icon_counts[size] for size in sizes)
    if total > config.max_icons:
        logger.warning(
            "render: the coarsest grid %d of layer %s has %d non-empty cells, above render.max_icons=%d, "
            "and is rendered anyway because the explorer needs icons of at least one grid",
            sizes[0], layer, total, config.max_icons,
        )
    if skipped:
        logger.info(
            "render: skipping grid sizes %s of layer %s (%s non-empty cells), because %d icons are already picked "
            "and render.max_icons is %d. Raise render.max_icons or set render.grid_sizes to render them",
            skipped, layer, ", ".join(str(icon_counts[size]) for size in skipped), total, config.max_icons,
        )
    return sizes


def _icon_settings(config: RenderConfig, source: str) -> dict[str, Any]:
    # Settings that change an icon's pixels. The size choice, batch size and mosaic do not.
    settings = config.model_dump(exclude={"grid_sizes", "max_icons", "batch_size", "mosaic_max_px"})
    settings["scale_range"] = list(settings["scale_range"])
    settings["source"] = source
    return settings


def _open_icon_arrays(grid: zarr.Group, size: int, config: RenderConfig, source: str, force: bool) -> tuple[zarr.Array, zarr.Array]:
    """Return ``(icons, icon_done)``, created when missing, rejected when made with other settings."""
    icon_size = config.size
    settings = _icon_settings(config, source)
    exists = "icons" in grid.array_keys() and "icon_done" in grid.array_keys()
    if exists and not force:
        icons = grid["icons"]
        stored = dict(icons.attrs.get("settings", {}))
        if icons.shape == (size, size, icon_size, icon_size, 3) and stored == settings:
            return icons, grid["icon_done"]
        changed = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
        raise StoreError(
            f"grid {size} already has icons rendered with other settings (changed: {', '.join(changed) or 'shape'}); "
            "rerun with --force to render them all again"
        )

    icons = grid.create_array(
        "icons", shape=(size, size, icon_size, icon_size, 3), chunks=(1, size, icon_size, icon_size, 3),
        dtype="uint8", fill_value=EMPTY_VALUE, overwrite=True,
    )
    icons.attrs["settings"] = settings
    done = grid.create_array("icon_done", shape=(size, size), chunks=(size, size), dtype="bool", fill_value=False, overwrite=True)
    return icons, done


def _write_icons(icons: zarr.Array, cells: np.ndarray, images: np.ndarray) -> None:
    # Cells are (b, 2) and images (b, P, P, 3). Icons are chunked by grid row,
    # so each touched row is read, updated and written once.
    for row in np.unique(cells[:, 0]):
        mask = cells[:, 0] == row
        values = np.asarray(icons[int(row)])
        values[cells[mask, 1]] = images[mask]
        icons[int(row)] = values


def write_mosaic(icons: zarr.Array, done: np.ndarray, path: Path, max_px: int) -> Path:
    """Tile the rendered icons into one PNG, higher grid rows at the top.

    Row ``i`` of the grid covers layout y in [i/S, (i+1)/S), so it is drawn
    at image row ``S - 1 - i``, matching a plot with y pointing up.

    Parameters
    ----------
    icons
        (S, S, P, P, 3) uint8.
    done
        (S, S) bool, the cells to draw. The others stay white.
    path
        Where to write the PNG.
    max_px
        Maximum side length of the PNG. Each tile is ``min(P, max_px // S)``
        pixels, shrunk with Lanczos resampling.

    Returns
    -------
    Path
        ``path``.
    """
    size, _, icon_size = icons.shape[:3]
    tile = max(1, min(icon_size, max_px // size))
    mosaic = np.full((size * tile, size * tile, 3), EMPTY_VALUE, dtype=np.uint8)
    for row in range(size):
        if not done[row].any():
            continue
        values = np.asarray(icons[row])
        top = (size - 1 - row) * tile
        for column in np.flatnonzero(done[row]):
            icon = values[column]
            if tile != icon_size:
                icon = np.asarray(Image.fromarray(icon).resize((tile, tile), Image.Resampling.LANCZOS))
            mosaic[top : top + tile, column * tile : (column + 1) * tile] = icon
    Image.fromarray(mosaic).save(path)
    return path


def _render_grid(
    group: zarr.Group,
    store_path: str | Path,
    layer: str,
    size: int,
    config: RenderConfig,
    model: LoadedModel,
    force: bool,
    progress: bool,
) -> tuple[int, int]:
    """Render the missing icons of one grid and return ``(rendered now, rendered in all)``."""
    grid = group[f"grids/{layer}/{size}"]
    min_count = int(grid.attrs.get("min_count", 1))
    filled = filled_cells(grid)

    source = "mean"
    if config.whiten:
        if "whitened_mean" in grid.array_keys():
            source = "whitened_mean"
        else:
            logger.warning("grid %d of layer %s has no whitened_mean; rendering the plain mean instead", size, layer)
    vectors = np.asarray(grid[source][:], dtype=np.float32)

    icons, done_array = _open_icon_arrays(grid, size, config, source, force)
    done = np.asarray(done_array[:]) & filled
    cells = np.argwhere(filled & ~done)
    logger.info(
        "grid %d of layer %s: %d non-empty cells (min_count %d), %d already rendered, %d to render",
        size, layer, int(filled.sum()), min_count, int(done.sum()), len(cells),
    )

    began = time.perf_counter()
    if len(cells):
        directions = torch.from_numpy(vectors[cells[:, 0], cells[:, 1]])
        zero = int((directions.norm(dim=1) == 0).sum())
        if zero:
            logger.warning("grid %d: %d non-empty cells have an all-zero %s; their icons will be flat", size, zero, source)
        try:
            for indices, result in iter_direction_batches(model, layer, directions, config, progress):
                batch_cells = cells[indices]
                _write_icons(icons, batch_cells, to_uint8(result.images))
                # Flags are written after the icons, so a crash in between only re-renders.
                done[batch_cells[:, 0], batch_cells[:, 1]] = True
                done_array[:] = done
        except KeyboardInterrupt:
            logger.warning(
                "render: interrupted with %d of %d icons of grid %d stored; run the same command again to go on",
                int(done.sum()), int(filled.sum()), size,
            )
            raise
    seconds = time.perf_counter() - began
    if len(cells):
        logger.info("grid %d: rendered %d icons in %.1f s (%.2f s per icon)", size, len(cells), seconds, seconds / len(cells))

    path = write_mosaic(icons, done, sidecar_path(store_path, f"mosaic-{layer}-{size}.png"), config.mosaic_max_px)
    logger.info("grid %d: wrote mosaic %s", size, path)
    return len(cells), int(done.sum())


def _warn_changed_settings(group: zarr.Group, layer: str, sizes: list[int], config: RenderConfig) -> None:
    for size in sizes:
        stored = group[f"grids/{layer}/{size}/icons"].attrs.get("settings", {})
        current = _icon_settings(config, stored.get("source", ""))
        if stored != current:
            logger.warning(
                "grid %d of layer %s keeps icons rendered with other settings than the current config; "
                "pass --force (force=True in Python) to render them again", size, layer,
            )


def run_render(
    store_path: str | Path,
    config: RenderConfig,
    layer: str | None = None,
    force: bool = False,
    model: LoadedModel | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the render stage: an icon for every non-empty cell of every grid size, and a mosaic per size.

    Parameters
    ----------
    store_path
        A local store folder (the mosaic is a sidecar file).
    config
        Render settings. ``config.grid_sizes`` ``None`` renders the sizes
        found under ``grids/<layer>/`` from the coarsest up, while their
        non-empty cells total at most ``config.max_icons`` (the coarsest
        size always). A list renders the listed sizes the store has.
    layer
        ``None`` is the store's primary layer.
    force
        Render every icon again, even when the stage is complete.
    model
        The store's model, already loaded; ``None`` loads ``attrs["model"]``.
    progress
        Show progress bars on a terminal.

    Returns
    -------
    dict
        ``layer``, ``sizes``, ``rendered`` (icons made by this call),
        ``n_icons`` (icons stored over ``sizes``), ``seconds``, ``mosaics``
        (paths) and ``skipped`` (true when the stage was already complete).

    Raises
    ------
    StageNotReadyError
        The grid stage has not run for the layer.
    StoreError
        None of the listed grid sizes is in the store, or icons exist with
        other settings and ``force`` is false.
    """
    began = time.perf_counter()
    group = open_store(store_path, mode="r+")
    layer = default_layer(group, layer)
    available = grid_sizes(group, layer)
    if not available or not (stage_done(group, "grid", layer) or stage_done(group, "grid")):
        raise StageNotReadyError(
            f"store {store_path} has no completed grids for layer {layer}; run `atlas grid {store_path}` first"
        )
    sizes = _choose_sizes(group, layer, available, config)

    record = dict(group.attrs.get("stages", {}).get(f"render:{layer}", {}))
    previous = [] if force else [size for size in record.get("sizes", []) if size in available]
    mosaics = [str(sidecar_path(store_path, f"mosaic-{layer}-{size}.png")) for size in sizes]
    if stage_done(group, "render", layer) and not force and set(sizes) <= set(previous):
        logger.info("render stage for layer %s is already complete (sizes %s); pass --force (force=True in Python) to redo it", layer, previous)
        _warn_changed_settings(group, layer, sizes, config)
        return {"layer": layer, "sizes": sizes, "rendered": 0, "n_icons": record.get("n_icons", 0),
                "seconds": 0.0, "mosaics": mosaics, "skipped": True}
    if force:
        clear_stage(group, "render", layer)

    if model is None:
        model = load_model(group.attrs["model"])
    logger.info("render stage for layer %s: grid sizes %s, %d px icons, %d steps", layer, sizes, config.size, config.steps)

    rendered = 0
    for size in sizes:
        rendered_now, _ = _render_grid(group, store_path, layer, size, config, model, force, progress)
        rendered += rendered_now

    done_sizes = sorted(set(previous) | set(sizes))
    n_icons = sum(int(np.asarray(group[f"grids/{layer}/{size}/icon_done"][:]).sum()) for size in done_sizes)
    seconds = time.perf_counter() - began
    mark_stage(group, "render", layer, sizes=done_sizes, n_icons=n_icons, seconds=round(seconds, 1))
    logger.info("render stage for layer %s done: %d icons rendered now, %d stored, %.1f s", layer, rendered, n_icons, seconds)
    return {"layer": layer, "sizes": sizes, "rendered": rendered, "n_icons": n_icons,
            "seconds": seconds, "mosaics": mosaics, "skipped": False}
