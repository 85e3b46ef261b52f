from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.capture import TruncatedModel
from atlas.config import RenderConfig
from atlas.errors import ModelError, QueryError
from atlas.models import LoadedModel
from atlas.render import direction_cosine, optimize_images, render_channel, render_directions
from atlas.render.render import derive_seed, to_uint8

LAYER = "layer2"


def test_optimize_increases_objective(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    net = TruncatedModel(tiny_model.module, LAYER)
    result = optimize_images(net, direction_cosine(tiny_directions), range(6), fast_config, tiny_model.mean, tiny_model.std)

    assert result.images.shape == (6, 3, 16, 16)
    assert torch.all(result.final_scores > result.initial_scores)


def test_icons_have_spatial_variance(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    icons = render_directions(tiny_model, LAYER, tiny_directions, fast_config, progress=False)

    assert icons.shape == (6, 16, 16, 3)
    assert icons.dtype == np.uint8
    # Standard deviation over the pixels of each icon and colour channel, on
    # the 0..255 scale; the starting image is near-uniform grey (std below 1).
    spatial_std = icons.reshape(6, -1, 3).astype(np.float64).std(axis=1)
    assert np.all(spatial_std.max(axis=1) > 5.0)


def test_batch_matches_single_render(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    batch = render_directions(tiny_model, LAYER, tiny_directions, fast_config, progress=False)
    alone = render_directions(tiny_model, LAYER, tiny_directions[3:4], fast_config, progress=False)

    # Pixels may differ by rounding because CPU kernels sum in a batch-size-dependent order.
    assert np.abs(batch[3].astype(int) - alone[0].astype(int)).max() <= 2


def test_batch_size_does_not_change_icons(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    large = render_directions(tiny_model, LAYER, tiny_directions, fast_config.model_copy(update={"batch_size": 6}), progress=False)
    small = render_directions(tiny_model, LAYER, tiny_directions, fast_config.model_copy(update={"batch_size": 2}), progress=False)

    assert np.abs(large.astype(int) - small.astype(int)).max() <= 2


def test_different_directions_differ(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    icons = render_directions(tiny_model, LAYER, tiny_directions[:3], fast_config, progress=False).astype(float)

    for first, second in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(icons[first] - icons[second]).mean() > 5.0


def test_seed_determinism(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    first = render_directions(tiny_model, LAYER, tiny_directions[:2], fast_config, progress=False)
    again = render_directions(tiny_model, LAYER, tiny_directions[:2], fast_config, progress=False)
    other = render_directions(
        tiny_model, LAYER, tiny_directions[:2], fast_config.model_copy(update={"seed": 1}), progress=False
    )

    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(float) - other.astype(float)).mean() > 1.0


def test_attempts_keep_best_score(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    # With three attempts, render_directions returns the highest-scoring of
    # the three images that optimize_images gives for the same seeds.
    config = fast_config.model_copy(update={"attempts": 3, "batch_size": 6})
    net = TruncatedModel(tiny_model.module, LAYER)
    vector = tiny_directions[0]
    seeds = [derive_seed(config.seed, attempt, vector) for attempt in range(3)]
    result = optimize_images(net, direction_cosine(vector.expand(3, -1)), seeds, config, tiny_model.mean, tiny_model.std)
    best = int(result.final_scores.argmax())

    icons = render_directions(tiny_model, LAYER, tiny_directions[:1], config, progress=False)

    np.testing.assert_array_equal(icons[0], to_uint8(result.images)[best])


def test_render_directions_empty(tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    icons = render_directions(tiny_model, LAYER, torch.zeros(0, 16), fast_config, progress=False)

    assert icons.shape == (0, 16, 16, 3)


def test_render_directions_accepts_numpy(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    from_numpy = render_directions(tiny_model, LAYER, tiny_directions[:1].numpy(), fast_config, progress=False)
    from_torch = render_directions(tiny_model, LAYER, tiny_directions[:1], fast_config, progress=False)

    np.testing.assert_array_equal(from_numpy, from_torch)


def test_render_directions_rejects_channel_count(tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    with pytest.raises(QueryError, match="directions have 8 channels but layer 'layer2' outputs 16"):
        render_directions(tiny_model, LAYER, torch.ones(2, 8), fast_config, progress=False)


def test_render_directions_rejects_nan(tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    directions = torch.ones(3, 16)
    directions[1, 4] = float("nan")

    with pytest.raises(QueryError, match=r"directions at rows \[1\] contain NaN or inf"):
        render_directions(tiny_model, LAYER, directions, fast_config, progress=False)


def test_render_directions_rejects_shape(tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    with pytest.raises(QueryError, match=r"directions must have shape \(n, C\), got \(16,\)"):
        render_directions(tiny_model, LAYER, torch.ones(16), fast_config, progress=False)


def test_render_directions_rejects_unknown_layer(tiny_model: LoadedModel, fast_config: RenderConfig) -> None:
    with pytest.raises(ModelError, match="layer 'layer9' not found"):
        render_directions(tiny_model, "layer9", torch.ones(1, 16), fast_config, progress=False)


def test_render_channel_increases_channel(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    # A random TinyNet has dead ReLU channels; take the most active one.
    channel = int(tiny_directions.mean(dim=0).argmax())
    icon = render_channel(tiny_model, LAYER, channel, config=fast_config)
    net = TruncatedModel(tiny_model.module, LAYER)
    mean = torch.tensor(tiny_model.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.std).view(1, 3, 1, 1)
    rendered = torch.from_numpy(icon).permute(2, 0, 1)[None].float() / 255
    grey = torch.full_like(rendered, 0.5)
    with torch.no_grad():
        after = net((rendered - mean) / std)[:, channel].mean()
        before = net((grey - mean) / std)[:, channel].mean()

    assert icon.shape == (16, 16, 3)
    assert icon.dtype == np.uint8
    assert after > before


def test_render_neuron_differs_from_channel(tiny_model: LoadedModel, tiny_directions: torch.Tensor, fast_config: RenderConfig) -> None:
    channel = int(tiny_directions.mean(dim=0).argmax())
    whole = render_channel(tiny_model, LAYER, channel, config=fast_config).astype(float)
    corner = render_channel(tiny_model, LAYER, channel, 0, 0, config=fast_config).astype(float)

    assert corner.shape == (16, 16, 3)
    assert np.abs(whole - corner).mean() > 1.0


@pytest.mark.parametrize(
    ("channel", "y", "x", "message"),
    [
        (16, None, None, "channel 16 does not exist; the layer has 16 channels"),
        (0, 2, None, "pass both y and x for a neuron"),
        (0, 0, 4, "x=4 is outside the layer's map of size 4"),
    ],
)
def test_render_channel_rejects_bad_target(
    tiny_model: LoadedModel, fast_config: RenderConfig, channel: int, y: int | None, x: int | None, message: str
) -> None:
    with pytest.raises(QueryError, match=message):
        render_channel(tiny_model, LAYER, channel, y, x, config=fast_config)


def test_derive_seed_depends_on_every_key() -> None:
    vector = np.arange(4, dtype=np.float32)
    base = derive_seed(0, 1, vector)

    assert base == derive_seed(0, 1, vector.copy())
    assert base == derive_seed(0, 1, torch.from_numpy(vector))
    assert base != derive_seed(1, 1, vector)
    assert base != derive_seed(0, 2, vector)
    assert base != derive_seed(0, 1, vector + 1)
    assert 0 <= base < 2**63
