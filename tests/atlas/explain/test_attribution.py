"""Properties the attribution methods must have: completeness, additivity, agreement, sanity, localisation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.stats import spearmanr
from skimage import data
from torch import nn

from atlas.explain import explain
from atlas.testing import TinyNet

# The cat in scikit-image's chelsea photo (451 x 300), as a polygon in original
# pixel coordinates (x, y), drawn by hand. The rest, mostly the blurred room on
# the right, is background.
CHELSEA_CAT = [
    (45, 0), (395, 0), (372, 60), (368, 110), (358, 160), (348, 210),
    (325, 260), (305, 300), (0, 300), (0, 125), (30, 100), (30, 40),
]


def _logit(model: nn.Module, x: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return float(model(x if x.ndim == 4 else x[None])[0, target])


class ReLU6Net(nn.Module):
    """A small CNN with in-place ReLU6 and a shared ReLU, the cases DeepLift needs rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU6(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shared = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.shared(self.conv2(x))
        x = self.shared(self.conv3(x)) + x
        return self.fc(x.mean(dim=(2, 3)))


class SkipNet(nn.Module):
    """``relu(h) + h`` with max pooling: the ReLU's input tensor has a second use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = self.conv1(x)
        x = self.pool(self.relu(h) + h)
        return self.fc(x.mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    # Non-trivial running statistics, so eval-mode batch norm is a real affine map.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["tiny", "relu6", "skip", "resnet18"])
def test_deepliftshap_sums_to_logit_change(kind, resnet18):
    torch.manual_seed(0)
    builders = {"tiny": TinyNet, "relu6": lambda: _randomize_bn(ReLU6Net()), "skip": SkipNet, "resnet18": lambda: resnet18}
    model = builders[kind]()
    model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2
    baselines = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.5

    result = explain(model, x, "deepliftshap", baselines=baselines)

    target = result.target
    changes = np.array([_logit(model, x, target) - _logit(model, baseline, target) for baseline in baselines])
    scale = np.abs(changes).max()
    # Captum's DeepLiftSHAP averages the per-baseline attributions, which each sum to their change.
    assert abs(result.attribution.sum() - changes.mean()) < 1e-4 * scale + 1e-5
    assert np.abs(result.extras["delta"]).max() < 1e-4 * scale + 1e-5


def test_gradientshap_exact_on_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16 * 16, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    baselines = torch.randn(4, 3, 16, 16)

    result = explain(model, x, "gradientshap", baselines=baselines, samples=64)

    # For a linear model every draw's gradient is the same, so each delta is float error only.
    assert np.abs(result.extras["delta"]).max() < 1e-4
    assert result.extras["delta"].shape == (64,)


def test_gradientshap_additive_in_expectation(tiny_model):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2
    baseline = torch.zeros(1, 3, 16, 16)
    samples = 3000

    result = explain(tiny_model, x, "gradientshap", baselines=baseline, samples=samples, seed=3)

    # With one baseline, each draw's attribution sum is delta + change. It is an unbiased
    # Monte Carlo estimate of the change, so the mean may miss it by a few standard errors.
    change = _logit(tiny_model, x, result.target) - _logit(tiny_model, baseline, result.target)
    sums = result.extras["delta"] + change
    standard_error = sums.std() / np.sqrt(samples)
    assert abs(result.attribution.sum() - change) < 4 * standard_error + 1e-6
    assert abs(sums.mean() - result.attribution.sum()) < 1e-4 * abs(change) + 1e-6


def _captum_grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, target: int) -> np.ndarray:
    from captum.attr import LayerAttribution, LayerGradCam

    x = x.clone().requires_grad_(True)
    attribution = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    upsampled = LayerAttribution.interpolate(attribution, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return upsampled[0, 0].detach().numpy()


def test_gradcam_agrees_with_captum_tiny(tiny_model, tiny_image):
    result = explain(tiny_model, tiny_image, "gradcam", layer="layer1")
    reference = _captum_grad_cam(tiny_model, tiny_image[None], tiny_model.layer1, result.target)
    assert np.corrcoef(result.attribution.ravel(), reference.ravel())[0, 1] >= 0.99


@pytest.mark.slow
def test_gradcam_agrees_with_captum_real(real_model, chelsea_input):
    result = explain(real_model, chelsea_input, "gradcam", layer="blocks.4")
    reference = _captum_grad_cam(real_model.module, chelsea_input[None], real_model.module.blocks[4], result.target)
    correlation = np.corrcoef(result.attribution.ravel(), reference.ravel())[0, 1]
    assert correlation >= 0.99, correlation


@pytest.mark.slow
def test_integrated_gradients_completeness_real(real_model, chelsea_input):
    result = explain(real_model, chelsea_input, "integrated-gradients", steps=128)

    change = _logit(real_model.module, chelsea_input, result.target) - _logit(
        real_model.module, torch.zeros_like(chelsea_input), result.target
    )
    relative_error = abs(float(result.attribution.sum()) - change) / abs(change)
    assert relative_error < 0.01, (relative_error, change)
    assert result.extras["completeness_error"] < 0.01


@pytest.mark.slow
def test_deepliftshap_sums_to_logit_change_real(real_model, chelsea_input):
    baselines = torch.stack([torch.zeros_like(chelsea_input), torch.full_like(chelsea_input, -1.0)])

    result = explain(real_model, chelsea_input, "deepliftshap", baselines=baselines)

    changes = [_logit(real_model.module, chelsea_input, result.target) - _logit(real_model.module, b, result.target)
               for b in baselines]
    assert abs(result.attribution.sum() - np.mean(changes)) < 1e-3 * max(abs(c) for c in changes)


def _rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    # A constant map has no ranking; it shares nothing with a non-constant one.
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return 0.0
    return float(spearmanr(first.ravel(), second.ravel()).statistic)


SANITY_OPTIONS = {
    "saliency": {},
    "smoothgrad": {"samples": 4},
    "integrated-gradients": {"steps": 8, "splits": None},
    "gradientshap": {"samples": 4},
    "deepliftshap": {"baselines": ["zeros", "blur"]},
    "gradcam": {},
    "gradcam++": {},
}
@pytest.fixture(scope="module")
def randomized_model(real_model):
    """The real network with every weight re-drawn: He-normal convolutions and linear layers, reset batch norm."""
    randomized = copy.deepcopy(real_model.module)
    torch.manual_seed(0)
    for module in randomized.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
    return randomized


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SANITY_OPTIONS))
def test_map_changes_after_randomization(real_model, randomized_model, chelsea_input, method):
    # Adebayo et al. (2018), "Sanity checks for saliency maps": a map that survives
    # randomizing every weight of the model does not explain the model.
    options = SANITY_OPTIONS[method]
    original = explain(real_model, chelsea_input, method, **options)
    after = explain(randomized_model, chelsea_input, method, target=original.target, **options)

    assert _rank_correlation(original.attribution, after.attribution) < 0.5


def _cat_mask(transform) -> np.ndarray:
    # Map the polygon through the same preprocessing as the photo: resize, crop, normalise.
    mask = Image.new("RGB", (451, 300))
    ImageDraw.Draw(mask).polygon(CHELSEA_CAT, fill=(255, 255, 255))
    mapped = transform(mask)[0].numpy()
    low, high = mapped.min(), mapped.max()
    return (mapped - low) / (high - low) > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_hotter_on_cat(real_model, method):
    from torchvision import transforms

    # The model's own preprocessing crops most of the background away; a resize of the
    # whole frame keeps the room on the right in view.
    whole_frame = transforms.Compose(
        [transforms.Resize((224, 336), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor(),
         transforms.Normalize(real_model.mean, real_model.std)]
    )
    photo = Image.fromarray(data.chelsea())
    for transform in (real_model.transform, whole_frame):
        image = transform(photo)
        mask = _cat_mask(transform)
        assert (~mask).mean() > 0.02  # enough background to compare

        result = explain(real_model, image, method)  # the final feature map, bn2 (batch norm and ReLU6)

        heat = result.attribution
        assert result.layer == "bn2"
        assert heat[mask].mean() > heat[~mask].mean(), (heat[mask].mean(), heat[~mask].mean())
