"""A small served store for the explorer tests: real tiny-model activations, synthetic icons.

Activations come from :class:`atlas.testing.TinyNet` over generated images, so
:func:`atlas.query.query_image` searches them with the same network. The FAISS
index and the grids are built by the real stages (:func:`atlas.index.build_index`,
:func:`atlas.grid.run_grid`). The layout is a PCA of the activations and the
icons are seeded colourful patterns, both written directly, because UMAP and
feature visualization are too slow for a unit test.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atlas.capture import forward_to
from atlas.config import GridConfig, IndexConfig
from atlas.grid import run_grid
from atlas.index import build_index
from atlas.models import load_model
from atlas.store import create_store, mark_stage, open_store
from atlas.testing import make_images, save_tiny_model

LAYER = "layer2"
CLASS_NAMES = [
    "tabby cat", "espresso", "golden retriever", "rocket", "daisy",
    "brick wall", "coffee mug", "sports car", "lighthouse", "tree frog",
]
TOP_K = 3


@dataclass
class BuiltStore:
    """Paths and arrays of a built store, for expected values in tests."""

    path: Path
    layer: str
    sizes: list[int]
    image_paths: list[str]
    projection: np.ndarray  # (N, 2) float32
    activations: np.ndarray  # (N, C) float16


def _pca_layout(values: np.ndarray) -> np.ndarray:
    # (N, C) -> (N, 2): the first two principal components, clipped to the
    # 1st-99th percentiles and scaled to [0, 1] per axis.
    centred = values - values.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    layout = centred @ vt[:2].T
    low, high = np.percentile(layout, [1, 99], axis=0)
    return np.clip((layout - low) / np.maximum(high - low, 1e-9), 0, 1).astype(np.float32)


def icon_pattern(seed: int, size: int, hue: float) -> np.ndarray:
    """Return a (size, size, 3) uint8 smooth colourful pattern: two waves in two colours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    angle_a, angle_b = rng.uniform(0, np.pi, 2)
    frequency_a, frequency_b = rng.uniform(2, 7, 2)
    wave_a = np.sin(2 * np.pi * frequency_a * (x * np.cos(angle_a) + y * np.sin(angle_a)))
    wave_b = np.sin(2 * np.pi * frequency_b * (x * np.cos(angle_b) + y * np.sin(angle_b)) + rng.uniform(0, 6))
    colour_a = np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.75, 0.95))
    colour_b = np.array(colorsys.hsv_to_rgb((hue + 0.35) % 1.0, 0.6, 0.55))
    mix = (0.5 + 0.25 * wave_a + 0.25 * wave_b)[..., None]
    return np.clip((mix * colour_a + (1 - mix) * colour_b) * 255, 0, 255).astype(np.uint8)


