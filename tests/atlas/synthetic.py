"""Synthetic feature stores for tests of the stages after extraction.

:func:`make_store` fills a store with clustered random activations;
:func:`make_tiny_model_store` runs :class:`atlas.testing.TinyNet` over
generated images, so queries against it have known results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atlas.capture import forward_to
from atlas.models import load_model
from atlas.store import create_store, mark_stage, open_store
from atlas.testing import make_images, save_tiny_model

N_CLASSES = 10


@dataclass
class SyntheticStore:
    """Contents of a synthetic store, for computing expected results in tests."""

    path: Path
    layer: str
    activations: np.ndarray  # (N, C) float16, exactly as stored
    valid: np.ndarray  # (N,) bool
    image: np.ndarray  # (N,) int32
    y: np.ndarray  # (N,) int16
    x: np.ndarray  # (N,) int16
    attribution_class: np.ndarray  # (N, K) int16
    attribution_score: np.ndarray  # (N, K) float32
    image_paths: list[str]


def clustered_vectors(n_rows: int, channels: int, n_clusters: int, seed: int = 0, spread: float = 0.15) -> np.ndarray:
    """Return (n_rows, channels) float32 vectors around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, channels))
    labels = rng.integers(0, n_clusters, size=n_rows)
    return (centres[labels] + spread * rng.normal(size=(n_rows, channels))).astype(np.float32)


def make_store(
    path: str | Path,
    *,
    activations: np.ndarray | None = None,
    n_rows: int = 200,
    channels: int = 8,
    n_clusters: int = 4,
    rows_per_image: int = 1,
    invalid_rows: tuple[int, ...] | np.ndarray = (),
    layer: str = "layer2",
    model: str = "file:unused.pt",
    top_k: int = 3,
    shard_size: int | None = None,
    seed: int = 0,
    mark_extract: bool = True,
) -> SyntheticStore:
    """Write a store whose extract stage is complete, without running a model.

    ``activations`` (N, C) overrides the clustered random data; ``n_rows``
    must then be a multiple of ``rows_per_image``. Rows in ``invalid_rows``
    get ``valid = False`` and NaN activations, as the extract stage leaves them.
    """
    rng = np.random.default_rng(seed + 1)
    if activations is None:
        activations = clustered_vectors(n_rows, channels, n_clusters, seed)
    values = np.asarray(activations, dtype=np.float16).copy()
    n_rows, channels = values.shape
    n_images = n_rows // rows_per_image

    valid = np.ones(n_rows, bool)
    valid[np.asarray(invalid_rows, dtype=np.int64)] = False
    values[~valid] = np.nan

    attribution_class = np.stack([rng.permutation(N_CLASSES)[:top_k] for _ in range(n_rows)]).astype(np.int16)
    attribution_score = rng.random((n_rows, top_k)).astype(np.float32)
    attribution_class[~valid] = -1
    attribution_score[~valid] = 0
    image = np.repeat(np.arange(n_images, dtype=np.int32), rows_per_image)
    y = np.tile(np.arange(rows_per_image, dtype=np.int16), n_images)
    x = np.zeros(n_rows, np.int16)
    image_paths = [f"images/img_{row:04d}.png" for row in range(n_images)]

    group = create_store(
        path,
        attrs={
            "model": model,
            "class_names": [f"class {index}" for index in range(N_CLASSES)],
            "layer_shapes": {layer: [channels, rows_per_image, 1]},
            "positions": "all",
            "per_image": rows_per_image,
            "seed": seed,
        },
        n_images=n_images,
        rows_per_image=rows_per_image,
        layer_channels={layer: channels},
        shard_size=shard_size or max(1, n_images // 3),
        attribution_top_k=top_k,
    )
    group[f"activations/{layer}"][:] = values
    group["samples/image"][:] = image
    group["samples/y"][:] = y
    group["samples/x"][:] = x
    group["samples/valid"][:] = valid
    group["samples/attribution_class"][:] = attribution_class
    group["samples/attribution_score"][:] = attribution_score
    group["images/path"][:] = np.array(image_paths)
    group["images/status"][:] = np.array(["ok"] * n_images)
    group["extract/shard_done"][:] = True
    if mark_extract:
        mark_stage(group, "extract")
    return SyntheticStore(
        path=Path(path), layer=layer, activations=values, valid=valid, image=image, y=y, x=x,
        attribution_class=attribution_class, attribution_score=attribution_score, image_paths=image_paths,
    )


def make_tiny_model_store(folder: str | Path, n_images: int = 4, layer: str = "layer2") -> SyntheticStore:
    """Run the tiny model over generated images and store every position of ``layer``.

    The store's model spec points at the saved :class:`~atlas.testing.TinyNet`,
    so ``query_image`` loads the same network and preprocessing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = save_tiny_model(folder / "tiny.pt")
    paths = make_images(folder / "images", n_images)
    model = load_model(spec)
    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.inference_mode():
        maps = forward_to(model.module, model.preprocess(images), [layer])[layer]  # (B, C, h, w)
    batch, channels, height, width = maps.shape
    activations = maps.permute(0, 2, 3, 1).reshape(batch * height * width, channels).numpy()

    store = make_store(
        folder / "tiny.zarr", activations=activations, rows_per_image=height * width, layer=layer, model=spec,
        shard_size=n_images,
    )
    # Rows are image-major then y-major: row = (image * h + y) * w + x.
    position = np.arange(height * width)
    store.y[:] = np.tile(position // width, batch).astype(np.int16)
    store.x[:] = np.tile(position % width, batch).astype(np.int16)
    store.image_paths[:] = [str(path) for path in paths]

    group = open_store(store.path, mode="r+")
    group["samples/y"][:] = store.y
    group["samples/x"][:] = store.x
    group["images/path"][:] = np.array(store.image_paths)
    group.attrs["layer_shapes"] = {layer: [channels, height, width]}
    return store
