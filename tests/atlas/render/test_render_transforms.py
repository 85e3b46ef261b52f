from __future__ import annotations

import pytest
import torch

from atlas.render.transforms import affine, draw_transforms, pad


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_pad_adds_constant_border() -> None:
    images = torch.zeros(2, 3, 4, 4)
    padded = pad(images, 2, value=0.5)

    assert padded.shape == (2, 3, 8, 8)
    assert torch.all(padded[..., :2, :] == 0.5)
    assert torch.all(padded[..., 2:6, 2:6] == 0)


def test_pad_zero_width_is_identity() -> None:
    images = torch.rand(1, 3, 4, 4)
    assert pad(images, 0) is images


def test_affine_identity() -> None:
    images = torch.rand(2, 3, 9, 9)
    out = affine(images, torch.zeros(2, 2), torch.ones(2), torch.zeros(2))

    torch.testing.assert_close(out, images)


def test_affine_whole_pixel_shift_is_exact() -> None:
    images = torch.rand(1, 1, 6, 6)
    out = affine(images, torch.tensor([[2.0, -1.0]]), torch.ones(1), torch.zeros(1), fill=0.25)

    # Content moves right by 2 and up by 1; uncovered pixels get the fill.
    expected = torch.full_like(images, 0.25)
    expected[..., 0:5, 2:6] = images[..., 1:6, 0:4]
    torch.testing.assert_close(out, expected)


def test_affine_rotation_quarter_turn_clockwise() -> None:
    images = torch.rand(1, 3, 7, 7)
    out = affine(images, torch.zeros(1, 2), torch.ones(1), torch.tensor([90.0]))

    torch.testing.assert_close(out, torch.rot90(images, k=-1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_affine_zoom_shrinks_content() -> None:
    images = torch.zeros(1, 1, 32, 32)
    images[..., 8:24, 8:24] = 1.0
    out = affine(images, torch.zeros(1, 2), torch.tensor([0.5]), torch.zeros(1), fill=0.0)

    # A 16 px square at half size covers a quarter of its area.
    assert out.sum().item() == pytest.approx(images.sum().item() / 4, rel=0.05)


def test_affine_draws_differ_per_image() -> None:
    images = torch.rand(1, 3, 8, 8).expand(2, -1, -1, -1)
    out = affine(images, torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.ones(2), torch.zeros(2))

    torch.testing.assert_close(out[0], images[0])
    assert not torch.allclose(out[1], images[1])


def test_draw_transforms_ranges() -> None:
    draws = draw_transforms(_generators(0, 1, 2), steps=50, jitter=3, scale_range=(0.9, 0.95), rotation=12.0)

    assert draws.shifts.shape == (50, 3, 2)
    assert draws.scales.shape == (50, 3)
    assert draws.angles.shape == (50, 3)
    assert torch.equal(draws.shifts, draws.shifts.round())
    assert draws.shifts.min() == -3
    assert draws.shifts.max() == 3
    assert draws.scales.min() >= 0.9
    assert draws.scales.max() <= 0.95
    assert draws.angles.abs().max() <= 12.0


def test_draw_transforms_independent_of_batch() -> None:
    batch = draw_transforms(_generators(4, 7), steps=10, jitter=2, scale_range=(0.9, 1.0), rotation=10.0)
    alone = draw_transforms(_generators(7), steps=10, jitter=2, scale_range=(0.9, 1.0), rotation=10.0)

    torch.testing.assert_close(batch.shifts[:, 1:], alone.shifts)
    torch.testing.assert_close(batch.angles[:, 1:], alone.angles)
    assert not torch.equal(batch.angles[:, 0], batch.angles[:, 1])


def test_draw_transforms_step() -> None:
    draws = draw_transforms(_generators(0, 1), steps=4, jitter=1, scale_range=(1.0, 1.0), rotation=0.0)
    shifts, scales, angles = draws.step(2)

    assert shifts.shape == (2, 2)
    assert torch.all(scales == 1.0)
    assert torch.all(angles == 0.0)
