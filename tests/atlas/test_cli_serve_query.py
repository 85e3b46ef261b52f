"""Tests of `atlas serve` argument handling and `atlas query` errors, through click's CliRunner."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import server.serve
import server.state
from atlas.cli import main
from atlas.config import ServeConfig
from atlas.store import create_store, open_store


def make_store(path: Path) -> str:
    create_store(
        path, attrs={"model": "efficientnet_lite0"}, n_images=1, rows_per_image=1, layer_channels={"blocks.4": 4},
        shard_size=1, attribution_top_k=1,
    )
    return str(path)


@pytest.fixture()
def stores(tmp_path: Path) -> list[str]:
    return [make_store(tmp_path / "a.zarr"), make_store(tmp_path / "b.zarr"), make_store(tmp_path / "c.zarr")]


@pytest.fixture()
def serve_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the server launcher with a recorder, so no server starts."""
    calls: list[dict] = []

    def record(store_paths: list[str], config: ServeConfig, *, show: bool = False) -> None:
        calls.append({"stores": list(store_paths), "config": config, "show": show})

    monkeypatch.setattr(server.serve, "serve", record)
    return calls


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["{a}"], ["{a}"]),
        (["--store", "{a}"], ["{a}"]),
        (["--store", "{a}", "--store", "{b}"], ["{a}", "{b}"]),
        # STORE arguments come first, then --store options, whatever the order on the command line.
        (["--store", "{c}", "{a}", "{b}"], ["{a}", "{b}", "{c}"]),
    ],
)
def test_serve_accepts_both_store_forms(
    stores: list[str], serve_calls: list[dict], arguments: list[str], expected: list[str]
) -> None:
    names = {"a": stores[0], "b": stores[1], "c": stores[2]}
    argv = [argument.format(**names) for argument in arguments]

    result = CliRunner().invoke(main, ["serve", *argv, "--port", "6123"])

    assert result.exit_code == 0, result.output
    assert len(serve_calls) == 1
    assert serve_calls[0]["stores"] == [path.format(**names) for path in expected]
    assert serve_calls[0]["config"].port == 6123


def test_serve_without_store_is_usage_error(serve_calls: list[dict]) -> None:
    result = CliRunner().invoke(main, ["serve"])

    assert result.exit_code == 2
    assert "no store given" in result.output
    assert "atlas serve STORE..." in result.output
    assert "atlas serve --store STORE" in result.output
    assert serve_calls == []


def test_serve_option_store_must_exist(tmp_path: Path, serve_calls: list[dict]) -> None:
    missing = tmp_path / "missing.zarr"

    result = CliRunner().invoke(main, ["serve", "--store", str(missing)])

    assert result.exit_code == 2
    assert f"no feature store at {missing}" in result.output
    assert serve_calls == []


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("notes.png", b"these are notes, not pixels\n", "not an image file"),
    ],
)
def test_query_names_undecodable_image(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    image = tmp_path / name
    image.write_bytes(content)
    store = make_store(tmp_path / "store.zarr")

    result = CliRunner().invoke(main, ["query", store, str(image)])

    assert result.exit_code == 2
    assert f"error: cannot decode image {image}: {reason}" in result.output
    assert "pass an image file that Pillow can read" in result.output


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["{a}", "--store", "{a}"], ["{a}"]),
        (["--store", "{a}", "--store", "{a}"], ["{a}"]),
        (["{b}", "{a}", "--store", "{b}"], ["{b}", "{a}"]),
    ],
)
def test_serve_drops_repeated_stores(
    stores: list[str], serve_calls: list[dict], arguments: list[str], expected: list[str]
) -> None:
    names = {"a": stores[0], "b": stores[1]}
    argv = [argument.format(**names) for argument in arguments]

    result = CliRunner().invoke(main, ["serve", *argv])

    assert result.exit_code == 0, result.output
    assert serve_calls[0]["stores"] == [path.format(**names) for path in expected]


def test_serve_compares_resolved_paths(
    stores: list[str], serve_calls: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["serve", "a.zarr", "--store", "./a.zarr/", "--store", stores[0]])

    assert result.exit_code == 0, result.output
    assert serve_calls[0]["stores"] == ["a.zarr"]


def add_grid(path: str, *, icons: bool) -> None:
    """Add a 2 x 2 grid of layer blocks.4 to a store, with one rendered icon when ``icons``."""
    group = open_store(path, mode="r+")
    grid = group.create_group("grids/blocks.4/2")
    grid.attrs["min_count"] = 1
    count = grid.create_array("count", shape=(2, 2), dtype="int32", fill_value=0)
    count[:] = np.ones((2, 2), np.int32)
    if icons:
        grid.create_array("icons", shape=(2, 2, 4, 4, 3), dtype="uint8", fill_value=0)
        done = grid.create_array("icon_done", shape=(2, 2), dtype="bool", fill_value=False)
        done[0, 0] = True


@pytest.mark.parametrize("icons", [False, True])
def test_serve_warns_without_icons(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, icons: bool
) -> None:
    # Keep the server's process-wide store registry of other tests untouched.
    monkeypatch.setattr(server.state, "_registry", server.state._Registry())
    monkeypatch.setattr(server.state, "_stores", {})
    path = make_store(tmp_path / "a.zarr")
    add_grid(path, icons=icons)

    with caplog.at_level(logging.WARNING, logger="server.serve"):
        server.serve._validate([path], ServeConfig())

    warnings = [record.getMessage() for record in caplog.records if record.name == "server.serve"]
    if icons:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert f"store {path} has no rendered icons for layer blocks.4" in warnings[0]
        assert f"run `atlas render {path} --layer blocks.4`" in warnings[0]
