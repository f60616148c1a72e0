"""What reading an image file can raise, in one place: every loader of the project (training data, VESL, the
benchmarks, serving) catches :data:`IMAGE_ERRORS` around ``Image.open(...)`` / ``image.load()`` and reports or skips
that image instead of failing the run.
"""

from __future__ import annotations

from PIL import Image

IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # missing or unreadable file, UnidentifiedImageError (not an image), "image file is truncated"
    ValueError,  # invalid header values (sizes, modes) found while decoding
    SyntaxError,  # malformed headers: several PIL plugins raise it ("broken PNG file", "not a TIFF file")
    EOFError,  # data that ends inside a frame
    Image.DecompressionBombError,  # more than twice Image.MAX_IMAGE_PIXELS; a plain Exception, not an OSError
)
"""The exceptions PIL raises for a file that is not a readable image."""

__all__ = ["IMAGE_ERRORS"]
