"""Index benchmark: recall@10 and queries/s of the stage's FAISS index against NumPy brute force.

Two data sets, each measured side by side in one run:

- the demo store (``stores/demo.zarr``, EfficientNet-Lite0 ``blocks.4``), built
  with ``make demo`` when missing;
- 1,000,000 clustered synthetic vectors of 112 dimensions.

For each, 1,000 rows are held out as queries and the rest are indexed exactly
as ``atlas index`` does (:func:`atlas.index.choose_factory`, a seeded training
sample, row IDs). Brute force is a NumPy matrix product of the normalised
queries with every normalised row, in blocks, then ``argpartition``. Its
result is also the ground truth for recall.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np

from atlas.config import IndexConfig, load_config
from atlas.index import choose_factory, create_index, normalize_rows, search, train_index
from atlas.store import open_store, read_rows, valid_rows
from benchmarks.common import machine
from benchmarks.synthetic import clustered_vectors

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEMO_STORE = ROOT / "stores" / "demo.zarr"
K = 10
N_QUERIES = 1_000
BRUTE_BLOCK = 100
NPROBE_SWEEP = (4, 8, 16, 32, 64)
# A search of 1,000 queries can take 50 ms, so each timing is the median of several runs.
REPEATS = 5


def demo_vectors() -> np.ndarray:
    """Return the demo store's valid activations as float32, building the store when missing."""
    if not (DEMO_STORE / "zarr.json").exists():
        from atlas.cli import run_stage

        logger.info("extracting %s for the benchmark (about 2 minutes)", DEMO_STORE)
        run_stage("extract", load_config(ROOT / "config.yaml", store=str(DEMO_STORE)), force=False)
    group = open_store(DEMO_STORE)
    layer = next(iter(group.attrs["layer_shapes"]))
    return read_rows(group[f"activations/{layer}"], valid_rows(group), dtype=np.float32)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-``k`` rows by inner product with NumPy; return (rows (q, k), seconds)."""
    start = time.perf_counter()
    found = np.empty((len(queries), k), np.int64)
    for first in range(0, len(queries), BRUTE_BLOCK):
        scores = queries[first : first + BRUTE_BLOCK] @ base.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        found[first : first + BRUTE_BLOCK] = np.take_along_axis(top, order, axis=1)
    return found, time.perf_counter() - start


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k rows that ``found`` contains."""
    hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found, truth)]
    return float(np.mean(hits)) / truth.shape[1]


def _timed_search(index: faiss.Index, queries: np.ndarray, nprobe: int | None) -> tuple[np.ndarray, float]:
    """Search ``REPEATS`` times; return the rows found and the median seconds."""
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        _, rows = search(index, queries, K, nprobe=nprobe)
        seconds.append(time.perf_counter() - start)
    return rows, float(np.median(seconds))


def measure(name: str, vectors: np.ndarray, config: IndexConfig, seed: int = 0) -> dict:
    """Hold out queries, build the stage's index over the rest and compare it with brute force."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(vectors))
    queries = normalize_rows(np.ascontiguousarray(vectors[order[:N_QUERIES]]))
    base_rows = np.sort(order[N_QUERIES:])
    base = normalize_rows(np.ascontiguousarray(vectors[base_rows]))

    kind, factory = choose_factory(len(base), base.shape[1], config)
    start = time.perf_counter()
    index = create_index(base.shape[1], factory)
    train_rows = np.sort(rng.choice(len(base), size=min(config.train_size, len(base)), replace=False))
    train_index(index, base[train_rows], config)
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    build_seconds = time.perf_counter() - start

    timings = [brute_force(base, queries, K) for _ in range(3)]
    truth, brute_seconds = timings[0][0], float(np.median([seconds for _, seconds in timings]))
    search(index, queries, K)  # warm-up
    found, index_seconds = _timed_search(index, queries, None)

    sweep = []
    if faiss.try_extract_index_ivf(index) is not None:
        for nprobe in NPROBE_SWEEP:
            rows, seconds = _timed_search(index, queries, nprobe)
            sweep.append({"nprobe": nprobe, "recall": recall_at_k(rows, truth), "qps": N_QUERIES / seconds})
    result = {
        "name": name,
        "n": len(base),
        "dim": base.shape[1],
        "kind": kind,
        "factory": factory,
        "nprobe": config.nprobe if sweep else None,
        "build_seconds": build_seconds,
        "recall": recall_at_k(found, truth),
        "brute_qps": N_QUERIES / brute_seconds,
        "index_qps": N_QUERIES / index_seconds,
        "sweep": sweep,
    }
    result["speedup"] = result["index_qps"] / result["brute_qps"]
    logger.info("%s: %s recall@10 %.3f, %.0f vs %.0f queries/s", name, factory, result["recall"], result["index_qps"], result["brute_qps"])
    return result


def run() -> dict:
    """Measure the demo store and 1,000,000 synthetic vectors with the shipped index settings."""
    config = load_config(ROOT / "config.yaml").index
    results = [measure("demo store", demo_vectors(), config)]
    results.append(measure("synthetic, clustered", clustered_vectors(1_000_000 + N_QUERIES), config))
    return {"results": results, "config": config}


def report(result: dict) -> str:
    """Format the measurements as the report section."""
    rows = []
    for item in result["results"]:
        verdict = "meets" if item["recall"] >= 0.95 and item["speedup"] >= 20 else "misses"
        probe = "" if item["nprobe"] is None else f", nprobe {item['nprobe']}"
        rows.append(
            f"| {item['name']} | {item['n']:,} × {item['dim']} | `{item['factory']}`{probe} | {item['build_seconds']:.1f} | "
            f"{item['recall']:.3f} | {item['index_qps']:,.0f} | {item['brute_qps']:,.0f} | "
            f"{item['speedup']:.1f}× | {verdict} |"
        )
    sweeps = []
    for item in result["results"]:
        if item["sweep"]:
            cells = ", ".join(f"{s['nprobe']}: {s['recall']:.3f} at {s['qps']:,.0f}/s" for s in item["sweep"])
            sweeps.append(f"- {item['name']}, nprobe: recall@10 at queries/s: {cells}.")
    sweep_text = "\n".join(sweeps)
    config = result["config"]
    return f"""## Index

`python -m benchmarks.run index`: the index `atlas index` builds with the shipped settings
(`exact_below` {config.exact_below:,}, `pq_above` {config.pq_above:,}, `train_size` {config.train_size:,}, `nprobe` {config.nprobe}),
against NumPy brute force (normalised matrix product in blocks of {BRUTE_BLOCK} queries, then `argpartition`),
which is also the ground truth. {N_QUERIES:,} held-out rows are the queries, k = {K}; both sides use
every core. Times are medians of {REPEATS} index searches and of 3 brute-force passes. Goal: recall@10 ≥ 0.95 at ≥ 20× the brute-force queries/s.

| data | rows indexed | index | build (s) | recall@10 | index queries/s | brute force queries/s | speed-up | goal |
| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |
{chr(10).join(rows)}

{sweep_text}

The synthetic set is a Gaussian mixture of 1,000 clusters with Zipf-like sizes and
spreads between 0.3 and 0.9 of the centres' scale (`benchmarks/synthetic.py`).

Machine: {machine()}.
"""
