"""Multi-scale grids over the 2-D layout: per-cell count, mean, top classes and exemplars.

:func:`run_grid` makes two streaming passes over the valid, laid-out rows, so
memory is bounded by the chunk size and the grids, not by N:

1. count, activation sum, attribution sums per class and ``AᵀA`` (for the
   whitening matrix), for every grid size at once;
2. exemplars: the rows nearest (by cosine) to their cell's mean, which is
   only known after the first pass.

A cell with fewer than ``min_count`` rows is empty: its count is kept, its
mean is zero, its classes and exemplars are -1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from atlas.config import GridConfig
from atlas.errors import StoreError
from atlas.store import (
    clear_stage,
    default_layer,
    iter_row_chunks,
    mark_stage,
    open_store,
    require_stage,
    stage_done,
    valid_rows,
)

logger = logging.getLogger(__name__)

STAGE = "grid"
DOWNSTREAM_STAGES = ("render",)
CHUNK_ROWS = 16_384
# The pseudo-inverse treats eigenvalues of AᵀA/N below this fraction of the largest
# as zero. float16 keeps about 5e-4 relative precision, so eigenvalues under about
# (5e-4)² of the largest are rounding noise, and inverting them would swamp the whitening.
WHITENING_RTOL = 1e-6


def cell_of(xy: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the grid cell of each layout point.

    Cell ``[i, j]`` covers y in [i/S, (i+1)/S) and x in [j/S, (j+1)/S); points
    at 1.0 fall in the last cell.

    Parameters
    ----------
    xy
        Shape (n, 2): x, y in [0, 1].
    size
        Grid size S.

    Returns
    -------
    i, j
        Shapes (n,) int64 in [0, S); -1 for points with NaN coordinates.
    """
    points = np.asarray(xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"layout points must have shape (n, 2), got {points.shape}")
    if size < 1:
        raise ValueError(f"grid size must be at least 1, got {size}")
    finite = np.isfinite(points).all(axis=1)
    i = np.full(len(points), -1, np.int64)
    j = np.full(len(points), -1, np.int64)
    i[finite] = np.clip(np.floor(points[finite, 1] * size), 0, size - 1).astype(np.int64)
    j[finite] = np.clip(np.floor(points[finite, 0] * size), 0, size - 1).astype(np.int64)
    return i, j


def _flat_cells(xy: np.ndarray, size: int) -> np.ndarray:
    i, j = cell_of(xy, size)
    return i * size + j


