"""Query by image: the dataset activations and atlas cells nearest to an image's activations.

The store's model, index and per-row metadata are loaded once per store and
kept in memory, so repeated queries cost one truncated forward pass and one
index search.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atlas.capture import forward_to
from atlas.errors import QueryError
from atlas.grid import cell_of
from atlas.index import load_index, search
from atlas.models import LoadedModel, load_model
from atlas.store import default_layer, open_store, read_strings, require_stage, stage_done

logger = logging.getLogger(__name__)

# Entries listed in the image-level summary, per grid size and for images.
SUMMARY_SIZE = 10
MAX_K = 1_000


@dataclass
class Hit:
    """One dataset activation near a query vector."""

    row: int
    image: int
    path: str
    y: int
    x: int
    score: float
    cells: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class PositionHits:
    """The hits of one query vector; ``y``, ``x`` locate it in the feature map (None for raw vectors)."""

    query: int
    y: int | None
    x: int | None
    hits: list[Hit]


@dataclass
class CellCount:
    """A grid cell and how often the query's hits fell in it."""

    i: int
    j: int
    count: int
    mean_score: float


@dataclass
class ImageCount:
    """A dataset image and how often the query's hits came from it."""

    image: int
    path: str
    count: int
    mean_score: float


@dataclass
class QueryResult:
    """Nearest dataset activations of every query position, with an image-level summary.

    Attributes
    ----------
    layer
        The layer searched.
    k
        Neighbours per position.
    map_shape
        (h, w) of the query's feature map; (q, 1) for :func:`query_vectors`.
    grid_sizes
        Sizes of the store's grids; every hit gives its cell at each.
    positions
        One entry per query vector, hits best first.
    cells
        Per grid size, the cells hit most often (count, then mean score).
    images
        The dataset images hit most often.
    """

    layer: str
    k: int
    map_shape: tuple[int, int]
    grid_sizes: list[int]
    positions: list[PositionHits]
    cells: dict[int, list[CellCount]]
    images: list[ImageCount]

    def top_matches(self, count: int | None = None) -> list[tuple[PositionHits, Hit]]:
        """Return the best hits over all positions, highest score first."""
        pairs = [(position, hit) for position in self.positions for hit in position.hits]
        pairs.sort(key=lambda pair: (-pair[1].score, pair[1].row))
        return pairs[:count] if count is not None else pairs

    def to_dict(self) -> dict:
        """Return the result as JSON-able data; grid sizes become string keys."""

        def hit_dict(hit: Hit) -> dict:
            # Written out by hand: dataclasses.asdict deep-copies and is slow for thousands of hits.
            return {
                "row": hit.row, "image": hit.image, "path": hit.path, "y": hit.y, "x": hit.x, "score": hit.score,
                "cells": {str(size): list(cell) for size, cell in hit.cells.items()},
            }

        matches = []
        for position, hit in self.top_matches(self.k):
            matches.append({**hit_dict(hit), "query": position.query, "query_y": position.y, "query_x": position.x})
        return {
            "layer": self.layer,
            "k": self.k,
            "map_shape": list(self.map_shape),
            "grid_sizes": list(self.grid_sizes),
            "positions": [
                {"query": p.query, "y": p.y, "x": p.x, "hits": [hit_dict(hit) for hit in p.hits]} for p in self.positions
            ],
            "top_matches": matches,
            "summary": {
                "cells": {str(size): [asdict(cell) for cell in cells] for size, cells in self.cells.items()},
                "images": [asdict(image) for image in self.images],
            },
        }


@dataclass
class _StoreView:
    """Per-row metadata of one store layer, held in memory (about 16 bytes per row)."""

    layer: str
    model_spec: str
    stages: str
    sample_image: np.ndarray  # (N,) int32
    sample_y: np.ndarray  # (N,) int16
    sample_x: np.ndarray  # (N,) int16
    projection: np.ndarray | None  # (N, 2) float32
    image_paths: np.ndarray  # (M,) object
    grid_sizes: list[int]


_views: dict[tuple[str, str], _StoreView] = {}
_views_lock = threading.Lock()


