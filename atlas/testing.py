"""Small models and images for tests and smoke runs, importable from worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


class TinyNet(nn.Module):
    """A four-layer CNN with 10 classes; ``layer2`` gives (B, 16, H/4, W/4) maps."""

    def __init__(self, n_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def save_tiny_model(path: str | Path, seed: int = 0, **kwargs) -> str:
    """Save a seeded :class:`TinyNet` as a pickled module and return its ``file:`` spec."""
    torch.manual_seed(seed)
    model = TinyNet(**kwargs).eval()
    torch.save(model, path)
    return f"file:{path}"


def make_images(folder: str | Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``count`` random-texture PNG images of ``size`` px and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        base = rng.integers(0, 256, size=3)
        noise = rng.normal(0, 40, size=(size, size, 3))
        ramp = np.linspace(0, 80, size)[None, :, None] * rng.choice([-1, 1])
        pixels = np.clip(base + noise + ramp, 0, 255).astype(np.uint8)
        path = folder / f"img_{index:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


class PoisonAbove(nn.Module):
    """Turns a whole feature map into NaN when its mean exceeds ``threshold`` (to test NaN flagging)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = x.flatten(1).mean(1) > self.threshold
        return torch.where(bad[:, None, None, None], torch.full_like(x, float("nan")), x)


def save_poisoned_model(path: str | Path, threshold: float, seed: int = 0) -> str:
    """Save a TinyNet whose ``layer2`` output is NaN for inputs with a high mean response."""
    torch.manual_seed(seed)
    model = TinyNet().eval()
    model.layer2.append(PoisonAbove(threshold))
    torch.save(model, path)
    return f"file:{path}"