def _sum_by_cell(cells: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (distinct cells, per-cell sums of ``values``) by sorting rows by cell."""
    order = np.argsort(cells, kind="stable")
    sorted_cells = cells[order]
    unique, starts = np.unique(sorted_cells, return_index=True)
    return unique, np.add.reduceat(values[order], starts, axis=0)


class _CellStatistics:
    """First-pass sums of one grid size, as flat arrays over S·S cells."""

    def __init__(self, size: int, channels: int, n_classes: int) -> None:
        n_cells = size * size
        self.size = size
        self.count = np.zeros(n_cells, np.int64)
        self.sums = np.zeros((n_cells, channels), np.float64)
        self.class_sums = np.zeros((n_cells, n_classes), np.float64)
        self.class_seen = np.zeros((n_cells, n_classes), bool)

    def add(self, cells: np.ndarray, values: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
        self.count += np.bincount(cells, minlength=len(self.count))
        unique, sums = _sum_by_cell(cells, values)
        self.sums[unique] += sums

        # classes, scores: (n, K); -1 marks an unused slot.
        used = classes >= 0
        if not used.any():
            return
        labels = classes[used].astype(np.int64)
        if labels.max() >= self.class_sums.shape[1]:
            extra = int(labels.max()) + 1 - self.class_sums.shape[1]
            self.class_sums = np.pad(self.class_sums, ((0, 0), (0, extra)))
            self.class_seen = np.pad(self.class_seen, ((0, 0), (0, extra)))
        n_classes = self.class_sums.shape[1]
        keys = np.broadcast_to(cells[:, None], classes.shape)[used] * n_classes + labels
        np.add.at(self.class_sums.reshape(-1), keys, scores[used].astype(np.float64))
        self.class_seen.reshape(-1)[keys] = True


class _NearestRows:
    """The ``n_best`` rows of highest score per cell, updated chunk by chunk; ties go to the lower row."""

    def __init__(self, n_cells: int, n_best: int) -> None:
        self.n_best = n_best
        self.scores = np.full((n_cells, n_best), -np.inf)
        self.rows = np.full((n_cells, n_best), -1, np.int64)

    def offer(self, cells: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> None:
        filled = self.rows >= 0
        filled_cells = np.nonzero(filled)[0]
        all_cells = np.concatenate([filled_cells, cells])
        all_scores = np.concatenate([self.scores[filled], scores])
        all_rows = np.concatenate([self.rows[filled], rows])

        order = np.lexsort((all_rows, -all_scores, all_cells))
        all_cells, all_scores, all_rows = all_cells[order], all_scores[order], all_rows[order]
        # Rank of each candidate within its cell; the sorted cells make searchsorted find group starts.
        rank = np.arange(len(all_cells)) - np.searchsorted(all_cells, all_cells, side="left")
        keep = rank < self.n_best
        self.scores[all_cells[keep], rank[keep]] = all_scores[keep]
        self.rows[all_cells[keep], rank[keep]] = all_rows[keep]


def _row_chunks(arrays: list[zarr.Array], rows: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield ``(rows, values of each array)`` for the same chunk of rows in every array."""
    readers = [iter_row_chunks(array, rows, CHUNK_ROWS) for array in arrays]
    for parts in zip(*readers):
        yield (parts[0][0], *(values for _, values in parts))


def _unit_rows(values: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(values, axis=-1, keepdims=True)
    return np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)


def whitening_matrix(gram: np.ndarray, n_rows: int) -> np.ndarray:
    """Return the pseudo-inverse of ``AᵀA / N`` as (C, C) float32.

    Parameters
    ----------
    gram
        ``AᵀA``, shape (C, C), summed over the ``n_rows`` rows of A.
    """
    return np.linalg.pinv(gram / max(n_rows, 1), rtol=WHITENING_RTOL, hermitian=True).astype(np.float32)


def _top_classes(class_sums: np.ndarray, class_seen: np.ndarray, count: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (classes, scores), each (n_cells, top), by mean attribution; -1 and 0 pad."""
    n_cells, n_classes = class_sums.shape
    means = class_sums / np.maximum(count, 1)[:, None]
    ranked = np.where(class_seen, means, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, : min(top, n_classes)]
    classes = np.full((n_cells, top), -1, np.int64)
    scores = np.zeros((n_cells, top), np.float64)
    picked = np.take_along_axis(ranked, order, axis=1)
    found = np.isfinite(picked)
    classes[:, : order.shape[1]] = np.where(found, order, -1)
    scores[:, : order.shape[1]] = np.where(found, picked, 0.0)
    return classes, scores


def run_grid(store_path: str | Path, config: GridConfig, layer: str | None = None, force: bool = False) -> dict:
    """Aggregate the laid-out activations into grids of each size in ``config.sizes``.

    Writes ``whitening/<layer>`` (C, C) float32. For each size S, writes these
    arrays under ``grids/<layer>/<S>/``: ``count`` (S, S) int32, ``mean`` and
    ``whitened_mean`` (S, S, C) float32, ``top_class`` (S, S, T) int16,
    ``top_score`` (S, S, T) float32 and ``exemplars`` (S, S, E) int64. The
    group attributes are ``size``, ``min_count`` and ``n_nonempty``. A class's
    score in a cell is the sum of its attribution scores over the cell's rows
    divided by the cell's count.

    Parameters
    ----------
    store_path
        A feature store whose ``project`` stage is complete for ``layer``.
    config
        ``sizes``, ``min_count``, ``n_exemplars`` (E) and ``top_classes`` (T).
    layer
        ``None`` means the store's first layer.
    force
        Recompute even when the stage is complete. This deletes every grid
        of the layer, icons included, and clears its ``render`` stage.

    Returns
    -------
    dict
        The stage record: ``sizes``, ``n`` (rows), ``n_nonempty`` per size,
        ``seconds``, ``done``, ``finished``.

    Raises
    ------
    StageNotReadyError
        The layout has not been computed.
    StoreError
        No valid row has a layout coordinate.
    """
    started = time.perf_counter()
    group = open_store(store_path, mode="r+")
    layer = default_layer(group, layer)
    require_stage(group, "project", layer, path=store_path)
    if stage_done(group, STAGE, layer) and not force:
        record = dict(group.attrs["stages"][f"{STAGE}:{layer}"])
        stored = sorted(int(size) for size in record.get("sizes", []))
        if stored and stored != sorted(config.sizes):
            logger.warning(
                "grids of layer %s exist at sizes %s, not the configured %s; keeping them. "
                "Pass --force (force=True in Python) to recompute them at %s",
                layer, stored, sorted(config.sizes), sorted(config.sizes),
            )
        else:
            logger.info("grids of layer %s are already computed; pass --force (force=True in Python) to recompute", layer)
        return record
    for stage in (STAGE, *DOWNSTREAM_STAGES):
        clear_stage(group, stage, layer)

    activations = group[f"activations/{layer}"]
    projection = np.asarray(group[f"projection/{layer}"][:])
    rows = valid_rows(group)
    rows = rows[np.isfinite(projection[rows]).all(axis=1)]
    if len(rows) == 0:
        raise StoreError(f"store {store_path} has no laid-out rows in layer {layer}; rerun `atlas project {store_path} --force`")
    channels = int(activations.shape[1])
    n_classes = max(1, len(group.attrs.get("class_names") or []))
    arrays = [activations, group["samples/attribution_class"], group["samples/attribution_score"]]
    total = -(-len(rows) // CHUNK_ROWS)

    # Pass 1: counts, sums, class attribution sums and AᵀA.
    statistics = {size: _CellStatistics(size, channels, n_classes) for size in config.sizes}
    gram = np.zeros((channels, channels))
    n_rows = 0
    nonfinite = []
    for chunk_rows, values, classes, scores in tqdm(
        _row_chunks(arrays, rows), total=total, desc=f"grid {layer}", unit="chunk", disable=None
    ):
        values = values.astype(np.float64)
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            nonfinite.append(chunk_rows[~finite])
            chunk_rows, values, classes, scores = chunk_rows[finite], values[finite], classes[finite], scores[finite]
        gram += values.T @ values
        n_rows += len(chunk_rows)
        for size, stats in statistics.items():
            stats.add(_flat_cells(projection[chunk_rows], size), values, classes, scores)
    if nonfinite:
        skipped = np.concatenate(nonfinite)
        logger.warning("%d rows marked valid contain NaN or inf values and are left out of the grids", len(skipped))
        rows = np.setdiff1d(rows, skipped, assume_unique=True)
    if n_rows == 0:
        raise StoreError(f"store {store_path} has no finite activations in layer {layer}")
    whitening = whitening_matrix(gram, n_rows)

    means, nonempty, nearest = {}, {}, {}
    for size, stats in statistics.items():
        nonempty[size] = stats.count >= config.min_count
        means[size] = np.where(nonempty[size][:, None], stats.sums / np.maximum(stats.count, 1)[:, None], 0.0)
        nearest[size] = _NearestRows(size * size, config.n_exemplars)

    # Pass 2: exemplars, the rows of each non-empty cell nearest its mean by cosine.
    unit_means = {size: _unit_rows(mean) for size, mean in means.items()}
    for chunk_rows, values in tqdm(
        _row_chunks([activations], rows), total=total, desc=f"exemplars {layer}", unit="chunk", disable=None
    ):
        unit = _unit_rows(values.astype(np.float64))
        for size in config.sizes:
            cells = _flat_cells(projection[chunk_rows], size)
            keep = nonempty[size][cells]
            cosine = np.einsum("nc,nc->n", unit[keep], unit_means[size][cells[keep]])
            nearest[size].offer(cells[keep], cosine, chunk_rows[keep])

    # Write: replace every grid of the layer, so no size from an earlier run survives.
    if f"grids/{layer}" in group:
        del group[f"grids/{layer}"]
    whitening_array = group.create_array(
        f"whitening/{layer}", shape=(channels, channels), dtype="float32", overwrite=True
    )
    whitening_array[:] = whitening
    layer_group = group.require_group(f"grids/{layer}")
    n_nonempty = {}
    for size, stats in statistics.items():
        classes, class_scores = _top_classes(stats.class_sums, stats.class_seen, stats.count, config.top_classes)
        classes[~nonempty[size]] = -1
        class_scores[~nonempty[size]] = 0.0
        cells = layer_group.require_group(str(size))
        shape = (size, size)
        _write(cells, "count", stats.count.reshape(shape).astype(np.int32))
        _write(cells, "mean", means[size].reshape(*shape, channels).astype(np.float32))
        _write(cells, "whitened_mean", (means[size] @ whitening.astype(np.float64)).reshape(*shape, channels).astype(np.float32))
        _write(cells, "top_class", classes.reshape(*shape, -1).astype(np.int16))
        _write(cells, "top_score", class_scores.reshape(*shape, -1).astype(np.float32))
        _write(cells, "exemplars", nearest[size].rows.reshape(*shape, -1))
        n_nonempty[str(size)] = int(nonempty[size].sum())
        cells.attrs.update({"size": size, "min_count": config.min_count, "n_nonempty": n_nonempty[str(size)]})
    layer_group.attrs["sizes"] = list(config.sizes)

    info = {
        "sizes": list(config.sizes),
        "n": int(n_rows),
        "n_nonempty": n_nonempty,
        "seconds": round(time.perf_counter() - started, 3),
    }
    mark_stage(group, STAGE, layer, **info)
    logger.info("gridded %d rows of layer %s at sizes %s in %.1f s", n_rows, layer, list(config.sizes), info["seconds"])
    return dict(group.attrs["stages"][f"{STAGE}:{layer}"])


def _write(group: zarr.Group, name: str, data: np.ndarray) -> None:
    # One chunk per row of cells keeps a cell lookup to one small read.
    chunks = (1, *data.shape[1:]) if data.ndim > 2 else data.shape
    array = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, overwrite=True)
    array[:] = data
