"""Exception types raised by the atlas library.

Every message names the offending value, what was expected and what to do.
"""

from __future__ import annotations


class AtlasError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(AtlasError, ValueError):
    """A configuration key or command-line value is invalid."""


class ModelError(AtlasError, ValueError):
    """A model spec or layer name cannot be resolved."""


class ImageDecodeError(AtlasError):
    """An input file cannot be turned into an RGB image."""


class StoreError(AtlasError):
    """A feature store is missing, incomplete or inconsistent."""


class StoreLockedError(StoreError):
    """Another live job holds the store's write lock."""


class StageNotReadyError(StoreError):
    """A stage needs the output of an earlier stage that has not run."""


class QueryError(AtlasError, ValueError):
    """A query image or query parameter is invalid."""
