"""Tests of query by image and by vector on a store built with the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import atlas.query
from atlas.config import GridConfig, IndexConfig
from atlas.errors import QueryError
from atlas.grid import cell_of, run_grid
from atlas.index import build_index, load_index
from atlas.models import load_model
from atlas.query import QueryResult, query_image, query_vectors
from atlas.store import mark_stage, open_store
from tests.atlas.synthetic import make_store, make_tiny_model_store

QUERY_IMAGE = 1
SIZES = [2, 4]
K = 3


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """Tiny-model store with an index, a random layout and grids."""
    store = make_tiny_model_store(tmp_path_factory.mktemp("query"), n_images=3)
    build_index(store.path, IndexConfig())
    group = open_store(store.path, mode="r+")
    layout = np.random.default_rng(0).random((len(store.valid), 2)).astype(np.float32)
    array = group.create_array(f"projection/{store.layer}", shape=layout.shape, dtype="float32")
    array[:] = layout
    mark_stage(group, "project", store.layer)
    run_grid(store.path, GridConfig(sizes=SIZES, min_count=1))
    return store, layout


@pytest.fixture(scope="module")
def image_result(tiny_store):
    store, _ = tiny_store
    return query_image(store.path, Image.open(store.image_paths[QUERY_IMAGE]), k=K)


def test_query_finds_the_image_itself(tiny_store, image_result):
    store, _ = tiny_store
    assert image_result.images[0].image == QUERY_IMAGE
    assert image_result.images[0].path == store.image_paths[QUERY_IMAGE]

    # Every position's stored twin (same image, same y, x) is its best hit,
    # except where flat image regions give several equally near rows.
    own = [
        position.hits[0].image == QUERY_IMAGE and (position.hits[0].y, position.hits[0].x) == (position.y, position.x)
        for position in image_result.positions
    ]
    assert np.mean(own) >= 0.95
    assert image_result.positions[0].hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_positions_cover_feature_map(tiny_store, image_result):
    store, _ = tiny_store
    height, width = open_store(store.path).attrs["layer_shapes"][store.layer][1:]
    assert image_result.map_shape == (height, width)
    assert len(image_result.positions) == height * width
    assert (image_result.positions[width + 2].y, image_result.positions[width + 2].x) == (1, 2)
    assert all(len(position.hits) == K for position in image_result.positions)


def test_hits_carry_store_metadata(tiny_store, image_result):
    store, layout = tiny_store
    for position in image_result.positions[:50]:
        for hit in position.hits:
            assert hit.image == store.image[hit.row]
            assert (hit.y, hit.x) == (store.y[hit.row], store.x[hit.row])
            assert hit.path == store.image_paths[hit.image]
            for size in SIZES:
                i, j = cell_of(layout[[hit.row]], size)
                assert hit.cells[size] == (int(i[0]), int(j[0]))


def test_hits_sorted_by_score(image_result):
    for position in image_result.positions:
        scores = [hit.score for hit in position.hits]
        assert scores == sorted(scores, reverse=True)


def test_cell_summary_counts(tiny_store, image_result):
    _, layout = tiny_store
    all_hits = [hit for position in image_result.positions for hit in position.hits]
    for size in SIZES:
        cells = image_result.cells[size]
        expected = {}
        for hit in all_hits:
            expected[hit.cells[size]] = expected.get(hit.cells[size], 0) + 1
        assert cells[0].count == max(expected.values())
        assert [cell.count for cell in cells] == sorted((cell.count for cell in cells), reverse=True)
        for cell in cells:
            assert cell.count == expected[(cell.i, cell.j)]


def test_to_dict_is_json(image_result):
    data = json.loads(json.dumps(image_result.to_dict()))
    assert data["map_shape"] == list(image_result.map_shape)
    assert len(data["top_matches"]) == K
    assert data["top_matches"][0]["score"] >= data["top_matches"][-1]["score"]
    assert set(data["summary"]["cells"]) == {str(size) for size in SIZES}
    assert data["summary"]["images"][0]["image"] == QUERY_IMAGE
    first = data["positions"][0]["hits"][0]
    assert set(first) == {"row", "image", "path", "y", "x", "score", "cells"}


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_query_accepts_other_modes(tiny_store, mode):
    store, _ = tiny_store
    image = Image.open(store.image_paths[0]).convert(mode)
    result = query_image(store.path, image, k=1)
    assert len(result.positions) == result.map_shape[0] * result.map_shape[1]
    assert result.images


def test_query_with_given_model(tiny_store):
    store, _ = tiny_store
    model = load_model(open_store(store.path).attrs["model"])
    result = query_image(store.path, Image.open(store.image_paths[2]), k=1, model=model)
    assert result.images[0].image == 2


def test_query_rejects_wrong_model_width(tiny_store):
    store, _ = tiny_store
    # TinyNet's stem has 8 channels, the stored layer2 has 16.
    model = _StemOnly(load_model(open_store(store.path).attrs["model"]))
    with pytest.raises(QueryError, match="8 channels but the index contains 16"):
        query_image(store.path, Image.open(store.image_paths[0]), layer=store.layer, model=model)


class _StemOnly:
    """A LoadedModel stand-in whose ``layer2`` is TinyNet's 8-channel stem."""

    def __init__(self, model):
        self.module = torch.nn.Sequential()
        self.module.add_module("layer2", model.module.stem)
        self.preprocess = model.preprocess
        self.device = torch.device("cpu")


@pytest.mark.parametrize(("image", "k", "message"), [("not an image", 3, "PIL.Image.Image"), (None, 0, "k must be")])
def test_query_rejects_bad_input(tiny_store, image, k, message):
    store, _ = tiny_store
    image = Image.new("RGB", (32, 32)) if image is None else image
    with pytest.raises(QueryError, match=message):
        query_image(store.path, image, k=k)


def test_query_vectors_float64(tiny_store):
    store, _ = tiny_store
    rows = np.array([5, 4000, 9000])
    result = query_vectors(store.path, store.activations[rows].astype(np.float64), k=2)
    assert [position.hits[0].row for position in result.positions] == rows.tolist()
    assert result.positions[0].y is None
    assert result.map_shape == (3, 1)


def test_store_handles_are_cached(tiny_store):
    store, _ = tiny_store
    first = atlas.query._store_view(store.path, None)
    assert atlas.query._store_view(store.path, None) is first
    assert load_index(store.path) is load_index(store.path)
    spec = open_store(store.path).attrs["model"]
    assert atlas.query.cached_model(spec) is atlas.query.cached_model(spec)


def test_empty_index_has_no_results(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_rows=10, channels=8, invalid_rows=tuple(range(10)))
    build_index(store.path, IndexConfig())
    result = query_vectors(store.path, np.ones((2, 8)), k=4)
    assert isinstance(result, QueryResult)
    assert all(position.hits == [] for position in result.positions)
    assert result.images == []
    assert result.to_dict()["top_matches"] == []


def test_query_without_grids_has_no_cells(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_rows=30, channels=8)
    build_index(store.path, IndexConfig())
    result = query_vectors(store.path, store.activations[:2].astype(np.float32), k=2)
    assert result.grid_sizes == []
    assert result.cells == {}
    assert result.positions[0].hits[0].cells == {}
