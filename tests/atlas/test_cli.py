from __future__ import annotations

import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from atlas.cli import main
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
