"""Tests of the grid stage against a direct NumPy computation over a known layout."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import atlas.grid
from atlas.config import GridConfig
from atlas.errors import StageNotReadyError
from atlas.grid import cell_of, run_grid, whitening_matrix
from atlas.store import mark_stage, open_store, stage_done
from tests.atlas.synthetic import make_store

INVALID = (0, 13, 140)
CONFIG = GridConfig(sizes=[2, 3, 5], min_count=4, n_exemplars=3, top_classes=4)


def _store_with_layout(path, n_rows=240, channels=6, layout=None, invalid=INVALID, seed=0):
    """A synthetic store with a given (or random) layout and its project stage marked done."""
    store = make_store(path, n_rows=n_rows, channels=channels, n_clusters=5, invalid_rows=invalid, seed=seed)
    rng = np.random.default_rng(seed + 10)
    if layout is None:
        layout = rng.random((n_rows, 2)).astype(np.float32)
        layout[1] = [1.0, 1.0]  # on the far edge: belongs to the last cell
        layout[2] = [0.0, 0.0]
    layout = np.asarray(layout, np.float32).copy()
    layout[~store.valid] = np.nan
    group = open_store(store.path, mode="r+")
    array = group.create_array(f"projection/{store.layer}", shape=layout.shape, dtype="float32", fill_value=np.nan)
    array[:] = layout
    mark_stage(group, "project", store.layer)
    return store, layout


def _expected(store, layout, size, config):
    """Per-cell statistics computed directly, one cell at a time."""
    rows = np.flatnonzero(store.valid)
    values = store.activations[rows].astype(np.float64)
    i = np.minimum(np.floor(layout[rows, 1].astype(np.float64) * size), size - 1).astype(int)
    j = np.minimum(np.floor(layout[rows, 0].astype(np.float64) * size), size - 1).astype(int)
    whitening = np.linalg.inv(values.T @ values / len(rows))

    channels = values.shape[1]
    count = np.zeros((size, size), int)
    mean = np.zeros((size, size, channels))
    top_class = np.full((size, size, config.top_classes), -1)
    top_score = np.zeros((size, size, config.top_classes))
    exemplars = np.full((size, size, config.n_exemplars), -1)
    for a in range(size):
        for b in range(size):
            members = np.flatnonzero((i == a) & (j == b))
            count[a, b] = len(members)
            if len(members) < config.min_count:
                continue
            mean[a, b] = values[members].mean(axis=0)

            scores: dict[int, float] = {}
            for member in members:
                for label, score in zip(store.attribution_class[rows[member]], store.attribution_score[rows[member]]):
                    if label >= 0:
                        scores[int(label)] = scores.get(int(label), 0.0) + float(score)
            ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[: config.top_classes]
            for slot, (label, total) in enumerate(ranked):
                top_class[a, b, slot] = label
                top_score[a, b, slot] = total / len(members)

            unit_mean = mean[a, b] / np.linalg.norm(mean[a, b])
            cosine = values[members] @ unit_mean / np.linalg.norm(values[members], axis=1)
            order = sorted(range(len(members)), key=lambda n: (-cosine[n], rows[members[n]]))
            best = rows[members[order[: config.n_exemplars]]]
            exemplars[a, b, : len(best)] = best
    return count, mean, whitening, top_class, top_score, exemplars


@pytest.fixture(scope="module")
def gridded(tmp_path_factory):
    store, layout = _store_with_layout(tmp_path_factory.mktemp("grid") / "s.zarr")
    info = run_grid(store.path, CONFIG)
    return store, layout, info


@pytest.mark.parametrize("size", CONFIG.sizes)
def test_counts_and_means_match_numpy(gridded, size):
    store, layout, _ = gridded
    count, mean, _, _, _, _ = _expected(store, layout, size, CONFIG)
    cells = open_store(store.path)[f"grids/{store.layer}/{size}"]
    np.testing.assert_array_equal(cells["count"][:], count)
    np.testing.assert_allclose(cells["mean"][:], mean, rtol=1e-5, atol=1e-6)
    assert cells["count"].dtype == np.int32
    assert cells["mean"].dtype == np.float32


def test_whitening_matches_numpy(gridded):
    store, layout, _ = gridded
    _, mean, whitening, _, _, _ = _expected(store, layout, 3, CONFIG)
    group = open_store(store.path)
    stored = group[f"whitening/{store.layer}"][:]
    assert stored.shape == (6, 6)
    assert stored.dtype == np.float32
    np.testing.assert_allclose(stored, whitening, rtol=1e-4, atol=1e-5)
    whitened = group[f"grids/{store.layer}/3/whitened_mean"][:]
    np.testing.assert_allclose(whitened, mean @ whitening, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", CONFIG.sizes)
def test_top_classes_match_numpy(gridded, size):
    store, layout, _ = gridded
    _, _, _, top_class, top_score, _ = _expected(store, layout, size, CONFIG)
    cells = open_store(store.path)[f"grids/{store.layer}/{size}"]
    np.testing.assert_array_equal(cells["top_class"][:], top_class)
    np.testing.assert_allclose(cells["top_score"][:], top_score, rtol=1e-5, atol=1e-6)
    assert cells["top_class"].dtype == np.int16


@pytest.mark.parametrize("size", CONFIG.sizes)
def test_exemplars_match_numpy(gridded, size):
    store, layout, _ = gridded
    _, _, _, _, _, exemplars = _expected(store, layout, size, CONFIG)
    cells = open_store(store.path)[f"grids/{store.layer}/{size}"]
    np.testing.assert_array_equal(cells["exemplars"][:], exemplars)
    assert cells["exemplars"].dtype == np.int64


def test_invalid_rows_never_exemplars(gridded):
    store, _, _ = gridded
    for size in CONFIG.sizes:
        exemplars = open_store(store.path)[f"grids/{store.layer}/{size}/exemplars"][:]
        assert not np.isin(exemplars, INVALID).any()


def test_group_attributes(gridded):
    store, layout, info = gridded
    group = open_store(store.path)
    assert group[f"grids/{store.layer}"].attrs["sizes"] == CONFIG.sizes
    for size in CONFIG.sizes:
        count, *_ = _expected(store, layout, size, CONFIG)
        attrs = group[f"grids/{store.layer}/{size}"].attrs
        assert attrs["size"] == size
        assert attrs["min_count"] == CONFIG.min_count
        assert attrs["n_nonempty"] == int((count >= CONFIG.min_count).sum())
        assert info["n_nonempty"][str(size)] == attrs["n_nonempty"]
    assert info["n"] == 240 - len(INVALID)


def test_streaming_chunks_give_same_result(tmp_path, monkeypatch, gridded):
    reference, _, _ = gridded
    monkeypatch.setattr(atlas.grid, "CHUNK_ROWS", 17)
    store, _ = _store_with_layout(tmp_path / "s.zarr")
    run_grid(store.path, CONFIG)
    for name in ("count", "mean", "top_class", "top_score", "exemplars"):
        chunked = open_store(store.path)[f"grids/{store.layer}/5/{name}"][:]
        whole = open_store(reference.path)[f"grids/{reference.layer}/5/{name}"][:]
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6, err_msg=name)


def test_empty_cells_keep_count(tmp_path):
    store, layout = _store_with_layout(tmp_path / "s.zarr", n_rows=60, invalid=(0, 13))
    run_grid(store.path, GridConfig(sizes=[4], min_count=1_000, n_exemplars=2, top_classes=2))
    cells = open_store(store.path)[f"grids/{store.layer}/4"]
    count, *_ = _expected(store, layout, 4, CONFIG)
    np.testing.assert_array_equal(cells["count"][:], count)
    assert (cells["top_class"][:] == -1).all()
    assert (cells["exemplars"][:] == -1).all()
    assert (cells["mean"][:] == 0).all()
    assert cells.attrs["n_nonempty"] == 0


def test_exemplars_pad_small_cells(tmp_path):
    # Two rows per cell at size 2 with n_exemplars 3: the third slot stays -1.
    layout = np.array([[0.1, 0.1], [0.2, 0.2], [0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.9, 0.9], [0.8, 0.8]])
    store, _ = _store_with_layout(tmp_path / "s.zarr", n_rows=8, layout=layout, invalid=())
    run_grid(store.path, GridConfig(sizes=[2], min_count=1, n_exemplars=3, top_classes=2))
    exemplars = open_store(store.path)[f"grids/{store.layer}/2/exemplars"][:]
    np.testing.assert_array_equal(np.sort(exemplars[0, 0, :2]), [0, 1])
    np.testing.assert_array_equal(np.sort(exemplars[1, 0, :2]), [4, 5])
    assert (exemplars[:, :, 2] == -1).all()


def test_rerun_noop_force_replaces_sizes(tmp_path, caplog):
    store, _ = _store_with_layout(tmp_path / "s.zarr", n_rows=50, invalid=(0, 13))
    first = run_grid(store.path, GridConfig(sizes=[2, 4], min_count=1))
    with caplog.at_level(logging.WARNING, logger="atlas.grid"):
        assert run_grid(store.path, GridConfig(sizes=[3], min_count=1)) == first
    assert "exist at sizes [2, 4], not the configured [3]" in caplog.text
    assert "Pass --force" in caplog.text

    group = open_store(store.path, mode="r+")
    mark_stage(group, "render", store.layer)
    run_grid(store.path, GridConfig(sizes=[3], min_count=1), force=True)
    group = open_store(store.path)
    assert sorted(group[f"grids/{store.layer}"].group_keys()) == ["3"]
    assert not stage_done(group, "render", store.layer)


def test_needs_projection(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_rows=10)
    with pytest.raises(StageNotReadyError, match="project for layer layer2"):
        run_grid(store.path, CONFIG)


def test_whitening_handles_dead_channel():
    values = np.random.default_rng(0).normal(size=(100, 5))
    values[:, 2] = 0.0  # a channel that never fires makes AᵀA singular
    whitening = whitening_matrix(values.T @ values, 100)
    assert np.isfinite(whitening).all()
    np.testing.assert_allclose(whitening, np.linalg.pinv(values.T @ values / 100), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(whitening[2], 0.0, atol=1e-12)


def test_whitening_ignores_near_dead_channel():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(100, 5))
    values[:, 4] = 1e-6 * rng.normal(size=100)  # variance 1e-12 of the others': noise, not signal
    whitening = whitening_matrix(values.T @ values, 100)
    # A plain inverse would put about 1e12 on that channel's diagonal.
    assert np.abs(whitening).max() < 10
    np.testing.assert_allclose(whitening[:4, :4], np.linalg.inv(values[:, :4].T @ values[:, :4] / 100), rtol=1e-3)


@pytest.mark.parametrize(
    ("point", "size", "cell"),
    [
        ((0.0, 0.0), 4, (0, 0)),
        ((1.0, 1.0), 4, (3, 3)),
        ((0.5, 0.25), 4, (1, 2)),
        ((0.999, 0.0), 10, (0, 9)),
        ((0.3, 0.7), 1, (0, 0)),
        ((np.nan, 0.5), 4, (-1, -1)),
    ],
)
def test_cell_of(point, size, cell):
    i, j = cell_of(np.array([point]), size)
    assert (int(i[0]), int(j[0])) == cell


def test_cell_of_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        cell_of(np.zeros((3, 3)), 4)
