"""Summaries of stores for `atlas info` and `atlas ls`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from atlas.errors import StoreError
from atlas.store import open_store, read_strings

logger = logging.getLogger(__name__)


def store_info(path: str | Path) -> dict:
    """Describe a store: model, layers, counts, rejected images, index, grids, stages.

    Returns
    -------
    dict
        JSON-able; ``rejected`` lists ``{"path", "reason"}`` for every image not decoded.
        ``worker_peak_memory_mib`` maps each extract worker's address to its
        peak resident memory in MiB, empty before extract finishes.

    Raises
    ------
    StoreError
        The path contains no store, or its metadata cannot be read.
    """
    group = open_store(path)
    try:
        return _summarise(group, path)
    except (ValueError, TypeError, KeyError) as error:
        # Zarr reads an array's zarr.json only when the array is opened, so a damaged one fails here.
        raise StoreError(
            f"cannot read the store metadata at {path}: {type(error).__name__}: {error}; "
            f"the store is damaged, so rebuild it with `atlas extract --store {path} --force`"
        ) from error


def _summarise(group, path: str | Path) -> dict:
    attrs = dict(group.attrs)
    paths = read_strings(group["images/path"])
    status = read_strings(group["images/status"])
    rejected = [
        {"row": int(row), "path": str(paths[row]), "reason": str(status[row])}
        for row in np.flatnonzero((status != "ok") & (status != "pending"))
    ]
    valid = np.asarray(group["samples/valid"][:])
    per_image = int(attrs.get("rows_per_image", 0))
    n_ok = int((status == "ok").sum())
    stages = attrs.get("stages", {})
    shard_done = np.asarray(group["extract/shard_done"][:]) if "extract/shard_done" in group else np.zeros(0, bool)

    layers = {}
    for layer in attrs.get("layers", []):
        activations = group[f"activations/{layer}"]
        index_info = stages.get(f"index:{layer}", {})
        grids = {}
        if f"grids/{layer}" in group:
            for size_name in sorted(group[f"grids/{layer}"].group_keys(), key=int):
                cells = group[f"grids/{layer}/{size_name}"]
                icons = int(np.asarray(cells["icon_done"][:]).sum()) if "icon_done" in cells else 0
                grids[size_name] = {
                    "n_nonempty": int(cells.attrs.get("n_nonempty", 0)),
                    "n_icons": icons,
                    "min_count": cells.attrs.get("min_count"),
                }
        layers[layer] = {
            "dim": int(activations.shape[1]),
            "index_type": index_info.get("type"),
            "projected": f"projection/{layer}" in group,
            "grids": grids,
        }

    extract_info = stages.get("extract", {})
    return {
        "store": str(path),
        "model": attrs.get("model"),
        "layers": layers,
        "n_images": int(attrs.get("n_images", len(paths))),
        "n_ok": n_ok,
        "n_pending": int((status == "pending").sum()),
        "n_rejected": len(rejected),
        "rejected": rejected,
        "n_activations": int(valid.sum()),
        "n_nonfinite_rows": int(max(0, n_ok * per_image - int(valid.sum()))),
        "positions": attrs.get("positions"),
        "rows_per_image": per_image,
        "stages": {key: bool(value.get("done")) for key, value in stages.items()},
        "n_shards": int(shard_done.size),
        "n_shards_done": int(shard_done.sum()),
        "extract_seconds": extract_info.get("seconds"),
        "worker_peak_memory_mib": dict(extract_info.get("worker_peak_memory_mib") or {}),
        "created": attrs.get("created"),
    }


def list_stores(root: str | Path) -> list[dict]:
    """Find the stores under ``root`` (searching at most three folders deep) and summarise each.

    A store that cannot be read is listed as ``{"store": path, "error": reason}``.
    """
    root = Path(root)
    if not root.exists():
        raise StoreError(f"{root} does not exist; pass a folder that contains .zarr stores")
    found = []
    candidates = [root] if (root / "zarr.json").exists() else []
    for depth in ("*", "*/*", "*/*/*"):
        candidates += [path.parent for path in root.glob(f"{depth}/zarr.json") if path.parent.name.endswith(".zarr")]
    seen = set()
    for candidate in sorted(candidates):
        if candidate in seen:
            continue
        seen.add(candidate)
        try:
            info = store_info(candidate)
        except StoreError as error:
            logger.debug("cannot summarise %s: %s", candidate, error)
            found.append({"store": str(candidate), "error": str(error)})
            continue
        found.append(info)
    return found
