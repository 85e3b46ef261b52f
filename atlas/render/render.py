"""Batched activation maximization: many images optimized at once against one truncated network.

One optimization step for a batch of B images:

1. the Fourier parameterization produces B images in [0, 1], (B, 3, P, P);
2. each is padded by ``pad`` grey pixels, (B, 3, P + 2 pad, P + 2 pad), and
   shifted, zoomed and rotated by its own random draw;
3. the result is normalised with the model's mean and std and run through the
   network up to the layer, (B, C, h, w);
4. the objective gives one score per image, and Adam takes a step on the
   negated sum.

Every random number an image uses (its initial coefficients and its
transforms) comes from its own generator, seeded from the run seed and the
image's direction. The result for a direction is therefore the same whether
it is rendered alone or in a batch, up to floating-point differences between
batch sizes, and does not depend on its position in the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from atlas.capture import TruncatedModel
from atlas.config import RenderConfig
from atlas.errors import QueryError
from atlas.models import LoadedModel
from atlas.render import objectives
from atlas.render.objectives import Objective
from atlas.render.param import FourierImage
from atlas.render.transforms import affine, draw_transforms, pad

logger = logging.getLogger(__name__)


@dataclass
class RenderResult:
    """Optimized images and their scores.

    Attributes
    ----------
    images
        (B, 3, P, P) float32 in [0, 1], on the CPU.
    initial_scores, final_scores
        (B,) float32, the objective on the untransformed image before the
        first step and after the last one.
    """

    images: torch.Tensor
    initial_scores: torch.Tensor
    final_scores: torch.Tensor


def derive_seed(seed: int, *keys: int | np.ndarray | torch.Tensor) -> int:
    """Derive a 63-bit generator seed from a run seed and any integers or arrays.

    Arrays contribute their exact bytes as float32 (for directions) or their
    integer values, so equal inputs always give equal seeds.
    """
    words: list[int] = [int(seed) & 0xFFFFFFFF]
    for key in keys:
        if isinstance(key, (np.ndarray, torch.Tensor)):
            values = np.ascontiguousarray(np.asarray(key, dtype=np.float32))
            words.extend(values.view(np.uint32).ravel().tolist())
        else:
            words.append(int(key) & 0xFFFFFFFF)
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def optimize_images(
    net: nn.Module,
    objective: Objective,
    seeds: Sequence[int],
    config: RenderConfig,
    mean: Sequence[float],
    std: Sequence[float],
) -> RenderResult:
    """Maximize ``objective`` for a batch of ``len(seeds)`` images.

    Parameters
    ----------
    net
        Maps a normalised batch (B, 3, H, W) to a layer's output (B, C, h, w),
        e.g. a :class:`~atlas.capture.TruncatedModel`.
    objective
        Scores (B,) from the layer output; image ``b`` maximizes score ``b``.
    seeds
        One seed per image for its initial coefficients and its transforms.
    config
        ``size``, ``pad``, ``steps``, ``lr``, ``jitter``, ``scale_range`` and
        ``rotation`` are used.
    mean, std
        The model's per-channel input normalisation.
    """
    device = next(iter(net.parameters()), torch.empty(0)).device
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    image = FourierImage(len(seeds), config.size, generators).to(device)
    draws = draw_transforms(generators, config.steps, config.jitter, tuple(config.scale_range), config.rotation)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def network_input(images: torch.Tensor, step: int | None) -> torch.Tensor:
        canvas = pad(images, config.pad)
        if step is not None:
            canvas = affine(canvas, *(values.to(device) for values in draws.step(step)))
        return (canvas - mean_t) / std_t

    with torch.no_grad():
        initial_scores = objective(net(network_input(image(), None)))

    optimizer = torch.optim.Adam(image.parameters(), lr=config.lr)
    for step in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        scores = objective(net(network_input(image(), step)))
        (-scores.sum()).backward()
        optimizer.step()

    with torch.no_grad():
        images = image()
        final_scores = objective(net(network_input(images, None)))
    return RenderResult(images=images.cpu(), initial_scores=initial_scores.cpu(), final_scores=final_scores.cpu())


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert images (B, 3, P, P) in [0, 1] to (B, P, P, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _best_attempts(result: RenderResult, attempts: int) -> RenderResult:
    # Images come grouped per target, `attempts` in a row: (n * attempts, ...) to (n, ...).
    scores = result.final_scores.view(-1, attempts)
    best = scores.argmax(dim=1) + torch.arange(scores.shape[0]) * attempts
    return RenderResult(result.images[best], result.initial_scores[best], result.final_scores[best])


def _probe_layer(net: nn.Module, config: RenderConfig, device: torch.device) -> tuple[int, int, int]:
    # One forward pass on a grey image gives the layer's (C, h, w) at the render size.
    side = config.size + 2 * config.pad
    with torch.no_grad():
        output = net(torch.zeros(1, 3, side, side, device=device))
    return tuple(int(v) for v in output.shape[1:])


def iter_direction_batches(
    model: LoadedModel,
    layer: str,
    directions: torch.Tensor,
    config: RenderConfig,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, RenderResult]]:
    """Render directions batch by batch, yielding ``(indices, result)`` per batch.

    ``indices`` (b,) int64 are the rows of ``directions`` in the batch and
    ``result`` contains their best attempts. Callers that save each batch as it
    finishes (the render stage) use this, and :func:`render_directions` collects it.
    """
    directions = _check_directions(directions)
    net = TruncatedModel(model.module, layer)
    device = model.device
    channels, height, width = _probe_layer(net, config, device)
    if directions.shape[1] != channels:
        raise QueryError(
            f"directions have {directions.shape[1]} channels but layer {layer!r} outputs {channels}; "
            "pass directions taken from this layer"
        )

    # Each batch optimizes `batch_size` images, i.e. `attempts` images per direction.
    per_batch = max(1, config.batch_size // config.attempts)
    starts = range(0, directions.shape[0], per_batch)
    logger.debug(
        "rendering %d directions at layer %s (map %dx%d), %d per batch, %d attempts, %d steps",
        directions.shape[0], layer, height, width, per_batch, config.attempts, config.steps,
    )
    bar = tqdm(starts, desc=f"render {layer}", unit="batch", disable=None if progress else True)
    for start in bar:
        indices = np.arange(start, min(start + per_batch, directions.shape[0]))
        batch = directions[indices]
        seeds = [derive_seed(config.seed, attempt, vector) for vector in batch for attempt in range(config.attempts)]
        targets = batch.repeat_interleave(config.attempts, dim=0).to(device)
        objective = objectives.direction_cosine(targets, power=config.cos_power)

        began = time.perf_counter()
        result = optimize_images(net, objective, seeds, config, model.mean, model.std)
        seconds = time.perf_counter() - began
        logger.debug(
            "batch of %d images: %.1f s, %.1f ms per image-step",
            len(seeds), seconds, 1000 * seconds / (len(seeds) * config.steps),
        )
        yield indices, _best_attempts(result, config.attempts)


def _check_directions(directions: torch.Tensor | np.ndarray) -> torch.Tensor:
    directions = torch.as_tensor(np.asarray(directions, dtype=np.float32))
    if directions.dim() != 2:
        raise QueryError(f"directions must have shape (n, C), got {tuple(directions.shape)}")
    if not torch.isfinite(directions).all():
        rows = torch.nonzero(~torch.isfinite(directions).all(dim=1)).flatten().tolist()
        raise QueryError(f"directions at rows {rows[:10]} contain NaN or inf; pass finite vectors")
    return directions


def render_directions(
    model: LoadedModel,
    layer: str,
    directions: torch.Tensor,
    config: RenderConfig,
    progress: bool = True,
) -> np.ndarray:
    """Render one icon per direction with the activation atlas objective.

    Each icon maximizes ``dot(a, v) * max(0.1, cos(a, v)) ** config.cos_power``
    where ``a`` is the layer's activation at the centre of the map and ``v``
    the direction. The best of ``config.attempts`` tries (by final score) is
    kept.

    Parameters
    ----------
    model
        The loaded model; its ``mean`` and ``std`` normalise the input.
    layer
        Module path of the layer, e.g. ``blocks.4``.
    directions
        (n, C) float; any scale, each is used as a unit vector.
    config
        Render settings; ``batch_size`` images are optimized at once and
        ``seed`` with each direction's values seeds its generator.
    progress
        Show a progress bar over batches on a terminal.

    Returns
    -------
    np.ndarray
        (n, P, P, 3) uint8 with P = ``config.size``.

    Raises
    ------
    QueryError
        ``directions`` is not (n, C) for the layer's C, or contains NaN or inf.
    ModelError
        ``layer`` is not a module of the model.
    """
    directions = _check_directions(directions)
    icons = np.zeros((directions.shape[0], config.size, config.size, 3), dtype=np.uint8)
    if directions.shape[0] == 0:
        return icons

    began = time.perf_counter()
    for indices, result in iter_direction_batches(model, layer, directions, config, progress):
        icons[indices] = to_uint8(result.images)
    logger.info("rendered %d icons for layer %s in %.1f s", directions.shape[0], layer, time.perf_counter() - began)
    return icons


def render_channel(
    model: LoadedModel,
    layer: str,
    channel: int,
    y: int | None = None,
    x: int | None = None,
    config: RenderConfig | None = None,
) -> np.ndarray:
    """Render the image that maximizes one channel, or one neuron when ``y`` and ``x`` are given.

    Parameters
    ----------
    channel
        Channel index in the layer's output.
    y, x
        A position in the layer's map: the neuron objective at that position.
        Both ``None``: the channel's mean over the whole map.
    config
        Render settings; ``None`` uses the defaults of :class:`RenderConfig`.

    Returns
    -------
    np.ndarray
        (P, P, 3) uint8 with P = ``config.size``.

    Raises
    ------
    QueryError
        Only one of ``y`` and ``x`` is given, or the channel or position is
        outside the layer.
    """
    config = config or RenderConfig()
    if (y is None) != (x is None):
        raise QueryError(f"pass both y and x for a neuron, or neither for a whole channel; got y={y}, x={x}")
    objective = objectives.channel(channel) if y is None else objectives.neuron(channel, y, x)

    net = TruncatedModel(model.module, layer)
    seeds = [derive_seed(config.seed, channel, -1 if y is None else y, -1 if x is None else x, attempt)
             for attempt in range(config.attempts)]
    began = time.perf_counter()
    result = _best_attempts(optimize_images(net, objective, seeds, config, model.mean, model.std), config.attempts)
    logger.info("rendered %s of layer %s in %.1f s", objective.name, layer, time.perf_counter() - began)
    return to_uint8(result.images)[0]