def _store_view(store_path: str | Path, layer: str | None) -> _StoreView:
    group = open_store(store_path, mode="r")
    layer = default_layer(group, layer)
    require_stage(group, "index", layer, path=store_path)
    stages = repr(sorted(group.attrs.get("stages", {}).items()))
    key = (str(Path(store_path).resolve()), layer)
    with _views_lock:
        view = _views.get(key)
        if view is not None and view.stages == stages:
            return view

        projection = None
        if stage_done(group, "project", layer):
            projection = np.asarray(group[f"projection/{layer}"][:])
        grid_sizes: list[int] = []
        if stage_done(group, "grid", layer):
            grid_sizes = [int(size) for size in group.attrs["stages"][f"grid:{layer}"].get("sizes", [])]
        view = _StoreView(
            layer=layer,
            model_spec=str(group.attrs["model"]),
            stages=stages,
            sample_image=np.asarray(group["samples/image"][:]),
            sample_y=np.asarray(group["samples/y"][:]),
            sample_x=np.asarray(group["samples/x"][:]),
            projection=projection,
            image_paths=read_strings(group["images/path"]),
            grid_sizes=grid_sizes,
        )
        _views[key] = view
    logger.info("loaded query metadata of %d rows of layer %s from %s", len(view.sample_image), layer, store_path)
    return view


@functools.lru_cache(maxsize=4)
def cached_model(spec: str) -> LoadedModel:
    """Load a model once per spec, on the CPU, for queries."""
    return load_model(spec)


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")


