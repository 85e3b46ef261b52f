"""Lazy, read-only access to a store's features for use outside the CLI.

>>> features = open_features("stores/demo.zarr")
>>> features.activations            # dask array (N, C) float16, nothing read yet
>>> features.rows_for_image("sample:chelsea/0000")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from atlas.errors import StoreError
from atlas.store import default_layer, open_store, read_strings

logger = logging.getLogger(__name__)


@dataclass
class Features:
    """A store's activations, sample positions and image table as lazy arrays.

    Attributes
    ----------
    activations
        (N, C) float16 dask array of the chosen layer.
    image, y, x, valid
        (N,) dask arrays: image row, position, validity.
    """

    path: str
    layer: str
    group: zarr.Group
    activations: da.Array
    image: da.Array
    y: da.Array
    x: da.Array
    valid: da.Array

    @cached_property
    def images(self) -> dict[str, np.ndarray]:
        """The image table, read once: ``path``, ``status`` (object arrays), ``top_class``, ``top_prob``."""
        return {
            "path": read_strings(self.group["images/path"]),
            "status": read_strings(self.group["images/status"]),
            "top_class": np.asarray(self.group["images/top_class"][:]),
            "top_prob": np.asarray(self.group["images/top_prob"][:]),
        }

    def rows_for_image(self, path: str) -> np.ndarray:
        """Return the activation rows of the image stored under ``path``, shape (rows_per_image,) int64.

        Raises
        ------
        StoreError
            No image with that path is in the store.
        """
        matches = np.flatnonzero(self.images["path"] == str(path))
        if len(matches) == 0:
            raise StoreError(f"image {path!r} is not in store {self.path}; list paths with Features.images['path']")
        per_image = int(self.group.attrs["rows_per_image"])
        row = int(matches[0])
        return np.arange(row * per_image, (row + 1) * per_image, dtype=np.int64)

    def to_xarray(self) -> xr.Dataset:
        """Return activations and sample arrays as one lazy ``xarray.Dataset`` over dimension ``row``."""
        return xr.Dataset(
            {
                "activations": (("row", "channel"), self.activations),
                "image": ("row", self.image),
                "y": ("row", self.y),
                "x": ("row", self.x),
                "valid": ("row", self.valid),
            },
            attrs={"model": self.group.attrs.get("model"), "layer": self.layer},
        )


def open_features(path: str | Path, layer: str | None = None) -> Features:
    """Open a store read-only and wrap its arrays lazily.

    Parameters
    ----------
    path
        Store path or fsspec URL.
    layer
        Layer name; the store's first layer when omitted.
    """
    group = open_store(path, mode="r")
    layer = default_layer(group, layer)

    def lazy(name: str) -> da.Array:
        return da.from_zarr(group[name])

    return Features(
        path=str(path),
        layer=layer,
        group=group,
        activations=lazy(f"activations/{layer}"),
        image=lazy("samples/image"),
        y=lazy("samples/y"),
        x=lazy("samples/x"),
        valid=lazy("samples/valid"),
    )
