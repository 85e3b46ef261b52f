"""Uploaded images: validation, the nearest-neighbour query and per-image explanations.

The browser sends a ``FileInput`` value as base64 text. :func:`read_upload`
checks its size before decoding it, then decodes the image with
:func:`atlas.images.decode_image`, which rejects empty files, non-images,
truncated files and decompression bombs. The file name is only ever shown,
escaped, in the page; it is never used as a path.

:func:`search_upload` and :func:`explain_upload` run in a worker thread
(:func:`server.state.executor`); they return plain data that the session
applies to its document on the Bokeh event loop.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from atlas.errors import QueryError
from atlas.images import decode_image
from atlas.query import Hit, QueryResult, cached_model, query_image
from server.mosaic import heatmap_overlay, png_data_uri
from server.state import MODEL_LOCK, StoreData

logger = logging.getLogger(__name__)

MEGABYTE = 1024 * 1024
# Neighbours searched per feature-map position; the summaries count hits over all positions.
QUERY_K = 10
THUMBNAIL_PX = 224
PATCH_PX = 96
EXPLANATION_METHODS = (("gradcam", "Grad-CAM"), ("saliency", "Saliency"))


@dataclass
class CellHit:
    """A grid cell hit by the upload's neighbours: ``count`` hits with ``mean_score`` cosine."""

    i: int
    j: int
    count: int
    mean_score: float


@dataclass
class Match:
    """A dataset patch near one of the upload's positions."""

    row: int
    image: int
    name: str
    score: float
    uri: str | None


@dataclass
class UploadResult:
    """Data the explorer shows for one upload.

    Attributes
    ----------
    filename
        The browser's file name, for display only.
    thumbnail
        PNG data URI of the decoded upload.
    cells
        Per grid size, the most-hit cells, most hits first.
    matches
        Nearest dataset patches, one per dataset image, best score first.
    map_shape
        (h, w) of the upload's feature map.
    seconds
        Time spent in the query.
    """

    filename: str
    thumbnail: str
    cells: dict[int, list[CellHit]]
    matches: list[Match]
    map_shape: tuple[int, int]
    seconds: float
    explanations: list[tuple[str, str]] = field(default_factory=list)


def format_megabytes(n_bytes: float) -> str:
    """Return ``n_bytes`` in MB with at most two decimals, e.g. ``0.25 MB``."""
    return f"{n_bytes / MEGABYTE:.2f}".rstrip("0").rstrip(".") + " MB"


def size_message(n_bytes: int, max_bytes: int) -> str:
    """Return the message for an upload of ``n_bytes`` above ``max_bytes``."""
    return (
        f"the file is {format_megabytes(n_bytes)}, above the {format_megabytes(max_bytes)} upload limit "
        "(serve.max_upload_mb); choose a smaller image"
    )


def display_name(filename: object, limit: int = 80) -> str:
    """Return a browser-supplied file name cut to ``limit`` characters, for display only."""
    text = filename if isinstance(filename, str) else ""
    text = "".join(char for char in text if char.isprintable()) or "upload"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def decode_upload(value: object, max_bytes: int) -> bytes:
    """Turn a ``FileInput`` base64 value into bytes, checking the size first.

    Parameters
    ----------
    value
        Base64 text as the browser sends it.
    max_bytes
        Largest file accepted.

    Raises
    ------
    QueryError
        The value is not text, is empty, is larger than ``max_bytes`` or is not valid base64.
    """
    if not isinstance(value, str):
        raise QueryError("the upload contains no file; choose one image file")
    text = value.strip()
    if not text:
        raise QueryError("the file is empty (0 bytes); choose an image file")
    # Base64 stores 3 bytes in 4 characters; the estimate is exact up to 2 bytes of padding.
    estimated = len(text) * 3 // 4
    if estimated > max_bytes + 2:
        raise QueryError(size_message(estimated, max_bytes))
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise QueryError(f"the upload is not valid base64 ({error}); choose the file again") from None
    if not data:
        raise QueryError("the file is empty (0 bytes); choose an image file")
    if len(data) > max_bytes:
        raise QueryError(size_message(len(data), max_bytes))
    return data


