"""Image decoding shared by prepare and caption: bytes → oriented RGB uint8 at the encoder's size.

Normalisation is not done here but inside the encoder, on its device (see ``capray.encoders``):
the CPU tasks hand uint8 arrays to the model actors, a quarter of the bytes of float32.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

from capray.errors import ConfigError

MAX_PIXELS = 100_000_000
"""Images with more pixels are refused as decompression bombs (PIL's own limit is ~179 M)."""


_ORIENTATION = 0x0112  # the EXIF tag


class ImageDecodeError(ConfigError):
    """Bytes that are not a usable image; the message is what goes in the ``error`` column."""


def decode_image(data: bytes, size: int, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """Decode, apply EXIF orientation, convert to RGB and resize to ``size``×``size``.

    Returns the (size, size, 3) uint8 array and the oriented source width and height.
    Raises ``ImageDecodeError`` with a short reason for anything that is not a decodable image.
    """
    with _opened(data, max_pixels) as image:
        width, height = image.size
        if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90°: a viewer swaps them
            width, height = height, width
        # JPEG: let libjpeg decode at a reduced scale when the target is much smaller (fast).
        image.draft("RGB", (size, size))
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.array(rgb, dtype=np.uint8)  # writable: torch.from_numpy wants it so
    return array, int(width), int(height)


def thumbnail(data: bytes, size: int, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode, apply EXIF orientation, convert to RGB and shrink to fit ``size``×``size``, keeping the
    aspect ratio (the gallery's thumbnails; the encoder's square input is ``decode_image``'s).

    Raises ``ImageDecodeError`` with a short reason for anything that is not a decodable image.
    """
    with _opened(data, max_pixels) as image:
        image.draft("RGB", (size, size))
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        rgb.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return rgb


@contextmanager
def _opened(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image PIL opens from ``data``, for the body of the ``with`` to decode; anything that goes
    wrong there (PIL raises many types: OSError, SyntaxError, ValueError, struct.error, ...) and images
    over ``max_pixels`` become one ``ImageDecodeError`` with a short reason."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image too large ({width}x{height} pixels > {max_pixels}): "
                                       "refused as a possible decompression bomb")
            yield image
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused as a possible decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}".strip()) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: PIL's convert("RGB") clips instead of scaling, so scale by hand.
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image
