"""Robust image decoding: any file a user points at becomes an RGB image or a clear reason.

Handles EXIF orientation (a malformed EXIF block is ignored with a warning),
palette and alpha images (composited on a background), CMYK, 16-bit and
32-bit integer or float images (rescaled to 8 bits, not clipped), truncated
files, zero-byte and non-image files, and decompression bombs.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, TiffImagePlugin, UnidentifiedImageError

from atlas.errors import ImageDecodeError

logger = logging.getLogger(__name__)

# Pillow's own default (about 89.5 megapixels); larger images are rejected as
# possible decompression bombs instead of being decoded.
MAX_PIXELS = 89_478_485
MIN_SIDE = 8
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
BACKGROUND = (255, 255, 255)
ORIENTATION_TAG = 0x0112
# IFD0 tags that point to the Exif and GPS sub-IFDs.
_SUB_IFDS = {0x8769: "Exif", 0x8825: "GPS"}


def _to_uint8(pixels: np.ndarray, bits: int | None) -> np.ndarray:
    """Rescale integer or float pixels to 0..255 without clipping the range."""
    pixels = pixels.astype(np.float64)
    if bits is not None:
        return np.round(pixels * (255.0 / (2**bits - 1))).astype(np.uint8)
    low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
    if not np.isfinite(low) or not np.isfinite(high):
        raise ImageDecodeError("invalid pixel values: the image contains NaN or infinity")
    if high <= 255 and low >= 0:
        return np.round(pixels).astype(np.uint8)
    if high == low:
        return np.zeros(pixels.shape, np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def _exif_defect(exif: Image.Exif) -> str | None:
    """Return why an EXIF block is malformed, or ``None`` when it is well formed.

    Malformed means: the Exif or GPS sub-IFD is empty or unreadable, or a
    rational in IFD0, Exif or GPS has a zero denominator. Some older Pillow
    releases raise inside ``exif_transpose`` on such blocks, and Pillow 13.0
    rotates them. Checking here gives the same result with either.
    """
    ifds = {"IFD0": dict(exif)}
    for tag, ifd_name in _SUB_IFDS.items():
        if tag not in exif:
            continue
        with warnings.catch_warnings():
            # Pillow warns "Corrupt EXIF data" and returns {} for an unreadable IFD.
            warnings.simplefilter("ignore", UserWarning)
            entries = exif.get_ifd(tag)
        if not entries:
            return f"the {ifd_name} IFD is empty or unreadable"
        ifds[ifd_name] = dict(entries)
    for ifd_name, entries in ifds.items():
        for tag, value in entries.items():
            values = value if isinstance(value, tuple) else (value,)
            for item in values:
                if isinstance(item, TiffImagePlugin.IFDRational) and item.denominator == 0:
                    return f"tag 0x{tag:04x} in {ifd_name} is a rational with a zero denominator"
    return None


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    """Rotate or flip the image to its EXIF Orientation, unless the EXIF block is malformed.

    NOTE: a malformed block is ignored as a whole, so a photo whose Orientation
    tag is intact but whose GPS IFD holds 0/0 rationals stays unrotated.
    """
    try:
        exif = image.getexif()
        if exif.get(ORIENTATION_TAG, 1) in {1, None}:
            return image
        defect = _exif_defect(exif)
        if defect is None:
            return ImageOps.exif_transpose(image)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, SyntaxError, OSError, struct.error) as error:
        defect = str(error)
    logger.warning("ignoring malformed EXIF in %s (%s); using the image unrotated", name, defect)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in {"I;16", "I;16B", "I;16L", "I;16N"}:
        return Image.fromarray(_to_uint8(np.asarray(image), 16)).convert("RGB")
    if mode in {"I", "F"}:
        return Image.fromarray(_to_uint8(np.asarray(image), None)).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "L" and "transparency" in image.info:
        return _to_rgb(image.convert("LA"))
    return image.convert("RGB")


def decode_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode a file or a byte string into an RGB image.

    Parameters
    ----------
    source
        A path or the raw bytes of an image file.
    name
        How to call the image in messages; defaults to the path.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, EXIF orientation applied.

    Raises
    ------
    ImageDecodeError
        With the reason: empty file, not an image, truncated, too large,
        too small, unreadable.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "upload")
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError("empty file (0 bytes)")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise ImageDecodeError("empty file (0 bytes)")
        except FileNotFoundError as error:
            raise ImageDecodeError("file not found or broken symbolic link") from error
        except PermissionError as error:
            raise ImageDecodeError("permission denied") from error
        except OSError as error:
            raise ImageDecodeError(f"cannot read file: {error.strerror or error}") from error
        stream = path

    previous_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as opened:
                width, height = opened.size
                if width * height > MAX_PIXELS:
                    raise ImageDecodeError(
                        f"image is {width}x{height} pixels, above the {MAX_PIXELS:,}-pixel decompression-bomb limit"
                    )
                opened.load()
                image = opened.copy()
                image.info = dict(opened.info)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not an image file (Pillow cannot identify it)") from error
    except PermissionError as error:
        raise ImageDecodeError("permission denied") from error
    except OSError as error:
        message = str(error)
        if "truncated" in message or "broken data stream" in message or "image file is truncated" in message:
            raise ImageDecodeError(f"truncated image file ({message})") from error
        if getattr(error, "errno", None) == 40:
            raise ImageDecodeError("symbolic link loop") from error
        raise ImageDecodeError(f"cannot decode image: {message}") from error
    except (SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous_truncated

    if min(image.size) < MIN_SIDE:
        raise ImageDecodeError(f"image is {image.size[0]}x{image.size[1]} pixels; the minimum side is {MIN_SIDE}")
    image = _apply_orientation(image, label)
    return _to_rgb(image)
