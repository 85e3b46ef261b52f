"""FAISS index over L2-normalised activations, searched by inner product (cosine similarity).

The index type follows the number of valid rows N (see :func:`choose_factory`):
exact ``IndexFlatIP`` for small stores, IVF-Flat above ``exact_below`` and
IVF-PQ above ``pq_above``. Index IDs are store row numbers, so a search returns
rows that can be looked up in ``samples/*`` and ``projection/<layer>`` directly.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from atlas.config import IndexConfig
from atlas.errors import ConfigError, QueryError, StoreError
from atlas.store import (
    clear_stage,
    default_layer,
    iter_row_chunks,
    mark_stage,
    open_store,
    read_rows,
    require_stage,
    sidecar_path,
    stage_done,
    valid_rows,
)

logger = logging.getLogger(__name__)

STAGE = "index"
ADD_CHUNK_ROWS = 65_536
# FAISS k-means warns below 39 training points per centroid (faiss/Clustering.h,
# min_points_per_centroid), so nlist is capped at n_train // 39.
MIN_POINTS_PER_LIST = 39
# Product quantizer codebooks have 2**nbits entries; 8 bits is FAISS's default.
PQ_BITS = 8
PQ_DIMS_PER_CODE = 4

_cache_lock = threading.Lock()
_index_cache: dict[tuple[str, str], tuple[int, faiss.Index]] = {}


def index_path(store_path: str | Path, layer: str) -> Path:
    """Return the path of the sidecar file with the index of ``layer``."""
    return sidecar_path(store_path, f"index-{layer}.faiss")


def as_query_matrix(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Convert vectors to the C-contiguous float32 (q, C) matrix FAISS expects.

    Accepts any float dtype and memory order and a single vector of shape (C,).
    The result is always a new array, so normalising it in place never
    changes the caller's data.

    Raises
    ------
    QueryError
        The input is not 1-D or 2-D, has the wrong width, or contains NaN or inf.
    """
    array = np.asarray(vectors)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise QueryError(f"query vectors must have shape (q, C), got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise QueryError(f"query vectors have {array.shape[1]} channels but the index contains {dim}-channel vectors")
    if not np.issubdtype(array.dtype, np.number):
        raise QueryError(f"query vectors must be numeric, got dtype {array.dtype}")
    out = np.array(array, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        raise QueryError("query vectors contain NaN or inf values; pass finite activations")
    return out


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of a C-contiguous float32 matrix in place and return it.

    All-zero rows stay zero (FAISS skips rows of norm 0).
    """
    if len(vectors):
        faiss.normalize_L2(vectors)
    return vectors


def nlist_for(n_rows: int, n_train: int) -> int:
    """Return the IVF list count: about 4·sqrt(N), with >= 39 training points per list."""
    target = int(round(4 * math.sqrt(max(n_rows, 1))))
    return max(1, min(target, n_train // MIN_POINTS_PER_LIST))


def _pq_shape(dim: int, n_train: int) -> tuple[int, int]:
    """Return (sub-quantizers m, bits per code) for IVF-PQ; m divides ``dim``."""
    target = max(1, dim // PQ_DIMS_PER_CODE)
    m = max(divisor for divisor in range(1, target + 1) if dim % divisor == 0)
    # Each codebook of 2**nbits centroids needs MIN_POINTS_PER_LIST points per centroid.
    nbits = PQ_BITS
    while nbits > 1 and n_train < MIN_POINTS_PER_LIST * 2**nbits:
        nbits -= 1
    return m, nbits


def choose_factory(n_rows: int, dim: int, config: IndexConfig) -> tuple[str, str]:
    """Pick the index type for ``n_rows`` vectors of width ``dim``.

    Returns
    -------
    kind, factory
        ``kind`` is ``flat``, ``ivf``, ``ivfpq`` or ``custom``; ``factory`` is
        the FAISS index-factory string (``Flat``, ``IVF512,Flat``, ``IVF4096,PQ28x8``).
    """
    if config.factory:
        return "custom", config.factory
    if n_rows < config.exact_below:
        return "flat", "Flat"
    n_train = min(config.train_size, n_rows)
    nlist = nlist_for(n_rows, n_train)
    if n_rows > config.pq_above:
        m, nbits = _pq_shape(dim, n_train)
        return "ivfpq", f"IVF{nlist},PQ{m}x{nbits}"
    return "ivf", f"IVF{nlist},Flat"


def create_index(dim: int, factory: str) -> faiss.Index:
    """Create an empty inner-product index that accepts store rows as IDs.

    IVF indexes store IDs natively; every other type is wrapped in
    ``IndexIDMap2``.

    Raises
    ------
    ConfigError
        FAISS cannot parse ``factory``.
    """
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ConfigError(
            f"index.factory={factory!r} is not a valid FAISS index-factory string "
            f"({str(error).strip().splitlines()[-1]}); try 'Flat', 'IVF1024,Flat' or 'IVF1024,PQ16'"
        ) from error
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def _train(index: faiss.Index, vectors: np.ndarray) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and faiss.get_num_gpus() > 0:
        # k-means over the coarse centroids is the costly part of training; run its
        # assignment step on every GPU. NOTE: not exercised by the CPU test suite.
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        logger.info("training the IVF quantizer on %d GPU(s)", faiss.get_num_gpus())
    index.train(vectors)
    if ivf is not None:
        ivf.clustering_index = None


def training_rows(rows: np.ndarray, config: IndexConfig) -> np.ndarray:
    """Return the seeded, sorted sample of ``config.train_size`` rows that an index is trained on."""
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(rows, size=min(config.train_size, len(rows)), replace=False))


def train_index(index: faiss.Index, training: np.ndarray, config: IndexConfig) -> None:
    """Train ``index`` on raw activation rows and set its ``nprobe``.

    Parameters
    ----------
    training
        Shape (n, C), any float dtype; rows are L2-normalised on a copy and
        rows with NaN or inf are dropped.
    """
    vectors = normalize_rows(np.array(training, dtype=np.float32, order="C", copy=True))
    vectors = np.ascontiguousarray(vectors[np.isfinite(vectors).all(axis=1)])
    if not index.is_trained:
        _train(index, vectors)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(config.nprobe, ivf.nlist)


def _write_atomically(index: faiss.Index, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    faiss.write_index(index, str(partial))
    os.replace(partial, path)


def build_index(store_path: str | Path, config: IndexConfig, layer: str | None = None, force: bool = False) -> dict:
    """Build the FAISS index of one layer's valid activations and save it beside the store.

    Vectors are L2-normalised, so inner product is cosine similarity. The
    index is trained on a seeded sample of ``config.train_size`` rows, then
    filled chunk by chunk from the store, so memory stays bounded by the
    chunk and the index itself.

    Parameters
    ----------
    store_path
        A local feature store with a completed ``extract`` stage.
    config
        Index settings: ``factory`` (FAISS string, overrides the automatic
        choice), ``exact_below``, ``pq_above``, ``train_size``, ``nprobe``, ``seed``.
    layer
        Layer to index; ``None`` means the store's first layer.
    force
        Rebuild even when the stage is already complete.

    Returns
    -------
    dict
        The stage record: ``type`` (flat, ivf, ivfpq or custom), ``factory``,
        ``n`` (rows indexed), ``dim``, ``path``, ``seconds``, ``done``, ``finished``.

    Raises
    ------
    StageNotReadyError
        Extraction has not finished.
    ConfigError
        ``config.factory`` is not a valid FAISS string.
    """
    started = time.perf_counter()
    group = open_store(store_path, mode="r+")
    layer = default_layer(group, layer)
    require_stage(group, "extract", path=store_path)
    if stage_done(group, STAGE, layer) and not force:
        logger.info("index for layer %s is already built; pass --force (force=True in Python) to rebuild", layer)
        return dict(group.attrs["stages"][f"{STAGE}:{layer}"])
    clear_stage(group, STAGE, layer)

    activations = group[f"activations/{layer}"]
    rows = valid_rows(group)
    n_rows, dim = len(rows), int(activations.shape[1])
    kind, factory = choose_factory(n_rows, dim, config)
    logger.info("building %s index (%s) over %d rows of layer %s", kind, factory, n_rows, layer)
    index = create_index(dim, factory)

    # Step 1: train on a seeded sample of rows, read in sorted order for contiguous blocks.
    if not index.is_trained:
        if n_rows == 0:
            raise StoreError(f"store {store_path} has no valid rows to train a {factory} index on; use a Flat index")
        training = read_rows(activations, training_rows(rows, config), dtype=np.float32)
        train_index(index, training, config)
    ivf = faiss.try_extract_index_ivf(index)

    # Step 2: add every valid row, chunk by chunk, with its store row as ID.
    n_skipped = 0
    chunks = iter_row_chunks(activations, rows, ADD_CHUNK_ROWS)
    total = -(-n_rows // ADD_CHUNK_ROWS)
    for chunk_rows, values in tqdm(chunks, total=total, desc=f"index {layer}", unit="chunk", disable=None):
        vectors = np.ascontiguousarray(values, dtype=np.float32)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            # The extract stage flags NaN/inf rows invalid; this guards stores written by other tools.
            n_skipped += int((~finite).sum())
            vectors, chunk_rows = np.ascontiguousarray(vectors[finite]), chunk_rows[finite]
        index.add_with_ids(normalize_rows(vectors), chunk_rows.astype(np.int64))
        logger.debug("added %d rows up to row %d", len(chunk_rows), int(chunk_rows[-1]) if len(chunk_rows) else -1)
    if n_skipped:
        logger.warning("skipped %d rows marked valid that contain NaN or inf values", n_skipped)

    path = index_path(store_path, layer)
    _write_atomically(index, path)
    info = {
        "type": kind,
        "factory": factory,
        "n": int(index.ntotal),
        "dim": dim,
        "path": path.name,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if ivf is not None:
        info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    mark_stage(group, STAGE, layer, **info)
    logger.info("indexed %d rows of layer %s in %.1f s (%s)", info["n"], layer, info["seconds"], factory)
    return dict(group.attrs["stages"][f"{STAGE}:{layer}"])


def load_index(store_path: str | Path, layer: str | None = None) -> faiss.Index:
    """Load the saved index of ``layer``, cached per path, layer and file modification time.

    The same object is returned to every caller until the file changes.
    FAISS CPU indexes allow concurrent searches.

    Raises
    ------
    StageNotReadyError
        The index stage has not run for this layer.
    StoreError
        The index file is missing or unreadable.
    """
    group = open_store(store_path, mode="r")
    layer = default_layer(group, layer)
    require_stage(group, STAGE, layer, path=store_path)
    path = index_path(store_path, layer)
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError as error:
        raise StoreError(f"index file {path} not found; rebuild it with `atlas index {store_path} --force`") from error

    key = (str(Path(store_path).resolve()), layer)
    with _cache_lock:
        cached = _index_cache.get(key)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise StoreError(f"cannot read index file {path} ({error}); rebuild it with `atlas index --force`") from error
        _index_cache[key] = (mtime, index)
    logger.info("loaded %s index of layer %s with %d vectors from %s", type(index).__name__, layer, index.ntotal, path)
    return index


def search(
    index: faiss.Index, vectors: np.ndarray, k: int, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Find the ``k`` indexed rows most similar to each query vector.

    Parameters
    ----------
    index
        An index from :func:`load_index` or :func:`create_index`.
    vectors
        Queries, shape (q, C) or (C,), any float dtype or memory order; they
        are L2-normalised on a copy.
    k
        Neighbours per query.
    nprobe
        IVF lists to visit; ``None`` keeps the value saved with the index.
        Ignored by non-IVF indexes.

    Returns
    -------
    scores, rows
        Shapes (q, k), float32 cosine similarity and int64 store rows, best
        first. Missing neighbours (an empty index, or fewer than ``k``
        vectors) have row -1 and score -inf.

    Raises
    ------
    QueryError
        ``k`` < 1, or the vectors have the wrong shape or non-finite values.
    """
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    queries = normalize_rows(as_query_matrix(vectors, index.d))
    if index.ntotal == 0 or len(queries) == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)

    params = None
    ivf = faiss.try_extract_index_ivf(index)
    if nprobe is not None and ivf is not None:
        if nprobe < 1:
            raise QueryError(f"nprobe must be at least 1, got {nprobe}")
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, ivf.nlist))
    scores, rows = index.search(queries, k, params=params)
    scores = np.asarray(scores, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    # FAISS pads missing results with -FLT_MAX for inner product.
    scores[rows < 0] = -np.inf
    return scores, rows
