"""Images from users: decoded with a short list of decoders, bounded in bytes and pixels, errors a user can read."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps

from cloc_encoder.data.images import IMAGE_ERRORS
from serve import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, InputError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Decoders an image may use (no EPS/PostScript: PIL would run Ghostscript on it)."""


def load_image(
    source: bytes | str | os.PathLike[str] | Image.Image,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Image.Image:
    """An RGB image from encoded bytes, a local file path or a PIL image, checked: decodable (PNG, JPEG, WebP, GIF,
    BMP, TIFF), at most ``max_pixels`` pixels and ``max_bytes`` bytes encoded. EXIF orientation is applied.
    Raises :class:`~serve.InputError` with a message for the user."""
    if isinstance(source, Image.Image):
        check_pixels(source.size, max_pixels)
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: no such image file")
        if path.stat().st_size > max_bytes:
            raise InputError(f"{path}: the image file is larger than {max_bytes} bytes")
        data = path.read_bytes()
    if not data:
        raise InputError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InputError(f"the image is {len(data)} bytes; at most {max_bytes} are accepted")
    try:
        opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except IMAGE_ERRORS as error:
        raise InputError(f"could not decode the image ({', '.join(IMAGE_FORMATS)} are accepted): {error}") from error
    with opened:
        check_pixels(opened.size, max_pixels)
        try:
            opened.load()
            return ImageOps.exif_transpose(opened).convert("RGB")
        except IMAGE_ERRORS as error:
            raise InputError(f"the image is corrupt or truncated: {error}") from error


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Raise :class:`~serve.InputError` unless ``size`` ``(width, height)`` has 1 to ``max_pixels`` pixels."""
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"the image is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted")


__all__ = ["IMAGE_FORMATS", "check_pixels", "load_image"]
