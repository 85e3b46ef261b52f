"""Activation Atlas: what a convolutional network has learned, at the scale of millions of activations."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from atlas.config import AtlasConfig, load_config
from atlas.errors import (
    AtlasError,
    ConfigError,
    ImageDecodeError,
    ModelError,
    QueryError,
    StageNotReadyError,
    StoreError,
    StoreLockedError,
)
from atlas.images import decode_image
from atlas.models import LoadedModel, load_model
from atlas.store import open_store

try:
    __version__ = version("activation-atlas")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# Stage functions load heavy libraries (FAISS, UMAP, captum); import them on first use.
_LAZY = {
    "build_index": "atlas.index",
    "search": "atlas.index",
    "run_project": "atlas.project",
    "run_grid": "atlas.grid",
    "run_render": "atlas.render",
    "render_directions": "atlas.render",
    "render_channel": "atlas.render",
    "query_image": "atlas.query",
    "explain": "atlas.explain",
    "open_features": "atlas.features",
    "store_info": "atlas.inspect",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atlas' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "AtlasConfig",
    "AtlasError",
    "ConfigError",
    "ImageDecodeError",
    "LoadedModel",
    "ModelError",
    "QueryError",
    "StageNotReadyError",
    "StoreError",
    "StoreLockedError",
    "__version__",
    "decode_image",
    "load_config",
    "load_model",
    "open_store",
]
