"""The ``atlas explain`` command: per-image explanations written as PNG figures and ``.npy`` arrays."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

from atlas.errors import AtlasError, ConfigError, ImageDecodeError
from atlas.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

METHOD_CHOICES = (
    "featuremaps", "filters", "channel", "gradcam", "gradcam++", "saliency", "smoothgrad",
    "integrated-gradients", "gradientshap", "deepliftshap", "lime", "all",
)


def is_explain_output(path: Path) -> bool:
    """Return whether ``path`` is named like a figure this command writes (``<stem>.<method>.png``)."""
    name = path.name.lower()
    return any(name.endswith(f".{method}.png") for method in METHOD_CHOICES)


def list_images(path: Path, out: Path | None = None) -> list[Path]:
    """Return ``path`` itself, or the image files in a folder and its sub-folders.

    A folder is listed as ``atlas extract --images`` lists it
    (:func:`atlas.datasets.list_items`): recursively, sorted by name within
    each folder, keeping files with a suffix in ``atlas.images.IMAGE_SUFFIXES``.
    Earlier outputs are left out, so a rerun does not explain its own figures:
    files named ``<stem>.<method>.png``, and every file in ``out`` when ``out``
    is a sub-folder of ``path``.

    Raises
    ------
    AtlasError
        The folder and its sub-folders contain no image that is not an earlier output.
    """
    from atlas.datasets import list_items

    if not path.is_dir():
        return [path]
    try:
        items = [Path(item) for item in list_items(str(path))]
    except ConfigError as error:
        raise AtlasError(
            f"folder {path} has no images in it or its sub-folders ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "pass an image file or another folder"
        ) from error

    folder = path.resolve()
    out_folder = out.resolve() if out is not None else None
    # When OUT is the image folder itself, every image lies in it, so only the name rule applies there.
    skip_out = out_folder is not None and out_folder != folder and out_folder.is_relative_to(folder)
    images = []
    n_named = n_in_out = 0
    for item in items:
        if is_explain_output(item):
            n_named += 1
        elif skip_out and item.resolve().is_relative_to(out_folder):
            n_in_out += 1
        else:
            images.append(item)
    if n_named:
        logger.info("skipped %d files in %s named like earlier outputs (<name>.<method>.png)", n_named, path)
    if n_in_out:
        # NOTE: this also skips original images that happen to lie in the output folder.
        logger.info("skipped %d files in the output folder %s, which lies inside %s", n_in_out, out, path)
    if not images:
        raise AtlasError(
            f"folder {path} contains only outputs of an earlier `atlas explain`; "
            "pass the folder of the original images, or another folder"
        )
    return images


def output_folder(path: Path, source: Path, out: Path) -> Path:
    """Return the folder for ``path``'s outputs: ``out`` plus ``path``'s sub-folder under the ``source`` folder.

    ``photos/a/cat.jpg`` from source ``photos`` goes to ``out/a``, so images
    with the same name in different sub-folders do not overwrite each other.
    A single file, or a file directly inside ``source``, goes to ``out``.
    """
    if not source.is_dir():
        return out
    # Resolved paths, because the folder listing resolves a relative source such as "..".
    return out / path.resolve().relative_to(source.resolve()).parent


def write_explanations(stem: str, explanations: dict, out: Path, combined: bool) -> list[Path]:
    """Write each explanation's attribution as ``<stem>.<method>.npy`` and the figures as PNG.

    With ``combined`` one figure ``<stem>.all.png`` shows every method;
    otherwise each method gets ``<stem>.<method>.png``.

    Returns
    -------
    list of Path
        The files written.
    """
    from atlas.explain.figures import plot_explanation, plot_explanations, save_figure

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for method, explanation in explanations.items():
        array_path = out / f"{stem}.{method}.npy"
        np.save(array_path, explanation.attribution)
        written.append(array_path)
        if not combined:
            figure = plot_explanation(explanation)
            written.append(save_figure(figure, out / f"{stem}.{method}.png"))
    if combined:
        figure = plot_explanations(explanations)
        # A 256-colour palette makes the eleven-panel figure about 0.35 MB instead of 1.1 MB.
        written.append(save_figure(figure, out / f"{stem}.all.png", dpi=80, colors=256))
    return written


def method_layers(methods: list[str], layer: str | None, model_spec: str) -> dict[str, str | None]:
    """Choose each method's layer: ``layer`` when given, else a default per method.

    Feature maps and channel visualization default to the model's atlas
    layer (``atlas.models.default_layer``), so they match the atlas. Grad-CAM
    and Grad-CAM++ default to the final rectified feature map, the one the
    classifier pools, as in Selvaraju et al. (2017): on EfficientNet-Lite0
    their maps at the atlas layer ``blocks.4`` follow texture, not the class.
    ``None`` lets the method pick that map.
    """
    from atlas.models import default_layer

    atlas_layer = default_layer(model_spec)
    layers: dict[str, str | None] = {}
    for name in methods:
        if layer is not None:
            layers[name] = layer
        elif name in ("featuremaps", "channel"):
            layers[name] = atlas_layer
        else:
            layers[name] = None
    return layers


def explain_file(path: Path, loaded, layers: dict[str, str | None], target: int | None,
                 out: Path, combined: bool, options: dict) -> list[Path]:
    """Decode one image, run each method in ``layers`` on it and write the outputs; return the files written."""
    from atlas.explain import explain
    from atlas.images import decode_image

    image = decode_image(path)
    tensor = loaded.transform(image)
    explanations = {}
    for method, layer in layers.items():
        result = explain(loaded, tensor, method, layer=layer, target=target, **options.get(method, {}))
        # Every method explains the class the first one resolved.
        target = result.target
        explanations[method] = result
    return write_explanations(path.stem, explanations, out, combined)


@click.command("explain")
@click.argument("image", type=click.Path(exists=True, path_type=Path))
@click.option("--method", "method", required=True, type=click.Choice(METHOD_CHOICES),
              help="Explanation method, or 'all' for every method in one figure.")
@click.option("--model", "model_spec", default="efficientnet_lite0", show_default=True,
              help="Model spec: efficientnet_lite0, timm:<name>, torchvision:<name> or file:<path>.")
@click.option("--layer", default=None,
              help="Module path for featuremaps, channel, gradcam and gradcam++. Default: the model's "
                   "atlas layer for featuremaps and channel, the final feature map (e.g. bn2) for the others.")
@click.option("--target", default=None,
              help="Class to explain, as an index or a case-insensitive part of its name. Default: the predicted class.")
@click.option("--channel", type=int, default=None, help="Channel for --method channel. Default: the image's strongest channel.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML configuration file; its render section sets --method channel's rendering.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set render.steps=64. Repeatable.")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cuda:0.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Folder for the .png figures and .npy attributions; sub-folders of IMAGE are mirrored inside it.")
def explain(image: Path, method: str, model_spec: str, layer: str | None, target: str | None,
            channel: int | None, config_path: str | None, overrides: tuple[str, ...], device: str, out: Path) -> None:
    """Explain a model's prediction on IMAGE (a file, or a folder of images).

    Writes <image name>.<method>.png (the map over the image, with the class in
    the title) and <image name>.<method>.npy (the raw attribution) into OUT.
    With --method all, one <image name>.all.png shows every method. A folder
    is searched recursively, and the outputs of an image in a sub-folder go to
    the same sub-folder under OUT (photos/a/cat.jpg gives OUT/a/cat.gradcam.png),
    so images with the same name do not overwrite each other. In a folder,
    files that cannot be decoded are skipped with a warning.
    """
    from tqdm import tqdm

    from atlas.config import load_config
    from atlas.explain import METHODS
    from atlas.explain.base import resolve_class
    from atlas.models import load_model

    paths = list_images(image, out)
    render_config = load_config(config_path, list(overrides)).render
    loaded = load_model(model_spec, device=device)
    target_index = resolve_class(target, loaded.class_names) if target is not None else None
    methods = list(METHODS) if method == "all" else [method]
    layers = method_layers(methods, layer, model_spec)
    options = {"channel": {"channel": channel, "config": render_config}} if "channel" in methods else {}

    folder = image.is_dir()
    failures = 0
    for path in tqdm(paths, desc="explain", unit="image", disable=None if folder else True):
        try:
            folder_out = output_folder(path, image, out)
            written = explain_file(path, loaded, layers, target_index, folder_out, method == "all", options)
        except ImageDecodeError as error:
            if not folder:
                raise ImageDecodeError(f"cannot decode {path}: {error}") from error
            failures += 1
            logger.warning("skipped %s: %s", path, error)
            continue
        logger.info("explained %s with %s: %s", path, method, ", ".join(str(item) for item in written))

    if failures:
        logger.warning("%d of %d images could not be decoded", failures, len(paths))
