"""Image parameterization: a batch of images in a decorrelated Fourier basis.

Each image is stored as the coefficients of its 2-D real FFT, scaled by
``1 / frequency``, so every frequency gets about the same energy and plain
gradient steps do not favour high-frequency noise. Colour is stored in a
decorrelated basis: the square root of ImageNet's RGB colour covariance maps
it back to RGB, then a sigmoid maps it into [0, 1]. Both ideas come from
Olah, Mordvintsev and Schubert, "Feature Visualization" (Distill, 2017).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Square root of the RGB colour covariance of ImageNet, from the SVD that the
# Lucid library (lucid/optvis/param/color.py) ships as `color_correlation_svd_sqrt`.
# Columns are the decorrelated colour directions.
COLOR_CORRELATION_SVD_SQRT = torch.tensor(
    [
        [0.26, 0.09, 0.02],
        [0.27, 0.00, -0.05],
        [0.27, -0.09, 0.03],
    ]
)

# Divisor of the image before the colour map and the sigmoid. Lucid's
# `fft_image` uses 4 without a derivation; a larger value gives less saturated icons.
SPECTRUM_DAMPING = 4.0


def fft_frequencies(height: int, width: int) -> torch.Tensor:
    """Return the radial frequency of each ``rfft2`` coefficient, shape (height, width // 2 + 1).

    Frequencies are in cycles per pixel, as :func:`torch.fft.fftfreq` gives them.
    """
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def decorrelated_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Map images from the decorrelated colour basis to RGB, shape (B, 3, H, W) to (B, 3, H, W).

    The matrix is normalised by its largest column norm, so no colour
    direction is amplified.
    """
    matrix = COLOR_CORRELATION_SVD_SQRT.to(image)
    matrix = matrix / matrix.norm(dim=0).max()
    return torch.einsum("rc,bchw->brhw", matrix, image)


class FourierImage(nn.Module):
    """A batch of square RGB images parameterised by scaled Fourier coefficients.

    Parameters
    ----------
    batch
        Number of images B.
    size
        Height and width in pixels.
    generators
        One :class:`torch.Generator` per image for the initial coefficients.
        Each image's start then does not depend on the other images in the
        batch. ``None`` draws from the global generator.
    std
        Standard deviation of the initial coefficients (0.01, as in Lucid).
    decay_power
        Exponent of the ``1 / frequency`` spectrum scaling.

    Calling the module returns the images, shape (B, 3, size, size), float32
    in (0, 1).
    """

    def __init__(
        self,
        batch: int,
        size: int,
        generators: Sequence[torch.Generator] | None = None,
        std: float = 0.01,
        decay_power: float = 1.0,
    ) -> None:
        super().__init__()
        if generators is not None and len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for a batch of {batch}; pass one per image")
        self.size = size

        # The real and imaginary parts are a trailing axis of 2, so the
        # optimizer updates a plain real tensor of shape (B, 3, size, size // 2 + 1, 2).
        shape = (3, size, size // 2 + 1, 2)
        if generators is None:
            spectrum = torch.randn(batch, *shape) * std
        else:
            spectrum = torch.stack([torch.randn(*shape, generator=generator) * std for generator in generators])
        self.spectrum = nn.Parameter(spectrum)

        # Clamping the frequency at 1 / size keeps the DC term finite. The
        # "ortho" inverse FFT keeps pixel values on the scale of the
        # coefficients, as Lucid's sqrt(H * W) factor does with TensorFlow's
        # unnormalised inverse, so learning rates that suit pixel images suit
        # this basis too.
        frequencies = fft_frequencies(size, size).clamp(min=1.0 / size)
        scale = frequencies.pow(-decay_power)
        self.register_buffer("scale", scale[None, None, :, :, None], persistent=False)

    def forward(self) -> torch.Tensor:
        coefficients = torch.view_as_complex(self.spectrum * self.scale)
        image = torch.fft.irfft2(coefficients, s=(self.size, self.size), norm="ortho")
        image = decorrelated_to_rgb(image / SPECTRUM_DAMPING)
        return torch.sigmoid(image)
