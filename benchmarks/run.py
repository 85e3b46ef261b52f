"""Run benchmarks and update docs/benchmarks.md: `python -m benchmarks.run [NAME ...]`."""

from __future__ import annotations

import argparse
import importlib
import logging

from benchmarks.common import write_section

BENCHMARKS = ("extract", "extract_scale", "index", "project", "scale", "demo", "explorer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    import distributed  # noqa: F401  (configures its loggers on import; quieted below)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("distributed", "bokeh", "tornado", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in args.names or BENCHMARKS:
        # Each module has run() -> result and report(result) -> its Markdown section.
        module = importlib.import_module(f"benchmarks.{name}")
        text = module.report(module.run())
        write_section(name, text)
        print(text)


if __name__ == "__main__":
    main()
