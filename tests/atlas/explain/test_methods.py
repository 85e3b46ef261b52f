"""Each method against an independent computation on small models, plus argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from atlas.config import RenderConfig
from atlas.errors import ConfigError, ModelError, QueryError
from atlas.explain import METHODS, explain, explain_many, resolve_class
from atlas.explain.base import explain_run
from atlas.explain.gradients import make_baseline, make_baselines
from atlas.explain.lime import superpixels
from atlas.explain.maps import filter_tiles


class LinearNet(nn.Module):
    """logits = W · flatten(x): every gradient method has a closed form."""

    def __init__(self, classes: int = 4, size: int = 8, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)  # identity, so the model has a convolution
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()
        self.fc = nn.Linear(channels * size * size, classes, bias=True)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


def test_feature_maps_ordered_by_mean(tiny_model, tiny_image):
    captured = {}
    handle = tiny_model.layer2.register_forward_hook(lambda _m, _i, output: captured.update(out=output.detach()))
    with torch.no_grad():
        tiny_model(tiny_image[None])
    handle.remove()
    maps = captured["out"][0].numpy()
    expected_order = np.argsort(-maps.mean(axis=(1, 2)), kind="stable")

    result = explain(tiny_model, tiny_image, "featuremaps", layer="layer2", max_channels=5)

    assert result.layer == "layer2"
    np.testing.assert_array_equal(result.extras["channels"], expected_order[:5])
    np.testing.assert_allclose(result.attribution, maps[expected_order[:5]], rtol=1e-6)
    assert result.kind == "feature-maps"


def test_feature_maps_default_to_final_map(tiny_model, tiny_image):
    # layer2 is the last convolution followed by its ReLU: the map the classifier pools.
    result = explain(tiny_model, tiny_image, "featuremaps")
    assert result.layer == "layer2"
    assert result.attribution.shape == (16, 8, 8)


def test_filters_are_first_conv_tiles(tiny_model, tiny_image):
    weights = tiny_model.stem[0].weight.detach().numpy()  # (8, 3, 3, 3)
    peak = np.abs(weights).max(axis=(1, 2, 3), keepdims=True)
    expected = (0.5 + 0.5 * weights / peak).transpose(0, 2, 3, 1)

    result = explain(tiny_model, tiny_image, "filters")

    assert result.layer == "stem.0"
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-6)
    assert result.attribution.min() >= 0
    assert result.attribution.max() <= 1


def test_filter_tiles_keep_zero_filter_finite():
    tiles = filter_tiles(torch.zeros(2, 3, 3, 3))
    np.testing.assert_array_equal(tiles, np.full((2, 3, 3, 3), 0.5, np.float32))


def test_filters_reject_deep_conv(tiny_model, tiny_image):
    with pytest.raises(ModelError, match="12 input channels"):
        explain(tiny_model, tiny_image, "filters", layer="layer2.0")


def test_filters_reject_non_conv(tiny_model, tiny_image):
    with pytest.raises(ModelError, match="nn.Conv2d.*ReLU"):
        explain(tiny_model, tiny_image, "filters", layer="stem.1")


def test_saliency_matches_autograd(tiny_model, tiny_image):
    x = tiny_image[None].clone().requires_grad_(True)
    logits = tiny_model(x)
    target = int(logits.argmax())
    logits[0, target].backward()
    expected = x.grad[0].abs().amax(dim=0).numpy()

    result = explain(tiny_model, tiny_image, "saliency")

    assert result.target == target
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-5, atol=1e-8)
    assert result.score == pytest.approx(float(torch.softmax(logits.detach(), 1)[0, target]), rel=1e-6)


def test_smoothgrad_is_seeded_and_keeps_caller_rng(tiny_model, tiny_image):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    first = explain(tiny_model, tiny_image, "smoothgrad", samples=6, seed=7)
    caller_next = torch.rand(1)
    second = explain(tiny_model, tiny_image, "smoothgrad", samples=6, seed=7)
    other = explain(tiny_model, tiny_image, "smoothgrad", samples=6, seed=8)

    assert torch.equal(caller_next, expected_next)
    np.testing.assert_array_equal(first.attribution, second.attribution)
    assert not np.allclose(first.attribution, other.attribution)


def test_integrated_gradients_exact_on_linear_model():
    torch.manual_seed(0)
    model = LinearNet().eval()
    x = torch.randn(3, 8, 8)
    target = 2
    weights = model.fc.weight[target].detach().view(3, 8, 8)
    expected = (x * weights).sum(dim=0).numpy()  # baseline zeros

    result = explain(model, x, "integrated-gradients", target=target, steps=4)

    np.testing.assert_allclose(result.attribution, expected, rtol=1e-4, atol=1e-6)
    assert abs(result.extras["delta"]) < 1e-4
    assert result.extras["steps"] == 8  # 4 pieces with at least 2 points each
    assert result.extras["logit"] - result.extras["baseline_logit"] == pytest.approx(float(expected.sum()), rel=1e-4)


def test_integrated_gradients_splits_validated(tiny_model, tiny_image):
    with pytest.raises(QueryError, match="splits"):
        explain(tiny_model, tiny_image, "integrated-gradients", splits=[0.5, 1.5])


def test_integrated_gradients_quadrature_validated(tiny_model, tiny_image):
    with pytest.raises(QueryError, match="unsupported quadrature 'simpson'.*riemann_middle"):
        explain(tiny_model, tiny_image, "integrated-gradients", quadrature="simpson")
    with pytest.raises(QueryError, match="riemann_trapezoid is excluded"):
        explain(tiny_model, tiny_image, "integrated-gradients", quadrature="riemann_trapezoid")


def test_integrated_gradients_quadratures_agree_on_linear_model():
    torch.manual_seed(0)
    model = LinearNet().eval()
    x = torch.randn(3, 8, 8)
    reference = explain(model, x, "integrated-gradients", target=1, steps=4).attribution
    for quadrature in ("riemann_middle", "riemann_left", "riemann_right"):
        result = explain(model, x, "integrated-gradients", target=1, steps=4, quadrature=quadrature)
        np.testing.assert_allclose(result.attribution, reference, rtol=1e-4, atol=1e-6)


def test_gradcam_in_unit_range(tiny_model, tiny_image):
    for method in ("gradcam", "gradcam++"):
        result = explain(tiny_model, tiny_image, method, layer="layer1")
        assert result.attribution.shape == (32, 32)
        assert result.attribution.min() >= 0
        assert result.attribution.max() <= 1 + 1e-6
        assert result.extras["layer_shape"] == (12, 16, 16)


def test_gradcam_rejects_flat_layer(tiny_model, tiny_image):
    with pytest.raises(ModelError, match=r"\(1, C, h, w\).*'fc'"):
        explain(tiny_model, tiny_image, "gradcam", layer="fc")


def test_unknown_layer_lists_close_names(tiny_model, tiny_image):
    with pytest.raises(ModelError, match="layer2"):
        explain(tiny_model, tiny_image, "gradcam", layer="layer3")


class LeftHalfNet(nn.Module):
    """Class 0's logit is the mean of the image's left half; class 1 is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        left = x[:, :, :, : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([left, torch.zeros_like(left)], dim=1)


def test_lime_credits_only_the_left_half():
    image = torch.ones(3, 32, 32)
    image[:, ::4, :] = 0.5  # stripes give SLIC some structure

    result = explain(LeftHalfNet(), image, "lime", target=0, segments=16, samples=300, compactness=20.0)

    segments = result.extras["segments"]
    weights = result.extras["weights"]
    np.testing.assert_array_equal(result.attribution, weights[segments].astype(np.float32))
    left_only = [label for label in range(len(weights)) if (np.nonzero(segments == label)[1] < 16).all()]
    right_only = [label for label in range(len(weights)) if (np.nonzero(segments == label)[1] >= 16).all()]
    assert left_only and right_only
    assert min(weights[left_only]) > 0
    assert max(np.abs(weights[right_only])) < 0.1 * min(weights[left_only])


def test_superpixels_fall_back_to_grid_on_noise():
    noise = np.random.default_rng(0).random((32, 32, 3))
    labels = superpixels(noise, segments=16)
    assert labels.shape == (32, 32)
    assert labels.max() + 1 >= 4
    np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_channel_visualization_renders(tiny_model, tiny_image):
    config = RenderConfig(size=16, steps=2, pad=2, jitter=1)
    result = explain(tiny_model, tiny_image, "channel", layer="layer2", channel=3, neuron=True, config=config)

    assert result.attribution.shape == (16, 16, 3)
    assert result.attribution.dtype == np.uint8
    assert result.extras["channel"] == 3
    assert result.extras["y"] is not None and result.extras["x"] is not None


def test_channel_out_of_range(tiny_model, tiny_image):
    with pytest.raises(QueryError, match="channel 99 out of range.*16 channels"):
        explain(tiny_model, tiny_image, "channel", layer="layer2", channel=99)


def test_explain_rejects_unknown_method(tiny_model, tiny_image):
    with pytest.raises(ConfigError, match=r"unknown explanation method 'gradcam\+'.*gradcam\+\+, saliency"):
        explain(tiny_model, tiny_image, "gradcam+")


def test_explain_rejects_unknown_option(tiny_model, tiny_image):
    with pytest.raises(ConfigError, match="no option n_steps.*steps"):
        explain(tiny_model, tiny_image, "integrated-gradients", n_steps=10)


@pytest.mark.parametrize(("method", "option", "value"), [
    ("saliency", "samples", 0),
    ("smoothgrad", "batch_size", -2),
    ("integrated-gradients", "steps", True),
    ("gradientshap", "samples", 2.5),
    ("lime", "segments", 0),
    ("lime", "samples", "8"),
    ("lime", "batch_size", 0),
])
def test_counts_must_be_positive_integers(tiny_model, tiny_image, method, option, value):
    with pytest.raises(QueryError, match=f"{option} must be a positive integer, got {value!r}"):
        explain(tiny_model, tiny_image, method, **{option: value})


@pytest.mark.parametrize("target", [10, -1, True, "3"])
def test_explain_rejects_bad_target(tiny_model, tiny_image, target):
    with pytest.raises(QueryError, match="target"):
        explain(tiny_model, tiny_image, "saliency", target=target)


def test_explain_many_uses_one_target(tiny_model, tiny_image):
    results = explain_many(tiny_model, tiny_image, ["gradcam", "saliency", "lime"], options={"lime": {"samples": 8}})
    assert list(results) == ["gradcam", "saliency", "lime"]
    assert len({result.target for result in results.values()}) == 1


def test_explain_many_rejects_options_for_unrun_method(tiny_model, tiny_image):
    with pytest.raises(ConfigError, match="lime"):
        explain_many(tiny_model, tiny_image, ["saliency"], options={"lime": {"samples": 8}})


def test_class_names_and_target_name(tiny_model, tiny_image):
    names = [f"thing {index}" for index in range(10)]
    result = explain(tiny_model, tiny_image, "saliency", target=4, class_names=names)
    assert result.target == 4
    assert result.target_name == "thing 4"


NAMES = ["tabby, tabby cat", "tiger cat", "Persian cat", "tiger, Panthera tigris", "cattle"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [("2", 2), (3, 3), ("Tiger Cat", 1), ("tabby", 0), ("tiger", 3), ("persian", 2), ("Panthera", 3)],
)
def test_resolve_class(query, expected):
    assert resolve_class(query, NAMES) == expected


def test_resolve_class_ambiguous_lists_candidates():
    with pytest.raises(QueryError, match=r"ambiguous.*0: tabby, tabby cat.*1: tiger cat.*2: Persian cat"):
        resolve_class("cat", NAMES)


def test_resolve_class_unknown():
    with pytest.raises(QueryError, match="no class name contains 'zebra'"):
        resolve_class("zebra", NAMES)


def test_resolve_class_index_out_of_range():
    with pytest.raises(QueryError, match="class index 7 out of range.*5 classes"):
        resolve_class("7", NAMES)


def _run_for(model, image, **kwargs):
    return explain_run("test", model, image, target=None, **kwargs)


def test_black_and_white_baselines_follow_normalisation(tiny_model, tiny_image):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    with _run_for(tiny_model, tiny_image, mean=mean, std=std) as run:
        black = make_baseline("black", run)
        white = make_baseline("white", run)
    for channel in range(3):
        assert torch.allclose(black[0, channel], torch.tensor(-mean[channel] / std[channel]))
        assert torch.allclose(white[0, channel], torch.tensor((1 - mean[channel]) / std[channel]))


def test_black_baseline_needs_normalisation(tiny_model, tiny_image):
    with _run_for(tiny_model, tiny_image) as run, pytest.raises(QueryError, match="'black' needs the model's input mean and std"):
        make_baseline("black", run)


def test_baselines_shapes(tiny_model, tiny_image):
    with _run_for(tiny_model, tiny_image) as run:
        assert make_baseline("blur", run).shape == (1, 3, 32, 32)
        assert make_baselines("zeros", run).shape == (2, 3, 32, 32)
        assert make_baselines(["zeros", "noise", 0.5], run).shape == (3, 3, 32, 32)
        with pytest.raises(QueryError, match=r"baseline tensor has shape \(3, 16, 16\)"):
            make_baseline(torch.zeros(3, 16, 16), run)
        with pytest.raises(QueryError, match="unknown baseline 'grey'"):
            make_baseline("grey", run)


def test_every_method_is_registered():
    assert set(METHODS) == {
        "featuremaps", "filters", "channel", "gradcam", "gradcam++", "saliency", "smoothgrad",
        "integrated-gradients", "gradientshap", "deepliftshap", "lime",
    }

