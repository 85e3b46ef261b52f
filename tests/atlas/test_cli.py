from __future__ import annotations

import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from atlas.cli import main
from atlas.errors import StoreError
from atlas.store import open_store
from tests.conftest import write_bad_folder

TINY = ["--set", "compute.processes=false", "--set", "extract.positions=random", "--set", "extract.per_image=4",
        "--set", "extract.shard_size=4", "--layer", "layer2"]


@pytest.fixture(scope="module")
def bad_store(tiny_spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_bad_folder(root / "bad")
    store = root / "stores" / "bad.zarr"
    result = CliRunner().invoke(main, ["-q", "extract", "--images", str(root / "bad"), "--store", str(store), "--model", tiny_spec, *TINY])
    assert result.exit_code == 0, result.output
    return store


def test_info_lists_rejected(bad_store):
    result = CliRunner().invoke(main, ["info", str(bad_store)])
    assert result.exit_code == 0, result.output
    assert "4 ok, 3 rejected" in result.output
    assert "empty.jpg: empty file (0 bytes)" in result.output
    assert "notes.jpg: not an image file" in result.output
    assert "truncated.jpg: truncated image file" in result.output


def test_info_json(bad_store):
    result = CliRunner().invoke(main, ["info", str(bad_store), "--json"])
    data = json.loads(result.output)
    assert data["n_rejected"] == 3
    assert data["n_activations"] == 4 * 4
    assert data["layers"]["layer2"]["dim"] == 16
    assert data["stages"] == {"extract": True}


def test_ls_finds_store(bad_store):
    result = CliRunner().invoke(main, ["ls", str(bad_store.parent.parent), "--json"])
    assert result.exit_code == 0, result.output
    stores = json.loads(result.output)
    assert [item["store"] for item in stores] == [str(bad_store)]
    assert stores[0]["model"].startswith("file:")


def test_ls_and_info_mark_partial(bad_store, tmp_path):
    partial = tmp_path / "stores" / "partial.zarr"
    shutil.copytree(bad_store, partial)
    group = open_store(partial, mode="r+")
    group["extract/shard_done"][0] = False
    group.attrs["stages"] = {}

    listed = CliRunner().invoke(main, ["ls", str(tmp_path)])
    info = CliRunner().invoke(main, ["info", str(partial)])
    n_shards = group["extract/shard_done"].shape[0]
    expected = f"extract partial: {n_shards - 1} of {n_shards} shards"
    assert listed.exit_code == 0, listed.output
    assert expected in listed.output
    assert expected in info.output
    complete = CliRunner().invoke(main, ["ls", str(bad_store.parent)])
    assert "partial" not in complete.output


def test_missing_store_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "none.zarr")])
    assert result.exit_code == 2
    assert "no feature store at" in result.output
    assert "Traceback" not in result.output


def test_bad_override_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["extract", "--store", str(tmp_path / "s.zarr"), "--set", "grid.nope=1"])
    assert result.exit_code == 2
    assert "grid.nope: unknown key" in result.output


def test_unknown_layer_clean_error(tiny_spec, image_folder, tmp_path, caplog):
    result = CliRunner().invoke(
        main, ["extract", "--images", str(image_folder), "--store", str(tmp_path / "s.zarr"), "--model", tiny_spec,
               "--layer", "layer9", "--set", "compute.processes=false"],
    )
    assert result.exit_code == 2
    assert "layer 'layer9' not found" in result.output
    assert "layer1" in result.output
    # The worker hands the error back instead of logging "Compute Failed" with a traceback.
    assert [record.getMessage() for record in caplog.records if record.name.startswith("distributed")
            and record.levelno >= logging.ERROR] == []


def test_info_shows_worker_peak_memory(bad_store):
    data = json.loads(CliRunner().invoke(main, ["info", str(bad_store), "--json"]).output)
    result = CliRunner().invoke(main, ["info", str(bad_store)])

    peaks = data["worker_peak_memory_mib"]
    assert peaks
    assert all(mib > 0 for mib in peaks.values())
    assert data["extract_seconds"] is not None
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("extract "))
    assert f"{data['n_images']:,} images in" in line
    assert f"worker peak memory {max(peaks.values()):,.0f} MiB" in line


