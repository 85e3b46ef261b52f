from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pytest
import torch
import zarr

from atlas.errors import ConfigError, StoreLockedError
from atlas.extract import cached_model
from atlas.inspect import store_info
from atlas.store import open_store, read_strings
from jobs.extract import run_extract
from jobs.lock import store_lock
from tests.conftest import tiny_config, write_bad_folder

ARRAYS = [
    "activations/layer2", "samples/image", "samples/y", "samples/x", "samples/valid",
    "samples/attribution_class", "samples/attribution_score", "images/top_class", "images/top_prob",
]


def test_rows_match_direct_forward(tiny_spec, image_folder, tmp_path):
    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr")
    summary = run_extract(config, progress=False)
    assert summary["n_ok"] == 20
    assert summary["n_rejected"] == 0
    group = open_store(config.store)
    assert group["activations/layer2"].shape == (20 * 6, 16)

    model = cached_model(tiny_spec)
    paths = read_strings(group["images/path"])
    image_row = 13
    from atlas.images import decode_image

    x = model.preprocess([decode_image(paths[image_row])])
    with torch.no_grad():
        layer = model.module.layer2(model.module.layer1(model.module.stem(x)))[0]
    rows = np.flatnonzero(group["samples/image"][:] == image_row)
    assert len(rows) == 6
    for row in rows:
        y, x_pos = int(group["samples/y"][row]), int(group["samples/x"][row])
        expected = layer[:, y, x_pos].numpy().astype(np.float16)
        np.testing.assert_array_equal(group["activations/layer2"][row], expected)
    assert group["samples/valid"][:].all()


def test_bad_inputs_recorded(tiny_spec, tmp_path, caplog):
    expected = write_bad_folder(tmp_path / "bad")
    config = tiny_config(tiny_spec, tmp_path / "bad", tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING):
        summary = run_extract(config, progress=False)
    ok_names = {name for name, outcome in expected.items() if outcome == "ok"}
    per_file = [record for record in caplog.records if record.getMessage().startswith("skipping ")]
    totals = [record.getMessage() for record in caplog.records if "images rejected" in record.getMessage()]
    assert len(per_file) == len(expected) - len(ok_names)
    assert len(totals) == 1
    assert f"{len(per_file)} of {len(expected)} images rejected, by reason: " in totals[0]
    assert summary["n_ok"] == len(ok_names)
    info = store_info(config.store)
    rejected = {item["path"].rsplit("/", 1)[1]: item["reason"] for item in info["rejected"]}
    assert set(rejected) == set(expected) - ok_names
    for name, reason in rejected.items():
        assert expected[name] in reason, (name, reason)
    valid_images = set(np.unique(open_store(config.store)["samples/image"][:][open_store(config.store)["samples/valid"][:]]))
    paths = read_strings(open_store(config.store)["images/path"])
    assert {paths[row].rsplit("/", 1)[1] for row in valid_images} == ok_names


def test_resume_after_lost_shard_equals_full_run(tiny_spec, image_folder, tmp_path):
    config = tiny_config(tiny_spec, image_folder, tmp_path / "full.zarr")
    run_extract(config, progress=False)
    shutil.copytree(config.store, tmp_path / "partial.zarr")
    partial = zarr.open_group(str(tmp_path / "partial.zarr"), mode="r+")
    # Simulate a job killed after two shards: wipe shards 2.. and the completion mark.
    rows_per_shard = 4 * 6
    partial["extract/shard_done"][2:] = False
    partial["activations/layer2"][2 * rows_per_shard :] = 0
    partial["samples/valid"][2 * rows_per_shard :] = False
    partial.attrs["stages"] = {}

    resumed = tiny_config(tiny_spec, image_folder, tmp_path / "partial.zarr")
    run_extract(resumed, progress=False)
    full = open_store(config.store)
    again = open_store(resumed.store)
    for name in ARRAYS:
        np.testing.assert_array_equal(full[name][:], again[name][:], err_msg=name)


