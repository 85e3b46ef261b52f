from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from atlas.models import load_model
from atlas.patches import model_view, patch_around


def test_model_view_matches_timm_transform():
    model = load_model("timm:resnet18@random")
    yy, xx = np.mgrid[0:300, 0:451]
    smooth = np.stack([xx * 255 / 450, yy * 255 / 299, 128 + 100 * np.sin(xx / 20.0)], -1)
    image = Image.fromarray(smooth.astype(np.uint8))
    view = model_view(image, model.preprocessing_info())
    ours = (torch.from_numpy(np.array(view)).permute(2, 0, 1).float() / 255 - torch.tensor(model.mean)[:, None, None]) / torch.tensor(model.std)[:, None, None]
    theirs = model.transform(image)
    assert ours.shape == theirs.shape
    # Both resize with bicubic filters but may round differently: compare on average.
    assert (ours - theirs).abs().mean() < 0.02


def test_patch_centered_on_position():
    pixels = np.zeros((224, 224, 3), np.uint8)
    pixels[16 * 5 : 16 * 6, 16 * 9 : 16 * 10] = 255  # layer cell (y=5, x=9) at stride 16
    patch = np.asarray(patch_around(Image.fromarray(pixels), 5, 9, (14, 14), size=64))
    bright = np.argwhere(patch[..., 0] > 128)
    center = bright.mean(0)
    assert abs(center[0] - 31.5) < 2
    assert abs(center[1] - 31.5) < 2


def test_patch_at_border_padded_grey():
    view = Image.new("RGB", (224, 224), (255, 0, 0))
    patch = np.asarray(patch_around(view, 0, 0, (14, 14), size=64))
    assert tuple(patch[0, 0]) == (128, 128, 128)
    assert tuple(patch[-1, -1]) == (255, 0, 0)
