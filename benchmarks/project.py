"""Projection benchmark: the whole `atlas project` stage against umap-learn's fit_transform on all rows.

Both sides get the same 200,000 clustered synthetic vectors of 112 dimensions
(as float16 in the store, read back as float32 for umap-learn) and the same
``n_neighbors``, ``min_dist`` and ``metric`` from ``config.yaml``. Numba's JIT
is warmed for both on a small set first. Quality is scikit-learn's
trustworthiness of each layout on the same seeded 5,000-row subsample.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from atlas.config import load_config
from atlas.project import run_project
from atlas.store import open_store
from benchmarks.common import machine
from benchmarks.synthetic import clustered_vectors, write_vector_store

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 200_000
N_TRUST = 5_000
TRUST_NEIGHBORS = 10


def _umap(vectors: np.ndarray, config) -> np.ndarray:
    import umap

    reducer = umap.UMAP(n_neighbors=config.n_neighbors, min_dist=config.min_dist, metric=config.metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reducer.fit_transform(vectors)


def _stage(store: Path, vectors: np.ndarray, config) -> tuple[np.ndarray, float, dict]:
    write_vector_store(store, vectors)
    start = time.perf_counter()
    info = run_project(store, config, force=True)
    seconds = time.perf_counter() - start
    layout = np.asarray(open_store(store)["projection/synthetic"][:])
    return layout, seconds, info


def trust(vectors: np.ndarray, layout: np.ndarray, sample: np.ndarray, metric: str) -> float:
    """Trustworthiness of ``layout`` on the rows ``sample``, neighbours by ``metric`` in the input space."""
    from sklearn.manifold import trustworthiness

    return float(trustworthiness(vectors[sample], layout[sample], n_neighbors=TRUST_NEIGHBORS, metric=metric))


def run(n_rows: int = N_ROWS) -> dict:
    """Time both sides and score both layouts."""
    config = load_config(ROOT / "config.yaml").project
    vectors = clustered_vectors(n_rows, seed=1).astype(np.float16).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-project-"))
    try:
        warm = clustered_vectors(5_000, seed=2).astype(np.float16).astype(np.float32)
        _umap(warm, config)
        _stage(work / "warm.zarr", warm, config)

        stage_layout, stage_seconds, info = _stage(work / "bench.zarr", vectors, config)
        start = time.perf_counter()
        umap_layout = _umap(vectors, config)
        umap_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sample = np.sort(np.random.default_rng(0).choice(n_rows, size=N_TRUST, replace=False))
    result = {
        "n_rows": n_rows,
        "config": config,
        "n_fit": info["n_fit"],
        "stage_seconds": stage_seconds,
        "umap_seconds": umap_seconds,
        "stage_trust": trust(vectors, stage_layout, sample, config.metric),
        "umap_trust": trust(vectors, umap_layout, sample, config.metric),
    }
    result["speedup"] = umap_seconds / stage_seconds
    return result


def report(result: dict) -> str:
    """Format the comparison as the report section."""
    config = result["config"]
    difference = result["stage_trust"] - result["umap_trust"]
    verdict = "meets" if result["speedup"] >= 5 and difference >= -0.01 else "misses"
    return f"""## Projection

`python -m benchmarks.run project`: {result['n_rows']:,} clustered synthetic vectors of 112 dimensions
(`benchmarks/synthetic.py`), `n_neighbors` {config.n_neighbors}, `min_dist` {config.min_dist}, `metric` {config.metric}
for both sides, Numba's JIT warmed on 5,000 other rows first.

| side | wall time (s) | trustworthiness |
| --- | ---: | ---: |
| `atlas project` stage (read, hash, UMAP fit on {result['n_fit']:,} rows, FAISS placement, write) | {result['stage_seconds']:.1f} | {result['stage_trust']:.4f} |
| umap-learn `fit_transform` on all rows, its other defaults | {result['umap_seconds']:.1f} | {result['umap_trust']:.4f} |

Speed-up {result['speedup']:.1f}×; trustworthiness of the stage minus umap-learn's: {difference:+.4f}
(goal: ≥ 5× faster, and no more than 0.01 lower: {verdict}).
Trustworthiness is `sklearn.manifold.trustworthiness` with {TRUST_NEIGHBORS} neighbours and the {config.metric} metric
on the same seeded {N_TRUST:,}-row subsample of both layouts. umap-learn runs without a
`random_state`, so it uses every core; the stage fits with its seed, on one thread.

Machine: {machine()}.
"""