def test_completed_store_is_noop_and_changed_config_refused(tiny_spec, image_folder, tmp_path):
    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr")
    run_extract(config, progress=False)
    stamp = open_store(config.store).attrs["stages"]["extract"]["finished"]
    run_extract(config, progress=False)
    assert open_store(config.store).attrs["stages"]["extract"]["finished"] == stamp

    changed = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr", "extract.per_image=3")
    expected = r"other extraction settings \(extract.per_image: 6 then, 3 now\)"
    with pytest.raises(ConfigError, match=expected):
        run_extract(changed, progress=False)
    open_store(config.store, mode="r+").attrs["stages"] = {}
    with pytest.raises(ConfigError, match=expected):
        run_extract(changed, progress=False)


def test_resume_with_other_batch_size_and_path_spelling(tiny_spec, image_folder, tmp_path, monkeypatch):
    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr")
    run_extract(config, progress=False)
    group = open_store(config.store, mode="r+")
    group["extract/shard_done"][2:] = False
    group.attrs["stages"] = {}

    # The same folder named relative to the working folder, with a trailing slash, and a smaller batch.
    monkeypatch.chdir(image_folder.parent)
    resumed = tiny_config(tiny_spec, f"{image_folder.name}/", tmp_path / "s.zarr", "extract.batch_size=2")
    summary = run_extract(resumed, progress=False)
    assert summary["n_ok"] == 20
    assert open_store(config.store)["extract/shard_done"][:].all()


@pytest.mark.parametrize("complete", [True, False])
def test_changed_image_folder_refused(tiny_spec, image_folder, tmp_path, complete):
    images = shutil.copytree(image_folder, tmp_path / "images")
    config = tiny_config(tiny_spec, images, tmp_path / "s.zarr")
    run_extract(config, progress=False)
    if not complete:
        open_store(config.store, mode="r+").attrs["stages"] = {}
    shutil.copy(sorted(images.glob("*.png"))[0], images / "zz-added.png")

    with pytest.raises(ConfigError, match=r"another image list \(20 images then, 21 now\)"):
        run_extract(config, progress=False)


def test_live_lock_refused_and_stale_taken_over(tiny_spec, image_folder, tmp_path):
    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr")
    (tmp_path / "s.zarr").mkdir()
    with store_lock(config.store, "extract"):
        with pytest.raises(StoreLockedError, match=r"pid \d+"):
            with store_lock(config.store, "extract"):
                pass
    lock = tmp_path / "s.zarr" / "sidecar" / "lock.json"
    lock.write_text('{"host": "%s", "pid": 999999999, "started": "then", "job": "extract"}' % __import__("socket").gethostname())
    with store_lock(config.store, "extract") as path:
        assert path.exists()
    assert not lock.exists()


