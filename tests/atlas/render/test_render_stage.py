from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from atlas.config import RenderConfig
from atlas.errors import StageNotReadyError, StoreError
from atlas.models import LoadedModel
from atlas.render import render_directions, run_render
from atlas.render.stage import budget_sizes
from atlas.store import create_store, mark_stage, open_store, stage_done

LAYER = "layer2"


def _make_store(path: Path, spec: str, directions: torch.Tensor, sizes: tuple[int, ...] = (3,), whitened: bool = True,
                mark_grid: bool = True) -> None:
    """Write a store with hand-made grids: cells (0, 0), (1, 2), (2, 1) and (2, 2) filled, (0, 1) below min_count."""
    group = create_store(
        path, attrs={"model": spec}, n_images=2, rows_per_image=1, layer_channels={LAYER: 16},
        shard_size=2, attribution_top_k=1,
    )
    for size in sizes:
        count = np.zeros((size, size), dtype=np.int32)
        mean = np.zeros((size, size, 16), dtype=np.float32)
        for index, (i, j) in enumerate([(0, 0), (1, 2), (2, 1), (2, 2)]):
            count[i, j] = 10 + index
            mean[i, j] = directions[index].numpy()
        count[0, 1] = 2
        mean[0, 1] = directions[4].numpy()
        grid = group.require_group(f"grids/{LAYER}/{size}")
        grid.create_array("count", data=count)
        grid.create_array("mean", data=mean)
        if whitened:
            # A diagonal whitening rescales the channels, so the two sources give different icons.
            whitening = np.diag(np.linspace(0.5, 2.0, 16)).astype(np.float32)
            grid.create_array("whitened_mean", data=mean @ whitening)
        grid.attrs["min_count"] = 5
    if mark_grid:
        mark_stage(group, "grid", LAYER, sizes=list(sizes))


@pytest.fixture()
def store(tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor) -> Path:
    path = tmp_path / "store.zarr"
    _make_store(path, tiny_model.spec, tiny_directions)
    return path


FILLED = [(0, 0), (1, 2), (2, 1), (2, 2)]


