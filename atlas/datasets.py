"""Image sources: the built-in sample set of real photos, folders, globs and path lists.

Every source becomes an ordered list of item strings. The list order fixes
each image's row in the store, so a rerun over the same source writes the
same rows. Items are file paths, fsspec URLs (``file://``, ``memory://``, or
any protocol whose fsspec backend is installed), or ``sample:<photo>/<crop>``
for the sample set, which :func:`open_image` turns back into the same crop
every time.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from atlas.errors import ConfigError, ImageDecodeError
from atlas.images import IMAGE_SUFFIXES, MAX_PIXELS, decode_image

logger = logging.getLogger(__name__)

SAMPLE_PREFIX = "sample:"
URL_SEPARATOR = "://"
LIST_SUFFIXES = frozenset({".txt", ".lst"})
GLOB_CHARACTERS = "*?["
SAMPLE_CROP_SIZE = 256
# Images at URLs are read whole into memory before decoding. No image within
# Pillow's decompression-bomb limit needs more than 3 bytes per pixel.
MAX_URL_BYTES = 3 * MAX_PIXELS
# An HTTP request without a complete response within this time fails; a
# timeout or a refused connection is tried URL_ATTEMPTS times in all.
URL_TIMEOUT_SECONDS = 30.0
URL_ATTEMPTS = 2
# Prefixes of the rejection reasons that _network_failure writes.
NETWORK_FAILURE_PREFIXES = ("timed out after ", "cannot connect: ")

# Real photographs shipped inside installed packages (package, path inside it).
# Synthetic images (chessboard, colour wheel, phantom, logos) are left out.
SAMPLE_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "brick": ("skimage", "data/brick.png"),
    "camera": ("skimage", "data/camera.png"),
    "cell": ("skimage", "data/cell.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "clock": ("skimage", "data/clock_motion.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "coins": ("skimage", "data/coins.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "moon": ("skimage", "data/moon.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "page": ("skimage", "data/page.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "text": ("skimage", "data/text.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}


@dataclass(frozen=True)
class CropBox:
    """A crop in source pixel coordinates: left, top, width, height."""

    left: int
    top: int
    width: int
    height: int


@lru_cache(maxsize=None)
def sample_photo_path(name: str) -> Path | None:
    """Return the file of a sample photo, or ``None`` when its package is not installed."""
    package, relative = SAMPLE_PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def available_sample_photos() -> list[str]:
    """Return the names of the sample photos whose packages are installed."""
    return [name for name in SAMPLE_PHOTOS if sample_photo_path(name) is not None]


@lru_cache(maxsize=32)
def _sample_photo(name: str) -> Image.Image:
    path = sample_photo_path(name)
    if path is None:
        package = SAMPLE_PHOTOS[name][0]
        raise ImageDecodeError(f"sample photo {name} needs the package {package}, which is not installed")
    return decode_image(path)


def sample_crop_box(width: int, height: int, crop: int, seed: int, min_scale: float, photo: str) -> CropBox:
    """Return the seeded random resized crop number ``crop`` of a photo.

    Area fraction uniform in [min_scale, 1], aspect ratio log-uniform in
    [3/4, 4/3], as in torchvision's RandomResizedCrop; crop 0 is the whole photo.
    """
    if crop == 0:
        return CropBox(0, 0, width, height)
    photo_key = int(hashlib.sha256(photo.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, photo_key, crop])
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        crop_width = int(round(np.sqrt(target * ratio)))
        crop_height = int(round(np.sqrt(target / ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return CropBox(left, top, crop_width, crop_height)
    side = min(width, height)
    return CropBox((width - side) // 2, (height - side) // 2, side, side)


def sample_items(crops_per_photo: int) -> list[str]:
    """Return the item strings of the sample set: ``crops_per_photo`` crops of each photo."""
    photos = available_sample_photos()
    if not photos:
        raise ConfigError("no sample photos found: install scikit-image, matplotlib and scikit-learn")
    return [f"{SAMPLE_PREFIX}{photo}/{crop:04d}" for photo in photos for crop in range(crops_per_photo)]


def _parse_sample_item(item: str) -> tuple[str, int]:
    body = item[len(SAMPLE_PREFIX):]
    photo, _, crop_text = body.partition("/")
    if photo not in SAMPLE_PHOTOS or not crop_text.isdigit():
        raise ImageDecodeError(f"unknown sample item {item!r}; expected sample:<photo>/<crop number>")
    return photo, int(crop_text)


def open_image(item: str, seed: int = 0, min_scale: float = 0.08) -> Image.Image:
    """Decode an item string into an RGB image.

    ``sample:`` items are rebuilt from their photo and crop number (resized to
    256 px square). URLs are read whole through ``fsspec.open`` and then
    decoded. Anything else is decoded as a file.

    Raises
    ------
    ImageDecodeError
        The file cannot be decoded; the message gives the reason.
    """
    if item.startswith(SAMPLE_PREFIX):
        photo, crop = _parse_sample_item(item)
        source = _sample_photo(photo)
        box = sample_crop_box(source.width, source.height, crop, seed, min_scale, photo)
        region = source.crop((box.left, box.top, box.left + box.width, box.top + box.height))
        return region.resize((SAMPLE_CROP_SIZE, SAMPLE_CROP_SIZE), Image.Resampling.BICUBIC)
    if is_url(item):
        return decode_image(_read_url(item), name=item)
    return decode_image(item)


def is_url(item: str) -> bool:
    """Return whether an item or source is an fsspec URL such as ``memory://images/a.png``."""
    return URL_SEPARATOR in item


