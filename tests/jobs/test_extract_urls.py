"""Extraction from fsspec URLs, using the in-process memory filesystem."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

from atlas.store import open_store, read_strings
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
