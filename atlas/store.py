"""The Zarr v3 feature store: one group per run, read and written by every stage.

Layout (N sampled activations, M images, C channels, K attribution classes)::

    activations/<layer>          (N, C) float16   row chunks aligned to shards
    samples/image                (N,)   int32     image row of each vector
    samples/y, samples/x         (N,)   int16     spatial position in the layer
    samples/valid                (N,)   bool      False for rejected images and NaN/inf rows
    samples/attribution_class    (N, K) int16     top classes by activation x gradient
    samples/attribution_score    (N, K) float32
    images/path                  (M,)   str
    images/status                (M,)   str       "ok", "pending" or the rejection reason
    images/top_class             (M, 5) int16     the model's top-5 predictions
    images/top_prob              (M, 5) float32
    extract/shard_done           (S,)   bool      one chunk per shard, set after its rows flush
    projection/<layer>           (N, 2) float32   layout in [0, 1]
    grids/<layer>/<size>/...     per-cell statistics and icons
    index/<layer>.faiss          sidecar file beside the arrays

Writers own disjoint, chunk-aligned row ranges, so parallel shard writes never
touch the same chunk. A stage marks itself complete in the group attributes
only after its arrays are written.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from atlas.errors import StageNotReadyError, StoreError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STAGES = ("extract", "index", "project", "grid", "render")
TOP_PREDICTIONS = 5
ROW = ["row"]
IMAGE = ["image"]


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a feature store group.

    Parameters
    ----------
    path
        A local path or an fsspec URL.
    mode
        ``"r"`` read-only, ``"r+"`` read-write on an existing store.

    Raises
    ------
    StoreError
        The path contains no feature store, its metadata cannot be read, or
        the fsspec backend of its URL scheme is not installed.
    """
    require_backend(path)
    try:
        group = zarr.open_group(str(local_store_path(path)), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise StoreError(
            f"no feature store at {path}; run `atlas extract --store {path}` (or `atlas build`) first"
        ) from error
    except zarr.errors.ContainsArrayError as error:
        raise StoreError(f"{path} is a Zarr array, not an activation atlas store; pass the store's folder") from error
    except (ValueError, TypeError, KeyError) as error:
        # A damaged zarr.json raises JSONDecodeError (a ValueError), or TypeError when it is JSON of the wrong shape.
        raise StoreError(
            f"cannot read the store metadata at {path}: {error}; "
            f"the store is damaged, so rebuild it with `atlas extract --store {path} --force`"
        ) from error
    except OSError as error:
        raise StoreError(
            f"cannot read the store metadata at {path}: {error}; check that the path is readable and the URL reachable"
        ) from error
    if "atlas_format" not in group.attrs:
        raise StoreError(f"{path} is a Zarr group but not an activation atlas store (no 'atlas_format' attribute)")
    return group


def create_store(
    path: str | Path,
    *,
    attrs: dict[str, Any],
    n_images: int,
    rows_per_image: int,
    layer_channels: dict[str, int],
    shard_size: int,
    attribution_top_k: int,
) -> zarr.Group:
    """Create an empty store with every extraction array pre-sized.

    Row ``i * rows_per_image + j`` is sample ``j`` of image ``i``, so each
    shard of ``shard_size`` images owns one chunk of every per-row array.

    Raises
    ------
    StoreError
        The fsspec backend of the path's URL scheme is not installed.
    """
    require_backend(path)
    group = zarr.open_group(str(local_store_path(path)), mode="w")
    shard_rows = shard_size * rows_per_image
    n_rows = n_images * rows_per_image
    n_shards = max(1, -(-n_images // shard_size))
    row_chunk = max(1, min(shard_rows, max(n_rows, 1)))
    image_chunk = max(1, min(shard_size, max(n_images, 1)))

    for layer, channels in layer_channels.items():
        group.create_array(
            f"activations/{layer}", shape=(n_rows, channels), chunks=(row_chunk, channels),
            dtype="float16", fill_value=0, dimension_names=["row", "channel"],
        )
    group.create_array("samples/image", shape=(n_rows,), chunks=(row_chunk,), dtype="int32", fill_value=-1, dimension_names=ROW)
    group.create_array("samples/y", shape=(n_rows,), chunks=(row_chunk,), dtype="int16", fill_value=-1, dimension_names=ROW)
    group.create_array("samples/x", shape=(n_rows,), chunks=(row_chunk,), dtype="int16", fill_value=-1, dimension_names=ROW)
    group.create_array("samples/valid", shape=(n_rows,), chunks=(row_chunk,), dtype="bool", fill_value=False, dimension_names=ROW)
    group.create_array(
        "samples/attribution_class", shape=(n_rows, attribution_top_k), chunks=(row_chunk, attribution_top_k),
        dtype="int16", fill_value=-1, dimension_names=["row", "rank"],
    )
    group.create_array(
        "samples/attribution_score", shape=(n_rows, attribution_top_k), chunks=(row_chunk, attribution_top_k),
        dtype="float32", fill_value=0, dimension_names=["row", "rank"],
    )
    group.create_array("images/path", shape=(n_images,), chunks=(image_chunk,), dtype=str, dimension_names=IMAGE)
    group.create_array("images/status", shape=(n_images,), chunks=(image_chunk,), dtype=str, dimension_names=IMAGE)
    group.create_array(
        "images/top_class", shape=(n_images, TOP_PREDICTIONS), chunks=(image_chunk, TOP_PREDICTIONS),
        dtype="int16", fill_value=-1, dimension_names=["image", "top"],
    )
    group.create_array(
        "images/top_prob", shape=(n_images, TOP_PREDICTIONS), chunks=(image_chunk, TOP_PREDICTIONS),
        dtype="float32", fill_value=0, dimension_names=["image", "top"],
    )
    group.create_array(
        "extract/shard_done", shape=(n_shards,), chunks=(1,), dtype="bool", fill_value=False, dimension_names=["shard"]
    )

    group.attrs.update(
        {
            **attrs,
            "atlas_format": FORMAT_VERSION,
            "n_images": n_images,
            "rows_per_image": rows_per_image,
            "shard_size": shard_size,
            "n_shards": n_shards,
            "layers": list(layer_channels),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "stages": {},
        }
    )
    return group


def stage_done(group: zarr.Group, stage: str, layer: str | None = None) -> bool:
    """Return whether ``stage`` (for ``layer``, where per layer) is marked complete."""
    stages = group.attrs.get("stages", {})
    key = stage if layer is None else f"{stage}:{layer}"
    return bool(stages.get(key, {}).get("done"))


def mark_stage(group: zarr.Group, stage: str, layer: str | None = None, **info: Any) -> None:
    """Record that ``stage`` finished, with timing and counts in ``info``.

    Call only after every array the stage writes is flushed.
    """
    stages = dict(group.attrs.get("stages", {}))
    key = stage if layer is None else f"{stage}:{layer}"
    stages[key] = {"done": True, "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info}
    group.attrs["stages"] = stages


def clear_stage(group: zarr.Group, stage: str, layer: str | None = None) -> None:
    """Forget a stage's completion, before it is rerun with ``--force``."""
    stages = dict(group.attrs.get("stages", {}))
    stages.pop(stage if layer is None else f"{stage}:{layer}", None)
    group.attrs["stages"] = stages


def require_stage(group: zarr.Group, stage: str, layer: str | None = None, *, path: str | Path = "") -> None:
    """Raise :class:`StageNotReadyError` unless ``stage`` is complete."""
    if not stage_done(group, stage, layer):
        what = stage if layer is None else f"{stage} for layer {layer}"
        if stage == "extract":
            # A bare `atlas extract STORE` would read the default images, not the store's.
            source = group.attrs.get("images_source", "IMAGES")
            raise StageNotReadyError(
                f"store {path} has no completed extraction; resume it with "
                f"`atlas extract --images {source} --store {path}` and the settings it started with"
            )
        raise StageNotReadyError(f"store {path} has no completed {what}; run `atlas {stage} {path}` first")


def default_layer(group: zarr.Group, layer: str | None) -> str:
    """Resolve ``layer`` against the store's layers; ``None`` means the first one."""
    layers = list(group.attrs.get("layers", []))
    if layer is None:
        if not layers:
            raise StoreError("the store contains no layers; run `atlas extract` first")
        return layers[0]
    if layer not in layers:
        raise StoreError(f"layer {layer!r} is not in the store; it contains {layers}")
    return layer


def valid_rows(group: zarr.Group, chunk_rows: int = 1_000_000) -> np.ndarray:
    """Return the indices of rows that are valid (decoded image, finite values), shape (n,) int64."""
    valid = group["samples/valid"]
    parts = [np.flatnonzero(valid[start : start + chunk_rows]) + start for start in range(0, valid.shape[0], chunk_rows)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def iter_row_chunks(array: zarr.Array, rows: np.ndarray, chunk_rows: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(row_indices, values)`` for ``rows`` in order, ``chunk_rows`` at a time.

    Reads each block as one contiguous slice and selects from it, which is much
    faster than Zarr's fancy indexing over scattered rows.
    """
    for start in range(0, len(rows), chunk_rows):
        block_rows = rows[start : start + chunk_rows]
        if len(block_rows) == 0:
            continue
        low, high = int(block_rows[0]), int(block_rows[-1]) + 1
        block = np.asarray(array[low:high])
        yield block_rows, block[block_rows - low]


def read_rows(array: zarr.Array, rows: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Read ``array[rows]`` for sorted ``rows`` in bounded blocks."""
    parts = [values for _, values in iter_row_chunks(array, rows)]
    if not parts:
        return np.zeros((0, *array.shape[1:]), dtype=dtype or array.dtype)
    out = np.concatenate(parts)
    return out.astype(dtype) if dtype is not None else out


def read_strings(array: zarr.Array, selection: slice = slice(None)) -> np.ndarray:
    """Read a string array as a NumPy object array of Python ``str``.

    Zarr v3 returns NumPy's variable-width ``StringDType``, which cannot be
    cast to a fixed-width ``str`` dtype.
    """
    return np.array([str(value) for value in array[selection]], dtype=object)


def local_store_path(path: str | Path) -> str | Path:
    """Return ``path`` with a leading ``file://`` removed, so a local store is always a plain path."""
    text = str(path)
    return text[len("file://"):] if text.startswith("file://") else path


def is_store_url(path: str | Path) -> bool:
    """Return whether ``path`` is an fsspec URL (``s3://...``, ``memory://...``) rather than a local path.

    ``file://`` URLs count as local paths.
    """
    return "://" in str(local_store_path(path))


def require_backend(path: str | Path) -> None:
    """Check that fsspec can load the filesystem of every protocol in a store URL; local paths pass.

    Raises
    ------
    StoreError
        A protocol is unknown to fsspec, or the package that implements it
        (``s3fs`` for ``s3://``) is not installed.
    """
    if not is_store_url(path):
        return
    import fsspec
    from fsspec.registry import known_implementations

    # Chained URLs such as ``simplecache::s3://bucket/x.zarr`` name one protocol per part.
    for part in str(path).split("::"):
        protocol = part.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as error:
            module = str(known_implementations.get(protocol, {}).get("class", "")).split(".")[0]
            package = f"e.g. pip install {module}" if module and module != "fsspec" else "the packages it names"
            raise StoreError(
                f"the fsspec backend for {protocol}:// is not installed ({error}); "
                f"install it, {package}, or use a local store folder"
            ) from None
        except ValueError as error:
            raise StoreError(
                f"unknown URL scheme {protocol}:// in store {path} ({error}); "
                "use a local store folder or an fsspec URL such as s3://bucket/atlas.zarr"
            ) from None


def store_exists(path: str | Path) -> bool:
    """Return whether a feature store, or anything, exists at a local path or fsspec URL."""
    if not is_store_url(path):
        return Path(local_store_path(path)).exists()
    import fsspec

    require_backend(path)
    fs, root = fsspec.core.url_to_fs(str(path))
    return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))


def sidecar_path(store_path: str | Path, name: str) -> Path:
    """Return the path of a non-Zarr file kept inside a local store folder."""
    if is_store_url(store_path):
        raise StoreError(f"sidecar file {name} needs a local store folder, got URL {store_path}")
    folder = Path(local_store_path(store_path)) / "sidecar"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
