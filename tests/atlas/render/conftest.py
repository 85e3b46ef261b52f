"""Fixtures for the render tests: a seeded TinyNet and directions taken from its own activations."""

from __future__ import annotations

import pytest
import torch

from atlas.capture import forward_to
from atlas.config import RenderConfig
from atlas.models import LoadedModel, load_model
from atlas.testing import save_tiny_model

LAYER = "layer2"
CHANNELS = 16


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    spec = save_tiny_model(tmp_path_factory.mktemp("render-model") / "tiny.pt", seed=0)
    return load_model(spec)


@pytest.fixture(scope="session")
def tiny_directions(tiny_model: LoadedModel) -> torch.Tensor:
    """Six activation vectors of ``layer2`` on random images, shape (6, 16)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    mean = torch.tensor(tiny_model.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        activations = forward_to(tiny_model.module, (images - mean) / std, [LAYER])[LAYER]
    # (4, 16, 8, 8) to (256, 16), then six spread-out rows.
    vectors = activations.permute(0, 2, 3, 1).reshape(-1, CHANNELS)
    return vectors[::9][:6].clone()


@pytest.fixture()
def fast_config() -> RenderConfig:
    """A 16 px, 16-step configuration: TinyNet's stride 4 gives a 4 x 4 map."""
    return RenderConfig(size=16, pad=0, steps=16, batch_size=4, jitter=1, rotation=5.0, seed=0, grid_sizes=None)
