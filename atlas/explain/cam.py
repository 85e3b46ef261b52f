"""Class activation maps: Grad-CAM and Grad-CAM++ through pytorch-grad-cam."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from atlas.capture import get_module
from atlas.explain.base import KIND_HEATMAP, Explanation, explain_run
from atlas.models import LoadedModel

logger = logging.getLogger(__name__)


def _class_activation_map(
    method: str,
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None,
    target: int | None,
    class_names: Sequence[str] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Explanation:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
    with explain_run(method, model, image, target=target, layer=layer, needs_layer=True,
                     class_names=class_names, mean=mean, std=std) as run:
        # pytorch-grad-cam backpropagates from the logit; with frozen parameters
        # only an input that requires grad gives the graph a path to the layer.
        x = run.input.clone().requires_grad_(True)
        cam = cam_class(model=run.module, target_layers=[get_module(run.module, run.layer)])
        try:
            heatmap = cam(input_tensor=x, targets=[ClassifierOutputTarget(run.target)])  # (1, H, W) in [0, 1]
        finally:
            cam.activations_and_grads.release()
        return run.explanation(KIND_HEATMAP, heatmap[0], layer_shape=tuple(run.activation.shape[1:]))


def grad_cam(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Compute the Grad-CAM heatmap of a class at a convolutional layer (Selvaraju et al., 2017).

    Channels of the layer are weighted by the spatial mean of the class
    logit's gradient, summed, passed through ReLU, resized to the input and
    scaled to [0, 1] by pytorch-grad-cam.

    Parameters
    ----------
    model
        A network or a :class:`~atlas.models.LoadedModel`.
    image
        (C, H, W) or (1, C, H, W) model input; a PIL image with a LoadedModel.
    layer
        Module path with a (1, C, h, w) output; ``None`` uses the last
        ``nn.Conv2d`` the model calls.
    target
        Class index; ``None`` explains the predicted class.

    Returns
    -------
    Explanation
        ``attribution`` is (H, W) float32 in [0, 1]; ``extras["layer_shape"]``
        is the layer's (C, h, w).
    """
    return _class_activation_map("gradcam", model, image, layer=layer, target=target,
                                 class_names=class_names, mean=mean, std=std)


def grad_cam_plus_plus(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Compute the Grad-CAM++ heatmap of a class (Chattopadhyay et al., 2018).

    Like :func:`grad_cam`, but each channel's weight sums the positive
    gradients with per-position coefficients (equation 19 of the paper, as
    pytorch-grad-cam 1.5.7 computes it), which spreads heat over several
    instances of a class.

    Returns
    -------
    Explanation
        ``attribution`` is (H, W) float32 in [0, 1].
    """
    return _class_activation_map("gradcam++", model, image, layer=layer, target=target,
                                 class_names=class_names, mean=mean, std=std)
