"""One render with the real EfficientNet-Lite0 weights, marked slow (a few seconds on one core)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from atlas.capture import TruncatedModel, forward_to
from atlas.config import RenderConfig
from atlas.models import load_model
from atlas.render import direction_cosine, optimize_images

pytestmark = pytest.mark.slow


def test_efficientnet_icons_reach_direction() -> None:
    model = load_model("efficientnet_lite0")
    batch = model.preprocess([Image.fromarray(data.chelsea())])
    with torch.no_grad():
        activations = forward_to(model.module, batch, ["blocks.4"])["blocks.4"]
    # Two positions of the cat photo's 14 x 14 map: (C,) vectors stacked to (2, 112).
    directions = torch.stack([activations[0, :, 7, 7], activations[0, :, 4, 9]])
    config = RenderConfig(steps=24)
    net = TruncatedModel(model.module, "blocks.4")

    result = optimize_images(net, direction_cosine(directions), [0, 1], config, model.mean, model.std)

    assert result.images.shape == (2, 3, 64, 64)
    assert torch.all(result.final_scores > result.initial_scores + 1.0)
    pixels = (result.images * 255).numpy()
    assert np.all(pixels.reshape(2, 3, -1).std(axis=2).max(axis=1) > 10.0)