def _summarise_cells(
    view: _StoreView, rows: np.ndarray, scores: np.ndarray
) -> dict[int, list[CellCount]]:
    summary: dict[int, list[CellCount]] = {}
    if view.projection is None:
        return summary
    for size in view.grid_sizes:
        i, j = cell_of(view.projection[rows], size)
        placed = i >= 0
        cells = i[placed] * size + j[placed]
        unique, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
        mean_scores = np.bincount(inverse, weights=scores[placed], minlength=len(unique)) / np.maximum(counts, 1)
        order = np.lexsort((unique, -mean_scores, -counts))[:SUMMARY_SIZE]
        summary[size] = [
            CellCount(i=int(unique[n] // size), j=int(unique[n] % size), count=int(counts[n]), mean_score=float(mean_scores[n]))
            for n in order
        ]
    return summary


def _summarise_images(view: _StoreView, rows: np.ndarray, scores: np.ndarray) -> list[ImageCount]:
    images = view.sample_image[rows].astype(np.int64)
    unique, inverse, counts = np.unique(images, return_inverse=True, return_counts=True)
    mean_scores = np.bincount(inverse, weights=scores, minlength=len(unique)) / np.maximum(counts, 1)
    order = np.lexsort((unique, -mean_scores, -counts))[:SUMMARY_SIZE]
    return [
        ImageCount(image=int(unique[n]), path=str(view.image_paths[unique[n]]), count=int(counts[n]),
                   mean_score=float(mean_scores[n]))
        for n in order
    ]


def _search_view(
    store_path: str | Path,
    view: _StoreView,
    vectors: np.ndarray,
    k: int,
    positions: np.ndarray | None,
    map_shape: tuple[int, int],
) -> QueryResult:
    index = load_index(store_path, view.layer)
    scores, rows = search(index, vectors, k)

    # Per-hit metadata as plain lists, gathered with NumPy once; building
    # dataclasses from Python ints is much faster than from NumPy scalars.
    found = rows >= 0
    safe_rows = np.where(found, rows, 0)
    images = view.sample_image[safe_rows].tolist()
    ys = view.sample_y[safe_rows].tolist()
    xs = view.sample_x[safe_rows].tolist()
    row_lists, score_lists = rows.tolist(), scores.tolist()
    cells_by_size: dict[int, tuple[list, list]] = {}
    if view.projection is not None:
        for size in view.grid_sizes:
            i, j = cell_of(view.projection[safe_rows.ravel()], size)
            cells_by_size[size] = (i.reshape(rows.shape).tolist(), j.reshape(rows.shape).tolist())

    results = []
    for query in range(len(rows)):
        hits = []
        for rank in range(k):
            row = row_lists[query][rank]
            if row < 0:
                continue
            cells = {}
            for size, (i, j) in cells_by_size.items():
                if i[query][rank] >= 0:
                    cells[size] = (i[query][rank], j[query][rank])
            image = images[query][rank]
            hits.append(
                Hit(row=row, image=image, path=str(view.image_paths[image]), y=ys[query][rank], x=xs[query][rank],
                    score=score_lists[query][rank], cells=cells)
            )
        y, x = (int(positions[query, 0]), int(positions[query, 1])) if positions is not None else (None, None)
        results.append(PositionHits(query=query, y=y, x=x, hits=hits))
    if index.ntotal == 0:
        logger.info("the index of layer %s is empty, so the query has no results", view.layer)

    hit_rows, hit_scores = rows[found], scores[found].astype(np.float64)
    return QueryResult(
        layer=view.layer,
        k=k,
        map_shape=map_shape,
        grid_sizes=list(view.grid_sizes),
        positions=results,
        cells=_summarise_cells(view, hit_rows, hit_scores),
        images=_summarise_images(view, hit_rows, hit_scores),
    )


def query_vectors(store_path: str | Path, vectors: np.ndarray, k: int = 10, layer: str | None = None) -> QueryResult:
    """Find the stored activations nearest to already computed vectors.

    Parameters
    ----------
    store_path
        A store whose index stage is complete for ``layer``.
    vectors
        Shape (q, C) or (C,), any float dtype.
    k
        Neighbours per vector, 1 to 1,000.
    layer
        ``None`` means the store's first layer.

    Raises
    ------
    QueryError
        ``k`` is out of range, or the vectors have the wrong width or non-finite values.
    StageNotReadyError
        The index has not been built.
    """
    _check_k(k)
    view = _store_view(store_path, layer)
    array = np.asarray(vectors)
    n_queries = 1
    if array.ndim == 2:
        n_queries = array.shape[0]
    return _search_view(store_path, view, array, k, None, (n_queries, 1))


def image_activations(model: LoadedModel, image: Image.Image, layer: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Return the layer's activation at every position of ``image``.

    Returns
    -------
    vectors, map_shape
        Vectors of shape (h·w, C) float32 in row-major position order
        (index ``y * w + x``), and (h, w).
    """
    batch = model.preprocess([image]).to(model.device)
    with torch.inference_mode():
        output = forward_to(model.module, batch, [layer])[layer]
    if output.ndim == 2:
        output = output[:, :, None, None]  # (1, C) from a linear layer: one position
    if output.ndim != 4:
        raise QueryError(f"layer {layer} returns a tensor of shape {tuple(output.shape)}; expected (B, C, h, w)")
    _, channels, height, width = output.shape
    # (1, C, h, w) -> (h·w, C), positions in row-major order.
    vectors = output[0].permute(1, 2, 0).reshape(height * width, channels).float().cpu().numpy()
    return vectors, (int(height), int(width))


def query_image(
    store_path: str | Path,
    image: Image.Image,
    k: int = 10,
    layer: str | None = None,
    model: LoadedModel | None = None,
) -> QueryResult:
    """Find the stored activations and atlas cells nearest to each position of ``image``.

    Parameters
    ----------
    store_path
        A store whose index stage is complete for ``layer``.
    image
        A decoded PIL image, any mode (converted to RGB).
    k
        Neighbours per position, 1 to 1,000.
    layer
        ``None`` means the store's first layer.
    model
        The store's model, already loaded; ``None`` loads the spec in the
        store's ``model`` attribute once and caches it.

    Returns
    -------
    QueryResult
        One entry per feature-map position (y, x) with its ``k`` hits, and
        the most-hit cells per grid size and most-hit images.

    Raises
    ------
    QueryError
        ``image`` is not a PIL image, ``k`` is out of range, or the model's
        layer width differs from the stored one.
    """
    if not isinstance(image, Image.Image):
        raise QueryError(f"image must be a PIL.Image.Image, got {type(image).__name__}; decode it with atlas.images.decode_image")
    _check_k(k)
    view = _store_view(store_path, layer)
    model = model or cached_model(view.model_spec)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    vectors, (height, width) = image_activations(model, rgb, view.layer)

    # Positions in the same row-major order as the vectors: (h·w, 2) of (y, x).
    grid_y, grid_x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    positions = np.stack([grid_y.ravel(), grid_x.ravel()], axis=1)
    return _search_view(store_path, view, vectors, k, positions, (height, width))
