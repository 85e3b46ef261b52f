"""Fixtures for the explanation tests: tiny models, a random ResNet-18, the real model on chelsea."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data

from atlas.testing import TinyNet


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 32, 32, generator=generator)


@pytest.fixture(scope="module")
def resnet18():
    """torchvision's ResNet-18 without weights: in-place ReLUs, one ReLU module called twice per block."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="session")
def real_model():
    from atlas.models import load_model

    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def chelsea_input(real_model) -> torch.Tensor:
    """scikit-image's chelsea photo through the real model's preprocessing, (3, 224, 224)."""
    return real_model.transform(Image.fromarray(data.chelsea()))
