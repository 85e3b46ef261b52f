"""Clustered synthetic activation vectors for the index, projection and scale benchmarks."""

from __future__ import annotations

import numpy as np

CHUNK_ROWS = 262_144


def clustered_vectors(n_rows: int, dim: int = 112, n_clusters: int = 1_000, seed: int = 0) -> np.ndarray:
    """Return ``n_rows`` float32 vectors drawn from a Gaussian mixture, shape (n_rows, dim).

    Cluster sizes follow a Zipf-like law (a few large clusters, many small
    ones) and each cluster has its own spread, between 0.3 and 0.9 of the
    centres' scale, so neighbourhoods overlap as real activations do. The
    rows are generated chunk by chunk and shuffled, so no cluster is contiguous.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    spreads = rng.uniform(0.3, 0.9, n_clusters).astype(np.float32)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.7
    labels = rng.choice(n_clusters, size=n_rows, p=weights / weights.sum())
    out = np.empty((n_rows, dim), np.float32)
    for start in range(0, n_rows, CHUNK_ROWS):
        part = labels[start : start + CHUNK_ROWS]
        noise = rng.standard_normal((len(part), dim), dtype=np.float32)
        out[start : start + len(part)] = centres[part] + spreads[part, None] * noise
    return out


def write_vector_store(path, vectors: np.ndarray, layer: str = "synthetic", rows_per_image: int = 100) -> None:
    """Write ``vectors`` (N, C) as a store whose extract stage is complete, for the later stages.

    Rows are grouped into images of ``rows_per_image`` rows; every row is
    valid and has no attribution, so the grid stage's top classes stay empty.
    """
    from atlas.store import create_store, mark_stage

    n_rows, channels = vectors.shape
    if n_rows % rows_per_image:
        raise ValueError(f"{n_rows} rows do not split into images of {rows_per_image} rows")
    n_images = n_rows // rows_per_image
    group = create_store(
        path,
        attrs={"model": "synthetic", "layer_shapes": {layer: [channels, 10, 10]}, "class_names": []},
        n_images=n_images,
        rows_per_image=rows_per_image,
        layer_channels={layer: channels},
        shard_size=max(1, CHUNK_ROWS // rows_per_image),
        attribution_top_k=1,
    )
    for start in range(0, n_rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n_rows)
        group[f"activations/{layer}"][start:stop] = vectors[start:stop].astype(np.float16)
    group["samples/image"][:] = np.repeat(np.arange(n_images, dtype=np.int32), rows_per_image)
    position = np.tile(np.arange(rows_per_image), n_images)
    group["samples/y"][:] = (position // 10).astype(np.int16)
    group["samples/x"][:] = (position % 10).astype(np.int16)
    group["samples/valid"][:] = True
    group["images/path"][:] = np.array([f"synthetic/{image:07d}" for image in range(n_images)])
    group["images/status"][:] = np.array(["ok"] * n_images)
    group["extract/shard_done"][:] = True
    mark_stage(group, "extract")
