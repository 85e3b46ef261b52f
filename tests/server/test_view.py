"""Tests of URL query arguments and zoom level choice."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

from server.view import (
    ViewRequest,
    choose_level,
    parse_view_arguments,
    resolve_cell,
    resolve_class,
    resolve_layer,
    resolve_zoom,
    span_for_level,
    view_query,
)

CLASSES = ["tabby cat", "espresso", "rocket"]


def arguments(**values: str) -> dict[str, list[bytes]]:
    return {name: [value.encode()] for name, value in values.items()}


def test_parse_valid_arguments() -> None:
    request = parse_view_arguments(arguments(store="1", layer="blocks.4", zoom="40", cell="12,7", **{"class": "espresso"}), 2)
    assert request.store == 1
    assert request.layer == "blocks.4"
    assert request.zoom == 40
    assert request.cell == (12, 7)
    assert request.class_text == "espresso"
    assert request.problems == []


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("store", "2", "store='2' ignored"),
        ("store", "-1", "store='-1' ignored"),
        ("store", "../../etc/passwd", "expected a number from 0 to 1"),
        ("zoom", "big", "zoom='big' ignored"),
        ("zoom", "0", "zoom='0' ignored"),
        ("cell", "3", "cell='3' ignored"),
        ("cell", "1,-2", "cell='1,-2' ignored"),
        ("cell", "a,b", "two numbers"),
    ],
)
def test_parse_drops_invalid_values(name: str, value: str, fragment: str) -> None:
    request = parse_view_arguments(arguments(**{name: value}), 2)
    assert request.store == 0
    assert request.zoom is None
    assert request.cell is None
    assert len(request.problems) == 1
    assert fragment in request.problems[0]


def test_parse_cuts_long_values() -> None:
    request = parse_view_arguments(arguments(layer="x" * 5000), 1)
    assert request.layer is not None
    assert len(request.layer) == 200


def test_resolve_against_store() -> None:
    request = ViewRequest(layer="layer9", zoom=33, cell=(5, 5))
    assert resolve_layer(request, ["layer2", "layer1"]) == "layer2"
    assert resolve_zoom(request, [6, 12]) is None
    assert resolve_cell(request, 5) is None
    assert len(request.problems) == 3
    assert "grids for layer2, layer1" in request.problems[0]
    assert "grid sizes are 6, 12" in request.problems[1]
    assert "rows and columns 0 to 4" in request.problems[2]

    good = ViewRequest(layer="layer1", zoom=12, cell=(11, 0))
    assert resolve_layer(good, ["layer2", "layer1"]) == "layer1"
    assert resolve_zoom(good, [6, 12]) == 12
    assert resolve_cell(good, 12) == (11, 0)
    assert good.problems == []


def test_resolve_class_by_name_or_index() -> None:
    assert resolve_class("Espresso", CLASSES) == 1
    assert resolve_class(" rocket ", CLASSES) == 2
    assert resolve_class("0", CLASSES) == 0
    assert resolve_class(None, CLASSES) is None
    request = ViewRequest()
    assert resolve_class("zebra", CLASSES, request) is None
    assert resolve_class("3", CLASSES, request) is None
    assert len(request.problems) == 2


@pytest.mark.parametrize(
    ("span", "expected"),
    [(1.0, 20), (0.8, 20), (0.75, 40), (0.5, 40), (0.37, 80), (0.1, 80), (2.0, 20)],
)
def test_choose_level(span: float, expected: int) -> None:
    assert choose_level([20, 40, 80], span) == expected


def test_span_for_level_round_trips() -> None:
    sizes = [20, 40, 80]
    for size in sizes:
        assert choose_level(sizes, span_for_level(sizes, size)) == size


def test_view_query_parses_back() -> None:
    query = view_query(1, "blocks.4", 40, (12, 7), "tabby cat")
    parsed = parse_qs(query.lstrip("?"))
    request = parse_view_arguments({key: [value.encode() for value in values] for key, values in parsed.items()}, 2)
    assert (request.store, request.layer, request.zoom, request.cell, request.class_text) == (
        1, "blocks.4", 40, (12, 7), "tabby cat",
    )
    assert view_query(0, "l", None, None, None) == "?store=0&layer=l"