def _url_options(url: str) -> dict:
    """Return fsspec storage options for ``url``: a request timeout for HTTP, which has none by default."""
    if url.split(URL_SEPARATOR, 1)[0] not in ("http", "https"):
        return {}
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=URL_TIMEOUT_SECONDS)}}


def is_network_failure(reason: str) -> bool:
    """Return whether a recorded rejection reason is a timeout or a failed connection, which a rerun may fix."""
    return reason.startswith(NETWORK_FAILURE_PREFIXES)


def _network_failure(error: BaseException) -> str | None:
    """Return a description when ``error`` (or its cause) is a timeout or a failed connection, else None."""
    for item in (error, error.__cause__, error.__context__):
        if isinstance(item, TimeoutError):
            return f"timed out after {URL_TIMEOUT_SECONDS:g} s"
        if isinstance(item, ConnectionError) or type(item).__name__.startswith("ClientConnector"):
            return f"cannot connect: {item}"
    return None


def _read_url(url: str) -> bytes:
    """Read the bytes of an image at an fsspec URL, at most ``MAX_URL_BYTES`` of them.

    A timeout or a failed connection is tried ``URL_ATTEMPTS`` times in all.

    Raises
    ------
    ImageDecodeError
        The file is missing, unreadable, unreachable or larger than ``MAX_URL_BYTES``.
    """
    import fsspec

    for attempt in range(1, URL_ATTEMPTS + 1):
        try:
            with fsspec.open(url, "rb", **_url_options(url)) as stream:
                data = stream.read(MAX_URL_BYTES + 1)
            break
        except (OSError, TimeoutError) as error:
            failure = _network_failure(error)
            if failure is None:
                raise _url_error(error) from error
            if attempt == URL_ATTEMPTS:
                raise ImageDecodeError(f"{failure} ({URL_ATTEMPTS} attempts)") from error
            logger.info("reading %s failed (%s); trying again", url, failure)
            time.sleep(attempt)
        except (ImportError, ValueError) as error:
            raise _url_error(error) from error
    if len(data) > MAX_URL_BYTES:
        raise ImageDecodeError(
            f"file is larger than {MAX_URL_BYTES:,} bytes, the size of an uncompressed RGB image at the "
            "decompression-bomb limit; downscale it or copy it to a local folder"
        )
    return data


def _url_error(error: BaseException) -> ImageDecodeError:
    """Translate an fsspec error for one URL into the reason recorded for the image."""
    if isinstance(error, FileNotFoundError):
        return ImageDecodeError("file not found")
    if isinstance(error, IsADirectoryError):
        return ImageDecodeError("the URL is a folder, not a file")
    if isinstance(error, ImportError):
        return ImageDecodeError(f"the fsspec backend for this URL is not installed ({error})")
    if isinstance(error, ValueError):
        return ImageDecodeError(f"invalid URL: {error}")
    return ImageDecodeError(f"cannot read file: {error}")


