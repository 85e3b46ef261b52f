"""Helpers shared by the benchmarks: machine description, timing, report sections."""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    """Describe this machine in one line: CPU model, cores, memory, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its waited-for children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


@contextmanager
def timer(results: dict, key: str):
    """Store the wall time of the block, in seconds, under ``results[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        results[key] = time.perf_counter() - start


def write_section(name: str, body: str) -> None:
    """Replace (or append) the report section between ``<!-- bench:name -->`` markers."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n\nProduced by `make bench`; each section names the machine it ran on.\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _match: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text)
