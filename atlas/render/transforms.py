"""Random geometric transforms applied to the images at every optimization step.

Small random shifts, scalings and rotations make the optimized image activate
the target robustly instead of through pixel-exact adversarial patterns
(Olah et al., "Feature Visualization", Distill 2017). Every image in a batch
gets its own draw, taken from its own generator, so an image's sequence of
transforms does not depend on which other images share its batch.

Shift, scale and rotation are composed into one affine map per image and
applied with a single :func:`torch.nn.functional.grid_sample`, which resamples
each image once per step instead of once per transform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Grey fills the border and every point sampled outside the image. Lucid's
# activation atlas recipe also pads with a constant (`pad(16, mode="constant")`).
PAD_VALUE = 0.5


@dataclass
class TransformDraws:
    """Per-step, per-image transform parameters.

    Attributes
    ----------
    shifts
        (steps, B, 2) float32, translation (dx, dy) in whole pixels.
    scales
        (steps, B) float32, zoom factor; below 1 shrinks the content.
    angles
        (steps, B) float32, rotation in degrees.
    """

    shifts: torch.Tensor
    scales: torch.Tensor
    angles: torch.Tensor

    def step(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(shifts (B, 2), scales (B,), angles (B,))`` of one step."""
        return self.shifts[index], self.scales[index], self.angles[index]


def draw_transforms(
    generators: Sequence[torch.Generator],
    steps: int,
    jitter: int,
    scale_range: tuple[float, float],
    rotation: float,
) -> TransformDraws:
    """Draw every step's transform parameters, one generator per image.

    Parameters
    ----------
    generators
        One generator per image, B in all.
    steps
        Number of optimization steps.
    jitter
        Maximum shift in pixels; shifts are whole pixels, uniform in
        [-jitter, jitter] along each axis.
    scale_range
        (low, high) zoom factors, drawn uniformly.
    rotation
        Maximum rotation in degrees, drawn uniformly in [-rotation, rotation].
    """
    # (B, steps, 4) uniform numbers in [0, 1): dx, dy, scale, angle.
    uniform = torch.stack([torch.rand(steps, 4, generator=generator) for generator in generators])
    uniform = uniform.transpose(0, 1)

    shifts = torch.floor(uniform[..., :2] * (2 * jitter + 1)) - jitter
    low, high = scale_range
    scales = low + uniform[..., 2] * (high - low)
    angles = (2 * uniform[..., 3] - 1) * rotation
    return TransformDraws(shifts=shifts, scales=scales, angles=angles)


def pad(images: torch.Tensor, width: int, value: float = PAD_VALUE) -> torch.Tensor:
    """Pad images with a constant border, shape (B, C, H, W) to (B, C, H + 2w, W + 2w)."""
    if width == 0:
        return images
    return F.pad(images, (width, width, width, width), mode="constant", value=value)


def affine(
    images: torch.Tensor,
    shifts: torch.Tensor,
    scales: torch.Tensor,
    angles: torch.Tensor,
    fill: float = PAD_VALUE,
) -> torch.Tensor:
    """Shift, zoom and rotate each image about its centre, keeping its size.

    Parameters
    ----------
    images
        (B, C, H, W) float.
    shifts
        (B, 2) translation (dx, dy) in pixels.
    scales
        (B,) zoom factors.
    angles
        (B,) rotations in degrees.
    fill
        Value of the points that come from outside the input.

    Returns
    -------
    torch.Tensor
        (B, C, H, W), bilinearly resampled. With zero angle, unit scale and
        whole-pixel shifts, the output is an exact shifted copy. Positive
        ``dx`` moves the content right, positive ``dy`` down, and a positive
        angle turns it clockwise as displayed (row 0 at the top).
    """
    batch, _, height, width = images.shape
    shifts = shifts.to(images)
    scales = scales.to(images)
    radians = angles.to(images) * (math.pi / 180)
    cos = torch.cos(radians) / scales
    sin = torch.sin(radians) / scales

    # `affine_grid` maps output coordinates in [-1, 1] to input coordinates,
    # so the matrix is the inverse of the content transform: rotate by -angle,
    # divide by the zoom, and move by minus the shift. Shifts convert from
    # pixels to normalised units, where the image spans 2.
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = sin * (height / width)
    theta[:, 1, 0] = -sin * (width / height)
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = -2 * shifts[:, 0] / width
    theta[:, 1, 2] = -2 * shifts[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)

    # Sampling (image - fill) with zero padding and adding fill back gives a
    # constant `fill` outside the input, which `grid_sample` has no mode for.
    shifted = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return shifted + fill