def build_store(
    folder: str | Path,
    *,
    n_images: int = 40,
    per_image: int = 16,
    sizes: tuple[int, ...] = (6, 12),
    min_count: int = 3,
    icon_px: int = 32,
    image_px: int = 64,
    seed: int = 0,
) -> BuiltStore:
    """Write a store with activations, index, layout, grids and icons under ``folder``.

    Rows are image-major: row ``n * per_image + k`` is position ``k`` of image ``n``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = save_tiny_model(folder / "tiny.pt", seed=seed)
    paths = [str(path) for path in make_images(folder / "images", n_images, size=image_px, seed=seed)]
    model = load_model(spec)
    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.inference_mode():
        maps = forward_to(model.module, model.preprocess(images), [LAYER])[LAYER]  # (B, C, h, w)
    batch, channels, height, width = maps.shape

    # Step 1: sample positions and their activations, (B, per_image) positions -> (N, C) rows.
    rng = np.random.default_rng(seed)
    flat = np.stack([rng.choice(height * width, per_image, replace=False) for _ in range(batch)])
    y, x = flat // width, flat % width
    vectors = maps.permute(0, 2, 3, 1)[torch.arange(batch)[:, None], torch.from_numpy(y), torch.from_numpy(x)]
    activations = vectors.reshape(-1, channels).numpy().astype(np.float16)
    n_rows = len(activations)

    # Step 2: class attribution h · ∇h logit_c. The logits are fc(mean over positions of h),
    # so the gradient at one position is fc.weight[c] / (h · w).
    weight = model.module.fc.weight.detach().numpy()  # (classes, C)
    contributions = activations.astype(np.float32) @ weight.T / (height * width)
    top = np.argsort(-contributions, axis=1)[:, :TOP_K]
    top_scores = np.take_along_axis(contributions, top, axis=1)

    with torch.inference_mode():
        probabilities = torch.softmax(model.module(model.preprocess(images)), dim=1).numpy()
    top_images = np.argsort(-probabilities, axis=1)[:, :5]

    group = create_store(
        folder / "served.zarr",
        attrs={
            "model": spec,
            "class_names": CLASS_NAMES,
            "layer_shapes": {LAYER: [channels, height, width]},
            "preprocessing": model.preprocessing_info(),
            "positions": "random",
            "per_image": per_image,
            "seed": seed,
        },
        n_images=n_images,
        rows_per_image=per_image,
        layer_channels={LAYER: channels},
        shard_size=n_images,
        attribution_top_k=TOP_K,
    )
    group[f"activations/{LAYER}"][:] = activations
    group["samples/image"][:] = np.repeat(np.arange(n_images, dtype=np.int32), per_image)
    group["samples/y"][:] = y.reshape(-1).astype(np.int16)
    group["samples/x"][:] = x.reshape(-1).astype(np.int16)
    group["samples/valid"][:] = np.ones(n_rows, bool)
    group["samples/attribution_class"][:] = top.astype(np.int16)
    group["samples/attribution_score"][:] = top_scores.astype(np.float32)
    group["images/path"][:] = np.array(paths)
    group["images/status"][:] = np.array(["ok"] * n_images)
    group["images/top_class"][:] = top_images.astype(np.int16)
    group["images/top_prob"][:] = np.take_along_axis(probabilities, top_images, axis=1).astype(np.float32)
    group["extract/shard_done"][:] = True
    mark_stage(group, "extract")

    # Step 3: the real index, a PCA layout, the real grids.
    build_index(folder / "served.zarr", IndexConfig())
    # Reopen: the handle above caches the attributes from before the index stage wrote its record.
    group = open_store(folder / "served.zarr", mode="r+")
    projection = _pca_layout(activations.astype(np.float32))
    group.create_array(f"projection/{LAYER}", shape=projection.shape, dtype="float32")[:] = projection
    mark_stage(group, "project", LAYER, method="pca")
    run_grid(folder / "served.zarr", GridConfig(sizes=list(sizes), min_count=min_count, n_exemplars=6, top_classes=3), LAYER)

    # Step 4: icons for every non-empty cell but one per grid, to show the "not rendered" state.
    group = open_store(folder / "served.zarr", mode="r+")
    for size in sizes:
        grid = group[f"grids/{LAYER}/{size}"]
        filled = np.asarray(grid["count"][:]) >= min_count
        icons = np.full((size, size, icon_px, icon_px, 3), 255, np.uint8)
        done = filled.copy()
        for i, j in np.argwhere(filled):
            hue = 0.6 * j / size + 0.4 * i / size
            icons[i, j] = icon_pattern(seed * 7919 + size * 1000 + i * size + j, icon_px, hue)
        last = np.argwhere(filled)[-1]
        done[last[0], last[1]] = False
        grid.create_array("icons", shape=icons.shape, chunks=(1, size, icon_px, icon_px, 3), dtype="uint8")[:] = icons
        grid.create_array("icon_done", shape=done.shape, dtype="bool")[:] = done
    mark_stage(group, "render", LAYER)
    return BuiltStore(
        path=folder / "served.zarr", layer=LAYER, sizes=list(sizes), image_paths=paths,
        projection=projection, activations=activations,
    )
