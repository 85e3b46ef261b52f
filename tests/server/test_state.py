"""Tests of the per-server store cache."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from atlas.config import ServeConfig
from atlas.errors import ConfigError, StoreError
from atlas.store import create_store
from server import state
from server.mosaic import tile_size
from tests.server.store_builder import BuiltStore


@pytest.fixture()
def registered(built_store: BuiltStore, serve_config: ServeConfig) -> state.StoreData:
    state.configure([str(built_store.path)], serve_config)
    return state.get_store(0)


def test_store_data_reads_grids(registered: state.StoreData, built_store: BuiltStore) -> None:
    group = zarr.open_group(str(built_store.path), mode="r")
    layer = registered.layer(built_store.layer)
    assert layer.sizes == built_store.sizes
    for size in built_store.sizes:
        level = layer.levels[size]
        count = np.asarray(group[f"grids/{built_store.layer}/{size}/count"][:])
        np.testing.assert_array_equal(level.count, count)
        np.testing.assert_array_equal(level.filled, count >= level.min_count)
        assert level.icon_px == 32
        assert level.icon_done.sum() == level.filled.sum() - 1


def test_store_is_cached_per_process(registered: state.StoreData) -> None:
    assert state.get_store(0) is registered
    layer = registered.layer(registered.layers[0])
    assert registered.layer(registered.layers[0]) is layer
    size = layer.sizes[-1]
    assert layer.mosaic(size, 256) is layer.mosaic(size, 256)


def test_mosaic_shape_follows_limit(registered: state.StoreData) -> None:
    layer = registered.layer(registered.layers[0])
    for size in layer.sizes:
        mosaic = layer.mosaic(size, 200)
        tile = tile_size(size, 32, 200)
        assert mosaic.shape == (size * tile, size * tile)
        assert mosaic.dtype == np.uint32


def test_density_counts_every_point(registered: state.StoreData, built_store: BuiltStore) -> None:
    density = registered.layer(registered.layers[0]).density()
    assert density is not None
    assert density.shape == (state.DENSITY_BINS, state.DENSITY_BINS)
    alpha = density.view(np.uint8).reshape(*density.shape, 4)[..., 3]
    bins = np.minimum((built_store.projection * state.DENSITY_BINS).astype(int), state.DENSITY_BINS - 1)
    occupied = np.zeros(density.shape, bool)
    occupied[bins[:, 1], bins[:, 0]] = True
    np.testing.assert_array_equal(alpha > 0, occupied)


def test_row_metadata(registered: state.StoreData, built_store: BuiltStore) -> None:
    row = 3 * 16 + 5
    assert registered.image_of_row(row) == 3
    assert registered.image_path(3) == built_store.image_paths[3]
    patch = registered.patch(row, 48, built_store.layer)
    assert patch is not None
    assert patch.size == (48, 48)
    assert registered.class_name(1) == "espresso"
    assert registered.class_name(99) == "class 99"


def test_store_index_out_of_range(registered: state.StoreData) -> None:
    with pytest.raises(StoreError, match="store index 3 is out of range; this server has 1 store"):
        state.get_store(3)


def test_unknown_layer_raises(registered: state.StoreData) -> None:
    with pytest.raises(StoreError, match="layer 'nope' has no grids"):
        registered.layer("nope")


def test_store_without_grids_raises(tmp_path) -> None:
    create_store(
        tmp_path / "bare.zarr", attrs={"model": "x"}, n_images=2, rows_per_image=1,
        layer_channels={"layer2": 4}, shard_size=2, attribution_top_k=1,
    )
    with pytest.raises(StoreError, match="has no grids for any layer; run `atlas grid"):
        state.StoreData(0, str(tmp_path / "bare.zarr"))
    with pytest.raises(StoreError, match="no feature store"):
        state.StoreData(0, str(tmp_path / "missing.zarr"))


def test_configure_from_argv(built_store: BuiltStore, tmp_path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("serve:\n  max_upload_mb: 3\n")
    state.configure_from_argv([str(built_store.path), "--config", str(config)])
    assert state.store_paths() == [str(built_store.path)]
    assert state.serve_config().max_upload_mb == 3

    with pytest.raises(ConfigError, match="no store given"):
        state.configure_from_argv([])
    with pytest.raises(ConfigError, match="invalid app arguments"):
        state.configure_from_argv([str(built_store.path), "--unknown"])
