"""Tests of the launcher: limits, origins, start and stop, and one session over the websocket."""

from __future__ import annotations

import urllib.request

import pytest
from bokeh.client import pull_session

from atlas.config import ServeConfig
from atlas.errors import ConfigError, StoreError
from server import state
from server.serve import create_server, free_port, start_in_thread, websocket_max_bytes, websocket_origins
from tests.server.store_builder import BuiltStore


def test_websocket_limit_fits_base64_upload() -> None:
    assert websocket_max_bytes(1) == 20 * 1024 * 1024
    limit = websocket_max_bytes(100)
    # Twice the upload, grown by 4/3 for base64, plus room for the message around it.
    assert limit > 100 * 1024 * 1024 * 2 * 4 / 3
    assert limit < 100 * 1024 * 1024 * 3


def test_websocket_origins_include_served_address() -> None:
    origins = websocket_origins(ServeConfig(host="127.0.0.1"), 6001)
    assert origins[:2] == ["localhost:5006", "127.0.0.1:5006"]
    assert "127.0.0.1:6001" in origins
    assert "localhost:6001" in origins
    public = websocket_origins(ServeConfig(host="10.0.0.5", allow_websocket_origin=["atlas.example:80"]), 80)
    assert public == ["atlas.example:80", "10.0.0.5:80"]


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536


def test_create_server_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no store given"):
        create_server([], ServeConfig(port=0))
    with pytest.raises(StoreError, match="no feature store"):
        create_server([str(tmp_path / "missing.zarr")], ServeConfig(port=0))


def test_server_serves_a_session(built_store: BuiltStore, serve_config: ServeConfig) -> None:
    server = start_in_thread([str(built_store.path)], serve_config)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/"
        page = urllib.request.urlopen(server.url, timeout=60).read().decode()
        assert "bokeh" in page.lower()
        # The custom template paints the page dark.
        assert "#15181d" in page

        session = pull_session(url=server.url, arguments={"zoom": "12", "cell": "1,2"})
        try:
            document = session.document
            assert document.get_model_by_name("atlas") is not None
            assert document.get_model_by_name("zoom_select").value == "auto"
            status = document.get_model_by_name("status").text
            assert "Grid 12 × 12" in status
            assert "Cell 1, 2" in document.get_model_by_name("detail_panel").text
        finally:
            session.close()
    finally:
        server.stop()
    assert not server.thread.is_alive()
    assert state.store_paths() == [str(built_store.path)]
