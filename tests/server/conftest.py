"""Fixtures of the explorer tests: one built store per session and a running server."""

from __future__ import annotations

import pytest

from atlas.config import ServeConfig
from tests.server.store_builder import BuiltStore, build_store

# Small enough that the oversized-upload test writes well under a megabyte.
TEST_MAX_UPLOAD_MB = 0.25


@pytest.fixture(scope="session")
def built_store(tmp_path_factory: pytest.TempPathFactory) -> BuiltStore:
    """A store with tiny-model activations, index, layout, grids 6 and 12, and icons."""
    return build_store(tmp_path_factory.mktemp("explorer"))


@pytest.fixture(scope="session")
def serve_config() -> ServeConfig:
    """Serve settings of the test server: a free port and a small upload limit."""
    return ServeConfig(port=0, max_upload_mb=TEST_MAX_UPLOAD_MB, neighbors=6, mosaic_max_px=512)


@pytest.fixture(scope="session")
def running_server(built_store: BuiltStore, serve_config: ServeConfig):
    """The explorer serving ``built_store`` twice (as stores 0 and 1) in a background thread."""
    from server.serve import start_in_thread

    server = start_in_thread([str(built_store.path), str(built_store.path)], serve_config)
    try:
        yield server
    finally:
        server.stop()
