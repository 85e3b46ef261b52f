"""Per-image explanations of a CNN's prediction, built on captum and pytorch-grad-cam.

Every method has the same call shape::

    fn(model, image, *, layer=None, target=None, **options) -> Explanation

where ``model`` is an ``nn.Module`` or a :class:`~atlas.models.LoadedModel`,
``image`` a (C, H, W) or (1, C, H, W) model input, and ``target`` a class index
(``None`` explains the predicted class). :func:`explain` dispatches by name.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from PIL import Image
from torch import nn

from atlas.errors import ConfigError
from atlas.explain.base import Explanation, resolve_class
from atlas.explain.cam import grad_cam, grad_cam_plus_plus
from atlas.explain.figures import plot_explanation, plot_explanations, save_figure
from atlas.explain.gradients import deeplift_shap, gradient_shap, integrated_gradients, saliency, smoothgrad
from atlas.explain.guard import model_guard
from atlas.explain.lime import lime_superpixels
from atlas.explain.maps import channel_visualization, feature_maps, filter_weights
from atlas.models import LoadedModel

logger = logging.getLogger(__name__)

METHODS: dict[str, Callable[..., Explanation]] = {
    "featuremaps": feature_maps,
    "filters": filter_weights,
    "channel": channel_visualization,
    "gradcam": grad_cam,
    "gradcam++": grad_cam_plus_plus,
    "saliency": saliency,
    "smoothgrad": smoothgrad,
    "integrated-gradients": integrated_gradients,
    "gradientshap": gradient_shap,
    "deepliftshap": deeplift_shap,
    "lime": lime_superpixels,
}
# Methods whose output depends on a layer (the others ignore ``layer``).
LAYER_METHODS = frozenset({"featuremaps", "channel", "gradcam", "gradcam++"})


def _check_options(name: str, function: Callable, options: Mapping[str, Any]) -> None:
    accepted = set(inspect.signature(function).parameters) - {"model", "image", "layer", "target"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"method {name!r} has no option {', '.join(unknown)}; its options are {', '.join(sorted(accepted))}")


def explain(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    method: str,
    *,
    layer: str | None = None,
    target: int | None = None,
    **options: Any,
) -> Explanation:
    """Run one explanation method by name.

    Parameters
    ----------
    model
        A network or a :class:`~atlas.models.LoadedModel` (which brings its
        class names and normalisation).
    image
        (C, H, W) or (1, C, H, W) model input; a PIL image with a LoadedModel.
    method
        A key of :data:`METHODS`.
    layer
        Module path for the layer methods (:data:`LAYER_METHODS`); ``None``
        uses the last ``nn.Conv2d`` the model calls.
    target
        Class index; ``None`` explains the predicted class.
    **options
        Keyword options of the method's function (``steps=``, ``baseline=``).

    Raises
    ------
    ConfigError
        Unknown method or option.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; use one of {', '.join(METHODS)}")
    function = METHODS[method]
    _check_options(method, function, options)
    return function(model, image, layer=layer, target=target, **options)


def explain_many(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    methods: Iterable[str] | None = None,
    *,
    layer: str | None = None,
    target: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Explanation]:
    """Run several methods on one image, all for the same class.

    Parameters
    ----------
    methods
        Method names; ``None`` runs every method in :data:`METHODS`.
    options
        Per-method options, e.g. ``{"integrated-gradients": {"steps": 128}}``.

    Returns
    -------
    dict
        Method name to :class:`Explanation`, in the order requested.
    """
    names = list(METHODS) if methods is None else list(methods)
    options = options or {}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"options given for methods that are not run: {', '.join(unknown)}")
    results: dict[str, Explanation] = {}
    for name in names:
        result = explain(model, image, name, layer=layer, target=target, **dict(options.get(name, {})))
        # Later methods explain the same class even when the first one picked it.
        target = result.target
        results[name] = result
    return results


__all__ = [
    "LAYER_METHODS",
    "METHODS",
    "Explanation",
    "channel_visualization",
    "deeplift_shap",
    "explain",
    "explain_many",
    "feature_maps",
    "filter_weights",
    "grad_cam",
    "grad_cam_plus_plus",
    "gradient_shap",
    "integrated_gradients",
    "lime_superpixels",
    "model_guard",
    "plot_explanation",
    "plot_explanations",
    "resolve_class",
    "saliency",
    "save_figure",
    "smoothgrad",
]
