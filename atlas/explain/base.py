"""Shared pieces of the per-image explanation methods.

Every method opens an :func:`explain_run`. It enters the model-state guard,
turns the image into a (1, C, H, W) tensor that autograd can use and runs one
forward pass for the logits, the target class and the layer's activation. The
run then builds the returned :class:`Explanation`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from atlas.capture import get_module
from atlas.errors import AtlasError, ModelError, QueryError
from atlas.explain.guard import attribution_model, call_counter, model_guard
from atlas.models import LoadedModel

logger = logging.getLogger(__name__)

# Display kinds of an attribution array (Explanation.kind).
KIND_HEATMAP = "heatmap"  # (H, W), non-negative
KIND_SIGNED = "signed-heatmap"  # (H, W), positive and negative evidence
KIND_MAPS = "feature-maps"  # (n, h, w) activations
KIND_TILES = "tiles"  # (n, k, k, C) in [0, 1]
KIND_IMAGE = "image"  # (P, P, 3) uint8


@dataclass
class Explanation:
    """The result of one explanation method on one image.

    Attributes
    ----------
    method
        Method name as in :data:`atlas.explain.METHODS` (``gradcam++``).
    attribution
        Float32 (H, W) heatmap at input resolution for attribution methods, an
        (n, h, w) activation stack for ``featuremaps``, (n, k, k, C) tiles in
        [0, 1] for ``filters``, a (P, P, 3) uint8 image for ``channel``.
    kind
        Display kind of ``attribution``: ``heatmap``, ``signed-heatmap``,
        ``feature-maps``, ``tiles`` or ``image``.
    target
        Class index the method explains (the predicted class unless one was given).
    target_name
        Name of ``target`` when the class names are known, else ``None``.
    score
        Softmax probability of ``target`` for the input.
    layer
        Module path the method read, ``None`` for input-level methods.
    image
        The input as shown under the heatmap, (H, W, 3) float32 in [0, 1].
    extras
        Method-specific values such as the convergence delta of Integrated
        Gradients or the superpixel segments of LIME.
    """

    method: str
    attribution: np.ndarray
    kind: str
    target: int
    target_name: str | None
    score: float
    layer: str | None = None
    image: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelParts:
    """A network with what is known about its input normalisation and classes."""

    module: nn.Module
    loaded: LoadedModel | None
    class_names: list[str] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def unpack_model(
    model: nn.Module | LoadedModel,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ModelParts:
    """Split a model argument into the network and its metadata; explicit values win."""
    if isinstance(model, LoadedModel):
        return ModelParts(
            module=model.module,
            loaded=model,
            class_names=list(class_names) if class_names is not None else list(model.class_names) or None,
            mean=tuple(mean) if mean is not None else model.mean,
            std=tuple(std) if std is not None else model.std,
        )
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch nn.Module or a LoadedModel, got {type(model).__name__}")
    return ModelParts(
        module=model,
        loaded=None,
        class_names=list(class_names) if class_names is not None else None,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )


def _input_channels(module: nn.Module) -> int | None:
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            return child.in_channels
    return None


def prepare_input(image: torch.Tensor | Image.Image, parts: ModelParts) -> torch.Tensor:
    """Turn ``image`` into a float32 (1, C, H, W) tensor on the model's device.

    The result is a fresh tensor outside inference mode, so autograd can record
    operations on it even when the caller built ``image`` under
    ``torch.inference_mode()``. Call inside ``torch.inference_mode(False)``.

    Raises
    ------
    QueryError
        ``image`` is not a (C, H, W) or (1, C, H, W) tensor, or its channel
        count cannot be matched to the model's first convolution.
    """
    if isinstance(image, Image.Image):
        if parts.loaded is None:
            raise QueryError(
                "a PIL image needs the model's preprocessing; pass a LoadedModel from "
                "atlas.models.load_model, or a (1, C, H, W) tensor"
            )
        image = parts.loaded.transform(image.convert("RGB"))
    if not isinstance(image, torch.Tensor):
        raise QueryError(f"expected the image as a torch tensor of shape (C, H, W) or (1, C, H, W), got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise QueryError(
            f"expected one image of shape (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}; "
            "explain images one at a time"
        )

    # clone() outside inference mode turns an inference tensor into a normal one.
    device = next(iter(parts.module.parameters()), torch.empty(0)).device
    x = image.detach().to(device=device, dtype=torch.float32).clone()

    expected = _input_channels(parts.module)
    channels = x.shape[1]
    if expected is not None and channels != expected:
        if channels == 3 and expected == 1:
            logger.warning("model takes 1 input channel; averaging the 3 channels of the image")
            x = x.mean(dim=1, keepdim=True)
        elif channels == 1 and expected == 3:
            logger.warning("model takes 3 input channels; repeating the single channel of the image")
            x = x.repeat(1, 3, 1, 1)
        else:
            raise QueryError(f"image has {channels} channels but the model's first convolution expects {expected}")
    if not torch.isfinite(x).all():
        raise QueryError("image tensor contains NaN or infinite values")
    return x


def display_image(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """Undo the normalisation of a (1, C, H, W) input for display, as (H, W, 3) float32 in [0, 1].

    Without ``mean`` and ``std`` each image is min-max scaled instead.
    """
    pixels = x[0].detach().float().cpu()
    channels = pixels.shape[0]
    if mean is not None and std is not None and len(mean) == len(std) == channels:
        pixels = pixels * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low) if high > low else torch.zeros_like(pixels)
    pixels = pixels.clamp(0, 1)
    if channels == 1:
        pixels = pixels.repeat(3, 1, 1)
    elif channels != 3:
        pixels = pixels[:3] if channels > 3 else pixels.mean(0, keepdim=True).repeat(3, 1, 1)
    return pixels.permute(1, 2, 0).numpy().astype(np.float32)


def resolve_class(text: str | int, class_names: Sequence[str]) -> int:
    """Resolve a class given as an index or a name to its index.

    A name matches case-insensitively: first a whole class name or one of its
    comma-separated synonyms (``tabby`` in ``tabby, tabby cat``), then a unique
    substring.

    Raises
    ------
    QueryError
        The index is out of range, no class matches, or several do (the
        message lists them).
    """
    count = len(class_names)
    if isinstance(text, int) or str(text).strip().lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < count:
            raise QueryError(f"class index {index} out of range; the model has {count} classes (0 to {count - 1})")
        return index

    query = str(text).strip().lower()
    if not query:
        raise QueryError("empty class name; pass a class index or part of a class name")
    lowered = [name.lower() for name in class_names]
    exact = [i for i, name in enumerate(lowered) if query == name or query in (part.strip() for part in name.split(","))]
    if len(exact) == 1:
        return exact[0]
    matches = exact or [i for i, name in enumerate(lowered) if query in name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise QueryError(f"no class name contains {text!r}; pass a class index (0 to {count - 1}) or another name")
    listed = "; ".join(f"{i}: {class_names[i]}" for i in matches[:15])
    more = f" and {len(matches) - 15} more" if len(matches) > 15 else ""
    raise QueryError(f"class name {text!r} is ambiguous, it matches {listed}{more}; pass the index or a longer name")


def check_positive(name: str, value: int) -> None:
    """Raise :class:`QueryError` unless ``value``, the option ``name``, is a positive ``int`` (``bool`` rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QueryError(f"{name} must be a positive integer, got {value!r}")


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's random generators inside the block and restore the caller's state after it."""
    devices = []
    if device.type == "cuda":
        devices.append(device.index if device.index is not None else torch.cuda.current_device())
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@dataclass
class ExplainRun:
    """Everything a method needs inside the guard: working model, input, target, activation.

    Attributes
    ----------
    module
        The model to attribute through: the caller's model, or a rewritten deep
        copy of it (see :func:`atlas.explain.guard.model_guard`).
    input
        (1, C, H, W) float32 tensor, not requiring grad.
    logits
        (1, K) output of the forward pass.
    activation
        Output of ``layer``, (1, C, h, w), or ``None`` when no layer is used.
    conv_layers
        Names of the ``nn.Conv2d`` modules in the order the forward pass called them.
    """

    method: str
    parts: ModelParts
    module: nn.Module
    input: torch.Tensor
    logits: torch.Tensor
    target: int
    score: float
    layer: str | None
    activation: torch.Tensor | None
    conv_layers: list[str]

    def explanation(self, kind: str, attribution: np.ndarray | torch.Tensor, **extras: Any) -> Explanation:
        """Build the :class:`Explanation`, raising instead of returning NaN or infinite values."""
        if isinstance(attribution, torch.Tensor):
            attribution = attribution.detach().cpu().numpy()
        attribution = np.asarray(attribution)
        if attribution.dtype != np.uint8:
            attribution = attribution.astype(np.float32)
            if not np.isfinite(attribution).all():
                raise AtlasError(
                    f"{self.method} gave NaN or infinite values for class {self.target} "
                    "(often a constant input or an overflowing model); try another baseline or image"
                )
        names = self.parts.class_names
        return Explanation(
            method=self.method,
            attribution=attribution,
            kind=kind,
            target=self.target,
            target_name=names[self.target] if names and self.target < len(names) else None,
            score=self.score,
            layer=self.layer,
            image=display_image(self.input, self.parts.mean, self.parts.std),
            extras=extras,
        )


@dataclass
class _ForwardRecord:
    """Outputs of the recording forward pass.

    ``feature_layer`` is the default layer of the layer-based methods: the
    last module to return a (1, C, h, w) map with h · w > 1 after the last
    convolution, among modules called once (``bn2`` in timm's EfficientNets,
    ``layer4`` in torchvision's ResNets), so the map is the rectified one the
    classifier pools, as Selvaraju et al. (2017) use for Grad-CAM. ``feature_map`` is its output,
    or ``None`` when no such module exists and the last convolution is used.
    """

    logits: torch.Tensor
    activation: torch.Tensor | None
    conv_layers: list[str]
    feature_layer: str | None
    feature_map: torch.Tensor | None


def _forward(module: nn.Module, x: torch.Tensor, layer: str | None) -> _ForwardRecord:
    # One pass that records the logits, the layer's output, the call order of the
    # convolutions and the final feature map (see _ForwardRecord).
    conv_order: list[str] = []
    captured: dict[str, torch.Tensor] = {}
    # Modules that returned a (1, C, h, w) map with h * w > 1 since the last convolution finished.
    after_last_conv: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []

    def first_tensor(output: Any) -> Any:
        return output[0] if isinstance(output, (tuple, list)) else output

    # Outputs are cloned because a later in-place operation (`out += identity`) would change them.
    def note_output(name: str, is_conv: bool):
        def hook(_module: nn.Module, _inputs: tuple, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            output = first_tensor(output)
            if is_conv:
                if name not in conv_order:
                    conv_order.append(name)
                after_last_conv.clear()
            if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
                after_last_conv.pop(name, None)
                after_last_conv[name] = output.detach().clone()

        return hook

    def keep_output(_module: nn.Module, _inputs: tuple, output: Any) -> None:
        output = first_tensor(output)
        captured["layer"] = output.detach().clone() if isinstance(output, torch.Tensor) else output

    try:
        for name, child in module.named_modules():
            if name:
                handles.append(child.register_forward_hook(note_output(name, isinstance(child, nn.Conv2d))))
        if layer is not None:
            handles.append(get_module(module, layer).register_forward_hook(keep_output))
        with torch.no_grad():
            logits = module(x)
    finally:
        for handle in handles:
            handle.remove()

    logits = first_tensor(logits)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"explanations need a classifier that returns (1, n_classes) logits, the model returned {shape}")
    # The last map to finish, among modules called once: reused modules (a shared ReLU)
    # would fire a CAM library's hooks several times in one pass.
    once = [name for name in after_last_conv if calls[name] == 1]
    feature_layer, feature_map = None, None
    if once:
        feature_layer = once[-1]
        feature_map = after_last_conv[feature_layer]
    elif conv_order:
        feature_layer = conv_order[-1]
    return _ForwardRecord(logits, captured.get("layer"), conv_order, feature_layer, feature_map)


def _check_target(target: int | None, logits: torch.Tensor) -> int:
    count = logits.shape[1]
    if target is None:
        return int(logits.argmax(dim=1).item())
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise QueryError(f"target must be a class index (int) or None, got {target!r}; resolve names with resolve_class")
    if not 0 <= int(target) < count:
        raise QueryError(f"target {int(target)} out of range; the model has {count} classes (0 to {count - 1})")
    return int(target)


@contextmanager
def explain_run(
    method: str,
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    target: int | None,
    layer: str | None = None,
    needs_layer: bool = False,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    for_deeplift: bool = False,
) -> Iterator[ExplainRun]:
    """Open the guard, prepare the input and run the forward pass every method starts with.

    With ``needs_layer`` and no ``layer``, the last ``nn.Conv2d`` the forward
    pass calls is used. Without ``needs_layer`` the layer is ignored.

    Raises
    ------
    ModelError
        The layer is not found, does not return a (1, C, h, w) feature map, or
        the model has no convolution to default to.
    QueryError
        The image or the target is invalid.
    """
    parts = unpack_model(model, class_names, mean, std)
    if not needs_layer:
        layer = None
    elif layer is not None:
        get_module(parts.module, layer)

    # Inference mode must be off before the model is copied, or the copy's
    # parameters would be inference tensors that autograd rejects.
    with torch.inference_mode(False), torch.enable_grad():
        x = prepare_input(image, parts)
        with model_guard(parts.module):
            with call_counter(parts.module) as counts:
                record = _forward(parts.module, x, layer)
            activation = record.activation
            if needs_layer and layer is None:
                if not record.conv_layers:
                    raise ModelError(f"{method} needs a layer and the model has no nn.Conv2d to default to; pass layer=")
                layer = record.feature_layer
                activation = record.feature_map
                if activation is None:
                    # No module after the last convolution qualifies: take the convolution itself.
                    activation = _forward(parts.module, x, layer).activation
                logger.debug("%s: no layer given, using the final feature map of %s", method, layer)
            if needs_layer and (not isinstance(activation, torch.Tensor) or activation.ndim != 4):
                shape = tuple(activation.shape) if isinstance(activation, torch.Tensor) else type(activation).__name__
                raise ModelError(f"{method} needs a layer with a (1, C, h, w) output; {layer!r} gives {shape}")

            target_index = _check_target(target, record.logits)
            score = float(torch.softmax(record.logits.float(), dim=1)[0, target_index])
            yield ExplainRun(
                method=method,
                parts=parts,
                module=attribution_model(parts.module, counts, for_deeplift),
                input=x,
                logits=record.logits,
                target=target_index,
                score=score,
                layer=layer,
                activation=activation,
                conv_layers=record.conv_layers,
            )
