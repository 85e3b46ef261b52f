"""Data the explorer loads once per server process and shares between sessions.

The launcher (:func:`server.serve.serve`) or the app's command-line arguments
register the store paths and the serve settings with :func:`configure`. Every
browser session then picks a store by its position in that list, so no value
from the browser is ever used as a path. Store handles, grid arrays, icon
mosaics, density maps and image patches are cached here and reused by every
session. The query model and FAISS index are cached by :mod:`atlas.query`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from atlas.config import ServeConfig, load_config
from atlas.errors import AtlasError, ConfigError, StoreError
from atlas.store import open_store
from server.mosaic import build_mosaic, density_histogram, density_rgba, tile_size, upscale_mosaic

logger = logging.getLogger(__name__)

DENSITY_BINS = 256
PROJECTION_CHUNK_ROWS = 1_000_000
# Uploads are searched and explained off the Bokeh event loop, so a slow query
# never blocks other sessions. Two workers leave one CPU core to the server.
QUERY_WORKERS = 2
# The query and the explanation methods share one cached model per spec, and
# atlas.explain temporarily rewires the model's hooks and modules while it runs,
# so only one thread at a time may use a model.
MODEL_LOCK = threading.Lock()


@dataclass
class GridLevel:
    """One grid size of one layer, with every per-cell array the explorer shows.

    Attributes
    ----------
    size
        Grid size S.
    count
        (S, S) int32 rows per cell.
    filled
        (S, S) bool, cells with at least ``min_count`` rows.
    top_class, top_score
        (S, S, T) int16 / float32 classes with the highest mean attribution; -1 where empty.
    exemplars
        (S, S, E) int64 store rows nearest the cell mean; -1 pads.
    icon_done
        (S, S) bool, cells whose icon is rendered.
    icons
        (S, S, P, P, 3) uint8 array handle, or ``None`` before rendering.
    min_count
        The grid stage's threshold for a non-empty cell.
    """

    size: int
    count: np.ndarray
    filled: np.ndarray
    top_class: np.ndarray
    top_score: np.ndarray
    exemplars: np.ndarray
    icon_done: np.ndarray
    icons: zarr.Array | None
    min_count: int

    @property
    def icon_px(self) -> int:
        """Side in pixels of a stored icon (0 when there are none)."""
        return int(self.icons.shape[2]) if self.icons is not None else 0

    def icon(self, i: int, j: int) -> np.ndarray | None:
        """Return the icon of cell (i, j), shape (P, P, 3) uint8, or ``None`` if not rendered."""
        if self.icons is None or not self.icon_done[i, j]:
            return None
        return np.asarray(self.icons[i, j])


@dataclass
class LayerData:
    """The grids and layout of one layer, with mosaics and the density map built on first use."""

    name: str
    levels: dict[int, GridLevel]
    projection: zarr.Array | None
    _mosaics: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    _density: np.ndarray | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def sizes(self) -> list[int]:
        """Grid sizes, ascending."""
        return sorted(self.levels)

    def mosaic(self, size: int, max_px: int) -> np.ndarray:
        """Return the (S·t, S·t) uint32 RGBA icon mosaic of grid ``size``, built once."""
        key = (size, max_px)
        with self._lock:
            cached = self._mosaics.get(key)
            if cached is not None:
                return cached
            level = self.levels[size]
            icons = level.icons
            read_row = (lambda i: icons[i]) if icons is not None else None
            # A grid without icons takes the others' icon size, so a borrowed icon keeps its detail.
            icon_px = level.icon_px if icons is not None else max(self._finest_icon_px(), 1)
            side = size * tile_size(size, icon_px, max_px)
            fallback = None
            parent = self._fallback_size(size)
            if parent is not None and (level.filled & ~level.icon_done).any():
                # The lock is re-entrant: the coarser mosaic is built, and cached, first.
                fallback = upscale_mosaic(self.mosaic(parent, max_px), side)
            mosaic = build_mosaic(read_row, size, icon_px, level.filled, level.icon_done, max_px, fallback=fallback)
            self._mosaics[key] = mosaic
        logger.info("built the %dx%d mosaic of layer %s (%d x %d px)", size, size, self.name, *mosaic.shape)
        return mosaic

    def _finest_icon_px(self) -> int:
        return max((level.icon_px for level in self.levels.values()), default=0)

    def has_own_icons(self, size: int) -> bool:
        """Return whether grid ``size`` has at least one rendered icon, not counting icons borrowed from a coarser grid."""
        level = self.levels[size]
        return level.icons is not None and bool(level.icon_done.any())

    def home_size(self) -> int:
        """Return the grid size a session opens on.

        Automatic zoom shows the coarsest grid when the whole layout is
        visible, so that grid is the home grid when it has icons of its own.
        Otherwise the home grid is the coarsest grid that has icons, and the
        coarsest grid when none has.
        """
        with_icons = [size for size in self.sizes if self.has_own_icons(size)]
        return with_icons[0] if with_icons else self.sizes[0]

    def _fallback_size(self, size: int) -> int | None:
        """Return the finest coarser grid with rendered icons that tiles ``size`` exactly, if any."""
        candidates = [
            other for other in self.sizes
            if other < size and size % other == 0 and self.has_own_icons(other)
        ]
        return candidates[-1] if candidates else None

    def density(self) -> np.ndarray | None:
        """Return the (B, B) uint32 RGBA density of layout points, or ``None`` without a layout."""
        if self.projection is None:
            return None
        with self._lock:
            if self._density is None:
                projection = self.projection
                chunks = (
                    np.asarray(projection[start : start + PROJECTION_CHUNK_ROWS])
                    for start in range(0, projection.shape[0], PROJECTION_CHUNK_ROWS)
                )
                self._density = density_rgba(density_histogram(chunks, DENSITY_BINS))
            return self._density


class StoreData:
    """A read-only store with the layers that have grids; shared by every session.

    Parameters
    ----------
    index
        Position of the store in the server's list; sessions refer to it by this number.
    path
        Local path or URL of the store.

    Raises
    ------
    StoreError
        The path contains no store, or no layer of it has grids.
    """

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.group = open_store(path, mode="r")
        self.name = Path(str(path).rstrip("/")).name or str(path)
        self.model_spec = str(self.group.attrs.get("model", ""))
        self.class_names = [str(name) for name in self.group.attrs.get("class_names", [])]
        self.layers = [layer for layer in self.group.attrs.get("layers", []) if self._grid_sizes(layer)]
        if not self.layers:
            raise StoreError(
                f"store {path} has no grids for any layer; run `atlas grid {path}` (and `atlas render {path}`) first"
            )
        self._layers: dict[str, LayerData] = {}
        self._lock = threading.Lock()
        self._sample_image: np.ndarray | None = None

    def _grid_sizes(self, layer: str) -> list[int]:
        try:
            grids = self.group[f"grids/{layer}"]
        except KeyError:
            return []
        return sorted(int(name) for name in grids.group_keys() if name.isdigit())

    def layer(self, name: str) -> LayerData:
        """Return the grids of layer ``name``, read on first use.

        Raises
        ------
        StoreError
            The layer has no grids in this store.
        """
        if name not in self.layers:
            raise StoreError(f"layer {name!r} has no grids in store {self.path}; it has grids for {self.layers}")
        with self._lock:
            data = self._layers.get(name)
            if data is None:
                data = self._read_layer(name)
                self._layers[name] = data
        return data

    def _read_layer(self, name: str) -> LayerData:
        levels = {}
        for size in self._grid_sizes(name):
            grid = self.group[f"grids/{name}/{size}"]
            arrays = set(grid.array_keys())
            count = np.asarray(grid["count"][:])
            min_count = int(grid.attrs.get("min_count", 1))
            has_icons = {"icons", "icon_done"} <= arrays
            levels[size] = GridLevel(
                size=size,
                count=count,
                filled=count >= max(min_count, 1),
                top_class=np.asarray(grid["top_class"][:]) if "top_class" in arrays else np.full((size, size, 0), -1, np.int16),
                top_score=np.asarray(grid["top_score"][:]) if "top_score" in arrays else np.zeros((size, size, 0), np.float32),
                exemplars=np.asarray(grid["exemplars"][:]) if "exemplars" in arrays else np.full((size, size, 0), -1, np.int64),
                icon_done=np.asarray(grid["icon_done"][:]) if has_icons else np.zeros((size, size), bool),
                icons=grid["icons"] if has_icons else None,
                min_count=min_count,
            )
        projection = self.group[f"projection/{name}"] if f"projection/{name}" in self.group else None
        logger.info("loaded grids %s of layer %s from %s", sorted(levels), name, self.path)
        return LayerData(name=name, levels=levels, projection=projection)

    def class_name(self, index: int) -> str:
        """Return the name of class ``index``, or ``class <index>`` past the stored list."""
        if 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"

    def image_of_row(self, row: int) -> int:
        """Return the image row that store row ``row`` was sampled from."""
        with self._lock:
            if self._sample_image is None:
                self._sample_image = np.asarray(self.group["samples/image"][:])
        return int(self._sample_image[row])

    @lru_cache(maxsize=4096)
    def image_path(self, image: int) -> str:
        """Return the stored path of image row ``image``, as text for display only."""
        return str(self.group["images/path"][image])

    @lru_cache(maxsize=2048)
    def patch(self, row: int, size: int, layer: str | None = None) -> Image.Image | None:
        """Return the crop of the source image around row ``row``, or ``None`` when unavailable.

        The result is cached, so a source image that is missing or cannot be
        decoded is logged once and then gives ``None``.
        """
        from atlas.patches import patch_for_row

        try:
            return patch_for_row(self.group, row, size, layer=layer)
        except (AtlasError, OSError, KeyError, ValueError) as error:
            # KeyError: a store written by an older extract lacks attributes the crop needs.
            logger.warning("no patch for row %d of %s: %s", row, self.path, error)
            return None


@dataclass
class _Registry:
    store_paths: list[str] = field(default_factory=list)
    config: ServeConfig = field(default_factory=ServeConfig)
    configured: bool = False


_registry = _Registry()
_stores: dict[int, StoreData] = {}
_stores_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def configure(store_paths: list[str], config: ServeConfig) -> None:
    """Register the stores and settings every session of this process uses.

    Clears the store cache when the list changes.
    """
    with _stores_lock:
        if list(store_paths) != _registry.store_paths:
            _stores.clear()
        _registry.store_paths = [str(path) for path in store_paths]
        _registry.config = config
        _registry.configured = True


def configure_from_argv(argv: list[str]) -> None:
    """Register stores from ``bokeh serve server/app --args STORE... [--config FILE]``.

    Raises
    ------
    ConfigError
        No store is given, or the config file is invalid.
    """
    parser = argparse.ArgumentParser(prog="server/app", add_help=False, exit_on_error=False)
    parser.add_argument("stores", nargs="*")
    parser.add_argument("--config", default=None)
    try:
        arguments, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise ConfigError(f"invalid app arguments {argv}: {error}; pass STORE [STORE ...] [--config FILE]") from None
    if unknown:
        raise ConfigError(f"invalid app arguments {unknown}; pass STORE [STORE ...] [--config FILE]")
    if not arguments.stores:
        raise ConfigError("no store given; run `bokeh serve server/app --args STORE [STORE ...]` or `atlas serve STORE`")
    configure(arguments.stores, load_config(arguments.config).serve)


def is_configured() -> bool:
    """Return whether :func:`configure` has run in this process."""
    return _registry.configured


def store_paths() -> list[str]:
    """Return the registered store paths, in the order sessions index them."""
    return list(_registry.store_paths)


def serve_config() -> ServeConfig:
    """Return the registered serve settings."""
    return _registry.config


def get_store(index: int) -> StoreData:
    """Return registered store number ``index``, opened on first use.

    Raises
    ------
    StoreError
        ``index`` is out of range, or the store cannot be opened.
    """
    paths = _registry.store_paths
    if not 0 <= index < len(paths):
        raise StoreError(f"store index {index} is out of range; this server has {len(paths)} store(s)")
    with _stores_lock:
        store = _stores.get(index)
        if store is None:
            store = StoreData(index, paths[index])
            _stores[index] = store
            logger.info("opened store %d: %s (layers with grids: %s)", index, store.path, store.layers)
    return store


def preload(max_px: int | None = None) -> None:
    """Build, before any session, what the first page of each store needs.

    Every mosaic and the density map of each store's first layer are built
    now, so zooming never waits for a mosaic. The other layers are built in
    the worker pool in the background.
    """
    max_px = max_px or _registry.config.mosaic_max_px
    later: list[LayerData] = []
    for index in range(len(_registry.store_paths)):
        store = get_store(index)
        first = store.layer(store.layers[0])
        for size in first.sizes:
            first.mosaic(size, max_px)
        first.density()
        later += [store.layer(name) for name in store.layers[1:]]

    def build(layer: LayerData) -> None:
        try:
            for size in layer.sizes:
                layer.mosaic(size, max_px)
            layer.density()
        except (AtlasError, OSError, ValueError) as error:
            logger.warning("building the mosaics of layer %s in the background failed: %s", layer.name, error)

    for layer in later:
        executor().submit(build, layer)


def executor() -> ThreadPoolExecutor:
    """Return the process-wide pool that runs uploads' queries and explanations."""
    global _executor
    with _stores_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=QUERY_WORKERS, thread_name_prefix="atlas-query")
    return _executor