def test_duplicate_paths_recorded(tiny_spec, image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    first = sorted(image_folder.glob("*.png"))[0]
    listing.write_text(f"{first}\n{first}\n")
    config = tiny_config(tiny_spec, listing, tmp_path / "s.zarr")
    summary = run_extract(config, progress=False)
    assert summary["n_ok"] == 1
    info = store_info(config.store)
    assert info["rejected"][0]["row"] == 1
    assert "duplicate" in info["rejected"][0]["reason"]


def test_summary_counts_this_run_only(tiny_spec, image_folder, tmp_path):
    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr")
    full = run_extract(config, progress=False)
    assert full["images_per_second"] == pytest.approx(20 / full["seconds"], rel=0.02)

    group = open_store(config.store, mode="r+")
    group["extract/shard_done"][4] = False  # the last shard: images 16..19
    group.attrs["stages"] = {}
    resumed = run_extract(config, progress=False)
    assert resumed["images_per_second"] == pytest.approx(4 / resumed["seconds"], rel=0.02)
    assert resumed["n_ok"] == 20


def test_workers_load_model_report_memory(tiny_spec, image_folder, tmp_path):
    import atlas.extract

    atlas.extract._MODEL_CACHE.pop((tiny_spec, "cpu"), None)
    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr", "compute.processes=true")
    summary = run_extract(config, progress=False)

    assert summary["n_ok"] == 20
    # The driver only creates the store; the model lives in the worker process.
    assert (tiny_spec, "cpu") not in atlas.extract._MODEL_CACHE
    expected = atlas.extract.probe_layer_shapes(cached_model(tiny_spec), ["layer2"])
    assert open_store(config.store).attrs["layer_shapes"] == expected
    peaks = summary["worker_peak_memory_mib"]
    assert len(peaks) == 1
    # A Python process with torch imported uses well over 100 MiB.
    assert min(peaks.values()) > 100
    assert open_store(config.store).attrs["stages"]["extract"]["worker_peak_memory_mib"] == peaks


def test_unreadable_image_recorded(tiny_spec, image_folder, tmp_path, monkeypatch):
    from PIL import Image

    from tests.atlas.test_images import _deny

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    locked = sorted(folder.glob("*.png"))[5]
    monkeypatch.setattr(Image, "open", _deny(locked))
    config = tiny_config(tiny_spec, folder, tmp_path / "s.zarr")
    summary = run_extract(config, progress=False)

    assert summary["n_ok"] == 19
    rejected = store_info(config.store)["rejected"]
    assert [item["path"] for item in rejected] == [str(locked)]
    assert rejected[0]["reason"] == "permission denied"


def test_interrupt_logs_progress_then_resumes(tiny_spec, image_folder, tmp_path, monkeypatch, caplog):
    import jobs.extract

    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr", "extract.shard_size=4")
    real_as_completed = jobs.extract.as_completed

    def interrupted_after_one(futures):
        for count, future in enumerate(real_as_completed(futures)):
            if count == 1:
                raise KeyboardInterrupt
            yield future

    monkeypatch.setattr(jobs.extract, "as_completed", interrupted_after_one)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        run_extract(config, progress=False)
    messages = [record.getMessage() for record in caplog.records if "interrupted" in record.getMessage()]
    assert len(messages) == 1
    logged = re.search(r"interrupted with at least (\d+) of 5 shards complete", messages[0])
    # A shard that was running when the interrupt came may still finish before the cluster closes.
    assert 1 <= int(logged.group(1)) <= int(open_store(config.store)["extract/shard_done"][:].sum())

    monkeypatch.setattr(jobs.extract, "as_completed", real_as_completed)
    summary = run_extract(config, progress=False)
    assert summary["n_ok"] == 20
    assert open_store(config.store)["extract/shard_done"][:].all()


def test_progress_log_throttled_with_rate(caplog):
    from jobs.extract import ProgressLog

    now = [100.0]
    progress = ProgressLog(total=1000, interval=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="jobs.extract"):
        now[0] = 110.0
        progress.update(100)
        now[0] = 140.0
        progress.update(200)
        now[0] = 145.0
        progress.update(700)
    lines = [record.getMessage() for record in caplog.records]
    # The first update comes before the interval, the last completes the job: neither logs.
    assert lines == ["extract: 300 of 1,000 images (30 %), 7.5 images/s, about 2 min left"]


def test_layer_before_inplace_relu(image_folder, tmp_path):
    from atlas.config import load_config
    from atlas.images import decode_image

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()
    torch.save(module, tmp_path / "inplace.pt")
    config = load_config(
        overrides=["compute.processes=false", "extract.positions=all", "extract.shard_size=8"],
        images=str(image_folder), store=str(tmp_path / "s.zarr"), model=f"file:{tmp_path / 'inplace.pt'}", layer="1",
    )

    summary = run_extract(config, progress=False)
    assert summary["n_ok"] == 20
    group = open_store(config.store)
    first = read_strings(group["images/path"])[0]
    x = cached_model(config.model).preprocess([decode_image(first)])
    with torch.no_grad():
        expected = module[1](module[0](x))[0]
    rows = group["activations/1"][: expected.shape[1] * expected.shape[2]]
    # The stored rows are the batch norm's output, negative values included, not the ReLU's.
    assert (rows < 0).any()
    np.testing.assert_allclose(rows, expected.flatten(1).T.numpy().astype(np.float16), rtol=1e-2, atol=1e-2)


def test_changed_file_contents_refused(tiny_spec, image_folder, tmp_path):
    images = shutil.copytree(image_folder, tmp_path / "images")
    config = tiny_config(tiny_spec, images, tmp_path / "s.zarr")
    run_extract(config, progress=False)
    first, second = sorted(images.glob("*.png"))[:2]
    first.write_bytes(second.read_bytes())

    with pytest.raises(ConfigError, match=r"some files have changed since \(size or modification time\)"):
        run_extract(config, progress=False)
