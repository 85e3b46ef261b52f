"""Extraction from fsspec URLs, using the in-process memory filesystem."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

from atlas.store import open_store, read_strings, sidecar_path
from jobs.extract import run_extract
from tests.conftest import tiny_config

COMPARED = ["activations/layer2", "samples/image", "samples/y", "samples/x", "samples/valid", "images/top_class"]


@pytest.fixture
def memory_images(image_folder):
    """The twenty test images copied to a fresh memory:// folder, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/atlas-extract-{uuid.uuid4().hex}"
    for path in sorted(image_folder.glob("*.png")):
        fs.pipe(f"{root}/{path.name}", path.read_bytes())
    yield fs, root
    fs.rm(root, recursive=True)


def test_memory_url_equals_local_folder(tiny_spec, image_folder, memory_images, tmp_path):
    fs, root = memory_images
    # The memory filesystem lives in this process only, so tiny_config's threads-only cluster is required.
    url_config = tiny_config(tiny_spec, f"memory://{root}", tmp_path / "url.zarr")
    assert url_config.compute.processes is False
    local_config = tiny_config(tiny_spec, image_folder, tmp_path / "local.zarr")

    url_summary = run_extract(url_config, progress=False)
    local_summary = run_extract(local_config, progress=False)
    assert url_summary["n_ok"] == 20
    assert url_summary["n_rejected"] == 0
    assert url_summary["n_valid_rows"] == local_summary["n_valid_rows"]

    url_store = open_store(url_config.store)
    local_store = open_store(local_config.store)
    url_paths = read_strings(url_store["images/path"])
    local_paths = read_strings(local_store["images/path"])
    assert [path.rsplit("/", 1)[1] for path in url_paths] == [path.rsplit("/", 1)[1] for path in local_paths]
    assert all(path.startswith(f"memory://{root}/") for path in url_paths)
    for name in COMPARED:
        np.testing.assert_array_equal(url_store[name][:], local_store[name][:], err_msg=name)


def test_memory_url_missing_file_rejected(tiny_spec, image_folder, tmp_path, memory_images):
    fs, root = memory_images
    fs.pipe(f"{root}/empty.png", b"")
    listing = tmp_path / "list.txt"
    listing.write_text(f"memory://{root}/img_0000.png\nmemory://{root}/gone.png\nmemory://{root}/empty.png\n")
    config = tiny_config(tiny_spec, listing, tmp_path / "s.zarr")
    summary = run_extract(config, progress=False)
    assert summary["n_ok"] == 1
    status = read_strings(open_store(config.store)["images/status"])
    assert status[0] == "ok"
    assert "not found" in status[1]
    assert "empty" in status[2]


@pytest.fixture
def memory_store():
    """A fresh memory:// store URL, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/atlas-store-{uuid.uuid4().hex}"
    yield f"memory://{root}/s.zarr"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_store_at_url_equals_local_store(tiny_spec, image_folder, memory_store, tmp_path):
    url_config = tiny_config(tiny_spec, image_folder, memory_store)
    local_config = tiny_config(tiny_spec, image_folder, tmp_path / "local.zarr")
    url_summary = run_extract(url_config, progress=False)
    run_extract(local_config, progress=False)

    assert url_summary["n_ok"] == 20
    url_store = open_store(memory_store)
    local_store = open_store(local_config.store)
    for name in COMPARED:
        np.testing.assert_array_equal(url_store[name][:], local_store[name][:], err_msg=name)
    # The lock is released: no lock file is left in the store.
    assert not fsspec.filesystem("memory").exists(memory_store.removeprefix("memory://") + "/sidecar/lock.json")


def test_store_at_url_resumes_lost_shard(tiny_spec, image_folder, memory_store):
    config = tiny_config(tiny_spec, image_folder, memory_store)
    run_extract(config, progress=False)
    group = open_store(memory_store, mode="r+")
    full = np.asarray(group["activations/layer2"][:])
    # Lose shard 2 (images 8..11): its rows go back to the fill value and it is not done.
    group["activations/layer2"][8 * 6 : 12 * 6] = 0
    group["extract/shard_done"][2] = False
    group.attrs["stages"] = {}

    resumed = run_extract(config, progress=False)

    assert resumed["n_ok"] == 20
    assert resumed["images_per_second"] == pytest.approx(4 / resumed["seconds"], rel=0.02)
    np.testing.assert_array_equal(open_store(memory_store)["activations/layer2"][:], full)


def test_store_at_url_live_lock_refused(tiny_spec, image_folder, memory_store):
    import json
    import os
    import socket
    import time

    from atlas.errors import StoreLockedError

    config = tiny_config(tiny_spec, image_folder, memory_store)
    run_extract(config, progress=False)
    group = open_store(memory_store, mode="r+")
    group.attrs["stages"] = {}
    # This test process is the holder: alive, and older than its lock.
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": "extract", "started": "now", "created_ts": time.time()}
    fsspec.filesystem("memory").pipe(memory_store.removeprefix("memory://") + "/sidecar/lock.json", json.dumps(holder).encode())

    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        run_extract(config, progress=False)


def test_file_url_store_is_local_folder(tiny_spec, image_folder, tmp_path):
    folder = tmp_path / "nested" / "s.zarr"
    config = tiny_config(tiny_spec, image_folder, f"file://{folder}")
    assert config.store == str(folder)

    summary = run_extract(config, progress=False)
    assert summary["n_ok"] == 20
    assert (folder / "zarr.json").is_file()
    reopened = open_store(f"file://{folder}")
    assert reopened["activations/layer2"].shape == (summary["n_rows"], 16)
    assert sidecar_path(f"file://{folder}", "index.faiss").parent == folder / "sidecar"


@pytest.fixture
def http_images(image_folder):
    """Serve the twenty test images over HTTP on 127.0.0.1; yield the base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(image_folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_images_equal_local_folder(tiny_spec, image_folder, http_images, tmp_path):
    names = sorted(path.name for path in image_folder.glob("*.png"))
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{http_images}/{name}\n" for name in names) + f"{http_images}/missing.png\n")
    url_config = tiny_config(tiny_spec, listing, tmp_path / "url.zarr")
    local_config = tiny_config(tiny_spec, image_folder, tmp_path / "local.zarr")

    url_summary = run_extract(url_config, progress=False)
    run_extract(local_config, progress=False)
    assert url_summary["n_ok"] == 20
    assert url_summary["n_rejected"] == 1
    url_store = open_store(url_config.store)
    local_store = open_store(local_config.store)
    status = read_strings(url_store["images/status"])
    assert status[-1] == "file not found"
    for name in COMPARED:
        np.testing.assert_array_equal(url_store[name][:][: local_store[name].shape[0]], local_store[name][:], err_msg=name)


def test_rerun_retries_network_failures(tiny_spec, image_folder, tmp_path):
    import functools
    import socket
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    names = sorted(path.name for path in image_folder.glob("*.png"))[:3]
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"http://127.0.0.1:{port}/{name}\n" for name in names))
    config = tiny_config(tiny_spec, listing, tmp_path / "s.zarr")

    # Nothing listens on the port yet: every image is rejected as unreachable.
    first = run_extract(config, progress=False)
    status = read_strings(open_store(config.store)["images/status"])
    assert first["n_ok"] == 0
    assert all(reason.startswith("cannot connect: ") for reason in status)

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(QuietHandler, directory=str(image_folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        second = run_extract(config, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert second["n_ok"] == 3
    assert list(read_strings(open_store(config.store)["images/status"])) == ["ok"] * 3
