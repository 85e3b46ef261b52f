"""The model-state guard and the robustness of every method on the tiny model and ResNet-18."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from atlas.config import RenderConfig
from atlas.errors import QueryError
from atlas.explain import METHODS, explain
from atlas.explain.guard import CallCycler, MaxPool2dAsReLU, ReLU6AsReLU, attribution_model, count_calls, model_guard
from atlas.testing import TinyNet

# Cheap settings so every method runs in well under a second on the tiny model.
FAST = {
    "smoothgrad": {"samples": 2},
    "integrated-gradients": {"steps": 4, "splits": None},
    "gradientshap": {"samples": 2},
    "deepliftshap": {"baselines": ["zeros", "blur"]},
    "lime": {"samples": 8, "segments": 8},
    "channel": {"config": RenderConfig(size=16, steps=2, pad=2, jitter=1)},
}
ROBUST_METHODS = list(METHODS)


def _state(model: nn.Module) -> dict:
    return {
        "training": {name: module.training for name, module in model.named_modules()},
        "requires_grad": {name: parameter.requires_grad for name, parameter in model.named_parameters()},
        "grads": {name: parameter.grad for name, parameter in model.named_parameters()},
        "hooks": sum(
            len(getattr(module, attribute))
            for module in model.modules()
            for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        ),
        "inplace": {name: module.inplace for name, module in model.named_modules() if hasattr(module, "inplace")},
        "modules": {name: id(module) for name, module in model.named_modules()},
    }


def _messy_state(model: nn.Module) -> None:
    # Train mode with one frozen submodule in eval, a mix of frozen and trainable
    # parameters, and a gradient already accumulated on one parameter.
    model.train()
    first_child = next(model.children())
    first_child.eval()
    parameters = list(model.parameters())
    for index, parameter in enumerate(parameters):
        parameter.requires_grad_(index % 2 == 0)
    parameters[0].grad = torch.full_like(parameters[0], 0.25)


def _model(kind: str, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    if kind == "tiny":
        return TinyNet(in_channels=in_channels)
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


@pytest.mark.parametrize("kind", ["tiny", "resnet18"])
@pytest.mark.parametrize("method", ROBUST_METHODS)
def test_method_restores_state(kind, method):
    model = _model(kind)
    _messy_state(model)
    before = _state(model)
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))

    result = explain(model, image, method, **FAST.get(method, {}))

    after = _state(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(after["grads"][name] is before["grads"][name] for name in before["grads"])
    assert after["hooks"] == before["hooks"]
    assert after["inplace"] == before["inplace"]
    assert after["modules"] == before["modules"]
    assert np.isfinite(result.attribution).all()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("kind", ["tiny", "resnet18"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated-gradients", "deepliftshap", "lime", "channel"])
def test_method_inside_disabled_grad(kind, mode, method):
    model = _model(kind).eval()
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with context:
        image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        result = explain(model, image, method, **FAST.get(method, {}))
        assert not torch.is_grad_enabled()
        if mode == "inference_mode":
            assert torch.is_inference_mode_enabled()

    reference = explain(model, image.clone(), method, **FAST.get(method, {}))
    np.testing.assert_allclose(result.attribution, reference.attribution, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["tiny", "resnet18"])
@pytest.mark.parametrize("method", ROBUST_METHODS)
def test_method_on_grayscale_model(kind, method):
    model = _model(kind, in_channels=1).eval()
    image = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(4))

    result = explain(model, image, method, **FAST.get(method, {}))

    assert np.isfinite(result.attribution).all()
    if result.kind in ("heatmap", "signed-heatmap"):
        assert result.attribution.shape == (32, 32)
    assert result.image.shape == (32, 32, 3)


@pytest.mark.parametrize("kind", ["tiny", "resnet18"])
@pytest.mark.parametrize("method", ROBUST_METHODS)
def test_method_on_black_input(kind, method):
    model = _model(kind).eval()
    black = torch.zeros(1, 3, 32, 32)

    result = explain(model, black, method, **FAST.get(method, {}))

    assert np.isfinite(result.attribution).all()
    assert np.isfinite(result.score)


def test_rgb_image_on_grayscale_model_is_averaged(tiny_image):
    model = TinyNet(in_channels=1).eval()

    rgb = explain(model, tiny_image, "saliency")
    gray = explain(model, tiny_image.mean(dim=0, keepdim=True), "saliency")

    np.testing.assert_allclose(rgb.attribution, gray.attribution, rtol=1e-6)


def test_image_with_wrong_channels_is_rejected(tiny_model):
    with pytest.raises(QueryError, match="5 channels"):
        explain(tiny_model, torch.zeros(5, 32, 32), "saliency")


def test_batch_of_two_is_rejected(tiny_model):
    with pytest.raises(QueryError, match=r"one image.*\(2, 3, 32, 32\)"):
        explain(tiny_model, torch.zeros(2, 3, 32, 32), "saliency")


def test_nan_image_is_rejected(tiny_model):
    image = torch.zeros(3, 32, 32)
    image[0, 0, 0] = float("nan")
    with pytest.raises(QueryError, match="NaN"):
        explain(tiny_model, image, "saliency")


def test_guard_restores_after_error(tiny_model):
    tiny_model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), model_guard(tiny_model) as working:
            assert not working.training
            assert torch.is_grad_enabled()
            working.stem.register_forward_hook(lambda *args: None)
            raise RuntimeError("boom")
    assert tiny_model.training
    assert all(parameter.requires_grad for parameter in tiny_model.parameters())
    assert not tiny_model.stem._forward_hooks


def test_guard_copies_resnet_and_keeps_outputs(resnet18):
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = resnet18(image)

    with model_guard(resnet18):
        working = attribution_model(resnet18, count_calls(resnet18, image))
        assert working is not resnet18
        relus = [module for module in working.modules() if isinstance(module, nn.ReLU)]
        assert relus and not any(module.inplace for module in relus)
        assert isinstance(working.layer1[0].relu, CallCycler)
        assert len(working.layer1[0].relu.copies) == 2
        with torch.no_grad():
            first = working(image)
            second = working(image)

    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert resnet18.relu.inplace
    assert isinstance(resnet18.layer1[0].relu, nn.ReLU)


def test_guard_keeps_plain_model_uncopied(tiny_model, tiny_image):
    with model_guard(tiny_model):
        assert attribution_model(tiny_model, count_calls(tiny_model, tiny_image[None])) is tiny_model


def test_call_cycler_uses_each_copy_once_per_pass():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x):
            calls.append(id(self))
            return x

    cycler = CallCycler(Recorder(), 3)
    for _ in range(2):
        for _ in range(3):
            cycler(torch.zeros(1))
    copy_ids = [id(module) for module in cycler.copies]
    assert calls == copy_ids + copy_ids


def test_relu6_as_relu_matches_relu6():
    x = torch.linspace(-10, 10, 2001, requires_grad=True)
    expected = nn.ReLU6()(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)

    y = torch.linspace(-10, 10, 2001, requires_grad=True)
    value = ReLU6AsReLU()(y)
    (grad,) = torch.autograd.grad(value.sum(), y)

    torch.testing.assert_close(value, expected)
    # The two differ only at the kink x = 6 (index 1600), where ReLU6's gradient is 0.
    off_kink = torch.ones(2001, dtype=torch.bool)
    off_kink[1600] = False
    torch.testing.assert_close(grad[off_kink], expected_grad[off_kink])


@pytest.mark.parametrize(
    "settings",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": 2, "stride": 2},
        {"kernel_size": 3, "stride": 1, "padding": 1},
        {"kernel_size": 3, "stride": 2, "ceil_mode": True},
        {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
    ],
)
def test_maxpool_as_relu_matches_maxpool(settings):
    # Negative values check that the padding constant never wins a window.
    x = torch.randn(2, 3, 13, 10, generator=torch.Generator().manual_seed(6)) - 3
    pool = nn.MaxPool2d(**settings)
    torch.testing.assert_close(MaxPool2dAsReLU(pool)(x), pool(x))