def _glob_files(pattern: Path) -> list[str]:
    """Return the files matching ``pattern``, sorted, without entering symlinked folders below its fixed part.

    Python's ``glob`` follows symlinked folders under ``**``, so a link to an
    ancestor repeats every file down to the path-length limit. Folder
    sources skip symlinked folders (``os.walk`` without ``followlinks``), and
    so do patterns.
    """
    parts = pattern.parts
    fixed = next((index for index, part in enumerate(parts) if any(char in part for char in GLOB_CHARACTERS)), len(parts))
    root = Path(*parts[:fixed])
    items = []
    for item in glob.glob(str(pattern), recursive=True):
        # The folders between the fixed part and the file, e.g. a/b and a for root/a/b/x.jpg.
        folders = [root / folder for folder in Path(item).relative_to(root).parents if folder != Path(".")]
        if Path(item).is_file() and not any(folder.is_symlink() for folder in folders):
            items.append(item)
    return sorted(items)


def _walk_folder(folder: Path) -> list[str]:
    items = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                items.append(str(Path(root) / name))
    return items


def _url_filesystem(source: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(source)
    except ImportError as error:
        raise ConfigError(
            f"image source {source!r} needs an fsspec backend that is not installed ({error}); install it or copy the images to a local folder"
        ) from error
    except ValueError as error:
        raise ConfigError(f"image source {source!r} is not a valid fsspec URL ({error}); use e.g. file:///data/images") from error


def _list_url(source: str) -> list[str]:
    """List a URL source the way :func:`list_items` lists a local one; items come back as URLs."""
    fs, path = _url_filesystem(source)
    if any(char in path for char in GLOB_CHARACTERS):
        matches = fs.glob(path, detail=True)
        return [fs.unstrip_protocol(name) for name in sorted(matches) if matches[name]["type"] == "file"]
    if fs.isdir(path):
        # Same order as _walk_folder: each folder's files sorted, then its sub-folders sorted.
        found = []
        for root, dirs, files in fs.walk(path):
            dirs.sort()
            for name in sorted(files):
                if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(fs.unstrip_protocol(f"{root.rstrip('/')}/{name}"))
        return found
    if fs.isfile(path) and PurePosixPath(path).suffix.lower() in LIST_SUFFIXES:
        folder = str(PurePosixPath(path).parent)
        items = []
        for line in fs.cat_file(path).decode().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if is_url(line):
                items.append(line)
            else:
                entry = line if line.startswith("/") else f"{folder.rstrip('/')}/{line}"
                items.append(fs.unstrip_protocol(entry))
        return items
    if fs.isfile(path):
        return [source]
    raise ConfigError(
        f"image source {source!r} not found; pass a URL of a folder, a glob pattern, a .txt list or an image file"
    )


def list_items(source: str, crops_per_photo: int = 100) -> list[str]:
    """List the image items of a source.

    Parameters
    ----------
    source
        ``sample``; a folder (searched recursively for common image
        suffixes); a glob pattern (``**`` allowed); or a ``.txt``/``.lst``
        file with one path per line (relative paths resolve against the
        file's folder). Each of these may also be an fsspec URL
        (``memory://images``, ``file:///data/**/*.jpg``); its items are
        then URLs too.

    Raises
    ------
    ConfigError
        The source does not exist or lists no image.
    """
    if source == "sample":
        return sample_items(crops_per_photo)
    # Local items are absolute, so the store's image table does not depend on the working folder.
    path = Path(os.path.abspath(Path(source).expanduser()))
    if is_url(source):
        items = _list_url(source)
    elif path.is_dir():
        items = _walk_folder(path)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        items = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if is_url(line):
                items.append(line)
                continue
            items.append(os.path.abspath(path.parent / Path(line).expanduser()))
    elif any(char in source for char in GLOB_CHARACTERS):
        items = _glob_files(path)
    elif path.is_file():
        items = [str(path)]
    else:
        raise ConfigError(
            f"image source {source!r} not found; pass `sample`, a folder, a glob pattern or a .txt list of paths"
        )
    if not items:
        raise ConfigError(f"image source {source!r} contains no image files (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def stat_fingerprint(items: list[str]) -> str:
    """Return a short hash of the local files' sizes and modification times, to detect changed contents.

    Sample items and URLs count by name only; a missing file counts as size -1.
    """
    digest = hashlib.sha256()
    for item in items:
        if item.startswith(SAMPLE_PREFIX) or is_url(item):
            continue
        try:
            info = os.stat(item)
            digest.update(f"{info.st_size}:{info.st_mtime_ns}\0".encode())
        except OSError:
            digest.update(b"-1\0")
    return digest.hexdigest()[:16]


def fingerprint(items: list[str]) -> str:
    """Return a short hash of the item list, stored to detect a changed dataset on resume."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
