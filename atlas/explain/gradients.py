"""Gradient attributions from captum: saliency, SmoothGrad, Integrated Gradients, GradientSHAP, DeepLiftSHAP.

Every heatmap here is at input resolution, (H, W). Saliency maps take the
maximum absolute gradient over colour channels (Simonyan et al., 2014). The
path and SHAP methods sum their signed attributions over channels, so the map
still sums to the explained change of the logit.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from atlas.errors import QueryError
from atlas.explain.base import KIND_HEATMAP, KIND_SIGNED, ExplainRun, Explanation, check_positive, explain_run, seeded
from atlas.models import LoadedModel

logger = logging.getLogger(__name__)

Baseline = str | float | torch.Tensor
BASELINE_NAMES = ("zeros", "black", "white", "blur", "noise")
DEFAULT_SHAP_BASELINES: tuple[str, ...] = ("zeros", "blur") + ("noise",) * 6
# Captum's integration methods whose weights sum to 1. Captum 0.9's "riemann_trapezoid"
# weights sum to (n - 1) / n, which scales every attribution down by 1 / n.
QUADRATURES = ("gausslegendre", "riemann_middle", "riemann_left", "riemann_right")
# Split points of the Integrated Gradients path, as fractions from the baseline.
# Measured on EfficientNet-Lite0 and scikit-image's chelsea photo (512 path
# points from the all-zero input): most of the tiger-cat logit's change, and the
# roughest gradients, come in the first 12% of the path, so steps are packed there.
DEFAULT_PATH_SPLITS: tuple[float, ...] = (1 / 64, 1 / 16, 1 / 4)


def _blur(x: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    height, width = x.shape[-2:]
    sigma = max(height, width) / 16
    # Reflect padding needs a kernel shorter than twice the image side.
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(height, width) - 1) // 2) + 1)
    if kernel < 3:
        return x.clone()
    return gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def _pixel_value(x: torch.Tensor, value: float, run: ExplainRun, name: str) -> torch.Tensor:
    mean, std = run.parts.mean, run.parts.std
    channels = x.shape[1]
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        raise QueryError(
            f"baseline {name!r} needs the model's input mean and std; pass a LoadedModel or mean= and std=, "
            "or use the 'zeros' baseline"
        )
    shift = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    scale = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((value - shift) / scale).expand_as(x).clone()


def _noise(x: torch.Tensor, run: ExplainRun) -> torch.Tensor:
    pixels = torch.rand(x.shape, device=x.device, dtype=x.dtype)
    mean, std = run.parts.mean, run.parts.std
    if mean is not None and std is not None and len(mean) == x.shape[1] == len(std):
        shift = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        scale = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (pixels - shift) / scale
    low, high = x.min(), x.max()
    return low + (high - low) * pixels


def make_baseline(spec: Baseline, run: ExplainRun) -> torch.Tensor:
    """Build one baseline image for the run's input.

    Parameters
    ----------
    spec
        ``"zeros"`` (all-zero input, the dataset mean colour for normalised
        models), ``"black"`` or ``"white"`` (pixel value 0 or 1, needs mean and
        std), ``"blur"`` (the input under a Gaussian blur of sigma = side / 16),
        ``"noise"`` (uniform pixel noise from torch's generator), a float (a
        constant input), or a tensor of shape (C, H, W) or (1, C, H, W).

    Returns
    -------
    torch.Tensor
        (1, C, H, W), like ``run.input``.
    """
    x = run.input
    if isinstance(spec, torch.Tensor):
        baseline = spec.detach().to(device=x.device, dtype=x.dtype)
        if baseline.ndim == 3:
            baseline = baseline.unsqueeze(0)
        if baseline.shape != x.shape:
            raise QueryError(f"baseline tensor has shape {tuple(spec.shape)}, expected {tuple(x.shape[1:])} or {tuple(x.shape)}")
        return baseline.clone()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return torch.full_like(x, float(spec))
    if spec == "zeros":
        return torch.zeros_like(x)
    if spec == "black":
        return _pixel_value(x, 0.0, run, spec)
    if spec == "white":
        return _pixel_value(x, 1.0, run, spec)
    if spec == "blur":
        return _blur(x)
    if spec == "noise":
        return _noise(x, run)
    raise QueryError(f"unknown baseline {spec!r}; use one of {', '.join(BASELINE_NAMES)}, a number or a tensor")


def make_baselines(specs: Baseline | Sequence[Baseline], run: ExplainRun) -> torch.Tensor:
    """Stack baselines for SHAP methods; a (k, C, H, W) tensor passes through unchanged.

    Returns
    -------
    torch.Tensor
        (k, C, H, W) with k >= 2, because captum's DeepLiftSHAP needs a
        distribution (a single baseline is repeated).
    """
    x = run.input
    if isinstance(specs, torch.Tensor) and specs.ndim == 4 and specs.shape[0] > 1:
        if specs.shape[1:] != x.shape[1:]:
            raise QueryError(f"baselines tensor has shape {tuple(specs.shape)}, expected (k, {', '.join(map(str, x.shape[1:]))})")
        return specs.detach().to(device=x.device, dtype=x.dtype).clone()
    if isinstance(specs, (str, int, float, torch.Tensor)):
        specs = [specs]
    if not specs:
        raise QueryError("baselines is empty; pass at least one baseline")
    baselines = torch.cat([make_baseline(spec, run) for spec in specs])
    if baselines.shape[0] == 1:
        baselines = baselines.repeat(2, 1, 1, 1)
    return baselines


def saliency(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    absolute: bool = True,
    smooth: bool = False,
    samples: int = 25,
    noise: float = 0.15,
    seed: int | None = 0,
    batch_size: int = 8,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Compute the gradient of the class logit with respect to the input pixels.

    Parameters
    ----------
    model
        A network or a :class:`~atlas.models.LoadedModel`.
    image
        (C, H, W) or (1, C, H, W) model input; a PIL image with a LoadedModel.
    layer
        Ignored; saliency is computed at the input.
    target
        Class index; ``None`` explains the predicted class.
    absolute
        Take absolute gradients and the maximum over channels; otherwise sum
        the signed gradients over channels.
    smooth
        Average over noisy copies of the input (SmoothGrad, Smilkov et al.,
        2017, through captum's ``NoiseTunnel``).
    samples
        Noisy copies for SmoothGrad.
    noise
        SmoothGrad noise standard deviation as a fraction of the input's
        value range (the paper suggests 0.1 to 0.2).
    seed
        Seed of the noise; the caller's random state is left untouched.
    batch_size
        Noisy copies per forward pass.

    Returns
    -------
    Explanation
        ``attribution`` is (H, W) float32, non-negative when ``absolute``.
    """
    from captum.attr import NoiseTunnel, Saliency

    method = "smoothgrad" if smooth else "saliency"
    check_positive("samples", samples)
    check_positive("batch_size", batch_size)
    if noise < 0:
        raise QueryError(f"noise must be non-negative, got {noise}")
    with explain_run(method, model, image, target=target, class_names=class_names, mean=mean, std=std) as run:
        x = run.input.clone().requires_grad_(True)
        explainer = Saliency(run.module)
        if smooth:
            sigma = noise * float(run.input.max() - run.input.min())
            with seeded(seed, x.device):
                gradients = NoiseTunnel(explainer).attribute(
                    x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=batch_size,
                    stdevs=sigma, target=run.target, abs=absolute,
                )
        else:
            gradients = explainer.attribute(x, target=run.target, abs=absolute)

        # (1, C, H, W) -> (H, W)
        heatmap = gradients[0].amax(dim=0) if absolute else gradients[0].sum(dim=0)
        extras = {"samples": samples, "noise": noise} if smooth else {}
        return run.explanation(KIND_HEATMAP if absolute else KIND_SIGNED, heatmap, **extras)


