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

__all__ = [
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
