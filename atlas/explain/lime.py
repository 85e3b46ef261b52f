"""LIME over SLIC superpixels, with captum's ``Lime``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from atlas.errors import QueryError
from atlas.explain.base import KIND_SIGNED, Explanation, check_positive, display_image, explain_run, seeded
from atlas.explain.gradients import Baseline, make_baseline
from atlas.models import LoadedModel

logger = logging.getLogger(__name__)


def superpixels(image: np.ndarray, segments: int = 50, compactness: float = 10.0) -> np.ndarray:
    """Cut an image into SLIC superpixels with scikit-image.

    SLIC merges everything into one or a few segments on noise-like images.
    When it returns fewer than a quarter of ``segments``, a grid of about
    ``segments`` square cells is used instead.

    Parameters
    ----------
    image
        (H, W, 3) float in [0, 1].
    segments
        Approximate number of superpixels.
    compactness
        SLIC's balance of colour against space; higher gives squarer segments.

    Returns
    -------
    np.ndarray
        (H, W) int64 labels numbered 0 to n - 1 without gaps.
    """
    from skimage.segmentation import slic

    labels = slic(image, n_segments=segments, compactness=compactness, start_label=0, channel_axis=-1)
    # SLIC can leave gaps in the numbering; captum expects feature ids 0 to n - 1.
    _, dense = np.unique(labels, return_inverse=True)
    labels = dense.reshape(labels.shape).astype(np.int64)
    found = int(labels.max()) + 1
    if found >= max(2, segments // 4):
        return labels

    height, width = image.shape[:2]
    side = max(1, math.ceil(math.sqrt(height * width / segments)))
    columns = math.ceil(width / side)
    rows, cols = np.mgrid[0:height, 0:width]
    logger.info("SLIC found %d superpixels for %d requested; using square cells of %d px", found, segments, side)
    return ((rows // side) * columns + cols // side).astype(np.int64)


def _superpixel_kernel(kernel_width: float):
    def similarity(_original: torch.Tensor, _perturbed: torch.Tensor, kept: torch.Tensor, **_kwargs) -> float:
        # kept: (1, n) binary vector of the superpixels left in place.
        count = kept.numel()
        cosine = math.sqrt(float(kept.sum()) / count) if count else 0.0
        distance = 1.0 - cosine
        return math.sqrt(math.exp(-(distance**2) / kernel_width**2))

    return similarity


def lime_superpixels(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    segments: int = 50,
    compactness: float = 10.0,
    samples: int = 200,
    baseline: Baseline = "zeros",
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    batch_size: int = 16,
    seed: int | None = 0,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Explain a class with LIME (Ribeiro et al., 2016) over superpixels.

    Captum switches random subsets of the SLIC superpixels to the baseline
    and fits a weighted ridge regression of the class logit on which
    superpixels were kept. A superpixel's coefficient is its attribution. As
    in the ``lime`` package's image explainer, each sample is weighted by
    ``sqrt(exp(-d**2 / kernel_width**2))`` with ``d`` the cosine distance of
    its kept-superpixel vector to the all-kept vector. Unlike it, the
    regression target is the logit, not the probability.

    Parameters
    ----------
    layer
        Ignored; LIME perturbs the input.
    segments, compactness
        Passed to :func:`superpixels`.
    samples
        Perturbed images evaluated.
    baseline
        What a removed superpixel shows; see
        :func:`atlas.explain.gradients.make_baseline`.
    kernel_width
        Width of the similarity kernel on cosine distance.
    alpha
        Ridge regularisation strength.
    batch_size
        Perturbed images per forward pass.
    seed
        Seed of the perturbations; the caller's random state is left untouched.

    Returns
    -------
    Explanation
        ``attribution`` is (H, W) float32, constant on each superpixel.
        ``extras``: ``segments`` (H, W) labels and ``weights`` (n,), one per
        superpixel.
    """
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    check_positive("segments", segments)
    check_positive("samples", samples)
    check_positive("batch_size", batch_size)
    if kernel_width <= 0 or alpha < 0:
        raise QueryError(f"kernel_width must be positive and alpha non-negative, got {kernel_width} and {alpha}")

    with explain_run("lime", model, image, target=target, class_names=class_names, mean=mean, std=std) as run:
        labels = superpixels(display_image(run.input, run.parts.mean, run.parts.std), segments, compactness)
        count = int(labels.max()) + 1
        if count < 2:
            logger.warning("LIME found a single superpixel; its map is uniform")
        feature_mask = torch.from_numpy(labels).to(run.input.device)[None, None]  # (1, 1, H, W)

        explainer = Lime(
            run.module,
            interpretable_model=SkLearnRidge(alpha=alpha),
            similarity_func=_superpixel_kernel(kernel_width),
        )
        with seeded(seed, run.input.device):
            removed = make_baseline(baseline, run)
            attribution = explainer.attribute(
                run.input,
                baselines=removed,
                target=run.target,
                feature_mask=feature_mask,
                n_samples=samples,
                perturbations_per_eval=batch_size,
            )

        heatmap = attribution[0, 0]  # constant over channels, (H, W)
        weights = torch.zeros(count, dtype=heatmap.dtype)
        weights[torch.from_numpy(labels).flatten()] = heatmap.detach().cpu().flatten()
        return run.explanation(KIND_SIGNED, heatmap, segments=labels, weights=weights.numpy())
