"""The ``atlas explain`` command on a tiny ``file:`` model, and once on the real model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from atlas.cli import main
from atlas.cli_explain import list_images, method_layers
from atlas.errors import AtlasError
from atlas.explain import METHODS
from atlas.testing import make_images, save_tiny_model


@pytest.fixture(scope="module")
def tiny_file_spec(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def photo(tmp_path):
    return make_images(tmp_path / "in", 1, size=48)[0]


def _run(*args: str):
    return CliRunner().invoke(main, ["explain", *args], catch_exceptions=False)


def test_single_method_writes_png_and_npy(tmp_path, tiny_file_spec, photo):
    out = tmp_path / "out"
    result = _run(str(photo), "--method", "gradcam++", "--model", tiny_file_spec, "-o", str(out))

    assert result.exit_code == 0, result.output
    stem = photo.stem
    assert sorted(path.name for path in out.iterdir()) == [f"{stem}.gradcam++.npy", f"{stem}.gradcam++.png"]
    attribution = np.load(out / f"{stem}.gradcam++.npy")
    assert attribution.shape == (224, 224)
    with Image.open(out / f"{stem}.gradcam++.png") as figure:
        assert figure.format == "PNG"


def test_all_writes_one_figure_and_every_array(tmp_path, tiny_file_spec, photo):
    out = tmp_path / "out"
    result = _run(str(photo), "--method", "all", "--model", tiny_file_spec, "--target", "3", "-o", str(out),
                  "--set", "render.steps=4", "--set", "render.size=32")

    assert result.exit_code == 0, result.output
    names = {path.name for path in out.iterdir()}
    expected = {f"{photo.stem}.{method}.npy" for method in METHODS} | {f"{photo.stem}.all.png"}
    assert names == expected


def test_folder_skips_undecodable_files(tmp_path, tiny_file_spec, caplog):
    folder = tmp_path / "in"
    images = make_images(folder, 2, size=40)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"

    with caplog.at_level(logging.WARNING):
        result = _run(str(folder), "--method", "saliency", "--model", tiny_file_spec, "-o", str(out))

    assert result.exit_code == 0, result.output
    assert {path.name for path in out.glob("*.npy")} == {f"{image.stem}.saliency.npy" for image in images}
    assert "broken.png" in caplog.text


def test_folder_explains_nested_images(tmp_path, tiny_file_spec):
    folder = tmp_path / "in"
    top = make_images(folder, 1, size=40)[0]
    nested = make_images(folder / "deep" / "deeper", 1, size=40, seed=1)[0]
    (folder / "deep" / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"

    result = _run(str(folder), "--method", "saliency", "--model", tiny_file_spec, "-o", str(out))

    assert result.exit_code == 0, result.output
    written = {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}
    assert written == {
        f"{top.stem}.saliency.npy",
        f"{top.stem}.saliency.png",
        f"deep/deeper/{nested.stem}.saliency.npy",
        f"deep/deeper/{nested.stem}.saliency.png",
    }


def test_same_names_in_subfolders_kept_apart(tmp_path, tiny_file_spec):
    folder = tmp_path / "in"
    first = make_images(folder / "a", 1, size=40, seed=0)[0]
    second = make_images(folder / "b", 1, size=40, seed=1)[0]
    assert first.name == second.name
    out = tmp_path / "out"

    result = _run(str(folder), "--method", "saliency", "--model", tiny_file_spec, "-o", str(out))

    assert result.exit_code == 0, result.output
    first_map = np.load(out / "a" / f"{first.stem}.saliency.npy")
    second_map = np.load(out / "b" / f"{second.stem}.saliency.npy")
    assert not np.array_equal(first_map, second_map)
    assert not list(out.glob("*.npy"))


def test_target_by_name(tmp_path, tiny_file_spec, photo):
    out = tmp_path / "out"
    result = _run(str(photo), "--method", "saliency", "--model", tiny_file_spec, "--target", "CLASS 7", "-o", str(out))
    assert result.exit_code == 0, result.output


def test_ambiguous_target_lists_candidates(tmp_path, tiny_file_spec, photo):
    result = _run(str(photo), "--method", "saliency", "--model", tiny_file_spec, "--target", "clas", "-o", str(tmp_path))
    assert result.exit_code == 2
    assert "ambiguous" in result.output
    assert "0: class 0" in result.output


def test_unknown_target_is_an_error(tmp_path, tiny_file_spec, photo):
    result = _run(str(photo), "--method", "saliency", "--model", tiny_file_spec, "--target", "zebra", "-o", str(tmp_path))
    assert result.exit_code == 2
    assert "no class name contains 'zebra'" in result.output


def test_empty_folder_is_an_error(tmp_path, tiny_file_spec):
    (tmp_path / "empty").mkdir()
    result = _run(str(tmp_path / "empty"), "--method", "saliency", "--model", tiny_file_spec)
    assert result.exit_code == 2
    assert "has no images" in result.output


def test_undecodable_single_file_is_an_error(tmp_path, tiny_file_spec):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    result = _run(str(path), "--method", "saliency", "--model", tiny_file_spec, "-o", str(tmp_path))
    assert result.exit_code == 2
    assert "broken.png" in result.output


def test_unknown_method_is_rejected(tmp_path, photo):
    result = _run(str(photo), "--method", "gradcam+", "-o", str(tmp_path))
    assert result.exit_code == 2
    assert "gradcam++" in result.output


def test_method_layers_defaults():
    layers = method_layers(["featuremaps", "channel", "gradcam", "saliency"], None, "efficientnet_lite0")
    assert layers == {"featuremaps": "blocks.4", "channel": "blocks.4", "gradcam": None, "saliency": None}
    assert method_layers(["gradcam"], "blocks.2", "efficientnet_lite0") == {"gradcam": "blocks.2"}
    assert method_layers(["featuremaps"], None, "file:/tmp/model.pt") == {"featuremaps": None}


@pytest.mark.slow
def test_real_model_gradcam(tmp_path, real_model, monkeypatch):
    # Reuse the session's model instead of loading it again inside the command.
    monkeypatch.setattr("atlas.models.load_model", lambda spec, device="cpu": real_model)
    path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)

    result = _run(str(path), "--method", "gradcam", "--target", "tiger cat", "-o", str(tmp_path))

    assert result.exit_code == 0, result.output
    attribution = np.load(tmp_path / "chelsea.gradcam.npy")
    assert attribution.shape == (224, 224)
    assert (tmp_path / "chelsea.gradcam.png").is_file()


def test_list_images_skips_earlier_outputs(tmp_path):
    folder = tmp_path / "in"
    image = make_images(folder, 1, size=40)[0]
    (folder / f"{image.stem}.gradcam++.png").write_bytes(image.read_bytes())
    (folder / f"{image.stem}.all.png").write_bytes(image.read_bytes())
    (folder / "results").mkdir()
    (folder / "results" / "copy.png").write_bytes(image.read_bytes())

    assert list_images(folder, folder / "results") == [image]
    # OUT equal to the image folder skips files by name only, never the whole folder.
    assert list_images(folder, folder) == [image, folder / "results" / "copy.png"]
    assert list_images(folder) == [image, folder / "results" / "copy.png"]


def test_list_images_only_outputs_is_error(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_images(tmp_path / "src", 1, size=40)[0].rename(folder / "cat.saliency.png")

    with pytest.raises(AtlasError, match="contains only outputs of an earlier `atlas explain`"):
        list_images(folder)


def test_rerun_inside_tree_skips_outputs(tmp_path, tiny_file_spec, monkeypatch):
    folder = tmp_path / "in"
    top = make_images(folder, 1, size=40)[0]
    make_images(folder / "a", 1, size=40, seed=1)
    monkeypatch.chdir(folder / "a")

    first = _run("..", "--method", "saliency", "--model", tiny_file_spec)
    written = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    second = _run("..", "--method", "saliency", "--model", tiny_file_spec)
    rewritten = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert f"a/{top.stem}.saliency.png" in written
    assert rewritten == written
    assert not [name for name in rewritten if ".saliency.saliency." in name]
