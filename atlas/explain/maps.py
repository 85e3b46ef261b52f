"""Layer views for one image: feature maps, first-layer filters and channel visualization."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from atlas.capture import forward_to, get_module
from atlas.config import RenderConfig
from atlas.errors import AtlasError, ModelError, QueryError
from atlas.explain.base import KIND_IMAGE, KIND_MAPS, KIND_TILES, ExplainRun, Explanation, explain_run
from atlas.models import IMAGENET_MEAN, IMAGENET_STD, LoadedModel

logger = logging.getLogger(__name__)


def feature_maps(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    max_channels: int | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Return a layer's activations for the image, strongest channels first.

    Parameters
    ----------
    model
        A network or a :class:`~atlas.models.LoadedModel`.
    image
        (C, H, W) or (1, C, H, W) model input; a PIL image with a LoadedModel.
    layer
        Module path; ``None`` uses the last ``nn.Conv2d`` the model calls.
    target
        Class for the title and ``score``; ``None`` is the predicted class.
    max_channels
        Keep only this many channels; ``None`` keeps all.

    Returns
    -------
    Explanation
        ``attribution`` is (n, h, w) float32, channels ordered by mean
        activation, descending; ``extras["channels"]`` contains their indices and
        ``extras["strength"]`` their mean activations.
    """
    if max_channels is not None and max_channels < 1:
        raise QueryError(f"max_channels must be at least 1, got {max_channels}")
    with explain_run("featuremaps", model, image, target=target, layer=layer, needs_layer=True,
                     class_names=class_names, mean=mean, std=std) as run:
        maps = run.activation[0].float()  # (C, h, w)
        strength = maps.mean(dim=(1, 2))
        order = torch.argsort(strength, descending=True, stable=True)
        if max_channels is not None:
            order = order[:max_channels]
        return run.explanation(
            KIND_MAPS,
            maps[order],
            channels=order.cpu().numpy(),
            strength=strength[order].cpu().numpy(),
        )


def filter_tiles(weights: torch.Tensor) -> np.ndarray:
    """Turn convolution weights into displayable tiles.

    Each filter is scaled on its own so that 0 maps to grey (0.5) and its
    largest absolute weight to 0 or 1.

    Parameters
    ----------
    weights
        (out, in, k, k) kernel with ``in`` 1 or 3.

    Returns
    -------
    np.ndarray
        (out, k, k, in) float32 in [0, 1].
    """
    weights = weights.detach().float().cpu()
    peak = weights.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    tiles = 0.5 + 0.5 * weights / peak
    return tiles.permute(0, 2, 3, 1).numpy()


def filter_weights(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Return the kernels of the first convolution as RGB (or grey) tiles.

    The image only decides the prediction shown with the figure; the kernels
    do not depend on it.

    Parameters
    ----------
    layer
        An ``nn.Conv2d`` with 1 or 3 input channels per group; ``None`` uses
        the first convolution the forward pass calls.

    Returns
    -------
    Explanation
        ``attribution`` is (out, k, k, in) float32 in [0, 1] (see
        :func:`filter_tiles`); ``extras["weights"]`` contains the raw
        (out, in, k, k) kernel and ``extras["norms"]`` each filter's L2 norm.

    Raises
    ------
    ModelError
        The layer is not a 2-D convolution or has another input depth.
    """
    with explain_run("filters", model, image, target=target, class_names=class_names, mean=mean, std=std) as run:
        if layer is None:
            if not run.conv_layers:
                raise ModelError("the model calls no nn.Conv2d, so it has no filters to show")
            layer = run.conv_layers[0]
        conv = get_module(run.module, layer)
        if not isinstance(conv, nn.Conv2d):
            raise ModelError(f"filters needs an nn.Conv2d layer; {layer!r} is a {type(conv).__name__}")
        weights = conv.weight.detach()
        if weights.shape[1] not in (1, 3):
            raise ModelError(
                f"layer {layer!r} has {weights.shape[1]} input channels per filter; "
                "filters are shown as images only for 1 or 3 (pass the first convolution)"
            )
        run.layer = layer
        return run.explanation(
            KIND_TILES,
            filter_tiles(weights),
            weights=weights.float().cpu().numpy(),
            norms=weights.flatten(1).norm(dim=1).float().cpu().numpy(),
        )


class _GrayInput(nn.Module):
    """Adapter that runs a 1-channel model on RGB images by averaging the channels first.

    render_channel optimizes RGB images. The wrapped model's layers sit under
    the ``model.`` prefix.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.mean(dim=1, keepdim=True))


