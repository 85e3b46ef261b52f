from __future__ import annotations

import numpy as np
import torch

from atlas.capture import forward_to
from atlas.extract import attribute_batch, cached_model, rows_per_image, sample_positions


def test_positions_policies():
    assert rows_per_image("all", 5, 4, 6) == 24
    assert rows_per_image("center", 5, 4, 6) == 1
    assert rows_per_image("random", 50, 4, 6) == 24
    np.testing.assert_array_equal(sample_positions(3, "all", 0, 2, 3, 0), np.arange(6))
    assert sample_positions(3, "center", 0, 5, 7, 0).tolist() == [2 * 7 + 3]


def test_random_positions_seeded_by_row():
    first = sample_positions(7, "random", 10, 14, 14, seed=1)
    assert len(np.unique(first)) == 10
    np.testing.assert_array_equal(first, sample_positions(7, "random", 10, 14, 14, seed=1))
    assert not np.array_equal(first, sample_positions(8, "random", 10, 14, 14, seed=1))
    assert not np.array_equal(first, sample_positions(7, "random", 10, 14, 14, seed=2))


def test_attribution_matches_manual_gradient(tiny_spec):
    model = cached_model(tiny_spec)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    outputs, candidates, scores, probabilities = attribute_batch(model, x, ["layer2"], candidates=3)

    # Independent computation: gradient of each candidate logit w.r.t. layer2's output.
    with torch.no_grad():
        h = forward_to(model.module, x, ["layer2"])["layer2"]
    h = h.clone().requires_grad_(True)
    logits = model.module.fc(torch.flatten(model.module.pool(h), 1))
    for image in range(2):
        for rank in range(3):
            (gradient,) = torch.autograd.grad(logits[image, candidates[image, rank]], h, retain_graph=True)
            expected = (h[image] * gradient[image]).sum(0)
            torch.testing.assert_close(scores[image, rank], expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outputs["layer2"], h.detach())
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2))
    assert torch.equal(candidates[:, 0], logits.argmax(1))


def test_attribution_leaves_model_frozen(tiny_spec):
    model = cached_model(tiny_spec)
    attribute_batch(model, torch.randn(1, 3, 16, 16), ["layer2"], candidates=2)
    assert not any(parameter.requires_grad for parameter in model.module.parameters())
    assert not model.module.layer2._forward_hooks
