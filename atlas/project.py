"""2-D layout of the activations: UMAP on a sample, nearest-neighbour placement for the rest.

Steps of :func:`run_project`:

1. Hash every valid row, so identical vectors are laid out once and share a coordinate.
2. Fit UMAP (umap-learn, ``precomputed_knn`` from an exact FAISS search) on all
   distinct rows, or on a seeded sample of ``fit_sample`` of them.
3. Place each distinct row outside the sample at the inverse-distance weighted
   mean of its ``place_neighbors`` nearest sample rows' coordinates.
4. Clip each axis to the ``clip_percentile`` .. ``100 - clip_percentile``
   percentiles and scale it to [0, 1], as Lucid's ``normalize_layout`` does.

Departure from umap-learn's own ``transform``: placement is a plain weighted mean
of fitted coordinates, with no optimisation epochs, so it needs only FAISS
searches and streams in chunks of any size.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from atlas.config import ProjectConfig
from atlas.errors import StoreError
from atlas.index import normalize_rows
from atlas.store import (
    clear_stage,
    default_layer,
    iter_row_chunks,
    mark_stage,
    open_store,
    read_rows,
    require_stage,
    stage_done,
    valid_rows,
)

logger = logging.getLogger(__name__)

STAGE = "project"
DOWNSTREAM_STAGES = ("grid", "render")
CHUNK_ROWS = 65_536
# Rows per placement task: small enough that every core gets tasks on modest stores.
PLACE_CHUNK_ROWS = 16_384
KNN_QUERY_ROWS = 4_096
# UMAP's spectral initialisation requests n_components + 1 = 3 eigenvectors from scipy,
# which needs more than 3 points; below this many distinct rows PCA is used instead.
MIN_UMAP_ROWS = 8
# Smallest distance used as an inverse-distance weight, so a row that coincides
# with a fitted row takes that row's coordinate instead of dividing by zero.
MIN_PLACE_DISTANCE = 1e-9
# umap-learn 0.5.12 warnings that do not apply here: random_state forces one
# thread (wanted, for reproducible layouts), and without an NNDescent search
# index UMAP.transform is unavailable (placement does not use it).
_EXPECTED_UMAP_WARNINGS = (
    r"n_jobs value .* overridden",
    r"precomputed_knn\[2\] \(knn_search_index\)",
)


def hash_rows(values: np.ndarray) -> np.ndarray:
    """Hash each row's bytes to a uint64, so equal rows get equal hashes.

    Parameters
    ----------
    values
        Shape (n, C), any dtype.

    Returns
    -------
    np.ndarray
        Shape (n,) uint64. Different rows collide with probability about
        n² / 2**65 (splitmix64 mixing of each 8-byte word).
    """
    data = np.ascontiguousarray(values)
    n_rows = data.shape[0]
    raw = data.view(np.uint8).reshape(n_rows, data.itemsize * int(np.prod(data.shape[1:])))
    padding = (-raw.shape[1]) % 8
    if padding:
        raw = np.concatenate([raw, np.zeros((n_rows, padding), np.uint8)], axis=1)
    words = raw.view(np.uint64)
    hashes = np.full(n_rows, 0x9E3779B97F4A7C15, np.uint64)
    for column in range(words.shape[1]):
        hashes = _splitmix64(hashes ^ words[:, column])
    return hashes


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # Finaliser of Steele, Lea and Flood's SplitMix64; uint64 arithmetic wraps modulo 2**64.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _prepare(values: np.ndarray, metric: str) -> np.ndarray:
    vectors = np.ascontiguousarray(values, dtype=np.float32)
    return normalize_rows(vectors) if metric == "cosine" else vectors


def _exact_index(vectors: np.ndarray, metric: str) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(vectors.shape[1])
    if faiss.get_num_gpus() > 0:
        # The exact kNN graph costs O(n² · C); GPUs take it. NOTE: not exercised by the CPU test suite.
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index


def _distances(index: faiss.Index, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Search ``index`` and return (distances, neighbours), both (q, k), in UMAP's conventions.

    umap-learn's cosine distance is ``1 - cos``; its euclidean distance is the
    plain (not squared) L2 norm.
    """
    scores, neighbours = index.search(queries, k)
    if metric == "cosine":
        distances = np.clip(1.0 - scores, 0.0, 2.0)
    else:
        distances = np.sqrt(np.maximum(scores, 0.0))
    return distances.astype(np.float32), neighbours.astype(np.int64)