def smoothgrad(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    absolute: bool = True,
    samples: int = 25,
    noise: float = 0.15,
    seed: int | None = 0,
    batch_size: int = 8,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Compute SmoothGrad: :func:`saliency` with ``smooth=True``."""
    return saliency(model, image, layer=layer, target=target, absolute=absolute, smooth=True, samples=samples,
                    noise=noise, seed=seed, batch_size=batch_size, class_names=class_names, mean=mean, std=std)


def integrated_gradients(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    baseline: Baseline = "zeros",
    steps: int = 64,
    quadrature: str = "gausslegendre",
    splits: Sequence[float] | None = DEFAULT_PATH_SPLITS,
    batch_size: int = 16,
    seed: int | None = 0,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Compute Integrated Gradients (Sundararajan et al., 2017) with captum.

    The straight path from the baseline to the input is cut at ``splits``
    and captum integrates each piece with ``steps / pieces`` points. The
    integral is the same as one uncut integration, but steps can be packed
    where the logit changes fastest. ``splits=None`` is captum's plain
    integration.

    Parameters
    ----------
    layer
        Ignored; attributions are computed at the input.
    target
        Class index; ``None`` explains the predicted class.
    baseline
        See :func:`make_baseline`; ``"noise"`` is drawn with ``seed``.
    steps
        Gradient evaluations in total, divided evenly over the pieces.
    quadrature
        Captum's integration method: ``gausslegendre``, ``riemann_middle``,
        ``riemann_left`` or ``riemann_right``.
    splits
        Increasing fractions in (0, 1) at which to cut the path.
    batch_size
        Path points per forward pass.

    Returns
    -------
    Explanation
        ``attribution`` is (H, W) float32, signed, summed over channels.
        ``extras``: ``delta`` (sum of attributions minus the logit change,
        captum's convergence delta summed over pieces), ``logit`` and
        ``baseline_logit`` of the target, ``completeness_error``
        (|delta| / |logit change|), ``steps``, ``splits``, ``quadrature``.
    """
    from captum.attr import IntegratedGradients

    check_positive("steps", steps)
    check_positive("batch_size", batch_size)
    if quadrature not in QUADRATURES:
        raise QueryError(
            f"unsupported quadrature {quadrature!r}; use one of {', '.join(QUADRATURES)} "
            "(captum's riemann_trapezoid is excluded because its weights do not sum to 1)"
        )
    cuts = sorted(float(value) for value in splits or ())
    if any(not 0 < value < 1 for value in cuts) or len(set(cuts)) != len(cuts):
        raise QueryError(f"splits must be distinct fractions strictly between 0 and 1, got {list(splits or ())}")
    bounds = [0.0, *cuts, 1.0]
    pieces = len(bounds) - 1
    steps_per_piece = max(2, math.ceil(steps / pieces))

    with explain_run("integrated-gradients", model, image, target=target, class_names=class_names, mean=mean, std=std) as run:
        with seeded(seed, run.input.device):
            start = make_baseline(baseline, run)
        x = run.input
        explainer = IntegratedGradients(run.module)
        total = torch.zeros_like(x)
        delta = 0.0
        for low, high in zip(bounds[:-1], bounds[1:]):
            attribution, piece_delta = explainer.attribute(
                start + high * (x - start),
                baselines=start + low * (x - start),
                target=run.target,
                n_steps=steps_per_piece,
                method=quadrature,
                internal_batch_size=batch_size,
                return_convergence_delta=True,
            )
            total += attribution.detach()
            delta += float(piece_delta.sum())

        with torch.no_grad():
            baseline_logit = float(run.module(start)[0, run.target])
        logit = float(run.logits[0, run.target])
        change = logit - baseline_logit
        error = abs(delta) / max(abs(change), 1e-12)
        if error > 0.05:
            logger.warning(
                "Integrated Gradients misses completeness by %.1f%% (delta %.4g of %.4g); raise steps for a closer sum",
                100 * error, delta, change,
            )
        return run.explanation(
            KIND_SIGNED,
            total[0].sum(dim=0),
            delta=delta,
            logit=logit,
            baseline_logit=baseline_logit,
            completeness_error=error,
            steps=steps_per_piece * pieces,
            splits=tuple(cuts),
            quadrature=quadrature,
        )


def gradient_shap(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    baselines: Baseline | Sequence[Baseline] = DEFAULT_SHAP_BASELINES,
    samples: int = 32,
    noise: float = 0.0,
    seed: int | None = 0,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Compute GradientSHAP (Lundberg and Lee, 2017) with captum.

    Each of ``samples`` draws picks a baseline and a point on the path to the
    (optionally noised) input and takes gradient times (input - baseline).
    Additivity is in expectation only: the attributions sum to the mean logit
    change over the baselines, up to Monte Carlo error that shrinks as
    1 / sqrt(samples).

    Parameters
    ----------
    layer
        Ignored; attributions are computed at the input.
    baselines
        A (k, C, H, W) tensor or a list of :func:`make_baseline` specs. The
        default is zeros, a blur of the input and six uniform-noise images.
    samples
        Random draws.
    noise
        Standard deviation of Gaussian noise added to the input, as a
        fraction of its value range.
    seed
        Seed of the draws and of ``"noise"`` baselines.

    Returns
    -------
    Explanation
        ``attribution`` is (H, W) float32, signed. ``extras["delta"]``
        contains captum's per-draw convergence deltas, (samples,).
    """
    from captum.attr import GradientShap

    check_positive("samples", samples)
    if noise < 0:
        raise QueryError(f"noise must be non-negative, got {noise}")
    with explain_run("gradientshap", model, image, target=target, class_names=class_names, mean=mean, std=std) as run:
        x = run.input.clone().requires_grad_(True)
        with seeded(seed, x.device):
            distribution = make_baselines(baselines, run)
            sigma = noise * float(run.input.max() - run.input.min())
            attribution, delta = GradientShap(run.module).attribute(
                x, baselines=distribution, n_samples=samples, stdevs=sigma, target=run.target,
                return_convergence_delta=True,
            )
        return run.explanation(
            KIND_SIGNED,
            attribution[0].sum(dim=0),
            delta=delta.detach().cpu().numpy(),
            baselines=int(distribution.shape[0]),
            samples=samples,
        )


def deeplift_shap(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | Image.Image,
    *,
    layer: str | None = None,
    target: int | None = None,
    baselines: Baseline | Sequence[Baseline] = DEFAULT_SHAP_BASELINES,
    seed: int | None = 0,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Explanation:
    """Compute DeepLiftSHAP with captum: DeepLift's rescale rule averaged over a baseline distribution.

    For each baseline the attributions sum to the logit change from that
    baseline (summation to delta), exactly up to float error when every
    nonlinearity is a module captum's DeepLift handles exactly. For this the
    guard rewrites shared and in-place activations, ``nn.ReLU6`` and
    ``nn.MaxPool2d`` on a copy of the model.

    Parameters
    ----------
    layer
        Ignored; attributions are computed at the input.
    baselines
        A (k, C, H, W) tensor or a list of :func:`make_baseline` specs, at
        least two; the default is the same as :func:`gradient_shap`'s.

    Returns
    -------
    Explanation
        ``attribution`` is (H, W) float32, signed, the mean over baselines.
        ``extras["delta"]`` contains captum's per-baseline deltas, (k,).

    Notes
    -----
    Nonlinearities called as functions (``F.relu``) or modules captum does not
    support (``nn.SiLU``, ``nn.GELU``, ``nn.Hardswish``) pass plain gradients,
    so summation to delta is only approximate for such models.
    """
    from captum.attr import DeepLiftShap

    with explain_run("deepliftshap", model, image, target=target, class_names=class_names, mean=mean, std=std,
                     for_deeplift=True) as run:
        x = run.input.clone().requires_grad_(True)
        with seeded(seed, x.device):
            distribution = make_baselines(baselines, run)
        with warnings.catch_warnings():
            # Captum warns on every call that it sets hooks on the activations.
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            attribution, delta = DeepLiftShap(run.module).attribute(
                x, baselines=distribution, target=run.target, return_convergence_delta=True,
            )
        return run.explanation(
            KIND_SIGNED,
            attribution[0].sum(dim=0),
            delta=delta.detach().cpu().numpy(),
            baselines=int(distribution.shape[0]),
        )
