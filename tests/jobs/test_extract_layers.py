"""Extraction of extra layers in the same pass, at another resolution than the primary layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atlas.cli import main
from atlas.extract import cached_model
from atlas.datasets import open_image
from atlas.images import decode_image
from atlas.patches import model_view, patch_around, patch_for_row
from atlas.store import open_store, read_strings
from jobs.extract import run_extract
from tests.conftest import tiny_config


def _direct_maps(spec: str, path: str) -> dict[str, np.ndarray]:
    """Run TinyNet's layers by hand on one image; returns layer name -> (C, h, w) float32."""
    model = cached_model(spec)
    x = model.preprocess([decode_image(path)])
    with torch.no_grad():
        layer1 = model.module.layer1(model.module.stem(x))
        layer2 = model.module.layer2(layer1)
    return {"layer1": layer1[0].numpy(), "layer2": layer2[0].numpy()}


@pytest.mark.parametrize(("primary", "extra"), [("layer2", "layer1"), ("layer1", "layer2")])
def test_extra_layer_rows_match_forward(tiny_spec, image_folder, tmp_path, primary, extra):
    config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr", f"extract.extra_layers=[{extra}]")
    # tiny_config fixes layer2 as the primary layer; the second case swaps the roles.
    config = config.model_copy(update={"layer": primary})
    summary = run_extract(config, progress=False)
    assert summary["n_ok"] == 20

    group = open_store(config.store)
    assert list(group.attrs["layers"]) == [primary, extra]
    shapes = {name: tuple(shape) for name, shape in group.attrs["layer_shapes"].items()}
    # TinyNet: layer1 keeps the stem's resolution (12 channels), layer2 halves it (16 channels).
    assert shapes["layer1"][0] == 12
    assert shapes["layer2"][0] == 16
    assert shapes["layer1"][1] == 2 * shapes["layer2"][1]
    assert shapes["layer1"][2] == 2 * shapes["layer2"][2]
    n_rows = 20 * 6
    assert group["activations/layer1"].shape == (n_rows, 12)
    assert group["activations/layer2"].shape == (n_rows, 16)

    paths = read_strings(group["images/path"])
    image_of_row = np.asarray(group["samples/image"][:])
    ys = np.asarray(group["samples/y"][:])
    xs = np.asarray(group["samples/x"][:])
    _, primary_h, primary_w = shapes[primary]
    _, extra_h, extra_w = shapes[extra]
    for image_row in (0, 7, 19):
        maps = _direct_maps(tiny_spec, paths[image_row])
        rows = np.flatnonzero(image_of_row == image_row)
        assert len(rows) == 6
        for row in rows:
            y, x = int(ys[row]), int(xs[row])
            assert 0 <= y < primary_h
            assert 0 <= x < primary_w
            # layer2's stride-2 convolution centres its output (y, x) on layer1's (2y, 2x).
            if primary == "layer2":
                extra_y, extra_x = 2 * y, 2 * x
            else:
                extra_y, extra_x = y // 2, x // 2
            assert 0 <= extra_y < extra_h
            assert 0 <= extra_x < extra_w
            np.testing.assert_array_equal(
                group[f"activations/{primary}"][row], maps[primary][:, y, x].astype(np.float16), err_msg=f"row {row}"
            )
            np.testing.assert_array_equal(
                group[f"activations/{extra}"][row],
                maps[extra][:, extra_y, extra_x].astype(np.float16),
                err_msg=f"row {row}",
            )

    # The extra layer's patch is centred on the same mapped cell as its stored vector.
    row = int(np.flatnonzero(image_of_row == 7)[0])
    y, x = int(ys[row]), int(xs[row])
    extra_y, extra_x = (2 * y, 2 * x) if primary == "layer2" else (y // 2, x // 2)
    view = model_view(open_image(paths[7]), dict(group.attrs["preprocessing"]))
    for layer, position, shape in [
        (primary, (y, x), (primary_h, primary_w)),
        (extra, (extra_y, extra_x), (extra_h, extra_w)),
    ]:
        expected = np.asarray(patch_around(view, *position, shape, 48))
        actual = np.asarray(patch_for_row(group, row, 48, layer=layer))
        np.testing.assert_array_equal(actual, expected, err_msg=layer)

    result = CliRunner().invoke(main, ["info", str(config.store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert list(info["layers"]) == [primary, extra]
    assert info["layers"]["layer1"]["dim"] == 12
    assert info["layers"]["layer2"]["dim"] == 16