def read_upload(value: object, max_bytes: int, name: str = "upload") -> Image.Image:
    """Decode an upload into an RGB image.

    ``name`` is the file name that log messages of the decoder show, such as
    a warning about malformed EXIF data.

    Raises
    ------
    QueryError
        The upload is empty, too large or not base64.
    ImageDecodeError
        The bytes are not a decodable image (the message gives the reason).
    """
    return decode_image(decode_upload(value, max_bytes), name=name)


def _thumbnail(image: Image.Image, side: int = THUMBNAIL_PX) -> str:
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    return png_data_uri(small)


def cells_from_result(result: QueryResult) -> dict[int, list[CellHit]]:
    """Return the most-hit cells per grid size of a query result."""
    return {
        int(size): [CellHit(cell.i, cell.j, cell.count, cell.mean_score) for cell in cells]
        for size, cells in result.cells.items()
    }


def best_hits(result: QueryResult, count: int) -> list[Hit]:
    """Return the ``count`` best hits over all positions, at most one per dataset image.

    Returns
    -------
    list of Hit
        Highest cosine first; ties broken by store row.
    """
    chosen: list[Hit] = []
    seen_images: set[int] = set()
    for _, hit in result.top_matches():
        if hit.image in seen_images:
            continue
        seen_images.add(hit.image)
        chosen.append(hit)
        if len(chosen) == count:
            break
    return chosen


def search_upload(store: StoreData, layer: str, image: Image.Image, filename: str, neighbors: int) -> UploadResult:
    """Query the store with an uploaded image and prepare what the page shows.

    Runs in a worker thread. The query model and index are loaded once per
    store by :mod:`atlas.query` and reused.

    Raises
    ------
    AtlasError
        The query failed, for example without an index or with a model mismatch.
    """
    started = time.perf_counter()
    with MODEL_LOCK:
        result = query_image(store.path, image, k=QUERY_K, layer=layer)
    seconds = time.perf_counter() - started

    matches = []
    for hit in best_hits(result, neighbors):
        patch = store.patch(hit.row, PATCH_PX, layer)
        matches.append(
            Match(
                row=hit.row, image=hit.image, name=hit.path, score=hit.score,
                uri=png_data_uri(patch) if patch is not None else None,
            )
        )
    logger.info(
        "upload %r on %s layer %s: %d positions searched in %.2f s", filename, store.name, layer,
        len(result.positions), seconds,
    )
    return UploadResult(
        filename=filename,
        thumbnail=_thumbnail(image),
        cells=cells_from_result(result),
        matches=matches,
        map_shape=(int(result.map_shape[0]), int(result.map_shape[1])),
        seconds=seconds,
    )


def explain_upload(store: StoreData, image: Image.Image) -> list[tuple[str, str]]:
    """Compute Grad-CAM and saliency maps of the model's predicted class for an upload.

    Grad-CAM reads the last convolution the model calls, as in Selvaraju et al.
    (2017), not the atlas layer. Runs in a worker thread.

    Returns
    -------
    list of (caption, data URI)
        One overlay per method that succeeded; failures are logged.
    """
    from atlas.explain import explain

    model = cached_model(store.model_spec)
    panels = []
    for method, label in EXPLANATION_METHODS:
        try:
            with MODEL_LOCK:
                explanation = explain(model, image.convert("RGB"), method)
        except Exception as error:  # noqa: BLE001 - an explanation is optional; the query result still shows
            logger.warning("%s of an upload on %s failed: %s", label, store.name, error, exc_info=True)
            continue
        seen = Image.fromarray((np.clip(explanation.image, 0, 1) * 255).round().astype(np.uint8))
        target = explanation.target_name or f"class {explanation.target}"
        caption = f"{label}: {target} ({explanation.score:.2f})"
        panels.append((caption, png_data_uri(heatmap_overlay(seen, explanation.attribution))))
    return panels
