"""Tests of the layout stage: UMAP fit on a sample, placement, duplicates, tiny stores."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from atlas.config import ProjectConfig
from atlas.errors import StageNotReadyError, StoreError
from atlas.project import (
    MIN_UMAP_ROWS,
    _exact_index,
    hash_rows,
    knn_graph,
    place_in_parallel,
    place_rows,
    run_project,
    scale_layout,
)
from atlas.store import mark_stage, open_store, stage_done
from tests.atlas.synthetic import clustered_vectors, make_store

# Small UMAP settings keep each fit under a second once numba has compiled UMAP,
# which happens once per test process and takes tens of seconds.
SMALL_UMAP = ProjectConfig(n_neighbors=10, n_epochs=30, fit_sample=150, place_neighbors=5)
N_ROWS = 400
N_CLUSTERS = 4
INVALID = (5, 77, 301)
# (copy, original) pairs: each copy row gets the original row's vector.
DUPLICATES = ((10, 11), (200, 11), (350, 120), (399, 398))


def _layout_store(path):
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(N_CLUSTERS, 16)) * 3
    labels = rng.integers(0, N_CLUSTERS, size=N_ROWS)
    vectors = (centres[labels] + 0.3 * rng.normal(size=(N_ROWS, 16))).astype(np.float32)
    for copy, original in DUPLICATES:
        vectors[copy] = vectors[original]
        labels[copy] = labels[original]
    store = make_store(path, activations=vectors, invalid_rows=INVALID)
    return store, labels


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory):
    """Two identical stores laid out with the same settings."""
    folder = tmp_path_factory.mktemp("project")
    results = []
    for name in ("a.zarr", "b.zarr"):
        store, labels = _layout_store(folder / name)
        info = run_project(store.path, SMALL_UMAP)
        projection = np.asarray(open_store(store.path)[f"projection/{store.layer}"][:])
        results.append((store, labels, info, projection))
    return results


def test_projection_shape_and_range(laid_out):
    store, _, _, projection = laid_out[0]
    assert projection.shape == (N_ROWS, 2)
    assert projection.dtype == np.float32
    assert np.isnan(projection[list(INVALID)]).all()

    valid = projection[store.valid]
    assert np.isfinite(valid).all()
    assert valid.min() >= 0.0
    assert valid.max() <= 1.0
    np.testing.assert_allclose(valid.min(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(valid.max(axis=0), 1.0, atol=1e-6)


def test_stage_record(laid_out):
    store, _, info, _ = laid_out[0]
    assert info["method"] == "umap"
    assert info["n"] == N_ROWS - len(INVALID)
    assert info["n_distinct"] == N_ROWS - len(INVALID) - len(DUPLICATES)
    assert info["n_fit"] == SMALL_UMAP.fit_sample
    assert info["n_neighbors"] == SMALL_UMAP.n_neighbors
    assert stage_done(open_store(store.path), "project", store.layer)


def test_duplicates_share_coordinates(laid_out):
    _, _, _, projection = laid_out[0]
    for copy, original in DUPLICATES:
        np.testing.assert_array_equal(projection[copy], projection[original])


def test_same_input_same_layout(laid_out):
    np.testing.assert_array_equal(laid_out[0][3], laid_out[1][3])


def test_clusters_stay_together(laid_out):
    # Fitted and placed rows alike: most of each row's 5 nearest layout
    # neighbours come from its own cluster.
    store, labels, _, projection = laid_out[0]
    rows = np.flatnonzero(store.valid)
    points, row_labels = projection[rows].astype(np.float64), labels[rows]
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :5]
    assert np.mean(row_labels[nearest] == row_labels[:, None]) >= 0.9


# The fixture runs first so numba compiles UMAP there, once.
@pytest.mark.usefixtures("laid_out")
def test_rerun_noop_and_force_clears_grid(tmp_path):
    store, _ = _layout_store(tmp_path / "s.zarr")
    first = run_project(store.path, SMALL_UMAP)
    assert run_project(store.path, SMALL_UMAP) == first

    group = open_store(store.path, mode="r+")
    mark_stage(group, "grid", store.layer)
    run_project(store.path, SMALL_UMAP, force=True)
    group = open_store(store.path)
    assert stage_done(group, "project", store.layer)
    assert not stage_done(group, "grid", store.layer)


@pytest.mark.usefixtures("laid_out")
def test_umap_lowers_n_neighbors_for_small_stores(tmp_path, caplog):
    vectors = clustered_vectors(12, 8, n_clusters=2, seed=2)
    store = make_store(tmp_path / "s.zarr", activations=vectors)
    with caplog.at_level(logging.WARNING, logger="atlas.project"):
        info = run_project(store.path, ProjectConfig(n_epochs=30))
    assert info["method"] == "umap"
    assert info["n_neighbors"] == 11
    assert "n_neighbors=11" in caplog.text
    projection = np.asarray(open_store(store.path)["projection/layer2"][:])
    assert np.isfinite(projection).all()


@pytest.mark.parametrize("n_valid", [2, 3, 4, 5])
def test_tiny_stores_project(tmp_path, caplog, n_valid):
    vectors = clustered_vectors(6, 8, n_clusters=3, seed=n_valid)
    store = make_store(tmp_path / "s.zarr", activations=vectors, invalid_rows=tuple(range(n_valid, 6)))
    with caplog.at_level(logging.WARNING, logger="atlas.project"):
        info = run_project(store.path, ProjectConfig())
    assert info["method"] == "pca"
    assert f"UMAP needs at least {MIN_UMAP_ROWS}" in caplog.text

    projection = np.asarray(open_store(store.path)["projection/layer2"][:])
    assert np.isfinite(projection[:n_valid]).all()
    assert np.isnan(projection[n_valid:]).all()
    assert projection[:n_valid].min() >= 0.0
    assert projection[:n_valid].max() <= 1.0
    # Distinct vectors must not all collapse onto one point.
    assert len(np.unique(projection[:n_valid], axis=0)) > 1


def test_single_row_lands_in_centre(tmp_path):
    store = make_store(tmp_path / "s.zarr", activations=clustered_vectors(3, 8, 1), invalid_rows=(1, 2))
    run_project(store.path, ProjectConfig())
    projection = np.asarray(open_store(store.path)["projection/layer2"][:])
    np.testing.assert_array_equal(projection[0], [0.5, 0.5])


def test_identical_rows_only(tmp_path):
    vectors = np.tile(clustered_vectors(1, 8, 1), (30, 1))
    store = make_store(tmp_path / "s.zarr", activations=vectors)
    info = run_project(store.path, ProjectConfig())
    assert info["n_distinct"] == 1
    projection = np.asarray(open_store(store.path)["projection/layer2"][:])
    assert (projection == 0.5).all()


def test_no_valid_rows_raises(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_rows=4, invalid_rows=(0, 1, 2, 3))
    with pytest.raises(StoreError, match="no valid rows"):
        run_project(store.path, ProjectConfig())


def test_needs_extract(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_rows=10, mark_extract=False)
    with pytest.raises(StageNotReadyError, match="extract"):
        run_project(store.path, ProjectConfig())


def test_knn_graph_matches_numpy():
    vectors = clustered_vectors(60, 8, 3, seed=1)
    vectors[5] = vectors[4] * 2  # same direction as row 4: cosine distance 0 to it
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    indices, distances = knn_graph(np.ascontiguousarray(unit), 6)

    np.testing.assert_array_equal(indices[:, 0], np.arange(60))
    np.testing.assert_array_equal(distances[:, 0], 0.0)
    expected = 1.0 - unit @ unit.T
    np.fill_diagonal(expected, np.inf)
    np.testing.assert_allclose(distances[:, 1:], np.sort(expected, axis=1)[:, :5], atol=1e-5)
    assert indices[4, 1] == 5
    assert indices[5, 1] == 4


def test_place_rows_weighted_mean():
    fitted = np.ascontiguousarray(clustered_vectors(20, 8, 2, seed=3))
    fitted /= np.linalg.norm(fitted, axis=1, keepdims=True)
    layout = np.random.default_rng(0).random((20, 2))
    index = _exact_index(fitted, "cosine")

    # A query equal to a fitted row takes that row's coordinate.
    np.testing.assert_allclose(place_rows(index, layout, fitted[[7]], 4, "cosine")[0], layout[7], atol=1e-6)

    query = np.ascontiguousarray(fitted[[2]] + fitted[[9]])
    query /= np.linalg.norm(query)
    distance = 1.0 - (fitted @ query[0]).astype(np.float64)
    nearest = np.argsort(distance)[:4]
    weights = 1.0 / distance[nearest]
    expected = (weights[:, None] * layout[nearest]).sum(axis=0) / weights.sum()
    np.testing.assert_allclose(place_rows(index, layout, query, 4, "cosine")[0], expected, rtol=1e-4)


def test_parallel_placement_matches_one_search(tmp_path, monkeypatch):
    import faiss

    import atlas.project

    store = make_store(tmp_path / "s.zarr", n_rows=500, channels=8, n_clusters=5)
    activations = open_store(store.path)["activations/layer2"]
    fitted_rows = np.arange(0, 500, 5)
    fitted = np.ascontiguousarray(store.activations[fitted_rows], dtype=np.float32)
    fitted /= np.linalg.norm(fitted, axis=1, keepdims=True)
    layout = np.random.default_rng(1).random((len(fitted_rows), 2))
    index = _exact_index(fitted, "cosine")
    rows = np.setdiff1d(np.arange(500), fitted_rows)
    config = ProjectConfig(place_neighbors=4)

    queries = np.ascontiguousarray(store.activations[rows], dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    expected = place_rows(index, layout, queries, 4, "cosine")
    # Chunks of 64 rows: seven tasks, the last one partial.
    monkeypatch.setattr(atlas.project, "PLACE_CHUNK_ROWS", 64)
    threads = faiss.omp_get_max_threads()
    placed = place_in_parallel(activations, rows, index, layout, config)

    # FAISS batches distance computations differently for other chunk sizes: float32 rounding only.
    np.testing.assert_allclose(placed, expected, rtol=1e-4, atol=1e-6)
    assert faiss.omp_get_max_threads() == threads


def test_scale_layout_matches_numpy():
    layout = np.random.default_rng(4).normal(size=(500, 2)) * [1.0, 10.0]
    scaled = scale_layout(layout, 1.0)
    low = np.percentile(layout, 1, axis=0)
    high = np.percentile(layout, 99, axis=0)
    expected = (np.clip(layout, low, high) - low) / (high - low)
    np.testing.assert_allclose(scaled, expected, atol=1e-6)
    assert scaled.dtype == np.float32


def test_scale_layout_flat_axis():
    layout = np.column_stack([np.arange(5.0), np.full(5, 3.0)])
    scaled = scale_layout(layout, 0.0)
    np.testing.assert_allclose(scaled[:, 0], np.linspace(0, 1, 5))
    np.testing.assert_array_equal(scaled[:, 1], 0.5)


def test_hash_rows_equal_and_distinct():
    values = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float16)
    values[30] = values[3]
    hashes = hash_rows(values)
    assert hashes.dtype == np.uint64
    assert hashes[30] == hashes[3]
    assert len(np.unique(hashes)) == 49
    assert hash_rows(values[:0]).shape == (0,)


@pytest.mark.usefixtures("laid_out")
def test_euclidean_metric_keeps_clusters(tmp_path):
    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1], 40)
    centres = np.array([np.zeros(8), np.full(8, 5.0)])
    vectors = (centres[labels] + 0.1 * rng.normal(size=(80, 8))).astype(np.float32)
    store = make_store(tmp_path / "s.zarr", activations=vectors)
    config = ProjectConfig(metric="euclidean", n_neighbors=10, n_epochs=30, fit_sample=40, place_neighbors=5)
    info = run_project(store.path, config)
    assert info["metric"] == "euclidean"
    assert info["n_fit"] == 40

    # Two tight clusters far apart: their layout centres lie far apart relative to their spread.
    projection = np.asarray(open_store(store.path)["projection/layer2"][:]).astype(np.float64)
    centre_a = projection[labels == 0].mean(axis=0)
    centre_b = projection[labels == 1].mean(axis=0)
    spread = max(projection[labels == label].std(axis=0).max() for label in (0, 1))
    assert np.linalg.norm(centre_a - centre_b) > 3 * spread