@pytest.fixture()
def corrupt_root(bad_store, tmp_path):
    """Copy the store twice under a root, then overwrite one copy's zarr.json with text that is not JSON."""
    good = tmp_path / "stores" / "good.zarr"
    broken = tmp_path / "stores" / "broken.zarr"
    shutil.copytree(bad_store, good)
    shutil.copytree(bad_store, broken)
    (broken / "zarr.json").write_text("{not json")
    return tmp_path, good, broken


def test_ls_lists_corrupt_store(corrupt_root):
    root, good, broken = corrupt_root

    text = CliRunner().invoke(main, ["ls", str(root)])
    listed = CliRunner().invoke(main, ["ls", str(root), "--json"])

    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert any(line.startswith(f"{good}  file:") for line in lines)
    assert any(line.startswith(f"{broken}  unreadable: cannot read the store metadata at {broken}") for line in lines)
    assert listed.exit_code == 0, listed.output
    entries = {item["store"]: item for item in json.loads(listed.output)}
    assert set(entries) == {str(good), str(broken)}
    assert "error" not in entries[str(good)]
    assert "cannot read the store metadata" in entries[str(broken)]["error"]


def test_info_corrupt_store_clean_error(corrupt_root):
    _, _, broken = corrupt_root

    result = CliRunner().invoke(main, ["info", str(broken)])

    assert result.exit_code == 2
    assert f"error: cannot read the store metadata at {broken}" in result.output
    assert "atlas extract --store" in result.output
    assert "Traceback" not in result.output


def test_info_corrupt_array_clean_error(bad_store, tmp_path):
    store = tmp_path / "nested.zarr"
    shutil.copytree(bad_store, store)
    (store / "images" / "path" / "zarr.json").write_text("")

    result = CliRunner().invoke(main, ["info", str(store)])

    assert result.exit_code == 2
    assert f"error: cannot read the store metadata at {store}: JSONDecodeError" in result.output


@pytest.fixture()
def missing_backend(monkeypatch):
    """Register a made-up fsspec protocol whose implementing package is not installed."""
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "atlasmissing", {
        "class": "atlas_missing_backend.FileSystem", "err": "Install atlas_missing_backend to access atlasmissing",
    })
    return "atlasmissing://bucket/x.zarr"


@pytest.mark.parametrize("helper", ["store_exists", "open_store", "create_store"])
def test_store_helpers_name_missing_backend(missing_backend, helper):
    import atlas.store

    call = {
        "store_exists": lambda: atlas.store.store_exists(missing_backend),
        "open_store": lambda: atlas.store.open_store(missing_backend),
        "create_store": lambda: atlas.store.create_store(
            missing_backend, attrs={}, n_images=1, rows_per_image=1, layer_channels={"a": 1}, shard_size=1,
            attribution_top_k=1,
        ),
    }[helper]
    with pytest.raises(StoreError, match="the fsspec backend for atlasmissing:// is not installed") as caught:
        call()
    assert "pip install atlas_missing_backend" in str(caught.value)
    assert "use a local store folder" in str(caught.value)


def test_extract_missing_backend_clean_error(missing_backend, image_folder):
    result = CliRunner().invoke(main, ["extract", "--images", str(image_folder), "--store", missing_backend])

    assert result.exit_code == 2
    assert ("error: the fsspec backend for atlasmissing:// is not installed "
            "(Install atlas_missing_backend to access atlasmissing)") in result.output
    assert "Traceback" not in result.output


def test_interrupt_exits_with_130(monkeypatch, tmp_path):
    def interrupt(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("atlas.inspect.store_info", interrupt)

    result = CliRunner().invoke(main, ["info", str(tmp_path)])

    assert result.exit_code == 130
    assert "Aborted!" in result.output
    assert "Traceback" not in result.output


def test_build_url_store_refused_first(tmp_path):
    result = CliRunner().invoke(main, ["build", "--images", str(tmp_path), "--store", "memory://atlas-build/s.zarr"])
    assert result.exit_code == 2
    assert "atlas build needs a local store folder, got memory://atlas-build/s.zarr" in result.output
    assert "Traceback" not in result.output