def test_run_render_writes_icons(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    info = run_render(store, fast_config, model=tiny_model, progress=False)

    group = open_store(store)
    icons = np.asarray(group[f"grids/{LAYER}/3/icons"][:])
    done = np.asarray(group[f"grids/{LAYER}/3/icon_done"][:])
    expected_done = np.zeros((3, 3), dtype=bool)
    for i, j in FILLED:
        expected_done[i, j] = True
    assert icons.shape == (3, 3, 16, 16, 3)
    assert icons.dtype == np.uint8
    np.testing.assert_array_equal(done, expected_done)
    assert np.all(icons[~expected_done] == 255)
    for i, j in FILLED:
        assert icons[i, j].astype(float).std() > 3.0
    assert info["rendered"] == 4
    assert info["n_icons"] == 4
    assert info["skipped"] is False
    assert stage_done(group, "render", LAYER)
    assert group.attrs["stages"][f"render:{LAYER}"]["sizes"] == [3]


def test_stage_icons_match_direct_render(
    store: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig
) -> None:
    run_render(store, fast_config, model=tiny_model, progress=False)
    group = open_store(store)
    whitened = np.asarray(group[f"grids/{LAYER}/3/whitened_mean"][:])
    cells = np.array(FILLED)
    expected = render_directions(tiny_model, LAYER, torch.from_numpy(whitened[cells[:, 0], cells[:, 1]]), fast_config, progress=False)

    icons = np.asarray(group[f"grids/{LAYER}/3/icons"][:])[cells[:, 0], cells[:, 1]]
    assert np.abs(icons.astype(int) - expected.astype(int)).max() <= 2


def test_run_render_without_whitening_uses_mean(
    store: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig
) -> None:
    config = fast_config.model_copy(update={"whiten": False})
    run_render(store, config, model=tiny_model, progress=False)
    expected = render_directions(tiny_model, LAYER, tiny_directions[:1], config, progress=False)

    icon = np.asarray(open_store(store)[f"grids/{LAYER}/3/icons"][0, 0])
    assert np.abs(icon.astype(int) - expected[0].astype(int)).max() <= 2


def test_run_render_falls_back_to_mean(
    tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "plain.zarr"
    _make_store(path, tiny_model.spec, tiny_directions, whitened=False)

    with caplog.at_level(logging.WARNING, logger="atlas.render.stage"):
        run_render(path, fast_config, model=tiny_model, progress=False)

    assert "no whitened_mean; rendering the plain mean" in caplog.text
    assert open_store(path)[f"grids/{LAYER}/3/icons"].attrs["settings"]["source"] == "mean"


def test_run_render_mosaic(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    info = run_render(store, fast_config, model=tiny_model, progress=False)

    mosaic_path = store / "sidecar" / f"mosaic-{LAYER}-3.png"
    assert info["mosaics"] == [str(mosaic_path)]
    mosaic = np.asarray(Image.open(mosaic_path))
    icons = np.asarray(open_store(store)[f"grids/{LAYER}/3/icons"][:])
    assert mosaic.shape == (48, 48, 3)
    # Grid row i is drawn at mosaic row 2 - i, so higher layout y is on top.
    np.testing.assert_array_equal(mosaic[32:48, 0:16], icons[0, 0])
    np.testing.assert_array_equal(mosaic[16:32, 32:48], icons[1, 2])
    assert np.all(mosaic[32:48, 16:32] == 255)


def test_run_render_mosaic_shrinks_to_max_size(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    run_render(store, fast_config.model_copy(update={"mosaic_max_px": 30}), model=tiny_model, progress=False)

    with Image.open(store / "sidecar" / f"mosaic-{LAYER}-3.png") as mosaic:
        assert mosaic.size == (30, 30)


def test_run_render_rerun_is_noop(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    run_render(store, fast_config, model=tiny_model, progress=False)
    group = open_store(store, mode="r+")
    group[f"grids/{LAYER}/3/icons"][0, 0] = np.zeros((16, 16, 3), dtype=np.uint8)

    info = run_render(store, fast_config, model=tiny_model, progress=False)

    assert info["skipped"] is True
    assert info["rendered"] == 0
    assert np.all(np.asarray(group[f"grids/{LAYER}/3/icons"][0, 0]) == 0)


def test_run_render_force_renders_again(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    run_render(store, fast_config, model=tiny_model, progress=False)
    group = open_store(store, mode="r+")
    group[f"grids/{LAYER}/3/icons"][0, 0] = np.zeros((16, 16, 3), dtype=np.uint8)

    info = run_render(store, fast_config, force=True, model=tiny_model, progress=False)

    assert info["rendered"] == 4
    assert not np.all(np.asarray(group[f"grids/{LAYER}/3/icons"][0, 0]) == 0)


def test_run_render_resumes_missing_icons(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    # A killed run: the first batch of two icons is written, the stage is not marked.
    config = fast_config.model_copy(update={"batch_size": 2})
    run_render(store, config, model=tiny_model, progress=False)
    group = open_store(store, mode="r+")
    complete = np.asarray(group[f"grids/{LAYER}/3/icons"][:])
    stages = dict(group.attrs["stages"])
    del stages[f"render:{LAYER}"]
    group.attrs["stages"] = stages
    done = np.asarray(group[f"grids/{LAYER}/3/icon_done"][:])
    done[2, 1] = done[2, 2] = False
    group[f"grids/{LAYER}/3/icon_done"][:] = done
    sentinel = np.full((16, 16, 3), 7, dtype=np.uint8)
    group[f"grids/{LAYER}/3/icons"][0, 0] = sentinel
    group[f"grids/{LAYER}/3/icons"][2, 1] = np.full((16, 16, 3), 255, dtype=np.uint8)
    group[f"grids/{LAYER}/3/icons"][2, 2] = np.full((16, 16, 3), 255, dtype=np.uint8)

    info = run_render(store, config, model=tiny_model, progress=False)

    icons = np.asarray(group[f"grids/{LAYER}/3/icons"][:])
    assert info["rendered"] == 2
    assert info["n_icons"] == 4
    np.testing.assert_array_equal(icons[0, 0], sentinel)
    np.testing.assert_array_equal(icons[2, 1], complete[2, 1])
    np.testing.assert_array_equal(icons[2, 2], complete[2, 2])
    assert np.asarray(group[f"grids/{LAYER}/3/icon_done"][:]).sum() == 4


def test_run_render_rejects_changed_settings(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    run_render(store, fast_config, model=tiny_model, progress=False)
    group = open_store(store, mode="r+")
    stages = dict(group.attrs["stages"])
    del stages[f"render:{LAYER}"]
    group.attrs["stages"] = stages

    with pytest.raises(StoreError, match="other settings \\(changed: steps\\); rerun with --force"):
        run_render(store, fast_config.model_copy(update={"steps": 3}), model=tiny_model, progress=False)


def test_run_render_sizes(tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    path = tmp_path / "two.zarr"
    _make_store(path, tiny_model.spec, tiny_directions, sizes=(3, 4))

    first = run_render(path, fast_config.model_copy(update={"grid_sizes": [4]}), model=tiny_model, progress=False)
    second = run_render(path, fast_config, model=tiny_model, progress=False)

    group = open_store(path)
    assert first["sizes"] == [4]
    assert second["sizes"] == [3, 4]
    assert second["rendered"] == 4
    assert second["n_icons"] == 8
    assert group.attrs["stages"][f"render:{LAYER}"]["sizes"] == [3, 4]
    with Image.open(path / "sidecar" / f"mosaic-{LAYER}-4.png") as mosaic:
        assert mosaic.size == (64, 64)


def test_run_render_rejects_missing_size(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    with pytest.raises(StoreError, match=r"none of the grid sizes \[5\] is in the store for layer layer2; it has \[3\]"):
        run_render(store, fast_config.model_copy(update={"grid_sizes": [5]}), model=tiny_model, progress=False)


def test_run_render_skips_absent_sizes(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    result = run_render(store, fast_config.model_copy(update={"grid_sizes": [3, 5]}), model=tiny_model, progress=False)
    assert result["sizes"] == [3]


def test_run_render_needs_grid_stage(tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    path = tmp_path / "nogrid.zarr"
    _make_store(path, tiny_model.spec, tiny_directions, mark_grid=False)

    with pytest.raises(StageNotReadyError, match="no completed grids for layer layer2; run `atlas grid"):
        run_render(path, fast_config, model=tiny_model, progress=False)


def test_run_render_loads_model_from_store(store: Path, fast_config: RenderConfig) -> None:
    info = run_render(store, fast_config, progress=False)

    assert info["rendered"] == 4


def test_noop_warns_on_changed_settings(
    store: Path, tiny_model: LoadedModel, fast_config: RenderConfig, caplog: pytest.LogCaptureFixture
) -> None:
    run_render(store, fast_config, model=tiny_model, progress=False)

    with caplog.at_level(logging.WARNING, logger="atlas.render.stage"):
        info = run_render(store, fast_config.model_copy(update={"steps": 3}), model=tiny_model, progress=False)

    assert info["skipped"] is True
    assert "icons rendered with other settings" in caplog.text


@pytest.mark.parametrize(
    ("icon_counts", "max_icons", "picked", "skipped"),
    [
        ({20: 176, 40: 542, 80: 1560}, 1000, [20, 40], [80]),
        ({20: 176, 40: 542, 80: 1560}, 5000, [20, 40, 80], []),
        ({20: 176, 40: 542, 80: 1560}, 718, [20, 40], [80]),
        ({20: 176, 40: 542, 80: 1560}, 717, [20], [40, 80]),
        # Picking stops at the first size over the budget, even when a later one would fit.
        ({10: 5, 20: 10, 40: 1}, 12, [10], [20, 40]),
        # The coarsest size is picked even above the budget.
        ({25: 300, 50: 900}, 100, [25], [50]),
    ],
)
def test_budget_sizes_table(icon_counts: dict[int, int], max_icons: int, picked: list[int], skipped: list[int]) -> None:
    assert budget_sizes(icon_counts, max_icons) == (picked, skipped)


def test_default_config_follows_store_sizes(
    tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig
) -> None:
    # Sizes that no fixed default list would contain.
    path = tmp_path / "odd.zarr"
    _make_store(path, tiny_model.spec, tiny_directions, sizes=(25, 50, 100))
    defaults = RenderConfig()
    config = fast_config.model_copy(update={"grid_sizes": defaults.grid_sizes, "max_icons": defaults.max_icons})

    info = run_render(path, config, model=tiny_model, progress=False)

    assert defaults.grid_sizes is None
    assert info["sizes"] == [25, 50, 100]
    assert info["n_icons"] == 3 * len(FILLED)
    group = open_store(path)
    assert group.attrs["stages"][f"render:{LAYER}"]["sizes"] == [25, 50, 100]
    for size in (25, 50, 100):
        assert np.asarray(group[f"grids/{LAYER}/{size}/icon_done"][:]).sum() == len(FILLED)


def test_budget_stops_before_exceeding_grid(
    tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every grid has four non-empty cells, so a budget of 8 fits the 3 and 4 grids only.
    path = tmp_path / "budget.zarr"
    _make_store(path, tiny_model.spec, tiny_directions, sizes=(3, 4, 5))

    with caplog.at_level(logging.INFO, logger="atlas.render.stage"):
        info = run_render(path, fast_config.model_copy(update={"max_icons": 8}), model=tiny_model, progress=False)

    group = open_store(path)
    assert info["sizes"] == [3, 4]
    assert info["n_icons"] == 8
    assert "icons" not in group[f"grids/{LAYER}/5"].array_keys()
    assert not (path / "sidecar" / f"mosaic-{LAYER}-5.png").exists()
    assert "skipping grid sizes [5] of layer layer2 (4 non-empty cells)" in caplog.text
    assert "Raise render.max_icons or set render.grid_sizes" in caplog.text


def test_budget_keeps_coarsest_grid(
    tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "coarsest.zarr"
    _make_store(path, tiny_model.spec, tiny_directions, sizes=(3, 4))

    with caplog.at_level(logging.WARNING, logger="atlas.render.stage"):
        info = run_render(path, fast_config.model_copy(update={"max_icons": 1}), model=tiny_model, progress=False)

    assert info["sizes"] == [3]
    assert info["n_icons"] == len(FILLED)
    assert "the coarsest grid 3 of layer layer2 has 4 non-empty cells, above render.max_icons=1" in caplog.text


def test_explicit_sizes_ignore_budget(
    tmp_path: Path, tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig
) -> None:
    path = tmp_path / "explicit.zarr"
    _make_store(path, tiny_model.spec, tiny_directions, sizes=(3, 4, 5))
    config = fast_config.model_copy(update={"grid_sizes": [5, 3], "max_icons": 1})

    info = run_render(path, config, model=tiny_model, progress=False)

    assert info["sizes"] == [3, 5]
    assert info["n_icons"] == 2 * len(FILLED)
    assert "icons" not in open_store(path)[f"grids/{LAYER}/4"].array_keys()


def test_budget_change_keeps_icons(store: Path, tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    # The size choice is no icon setting, so a new budget resumes instead of raising.
    run_render(store, fast_config, model=tiny_model, progress=False)
    group = open_store(store, mode="r+")
    stages = dict(group.attrs["stages"])
    del stages[f"render:{LAYER}"]
    group.attrs["stages"] = stages

    info = run_render(store, fast_config.model_copy(update={"max_icons": 500}), model=tiny_model, progress=False)

    assert info["rendered"] == 0
    assert info["n_icons"] == len(FILLED)


@pytest.mark.parametrize("grid_sizes", [[], [0, 20], [-4]])
def test_render_config_rejects_bad_sizes(grid_sizes: list[int]) -> None:
    with pytest.raises(ValidationError, match="grid_sizes must be null"):
        RenderConfig(grid_sizes=grid_sizes)


def test_interrupted_render_logs_and_resumes(
    store: Path, tiny_model: LoadedModel, fast_config: RenderConfig, monkeypatch, caplog
) -> None:
    import atlas.render.stage as stage

    config = fast_config.model_copy(update={"batch_size": 2})
    real_batches = stage.iter_direction_batches

    def interrupted_after_one(*args, **kwargs):
        for count, item in enumerate(real_batches(*args, **kwargs)):
            if count == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(stage, "iter_direction_batches", interrupted_after_one)
    with caplog.at_level(logging.WARNING, logger="atlas.render.stage"), pytest.raises(KeyboardInterrupt):
        run_render(store, config, model=tiny_model, progress=False)
    assert "interrupted with 2 of 4 icons of grid 3 stored" in caplog.text

    monkeypatch.setattr(stage, "iter_direction_batches", real_batches)
    info = run_render(store, config, model=tiny_model, progress=False)
    assert info["rendered"] == 2
    assert info["n_icons"] == 4
