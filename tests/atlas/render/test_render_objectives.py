from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.errors import QueryError
from atlas.render.objectives import (
    Objective,
    activation_at,
    center_index,
    channel,
    direction,
    direction_cosine,
    neuron,
)


@pytest.fixture()
def activations() -> torch.Tensor:
    return torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(0))


def _numpy_direction_cosine(vectors: np.ndarray, directions: np.ndarray, power: float, floor: float) -> np.ndarray:
    unit = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    dot = (vectors * unit).sum(axis=-1)
    cosine = dot / np.linalg.norm(vectors, axis=-1)
    return dot * np.maximum(floor, cosine) ** power


@pytest.mark.parametrize(("length", "expected"), [(5, (2, 3)), (4, (1, 3)), (1, (0, 1)), (2, (0, 2))])
def test_center_index(length: int, expected: tuple[int, int]) -> None:
    assert center_index(length) == expected


def test_activation_at_odd_map_centre(activations: torch.Tensor) -> None:
    torch.testing.assert_close(activation_at(activations), activations[:, :, 2, 2])


def test_activation_at_even_map_averages_centre() -> None:
    activations = torch.randn(2, 3, 4, 6)
    expected = activations[:, :, 1:3, 2:4].mean(dim=(2, 3))

    torch.testing.assert_close(activation_at(activations), expected)


def test_activation_at_position(activations: torch.Tensor) -> None:
    torch.testing.assert_close(activation_at(activations, 4, 0), activations[:, :, 4, 0])


def test_activation_at_rejects_outside_position(activations: torch.Tensor) -> None:
    with pytest.raises(QueryError, match="y=5 is outside the layer's map of size 5"):
        activation_at(activations, 5, 0)


def test_direction_cosine_matches_numpy(activations: torch.Tensor) -> None:
    directions = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    expected = _numpy_direction_cosine(activations[:, :, 2, 2].numpy(), directions.numpy(), power=3.0, floor=0.1)

    scores = direction_cosine(directions, power=3.0)(activations)

    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_direction_cosine_floor_applies() -> None:
    # An activation opposite to v: cosine -1 is clamped to the floor.
    activations = torch.zeros(1, 2, 1, 1)
    activations[0, :, 0, 0] = torch.tensor([-2.0, 0.0])
    score = direction_cosine(torch.tensor([1.0, 0.0]), power=2.0, floor=0.1)(activations)

    assert score.item() == pytest.approx(-2.0 * 0.1**2)


def test_direction_cosine_shared_direction(activations: torch.Tensor) -> None:
    vector = torch.randn(6)
    shared = direction_cosine(vector)(activations)
    repeated = direction_cosine(vector.expand(3, -1))(activations)

    torch.testing.assert_close(shared, repeated)


def test_direction_cosine_ignores_direction_norm(activations: torch.Tensor) -> None:
    vector = torch.randn(6)
    torch.testing.assert_close(direction_cosine(vector)(activations), direction_cosine(7.5 * vector)(activations))


def test_direction_cosine_prefers_aligned_activation() -> None:
    # Same dot product with v, but the second activation also points elsewhere.
    activations = torch.zeros(2, 2, 1, 1)
    activations[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    activations[1, :, 0, 0] = torch.tensor([1.0, 3.0])
    scores = direction_cosine(torch.tensor([1.0, 0.0]), power=2.0)(activations)

    assert scores[0] > scores[1]


def test_direction_is_dot_product(activations: torch.Tensor) -> None:
    vector = torch.tensor([3.0, 4.0, 0, 0, 0, 0])
    expected = (activations[:, :2, 2, 2] * torch.tensor([0.6, 0.8])).sum(dim=1)

    torch.testing.assert_close(direction(vector)(activations), expected)


def test_direction_rejects_channel_mismatch(activations: torch.Tensor) -> None:
    with pytest.raises(QueryError, match="the direction has 4 values but the layer has 6 channels"):
        direction_cosine(torch.ones(4))(activations)


def test_direction_rejects_batch_mismatch(activations: torch.Tensor) -> None:
    with pytest.raises(QueryError, match="got 2 directions for a batch of 3 images"):
        direction_cosine(torch.ones(2, 6))(activations)


def test_channel_is_spatial_mean(activations: torch.Tensor) -> None:
    torch.testing.assert_close(channel(4)(activations), activations[:, 4].mean(dim=(1, 2)))


def test_neuron_at_position_and_centre(activations: torch.Tensor) -> None:
    torch.testing.assert_close(neuron(1, 0, 3)(activations), activations[:, 1, 0, 3])
    torch.testing.assert_close(neuron(1)(activations), activations[:, 1, 2, 2])


def test_channel_rejects_missing_channel(activations: torch.Tensor) -> None:
    with pytest.raises(QueryError, match="channel 6 does not exist; the layer has 6 channels"):
        channel(6)(activations)


def test_objectives_compose(activations: torch.Tensor) -> None:
    first = channel(0)
    second = neuron(2, 1, 1)
    a = first(activations)
    b = second(activations)

    torch.testing.assert_close((first + second)(activations), a + b)
    torch.testing.assert_close((first - second)(activations), a - b)
    torch.testing.assert_close((2 * first)(activations), 2 * a)
    torch.testing.assert_close((first * 0.5)(activations), 0.5 * a)
    torch.testing.assert_close((first / 4)(activations), a / 4)
    torch.testing.assert_close((-first)(activations), -a)
    torch.testing.assert_close((first * second)(activations), a * b)
    torch.testing.assert_close((1 - first)(activations), 1 - a)
    torch.testing.assert_close(sum([first, second, first])(activations), 2 * a + b)


def test_objective_name_describes_composition() -> None:
    combined = channel(1) + 2 * neuron(3)

    assert isinstance(combined, Objective)
    assert "channel 1" in repr(combined)
    assert "neuron 3" in repr(combined)
