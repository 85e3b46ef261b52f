"""The real EfficientNet-Lite0 on real photos, through every stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage import data

from atlas.cli import STAGE_ORDER, main, run_stage
from atlas.config import load_config
from atlas.inspect import store_info
from atlas.models import load_model
from atlas.store import open_store

pytestmark = pytest.mark.slow


def _top(model, image: np.ndarray, k: int) -> list[str]:
    from PIL import Image

    with torch.no_grad():
        probabilities = model.module(model.preprocess([Image.fromarray(image)])).softmax(1)[0]
    return [model.class_names[index] for index in probabilities.topk(k).indices]


def test_efficientnet_lite0_predictions():
    model = load_model("efficientnet_lite0")
    top3 = _top(model, data.chelsea(), 3)
    assert any(name.split(",")[0] in {"tiger cat", "Egyptian cat", "tabby"} for name in top3), top3
    assert _top(model, data.coffee(), 1) == ["espresso"]


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("real") / "atlas.zarr"
    config = load_config(
        overrides=[
            "sample.crops_per_photo=3", "grid.sizes=[6, 12]", "grid.min_count=5",
            "project.n_epochs=60", "render.steps=24", "render.size=32", "render.batch_size=48",
            "render.grid_sizes=[6]",
        ],
        store=str(store),
    )
    for stage in STAGE_ORDER:
        run_stage(stage, config, force=False)
    return config


def test_every_stage_complete(real_store):
    info = store_info(real_store.store)
    assert info["n_images"] == 66
    assert info["n_activations"] == 66 * 196
    assert all(info["stages"].values())
    assert set(info["stages"]) >= {"extract", "index:blocks.4", "project:blocks.4", "grid:blocks.4", "render:blocks.4"}


def test_icons_for_every_nonempty_cell(real_store):
    group = open_store(real_store.store)
    cells = group["grids/blocks.4/6"]
    nonempty = np.asarray(cells["count"][:]) >= cells.attrs["min_count"]
    assert nonempty.sum() >= 10
    np.testing.assert_array_equal(np.asarray(cells["icon_done"][:]), nonempty)
    icons = np.asarray(cells["icons"][:])[nonempty].astype(float)
    # Not flat: every icon varies across its pixels, and icons differ from each other.
    assert (icons.reshape(len(icons), -1).std(1) > 5).all()
    assert np.abs(icons[0] - icons[1]).mean() > 3


def test_query_chelsea_finds_chelsea_crops(real_store):
    from PIL import Image

    from atlas.query import query_image

    result = query_image(real_store.store, Image.fromarray(data.chelsea()), k=5).to_dict()
    top_images = [item["path"] for item in result["summary"]["images"][:3]]
    assert any(path.startswith("sample:chelsea/") for path in top_images), top_images


def test_query_cli_text(real_store, tmp_path):
    from PIL import Image

    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    result = CliRunner().invoke(main, ["query", real_store.store, str(tmp_path / "chelsea.png"), "--k", "5"])
    assert result.exit_code == 0, result.output
    assert "sample:chelsea/" in result.output
