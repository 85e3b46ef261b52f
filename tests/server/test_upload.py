"""Tests of upload validation and of turning a query result into what the page shows."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from atlas.errors import ImageDecodeError, QueryError
from atlas.query import query_image
from server import state
from server.upload import (
    MEGABYTE,
    best_hits,
    cells_from_result,
    decode_upload,
    display_name,
    explain_upload,
    format_megabytes,
    read_upload,
    search_upload,
)
from tests.server.store_builder import BuiltStore


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(size: tuple[int, int] = (32, 24), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_upload_returns_bytes() -> None:
    data = png_bytes()
    assert decode_upload(encode(data), len(data)) == data


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (None, "contains no file"),
        (["a", "b"], "contains no file"),
        ("not base64!!", "not valid base64"),
    ],
)
def test_decode_upload_rejects(value: object, match: str) -> None:
    with pytest.raises(QueryError, match=match):
        decode_upload(value, MEGABYTE)


def test_decode_upload_rejects_oversized_before_decoding() -> None:
    data = b"\0" * (MEGABYTE // 2)
    with pytest.raises(QueryError, match=r"the file is 0.5 MB, above the 0.25 MB upload limit \(serve.max_upload_mb\)"):
        decode_upload(encode(data), MEGABYTE // 4)
    # Exactly at the limit is accepted.
    assert len(decode_upload(encode(data), MEGABYTE // 2)) == MEGABYTE // 2


def test_read_upload_rejects_non_image_and_bomb() -> None:
    with pytest.raises(ImageDecodeError, match="not an image"):
        read_upload(encode(b"just some text, not pixels"), MEGABYTE)

    # 10,000 x 10,000 one-bit pixels compress to a few kilobytes but exceed Pillow's bomb limit.
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MEGABYTE
    with pytest.raises(ImageDecodeError, match="decompression-bomb|decompression bomb"):
        read_upload(encode(buffer.getvalue()), MEGABYTE)


def test_read_upload_logs_file_name(caplog: pytest.LogCaptureFixture) -> None:
    # Orientation 6 with a 1/0 XResolution, so the decoder ignores the EXIF block and warns.
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x011A] = TiffImagePlugin.IFDRational(1, 0)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), 128).save(buffer, format="JPEG", exif=exif.tobytes())

    with caplog.at_level(logging.WARNING, logger="atlas.images"):
        image = read_upload(encode(buffer.getvalue()), MEGABYTE, name="holiday.jpg")

    assert image.size == (32, 24)
    assert "ignoring malformed EXIF in holiday.jpg" in caplog.text


def test_read_upload_decodes_rgb() -> None:
    image = read_upload(encode(png_bytes(mode="L")), MEGABYTE)
    assert image.mode == "RGB"
    assert image.size == (32, 24)


def test_display_name_is_printable_and_short() -> None:
    assert display_name("cat.png") == "cat.png"
    assert display_name(None) == "upload"
    assert display_name("a\x00b\nc.png") == "abc.png"
    long = display_name("x" * 300)
    assert len(long) == 80
    assert long.endswith("…")


def test_format_megabytes() -> None:
    assert format_megabytes(MEGABYTE // 4) == "0.25 MB"
    assert format_megabytes(10 * MEGABYTE) == "10 MB"


def test_query_summaries_match_result(built_store: BuiltStore) -> None:
    image = Image.open(built_store.image_paths[5]).convert("RGB")
    result = query_image(built_store.path, image, k=4)

    cells = cells_from_result(result)
    assert sorted(cells) == built_store.sizes
    for size, entries in cells.items():
        assert [(c.i, c.j, c.count) for c in entries] == [(c.i, c.j, c.count) for c in result.cells[size]]

    hits = best_hits(result, 5)
    assert len(hits) == 5
    assert len({hit.image for hit in hits}) == 5
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    # Every chosen hit is the best hit of its image over all positions.
    for hit in hits:
        best = max(h.score for p in result.positions for h in p.hits if h.image == hit.image)
        assert hit.score == pytest.approx(best)


def test_search_upload_finds_its_own_image(built_store: BuiltStore, serve_config) -> None:
    state.configure([str(built_store.path)], serve_config)
    store = state.get_store(0)
    image = Image.open(built_store.image_paths[7]).convert("RGB")
    result = search_upload(store, built_store.layer, image, "photo.png", neighbors=3)

    assert result.filename == "photo.png"
    assert result.thumbnail.startswith("data:image/png;base64,")
    assert len(result.matches) == 3
    # The query image is in the store, so its own rows are the closest (cosine about 1).
    assert result.matches[0].name == built_store.image_paths[7]
    assert result.matches[0].score == pytest.approx(1.0, abs=1e-2)
    assert all(match.uri is not None for match in result.matches)
    assert set(result.cells) == set(built_store.sizes)
    assert result.map_shape[0] * result.map_shape[1] > 0
    assert np.isfinite(result.seconds)


def test_explain_upload_gives_overlays(built_store: BuiltStore, serve_config) -> None:
    state.configure([str(built_store.path)], serve_config)
    store = state.get_store(0)
    image = Image.open(built_store.image_paths[1]).convert("RGB")
    panels = explain_upload(store, image)

    assert [caption.split(":")[0] for caption, _ in panels] == ["Grad-CAM", "Saliency"]
    for caption, uri in panels:
        assert "(" in caption
        overlay = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        # TinyNet loaded from a file gets a 224 px input (resize 256, centre crop 224).
        assert overlay.size == (224, 224)
