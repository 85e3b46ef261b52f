"""Objectives for activation maximization, composable by addition and scaling.

An objective maps a layer's output, shape (B, C, h, w), to one score per
image, shape (B,), and the optimizer maximizes the sum of the scores.
Objectives combine like numbers (``2 * channel(3) - neuron(5)``), as in Lucid
and Lucent. A direction objective may give every image in the batch its own
direction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from atlas.errors import QueryError

ObjectiveFunction = Callable[[torch.Tensor], torch.Tensor]


class Objective:
    """A differentiable score per image, computed from one layer's output.

    Parameters
    ----------
    function
        Maps activations (B, C, h, w) to scores (B,).
    name
        A readable description, used in logs and ``repr``.
    """

    def __init__(self, function: ObjectiveFunction, name: str = "objective") -> None:
        self.function = function
        self.name = name

    def __call__(self, activations: torch.Tensor) -> torch.Tensor:
        return self.function(activations)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda acts: self(acts) + other(acts), f"{self.name} + {other.name}")
        return Objective(lambda acts: self(acts) + other, f"{self.name} + {other}")

    def __radd__(self, other: float) -> Objective:
        # `sum(objectives)` starts from 0.
        return self + other

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __sub__(self, other: Objective | float) -> Objective:
        return self + (-other)

    def __rsub__(self, other: float) -> Objective:
        return (-self) + other

    def __mul__(self, other: Objective | float) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda acts: self(acts) * other(acts), f"({self.name}) * ({other.name})")
        return Objective(lambda acts: other * self(acts), f"{other} * ({self.name})")

    def __rmul__(self, other: float) -> Objective:
        return self * other

    def __truediv__(self, other: float) -> Objective:
        return self * (1.0 / other)


def center_index(length: int) -> tuple[int, int]:
    """Return the slice ``(start, stop)`` of the centre of an axis of ``length`` positions.

    An odd length has one centre position. An even length has two, and
    objectives average them to estimate the activation at the exact centre
    of the image.
    """
    if length % 2:
        return length // 2, length // 2 + 1
    return length // 2 - 1, length // 2 + 1


def activation_at(activations: torch.Tensor, y: int | None = None, x: int | None = None) -> torch.Tensor:
    """Return the activation vector at one spatial position, (B, C, h, w) to (B, C).

    ``None`` for ``y`` or ``x`` means the centre of that axis, averaged over
    the two middle positions when the axis length is even.

    Raises
    ------
    QueryError
        The position is outside the map.
    """
    _, _, height, width = activations.shape
    rows = _position_slice(y, height, "y")
    columns = _position_slice(x, width, "x")
    return activations[:, :, rows[0] : rows[1], columns[0] : columns[1]].mean(dim=(2, 3))


def _position_slice(position: int | None, length: int, axis: str) -> tuple[int, int]:
    if position is None:
        return center_index(length)
    if not 0 <= position < length:
        raise QueryError(f"{axis}={position} is outside the layer's map of size {length}; pass 0..{length - 1}")
    return position, position + 1


def _check_channel(activations: torch.Tensor, channel: int) -> None:
    channels = activations.shape[1]
    if not 0 <= channel < channels:
        raise QueryError(f"channel {channel} does not exist; the layer has {channels} channels (0..{channels - 1})")


def channel(index: int) -> Objective:
    """Mean activation of one channel over every position of the map."""

    def score(activations: torch.Tensor) -> torch.Tensor:
        _check_channel(activations, index)
        return activations[:, index].mean(dim=(1, 2))

    return Objective(score, f"channel {index}")


def neuron(index: int, y: int | None = None, x: int | None = None) -> Objective:
    """Activation of one channel at one position (``None``: the centre of the map)."""

    def score(activations: torch.Tensor) -> torch.Tensor:
        _check_channel(activations, index)
        return activation_at(activations[:, index : index + 1], y, x)[:, 0]

    return Objective(score, f"neuron {index} at y={y}, x={x}")


def _unit_directions(directions: torch.Tensor) -> torch.Tensor:
    # (C,) or (B, C) to unit vectors of the same shape.
    directions = torch.as_tensor(directions).float()
    if directions.dim() not in (1, 2):
        raise QueryError(f"directions must have shape (C,) or (B, C), got {tuple(directions.shape)}")
    return directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _project(vectors: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    # vectors (B, C) and unit (C,) or (B, C) to dot products (B,).
    if unit.shape[-1] != vectors.shape[1]:
        raise QueryError(
            f"the direction has {unit.shape[-1]} values but the layer has {vectors.shape[1]} channels; "
            "pass directions taken from this layer"
        )
    if unit.dim() == 2 and unit.shape[0] != vectors.shape[0]:
        raise QueryError(f"got {unit.shape[0]} directions for a batch of {vectors.shape[0]} images; pass one per image")
    return (vectors * unit.to(vectors)).sum(dim=-1)


def direction(directions: torch.Tensor, y: int | None = None, x: int | None = None) -> Objective:
    """Dot product of the activation at one position with a unit direction.

    Parameters
    ----------
    directions
        (C,) for one direction shared by the batch, or (B, C) for one per image.
    """
    unit = _unit_directions(directions)

    def score(activations: torch.Tensor) -> torch.Tensor:
        return _project(activation_at(activations, y, x), unit)

    return Objective(score, "direction")


def direction_cosine(
    directions: torch.Tensor,
    power: float = 3.0,
    floor: float = 0.1,
    y: int | None = None,
    x: int | None = None,
) -> Objective:
    """Dot product times clamped cosine similarity: ``dot(a, v) * max(floor, cos(a, v)) ** power``.

    This is the activation atlas objective (Carter et al., "Activation Atlas",
    Distill 2019): the dot product alone is maximized by any large activation
    that leans towards ``v``, and the cosine factor pushes the activation's
    direction onto ``v``. The floor keeps the gradient alive while the cosine
    is still near zero or negative.

    Parameters
    ----------
    directions
        (C,) or (B, C). Each direction is scaled to unit length, so the score
        does not depend on its norm.
    power
        Exponent p of the cosine; 0 gives the plain dot product.
    floor
        Lower clamp of the cosine.
    y, x
        Position in the layer's map; ``None`` means the centre.

    Notes
    -----
    Lucid's recipe (``lucid/recipes/activation_atlas/render.py``) takes the
    mean of ``a * v`` instead of the sum and does not normalise ``v``, so its
    "cosine" is the true cosine times ``|v| / C``. Here the cosine is the
    true one, and ``floor`` clamps the true cosine.
    """
    unit = _unit_directions(directions)

    def score(activations: torch.Tensor) -> torch.Tensor:
        vectors = activation_at(activations, y, x)
        dot = _project(vectors, unit)
        cosine = dot / vectors.norm(dim=-1).clamp(min=1e-6)
        return dot * cosine.clamp(min=floor).pow(power)

    return Objective(score, f"direction_cosine(p={power})")
