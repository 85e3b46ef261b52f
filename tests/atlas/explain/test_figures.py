"""Figures of explanations: layout, titles and written files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from atlas.explain.base import Explanation
from atlas.explain.figures import (
    CLIP_PERCENTILE,
    describe,
    montage,
    plot_explanation,
    plot_explanations,
    save_figure,
    short_class_name,
)


def _explanation(method: str, kind: str, attribution: np.ndarray, **extras) -> Explanation:
    image = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    return Explanation(method=method, attribution=attribution, kind=kind, target=281, target_name="tabby, tabby cat",
                       score=0.4321, layer="blocks.4", image=image, extras=extras)


EXAMPLES = {
    "gradcam": ("heatmap", np.random.default_rng(0).random((16, 16)).astype(np.float32)),
    "integrated-gradients": ("signed-heatmap", np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)),
    "featuremaps": ("feature-maps", np.random.default_rng(2).random((20, 4, 4)).astype(np.float32)),
    "filters": ("tiles", np.random.default_rng(3).random((8, 3, 3, 3)).astype(np.float32)),
    "channel": ("image", np.zeros((16, 16, 3), np.uint8)),
}


def test_montage_places_tiles_row_by_row():
    stack = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    grid = montage(stack, columns=3, pad=1, fill=-1)

    assert grid.shape == (2 * 2 + 1, 3 * 3 + 2)
    np.testing.assert_array_equal(grid[0:2, 0:3], stack[0])
    np.testing.assert_array_equal(grid[0:2, 4:7], stack[1])
    np.testing.assert_array_equal(grid[3:5, 4:7], stack[4])
    assert (grid[2] == -1).all()
    assert (grid[3:5, 8:11] == -1).all()  # the sixth, empty slot


def test_short_class_name_and_description():
    assert short_class_name("tabby, tabby cat") == "tabby"
    assert describe(_explanation("gradcam", *EXAMPLES["gradcam"])) == "tabby (0.43)"
    unnamed = _explanation("gradcam", *EXAMPLES["gradcam"])
    unnamed.target_name = None
    assert describe(unnamed) == "class 281 (0.43)"


@pytest.mark.parametrize("method", list(EXAMPLES))
def test_plot_explanation_writes_png(tmp_path, method):
    kind, attribution = EXAMPLES[method]
    figure = plot_explanation(_explanation(method, kind, attribution, channel=3, y=None, x=None))

    path = save_figure(figure, tmp_path / "out" / f"x.{method}.png")

    assert "tabby (0.43)" in figure.axes[0].get_title()
    has_colorbar = len(figure.axes) == 2
    assert has_colorbar == (kind in ("heatmap", "signed-heatmap", "feature-maps"))
    with Image.open(path) as written:
        assert written.size[0] > 300
        assert written.size[1] > 300


def test_plot_explanations_one_panel_per_method(tmp_path):
    explanations = {method: _explanation(method, kind, attribution, channel=3, y=None, x=None)
                    for method, (kind, attribution) in EXAMPLES.items()}

    figure = plot_explanations(explanations, columns=3)

    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles[0] == "input"
    assert [title.split()[0] for title in titles[1:]] == list(EXAMPLES)
    assert "tabby (0.43)" in figure.get_suptitle()
    save_figure(figure, tmp_path / "all.png")
    assert (tmp_path / "all.png").stat().st_size > 1000


def test_constant_heatmap_plots(tmp_path):
    figure = plot_explanation(_explanation("saliency", "heatmap", np.zeros((16, 16), np.float32)))
    save_figure(figure, tmp_path / "zero.png")
    assert (tmp_path / "zero.png").is_file()


def _heatmap_colorbar(figure):
    # The last image drawn on the first axes is the heatmap, under it lies the grey photo.
    return figure.axes[0].images[-1].colorbar


@pytest.mark.parametrize(("kind", "expected_extend"), [("heatmap", "max"), ("signed-heatmap", "both")])
def test_outlier_extends_colorbar(kind, expected_extend):
    values = np.random.default_rng(5).random((32, 32)).astype(np.float32)
    if kind == "signed-heatmap":
        values = values - 0.5
        values[0, 0] = -1000.0
    values[5, 5] = 1000.0

    bar = _heatmap_colorbar(plot_explanation(_explanation("saliency", kind, values)))

    assert bar.extend == expected_extend
    assert f"clipped at the {CLIP_PERCENTILE:g}th percentile" in bar.ax.get_ylabel()


@pytest.mark.parametrize("kind", ["heatmap", "signed-heatmap"])
def test_map_without_outliers_not_extended(kind):
    # Blocks of equal values: the percentile limit equals the max |value|, so nothing is clipped.
    values = np.zeros((32, 32), np.float32)
    values[:8] = 1.0
    if kind == "signed-heatmap":
        values[-8:] = -1.0

    bar = _heatmap_colorbar(plot_explanation(_explanation("saliency", kind, values)))

    assert bar.extend == "neither"
    assert bar.ax.get_ylabel() == ""


def test_combined_figure_marks_clipped_panel():
    values = np.random.default_rng(6).random((32, 32)).astype(np.float32)
    values[3, 3] = 1000.0
    explanations = {"saliency": _explanation("saliency", "heatmap", values)}

    figure = plot_explanations(explanations, columns=2)

    bar = figure.axes[1].images[-1].colorbar
    assert bar.extend == "max"
    assert "percentile" in bar.ax.get_ylabel()


def test_plot_explanations_needs_input():
    with pytest.raises(ValueError, match="no explanations"):
        plot_explanations({})


def test_palette_png_is_smaller(tmp_path):
    # Per-pixel noise over a photo, like a gradient map: the case the palette is for.
    photo = np.asarray(Image.fromarray(data.chelsea()).resize((200, 200)), dtype=np.float32) / 255
    noise = np.random.default_rng(4).normal(size=(200, 200)).astype(np.float32)
    explanation = _explanation("integrated-gradients", "signed-heatmap", noise)
    explanation.image = photo
    figure = plot_explanation(explanation)

    full = save_figure(figure, tmp_path / "full.png")
    palette = save_figure(figure, tmp_path / "palette.png", colors=64)

    with Image.open(palette) as image:
        assert image.mode == "P"
        assert len(image.getcolors()) <= 64
    assert palette.stat().st_size < full.stat().st_size
