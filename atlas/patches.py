"""Crops of the real source images around sampled activations, for exemplar patches."""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import zarr
from PIL import Image

from atlas.datasets import open_image
from atlas.errors import ImageDecodeError, StoreError

logger = logging.getLogger(__name__)

# A patch spans this many layer cells around the position; at EfficientNet-Lite0
# blocks.4 (stride 16) that is 64 px of the 224 px input, a view the cell's
# central receptive field dominates.
PATCH_CELLS = 4

_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def model_view(image: Image.Image, preprocessing: dict) -> Image.Image:
    """Apply the model's resize and centre crop (no normalisation): what the network saw."""
    height, width = preprocessing["input_size"]
    crop_pct = float(preprocessing.get("crop_pct", 0.875))
    resample = _RESAMPLING.get(preprocessing.get("interpolation", "bicubic"), Image.Resampling.BICUBIC)
    scale_to = int(np.floor(min(height, width) / crop_pct))
    ratio = scale_to / min(image.size)
    resized = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), resample)
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


@lru_cache(maxsize=256)
def _cached_view(path: str, preprocessing_key: tuple, seed: int, min_scale: float) -> Image.Image:
    preprocessing = dict(preprocessing_key)
    preprocessing["input_size"] = list(preprocessing["input_size"])
    return model_view(open_image(path, seed=seed, min_scale=min_scale), preprocessing)


def _preprocessing_key(preprocessing: dict) -> tuple:
    return tuple(sorted((key, tuple(value) if isinstance(value, list) else value) for key, value in preprocessing.items()))


def patch_around(view: Image.Image, y: int, x: int, layer_hw: tuple[int, int], size: int = 96) -> Image.Image:
    """Crop ``view`` (the model's input image) around layer position (y, x) and resize to ``size`` px."""
    layer_h, layer_w = layer_hw
    step_y, step_x = view.height / layer_h, view.width / layer_w
    center_y, center_x = (y + 0.5) * step_y, (x + 0.5) * step_x
    half_h, half_w = PATCH_CELLS * step_y / 2, PATCH_CELLS * step_x / 2
    box = (round(center_x - half_w), round(center_y - half_h), round(center_x + half_w), round(center_y + half_h))
    canvas = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), (128, 128, 128))
    inside = (max(box[0], 0), max(box[1], 0), min(box[2], view.width), min(box[3], view.height))
    if inside[0] < inside[2] and inside[1] < inside[3]:
        canvas.paste(view.crop(inside), (inside[0] - box[0], inside[1] - box[1]))
    return canvas.resize((size, size), Image.Resampling.BICUBIC)


def patch_for_row(group: zarr.Group, row: int, size: int = 96, layer: str | None = None) -> Image.Image:
    """Return the crop of the source image around the activation stored at ``row``.

    Parameters
    ----------
    group
        An open store.
    row
        Activation row.
    size
        Output side in pixels.
    layer
        Layer whose cell the patch is centred on and sized by; the primary
        layer when omitted.

    Raises
    ------
    StoreError
        The row does not belong to a decoded image.
    ImageDecodeError
        The source image can no longer be read (moved or deleted since extraction).
    """
    image_row = int(group["samples/image"][row])
    if image_row < 0:
        raise StoreError(f"activation row {row} belongs to no decoded image")
    path = str(group["images/path"][image_row])
    y, x = int(group["samples/y"][row]), int(group["samples/x"][row])
    attrs = group.attrs
    primary = attrs["layers"][0]
    layer = layer or primary
    _, layer_h, layer_w = attrs["layer_shapes"][layer]
    # samples/y and samples/x index the primary layer's map. Extraction stores an
    # extra layer's vector from the same relative position, so map them the same way.
    _, primary_h, primary_w = attrs["layer_shapes"][primary]
    y = (y * layer_h) // primary_h
    x = (x * layer_w) // primary_w
    sample = attrs.get("config", {}).get("sample", {})
    try:
        view = _cached_view(path, _preprocessing_key(attrs["preprocessing"]), int(sample.get("seed", 0)), float(sample.get("min_scale", 0.08)))
    except ImageDecodeError as error:
        raise ImageDecodeError(f"cannot rebuild the patch of row {row} from {path}: {error}") from error
    return patch_around(view, y, x, (layer_h, layer_w), size)
