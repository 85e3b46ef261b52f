"""Scale benchmark: index, project and grid on a 2,000,000-row store, wall time and peak memory.

The store is ``stores/bench-2m.zarr`` from the ``extract_scale`` benchmark,
with real EfficientNet-Lite0 activations. Without it, a store of 2,000,000
clustered synthetic vectors is written instead and the report names it. Each
stage runs in a fresh process, so its peak resident memory is its own.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from atlas.config import load_config
from atlas.extract import peak_memory_mib
from atlas.store import open_store, stage_done
from benchmarks.common import machine
from benchmarks.extract_scale import STORE

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("index", "project", "grid")
N_SYNTHETIC = 2_000_000


def _run_stage(stage: str, store: str, layer: str) -> tuple[float, dict, float]:
    """Run one stage in this (fresh) process; return (seconds, stage record, peak MiB)."""
    from atlas.cli import run_stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(ROOT / "config.yaml", store=store, overrides=[f"layer={layer}"])
    start = time.perf_counter()
    record = run_stage(stage, config, force=True)
    seconds = time.perf_counter() - start
    return seconds, record, peak_memory_mib()


def run() -> dict:
    """Run the three stages on the 2M-row store, each in its own process."""
    work = None
    if (STORE / "zarr.json").exists() and stage_done(open_store(STORE), "extract"):
        store, source = STORE, "real"
    else:
        from benchmarks.synthetic import clustered_vectors, write_vector_store

        work = Path(tempfile.mkdtemp(prefix="atlas-bench-scale-"))
        store, source = work / "synthetic.zarr", "synthetic"
        write_vector_store(store, clustered_vectors(N_SYNTHETIC))
    group = open_store(store)
    layer = list(group.attrs["layers"])[0]
    n_rows = int(group[f"activations/{layer}"].shape[0])
    results = {}
    try:
        for stage in STAGES:
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results[stage] = pool.submit(_run_stage, stage, str(store), layer).result()
            logger.info("%s: %.0f s, peak %.0f MiB", stage, results[stage][0], results[stage][2])
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return {"source": source, "n_rows": n_rows, "layer": layer, "stages": results}


def report(result: dict) -> str:
    """Format the stage timings and memory as the report section."""
    stages = result["stages"]
    rows = "\n".join(
        f"| {stage} | {seconds:.0f} | {peak:,.0f} | {_detail(stage, record)} |"
        for stage, (seconds, record, peak) in stages.items()
    )
    total = sum(seconds for seconds, _, _ in stages.values())
    data = (
        f"`stores/bench-2m.zarr` from the extraction-at-scale run: {result['n_rows']:,} EfficientNet-Lite0 "
        f"`{result['layer']}` activations of 112 channels"
        if result["source"] == "real"
        else f"{result['n_rows']:,} clustered synthetic vectors of 112 dimensions (no `stores/bench-2m.zarr`)"
    )
    return f"""## Scale: index, project and grid on two million rows

`python -m benchmarks.run scale`: {data}, `config.yaml` settings. Each stage runs in a fresh
process; its peak resident memory is that process's `ru_maxrss`.

| stage | wall time (s) | peak memory (MiB) | what it built |
| --- | ---: | ---: | --- |
{rows}
| **total** | **{total:.0f}** | | |

The activations alone are {result['n_rows'] * 112 * 2 / 2**20:,.0f} MiB as float16 and {result['n_rows'] * 112 * 4 / 2**20:,.0f} MiB as float32.

Machine: {machine()}.
"""


def _detail(stage: str, record: dict) -> str:
    if stage == "index":
        return f"`{record['factory']}`, {record['n']:,} vectors"
    if stage == "project":
        return f"UMAP on {record['n_fit']:,} rows, {record['n'] - record['n_fit']:,} placed"
    return ", ".join(f"{size}: {count} cells" for size, count in record.get("n_nonempty", {}).items()) or "grids"