def _render_target(run: ExplainRun) -> tuple[LoadedModel, str]:
    # render_channel takes a LoadedModel; give it the guarded module, and a layer path in it.
    channels = run.input.shape[1]
    module, layer = run.module, run.layer
    if channels == 1:
        module, layer = _GrayInput(run.module), f"model.{run.layer}"
    if run.parts.loaded is not None:
        return dataclasses.replace(run.parts.loaded, module=module), layer

    fallback_mean = IMAGENET_MEAN if channels == 3 else (0.5,) * channels
    fallback_std = IMAGENET_STD if channels == 3 else (0.5,) * channels
    if run.parts.mean is None or run.parts.std is None:
        logger.warning("no input normalisation given for channel visualization; assuming mean %s, std %s", fallback_mean, fallback_std)

    def no_transform(_image: Image.Image) -> torch.Tensor:
        raise AtlasError("this model was passed without its preprocessing; pass a LoadedModel instead")

    loaded = LoadedModel(
        module=module,
        spec=f"module:{type(run.module).__name__}",
        transform=no_transform,
        input_size=(int(run.input.shape[2]), int(run.input.shape[3])),
        mean=tuple(run.parts.mean or fallback_mean),
        std=tuple(run.parts.std or fallback_std),
        class_names=list(run.parts.class_names or []),
    )
    return loaded, layer


def channel_visualization(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    channel: int | None = None,
    neuron: bool = False,
    config: RenderConfig | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Render what one channel (or one neuron) of a layer responds to, by activation maximization.

    Calls :func:`atlas.render.render_channel`. By default the channel is the
    one with the highest mean activation on this image.

    Parameters
    ----------
    layer
        Module path; ``None`` uses the last ``nn.Conv2d`` the model calls.
    channel
        Channel index; ``None`` picks the image's strongest channel.
    neuron
        Maximize the channel at the centre position of the layer's map (a
        neuron objective) instead of its mean over the map.
    config
        An :class:`atlas.config.RenderConfig`; ``None`` uses its defaults.

    Returns
    -------
    Explanation
        ``attribution`` is the (P, P, 3) uint8 rendering. ``extras`` contains
        ``channel``, the neuron's ``y`` and ``x`` in the rendering's layer map
        (``None`` without ``neuron``) and the channel's mean ``activation`` on
        the image.

    Raises
    ------
    AtlasError
        ``atlas.render`` is not installed.
    QueryError
        ``channel`` is out of range.
    """
    with explain_run("channel", model, image, target=target, layer=layer, needs_layer=True,
                     class_names=class_names, mean=mean, std=std) as run:
        maps = run.activation[0].float()  # (C, h, w)
        count = maps.shape[0]
        if channel is None:
            channel = int(maps.mean(dim=(1, 2)).argmax())
        elif not 0 <= channel < count:
            raise QueryError(f"channel {channel} out of range; layer {run.layer!r} has {count} channels (0 to {count - 1})")

        try:
            from atlas.render import render_channel
        except ImportError as error:
            raise AtlasError(f"channel visualization needs atlas.render.render_channel, which failed to import: {error}") from error

        config = config or RenderConfig()
        y = x = None
        if neuron:
            # render_channel optimizes a (P + 2 pad)-pixel canvas; find the centre of the layer's map for it.
            side = config.size + 2 * config.pad
            canvas = torch.zeros(1, run.input.shape[1], side, side, device=run.input.device)
            with torch.no_grad():
                height, width = forward_to(run.module, canvas, [run.layer])[run.layer].shape[-2:]
            y, x = height // 2, width // 2

        loaded, render_layer = _render_target(run)
        rendered = render_channel(loaded, render_layer, channel, y, x, config)
        return run.explanation(
            KIND_IMAGE,
            np.asarray(rendered, dtype=np.uint8),
            channel=channel,
            y=y,
            x=x,
            activation=float(maps[channel].mean()),
        )


__all__ = ["channel_visualization", "feature_maps", "filter_tiles", "filter_weights"]
