from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.render.param import COLOR_CORRELATION_SVD_SQRT, FourierImage, decorrelated_to_rgb, fft_frequencies


@pytest.mark.parametrize(("height", "width"), [(8, 8), (7, 10), (16, 5)])
def test_fft_frequencies_match_numpy(height: int, width: int) -> None:
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    expected = np.sqrt(fx**2 + fy**2)

    frequencies = fft_frequencies(height, width)

    assert frequencies.shape == (height, width // 2 + 1)
    np.testing.assert_allclose(frequencies.numpy(), expected, rtol=1e-6)


def test_decorrelated_to_rgb_matches_numpy() -> None:
    image = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    matrix = COLOR_CORRELATION_SVD_SQRT.numpy()
    matrix = matrix / np.linalg.norm(matrix, axis=0).max()
    expected = np.einsum("rc,bchw->brhw", matrix, image.numpy())

    np.testing.assert_allclose(decorrelated_to_rgb(image).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_fourier_image_shape_and_range() -> None:
    image = FourierImage(3, 12)()

    assert image.shape == (3, 3, 12, 12)
    assert image.min() > 0
    assert image.max() < 1


def test_fourier_image_odd_size() -> None:
    assert FourierImage(1, 15)().shape == (1, 3, 15, 15)


def test_fourier_image_seeded_per_image() -> None:
    first = FourierImage(2, 8, [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])()
    alone = FourierImage(1, 8, [torch.Generator().manual_seed(6)])()

    torch.testing.assert_close(first[1:], alone)
    assert not torch.allclose(first[0], first[1])


def test_fourier_image_rejects_generator_count() -> None:
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2"):
        FourierImage(2, 8, [torch.Generator()])


def test_fourier_image_gradient_reaches_coefficients() -> None:
    image = FourierImage(1, 8)
    image()[:, 0].sum().backward()

    assert image.spectrum.grad is not None
    assert image.spectrum.grad.abs().sum() > 0


def test_fourier_image_low_frequencies_dominate() -> None:
    # With equal-variance coefficients, the 1 / frequency scaling makes the
    # image smooth: neighbouring pixels correlate far more than white noise.
    generator = torch.Generator().manual_seed(0)
    image = FourierImage(8, 32, [generator] * 8, std=0.5)().detach()
    centred = image - image.mean(dim=(2, 3), keepdim=True)
    neighbours = (centred[..., 1:] * centred[..., :-1]).mean() / centred.pow(2).mean()

    assert neighbours > 0.5
