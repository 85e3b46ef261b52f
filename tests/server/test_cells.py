"""Tests of the atlas plot's column data."""

from __future__ import annotations

import numpy as np
import pytest

from server.cells import (
    VEIL_MATCH,
    VEIL_OTHER,
    VEIL_PARTIAL,
    cell_columns,
    class_completions,
    class_label,
    query_columns,
    veil,
)
from server.state import GridLevel, LayerData
from server.upload import CellHit

NAMES = ["cat", "dog", "car", "tree"]


def make_level(size: int = 4, seed: int = 0) -> GridLevel:
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 10, size=(size, size)).astype(np.int32)
    filled = count >= 3
    top_class = rng.integers(0, len(NAMES), size=(size, size, 3)).astype(np.int16)
    top_class[~filled] = -1
    top_score = rng.random((size, size, 3)).astype(np.float32)
    return GridLevel(
        size=size, count=count, filled=filled, top_class=top_class, top_score=top_score,
        exemplars=np.full((size, size, 2), -1, np.int64), icon_done=filled.copy(), icons=None, min_count=3,
    )


def test_cell_columns_geometry_and_counts() -> None:
    level = make_level()
    columns = cell_columns(level, NAMES)
    i, j = np.nonzero(level.filled)

    assert columns["i"] == i.tolist()
    assert columns["j"] == j.tolist()
    np.testing.assert_allclose(columns["x"], (j + 0.5) / level.size)
    np.testing.assert_allclose(columns["y"], (i + 0.5) / level.size)
    assert columns["w"] == [0.25] * len(i)
    assert columns["count"] == level.count[i, j].tolist()
    assert columns["veil"] == [0.0] * len(i)
    assert columns["query"] == [""] * len(i)
    first = int(level.top_class[i[0], j[0], 0])
    assert columns["top1"][0] == class_label(NAMES, first, float(level.top_score[i[0], j[0], 0]))
    assert columns["top1"][0].startswith(NAMES[first])


def test_class_filter_veils_other_cells() -> None:
    level = make_level(seed=1)
    class_id = 2
    expected = np.full(level.count.shape, VEIL_OTHER)
    expected[(level.top_class == class_id).any(axis=-1)] = VEIL_PARTIAL
    expected[level.top_class[..., 0] == class_id] = VEIL_MATCH
    np.testing.assert_array_equal(veil(level, class_id), expected)

    columns = cell_columns(level, NAMES, class_id=class_id)
    i, j = np.nonzero(level.filled)
    np.testing.assert_array_equal(columns["veil"], expected[i, j])
    np.testing.assert_array_equal(columns["outline"], (level.top_class[i, j, 0] == class_id).astype(float))


def test_cell_columns_mark_query_hits() -> None:
    level = make_level(seed=2)
    i, j = np.nonzero(level.filled)
    hit = CellHit(int(i[1]), int(j[1]), count=7, mean_score=0.8125)
    columns = cell_columns(level, NAMES, query_cells=[hit])
    assert columns["query"][1] == "upload: 7 hits, mean cosine 0.812"
    assert sum(1 for text in columns["query"] if text) == 1


def test_query_columns_rank_and_place() -> None:
    cells = [CellHit(1, 2, 10, 0.9), CellHit(3, 0, 5, 0.7)]
    columns = query_columns(cells, size=4)
    assert columns["label"] == ["1", "2"]
    assert columns["x"] == pytest.approx([2.5 / 4, 0.5 / 4])
    assert columns["y"] == pytest.approx([1.5 / 4, 3.5 / 4])
    assert columns["label_x"] == pytest.approx([0.5, 0.0])
    assert columns["label_y"] == pytest.approx([0.5, 1.0])
    assert columns["line_width"][0] > columns["line_width"][1]
    assert query_columns([], size=4)["x"] == []


def test_class_completions_lists_present_classes() -> None:
    level = make_level(seed=3)
    layer = LayerData(name="layer", levels={4: level}, projection=None)
    present = {NAMES[c] for c in np.unique(level.top_class[level.filled])}
    assert class_completions(layer, NAMES) == sorted(present, key=str.lower)
