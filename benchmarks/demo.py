"""Wall time and peak memory of each stage of the demo build (`atlas demo --no-serve`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from atlas.cli import STAGE_ORDER, run_stage
from atlas.config import load_config
from atlas.inspect import store_info
from benchmarks.common import machine, peak_rss_mib


def run(store: str | None = None) -> dict:
    """Build the demo atlas from scratch into a temporary store and time each stage."""
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-demo-"))
    try:
        config = load_config(Path(__file__).resolve().parents[1] / "config.yaml", store=store or str(work / "demo.zarr"))
        timings = {}
        for stage in STAGE_ORDER:
            start = time.perf_counter()
            run_stage(stage, config, force=True)
            timings[stage] = time.perf_counter() - start
        info = store_info(config.store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"timings": timings, "info": info, "peak_rss_mib": peak_rss_mib()}


def report(result: dict) -> str:
    """Format the stage timings as the report section."""
    info = result["info"]
    layer = next(iter(info["layers"].values()))
    rows = "\n".join(f"| {stage} | {seconds:.0f} |" for stage, seconds in result["timings"].items())
    grids = ", ".join(f"{size}: {grid['n_nonempty']} cells / {grid['n_icons']} icons" for size, grid in layer["grids"].items())
    return f"""## Demo build

`python -m benchmarks.run demo`: `config.yaml` as shipped, from an empty store.
{info['n_images']} sample images, {info['n_activations']:,} activation vectors at `blocks.4`; grids {grids}.

| stage | seconds |
| --- | ---: |
{rows}
| **total** | **{sum(result['timings'].values()):.0f}** |

Peak resident memory, the largest of this process and its child processes (the one CPU extraction worker
runs as threads of this process by default): {result['peak_rss_mib']:.0f} MiB.
Machine: {machine()}.
"""
