from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from atlas.errors import StoreError
from atlas.features import open_features
from jobs.extract import run_extract
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def small_store(tiny_spec, image_folder, tmp_path_factory):
    config = tiny_config(tiny_spec, image_folder, tmp_path_factory.mktemp("features") / "s.zarr")
    run_extract(config, progress=False)
    return config.store


def test_lazy_arrays_match_zarr(small_store):
    features = open_features(small_store)
    raw = zarr.open_group(small_store, mode="r")
    assert features.layer == "layer2"
    assert features.activations.shape == raw["activations/layer2"].shape
    np.testing.assert_array_equal(features.activations[5:9].compute(), raw["activations/layer2"][5:9])
    dataset = features.to_xarray()
    assert dataset.sizes["row"] == raw["samples/image"].shape[0]


def test_rows_for_image(small_store):
    features = open_features(small_store)
    path = features.images["path"][3]
    rows = features.rows_for_image(path)
    np.testing.assert_array_equal(features.image[rows].compute(), np.full(len(rows), 3))
    with pytest.raises(StoreError, match="not in store"):
        features.rows_for_image("/no/such.png")


def test_xarray_open_zarr_reads_groups(small_store):
    samples = xr.open_zarr(small_store, group="samples", consolidated=False)
    images = xr.open_zarr(small_store, group="images", consolidated=False)
    assert set(samples.data_vars) >= {"image", "y", "x", "valid"}
    assert samples["image"].dims == ("row",)
    assert images.sizes["image"] == 20
    assert str(images["status"].values[0]) == "ok"