def knn_graph(vectors: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Return the exact k-nearest-neighbour graph of ``vectors`` for ``umap.UMAP(precomputed_knn=...)``.

    Parameters
    ----------
    vectors
        Shape (n, C) float32, L2-normalised when ``metric`` is cosine.
    k
        Neighbours per row, counting the row itself; ``k <= n``.

    Returns
    -------
    indices, distances
        Shapes (n, k), int64 and float32. Column 0 is the row itself at
        distance 0, as umap-learn expects, also where another row has the
        same direction.

    Notes
    -----
    The search is exact, so its cost grows as n² · C; ``fit_sample`` bounds n.
    """
    index = _exact_index(vectors, metric)
    n_rows = len(vectors)
    indices = np.empty((n_rows, k), np.int64)
    distances = np.empty((n_rows, k), np.float32)
    for start in range(0, n_rows, KNN_QUERY_ROWS):
        stop = min(start + KNN_QUERY_ROWS, n_rows)
        found_distances, found = _distances(index, vectors[start:stop], k, metric)
        own = np.arange(start, stop)[:, None]
        # Drop the row itself wherever it appears, else the farthest neighbour, then put it first.
        keep = found != own
        no_self = keep.all(axis=1)
        keep[no_self, -1] = False
        indices[start:stop, 0] = own[:, 0]
        distances[start:stop, 0] = 0.0
        indices[start:stop, 1:] = found[keep].reshape(stop - start, k - 1)
        distances[start:stop, 1:] = found_distances[keep].reshape(stop - start, k - 1)
    return indices, distances


def _fit_umap(vectors: np.ndarray, config: ProjectConfig) -> tuple[np.ndarray, int]:
    import umap

    n_rows = len(vectors)
    n_neighbors = min(config.n_neighbors, n_rows - 1)
    if n_neighbors < config.n_neighbors:
        logger.warning(
            "only %d distinct rows to fit, so UMAP uses n_neighbors=%d instead of %d; "
            "the layout shows only local structure",
            n_rows, n_neighbors, config.n_neighbors,
        )
    indices, distances = knn_graph(vectors, n_neighbors, config.metric)
    reducer = umap.UMAP(
        n_neighbors=n_neighbors,
        n_components=2,
        metric=config.metric,
        min_dist=config.min_dist,
        n_epochs=config.n_epochs,
        random_state=config.seed,
        precomputed_knn=(indices, distances),
    )
    with warnings.catch_warnings():
        for pattern in _EXPECTED_UMAP_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        embedding = reducer.fit_transform(vectors)
    return np.asarray(embedding, dtype=np.float64), n_neighbors


def _fit_pca(vectors: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    n_rows, channels = vectors.shape
    layout = np.zeros((n_rows, 2))
    n_components = min(2, n_rows, channels)
    if n_rows > 1:
        layout[:, :n_components] = PCA(n_components=n_components, svd_solver="full").fit_transform(vectors)
    return layout


def fit_layout(vectors: np.ndarray, config: ProjectConfig) -> tuple[np.ndarray, dict]:
    """Lay out distinct vectors in 2-D: UMAP, or PCA below ``MIN_UMAP_ROWS`` rows.

    Parameters
    ----------
    vectors
        Shape (n, C) float32, L2-normalised when ``config.metric`` is cosine.

    Returns
    -------
    layout, info
        Layout of shape (n, 2) float64, unscaled; ``info`` has ``method`` and
        ``n_neighbors``.
    """
    if len(vectors) < MIN_UMAP_ROWS:
        logger.warning(
            "only %d distinct rows; UMAP needs at least %d, so the layout is a 2-D PCA",
            len(vectors), MIN_UMAP_ROWS,
        )
        return _fit_pca(vectors), {"method": "pca", "n_neighbors": 0}
    layout, n_neighbors = _fit_umap(vectors, config)
    return layout, {"method": "umap", "n_neighbors": n_neighbors}


def place_rows(
    index: faiss.Index, fitted_layout: np.ndarray, queries: np.ndarray, n_neighbors: int, metric: str
) -> np.ndarray:
    """Place rows at the inverse-distance weighted mean of their nearest fitted rows.

    Parameters
    ----------
    index
        Exact index over the fitted vectors, in the same order as ``fitted_layout``.
    fitted_layout
        Shape (n_fit, 2).
    queries
        Shape (q, C) float32, prepared like the fitted vectors.

    Returns
    -------
    np.ndarray
        Shape (q, 2) float64.
    """
    k = min(n_neighbors, index.ntotal)
    distances, neighbours = _distances(index, queries, k, metric)
    weights = 1.0 / np.maximum(distances.astype(np.float64), MIN_PLACE_DISTANCE)
    weights /= weights.sum(axis=1, keepdims=True)
    # (q, k, 1) weights times (q, k, 2) neighbour coordinates, summed over k.
    return np.einsum("qk,qkd->qd", weights, fitted_layout[neighbours])


def _place_chunk(activations, rows: np.ndarray, index: faiss.Index, fitted: np.ndarray, config: ProjectConfig) -> np.ndarray:
    values = read_rows(activations, rows)
    return place_rows(index, fitted, _prepare(values, config.metric), config.place_neighbors, config.metric)


def place_in_parallel(
    activations, rows: np.ndarray, index: faiss.Index, fitted: np.ndarray, config: ProjectConfig
) -> np.ndarray:
    """Place store rows from their nearest fitted rows, one Dask task per chunk of rows.

    Each task reads its ``PLACE_CHUNK_ROWS`` rows from the store and searches the
    index with one FAISS thread; Dask's threaded scheduler runs one task per
    core, so at most that many chunks are in memory at once.

    Parameters
    ----------
    activations
        The layer's (N, C) activation array in the store.
    rows
        Sorted store rows to place, shape (q,).
    index, fitted
        Exact index over the fitted vectors and their layout, shape (n_fit, 2).

    Returns
    -------
    np.ndarray
        Shape (q, 2) float64, in the order of ``rows``.
    """
    import dask
    from dask.callbacks import Callback

    starts = range(0, len(rows), PLACE_CHUNK_ROWS)
    tasks = [
        dask.delayed(_place_chunk, pure=False)(activations, rows[start : start + PLACE_CHUNK_ROWS], index, fitted, config)
        for start in starts
    ]
    workers = os.cpu_count() or 1
    logger.info("placing %d rows in %d chunks on %d threads", len(rows), len(tasks), workers)
    threads = faiss.omp_get_max_threads()
    # One FAISS thread per task: the parallelism comes from the tasks, not from OpenMP inside each.
    faiss.omp_set_num_threads(1)
    bar = tqdm(total=len(tasks), desc="place rows", unit="chunk", disable=None)
    try:
        with Callback(posttask=lambda *_args: bar.update(1)):
            parts = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    finally:
        faiss.omp_set_num_threads(threads)
        bar.close()
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def scale_layout(layout: np.ndarray, clip_percentile: float) -> np.ndarray:
    """Clip each axis to its percentiles and scale it to [0, 1].

    An axis with no spread (one point, or all points equal) maps to 0.5.

    Parameters
    ----------
    layout
        Shape (n, 2).
    clip_percentile
        Lower percentile; the upper one is ``100 - clip_percentile``.

    Returns
    -------
    np.ndarray
        Shape (n, 2) float32 in [0, 1].
    """
    if len(layout) == 0:
        return np.zeros((0, 2), np.float32)
    low = np.percentile(layout, clip_percentile, axis=0)
    high = np.percentile(layout, 100.0 - clip_percentile, axis=0)
    span = high - low
    flat = span <= 0
    scaled = (np.clip(layout, low, high) - low) / np.where(flat, 1.0, span)
    scaled[:, flat] = 0.5
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _distinct_rows(activations, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (finite rows, distinct rows, position of each finite row's twin in the distinct rows)."""
    hashes, finite_parts = [], []
    total = -(-len(rows) // CHUNK_ROWS)
    for chunk_rows, values in tqdm(
        iter_row_chunks(activations, rows, CHUNK_ROWS), total=total, desc="hash rows", unit="chunk", disable=None
    ):
        finite = np.isfinite(values).all(axis=1)
        finite_parts.append(finite)
        hashes.append(hash_rows(values[finite]))
    finite = np.concatenate(finite_parts) if finite_parts else np.zeros(0, bool)
    if not finite.all():
        logger.warning("%d rows marked valid contain NaN or inf values and are left out of the layout", int((~finite).sum()))
    rows = rows[finite]
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)

    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first_sorted = np.sort(first)
    # For each finite row: index of its first identical row in the sorted distinct list.
    twin = np.searchsorted(first_sorted, first[inverse.ravel()])
    return rows, rows[first_sorted], twin


def run_project(store_path: str | Path, config: ProjectConfig, layer: str | None = None, force: bool = False) -> dict:
    """Compute the 2-D layout of one layer's valid activations and write ``projection/<layer>``.

    Parameters
    ----------
    store_path
        A feature store with a completed ``extract`` stage.
    config
        ``n_neighbors``, ``min_dist``, ``metric``, ``n_epochs`` and ``seed``
        for UMAP; ``fit_sample`` (distinct rows UMAP is fitted on),
        ``place_neighbors`` and ``clip_percentile``.
    layer
        Layer to lay out; ``None`` means the store's first layer.
    force
        Recompute even when the stage is complete. This also clears the
        ``grid`` and ``render`` stages of the layer, which depend on the layout.

    Returns
    -------
    dict
        The stage record: ``method`` (umap or pca), ``n`` (rows laid out),
        ``n_distinct``, ``n_fit``, ``n_neighbors``, ``seconds``, ``done``, ``finished``.

    Raises
    ------
    StageNotReadyError
        Extraction has not finished.
    StoreError
        The store has no valid rows.
    """
    started = time.perf_counter()
    group = open_store(store_path, mode="r+")
    layer = default_layer(group, layer)
    require_stage(group, "extract", path=store_path)
    if stage_done(group, STAGE, layer) and not force:
        logger.info("layout of layer %s is already computed; pass --force (force=True in Python) to recompute", layer)
        return dict(group.attrs["stages"][f"{STAGE}:{layer}"])
    for stage in (STAGE, *DOWNSTREAM_STAGES):
        clear_stage(group, stage, layer)

    activations = group[f"activations/{layer}"]
    n_total = int(activations.shape[0])
    rows, distinct, twin = _distinct_rows(activations, valid_rows(group))
    if len(rows) == 0:
        raise StoreError(f"store {store_path} has no valid rows in layer {layer} to lay out; check `atlas info {store_path}`")

    # Step 1: fit on all distinct rows, or on a seeded sample of them.
    rng = np.random.default_rng(config.seed)
    if len(distinct) > config.fit_sample:
        fit_positions = np.sort(rng.choice(len(distinct), size=config.fit_sample, replace=False))
    else:
        fit_positions = np.arange(len(distinct))
    logger.info(
        "laying out %d rows (%d distinct) of layer %s, fitting on %d", len(rows), len(distinct), layer, len(fit_positions)
    )
    fit_vectors = _prepare(read_rows(activations, distinct[fit_positions]), config.metric)
    fitted, fit_info = fit_layout(fit_vectors, config)

    # Step 2: place the distinct rows that were not fitted, chunk by chunk.
    layout = np.empty((len(distinct), 2))
    layout[fit_positions] = fitted
    rest = np.setdiff1d(np.arange(len(distinct)), fit_positions, assume_unique=True)
    if len(rest):
        index = _exact_index(fit_vectors, config.metric)
        layout[rest] = place_in_parallel(activations, distinct[rest], index, fitted, config)

    # Step 3: copy each distinct row's coordinate to its duplicates, then scale to [0, 1].
    coordinates = np.full((n_total, 2), np.nan, np.float32)
    coordinates[rows] = scale_layout(layout[twin], config.clip_percentile)
    row_chunk = int(activations.chunks[0])
    array = group.create_array(
        f"projection/{layer}", shape=(n_total, 2), chunks=(row_chunk, 2), dtype="float32", fill_value=np.nan,
        overwrite=True,
    )
    array[:] = coordinates
    array.attrs["description"] = "layout (x, y) in [0, 1]; NaN for invalid rows"

    info = {
        **fit_info,
        "n": int(len(rows)),
        "n_distinct": int(len(distinct)),
        "n_fit": int(len(fit_positions)),
        "metric": config.metric,
        "seconds": round(time.perf_counter() - started, 3),
    }
    mark_stage(group, STAGE, layer, **info)
    logger.info("laid out %d rows of layer %s with %s in %.1f s", info["n"], layer, info["method"], info["seconds"])
    return dict(group.attrs["stages"][f"{STAGE}:{layer}"])
