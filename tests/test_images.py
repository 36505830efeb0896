"""capray.images: bytes → oriented RGB uint8 at the encoder's size, or ImageDecodeError."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from capray.images import ImageDecodeError, decode_image, thumbnail

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def solid(mode: str, size: tuple[int, int], color) -> Image.Image:
    return Image.new(mode, size, color)


def close_to(pixel, color, tol: int = 12) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(color)) <= tol))


def left_red_right_blue(width: int = 64, height: int = 32) -> Image.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = RED
    array[:, width // 2:] = BLUE
    return Image.fromarray(array)


# --- formats and modes -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_rgb_image_decodes_to_size_size_3_uint8(fmt):
    data = encode(left_red_right_blue(80, 40), fmt)
    array, width, height = decode_image(data, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert (width, height) == (80, 40)
    assert close_to(array[16, 4], RED, 40) and close_to(array[16, 28], BLUE, 40)


def test_resize_is_not_a_crop():
    # A 4:1 image is squashed to a square, so both halves are still visible.
    array, _, _ = decode_image(encode(left_red_right_blue(256, 64), "PNG"), 16)
    assert close_to(array[8, 2], RED) and close_to(array[8, 13], BLUE)


def test_large_jpeg_decoded_at_a_reduced_scale_keeps_its_colors():
    data = encode(left_red_right_blue(1024, 1024), "JPEG", quality=95)
    array, width, height = decode_image(data, 64)
    assert (width, height) == (1024, 1024)
    assert array.shape == (64, 64, 3)
    assert close_to(array[32, 8], RED, 30) and close_to(array[32, 56], BLUE, 30)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_becomes_three_equal_channels(fmt):
    array, _, _ = decode_image(encode(solid("L", (20, 10), 100), fmt), 8)
    assert array.shape == (8, 8, 3)
    assert (np.abs(array.astype(int) - 100) <= 2).all()
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_palette_image():
    image = left_red_right_blue(32, 16).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    array, _, _ = decode_image(data, 16)
    assert close_to(array[8, 2], RED) and close_to(array[8, 13], BLUE)


def test_palette_transparency_becomes_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    image.paste(1, (8, 0, 16, 16))
    data = encode(image, "PNG", transparency=0)  # the black half is transparent
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    array, _, _ = decode_image(data, 16)
    assert close_to(array[8, 1], WHITE) and close_to(array[8, 14], RED)


def test_rgba_transparent_areas_become_white_and_opaque_keep_their_color():
    array = np.zeros((16, 16, 4), dtype=np.uint8)  # transparent black everywhere...
    array[:, 8:] = (0, 0, 255, 255)  # ...except an opaque blue right half
    out, _, _ = decode_image(encode(Image.fromarray(array, "RGBA"), "PNG"), 16)
    assert close_to(out[8, 1], WHITE) and close_to(out[8, 14], BLUE)


def test_half_transparent_pixels_are_blended_on_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    out, _, _ = decode_image(encode(image, "PNG"), 8)
    assert close_to(out[4, 4], (127, 127, 127), 2)


def test_grey_with_alpha():
    image = Image.new("LA", (8, 8), (0, 0))
    out, _, _ = decode_image(encode(image, "PNG"), 8)
    assert close_to(out[4, 4], WHITE, 0)


def test_cmyk_jpeg():
    data = encode(solid("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    array, _, _ = decode_image(data, 16)
    assert close_to(array[8, 8], RED, 30)


@pytest.mark.parametrize("value,expected", [(32768, 128), (65535, 255), (0, 0), (16384, 64)])
def test_16_bit_grayscale_png_is_scaled_not_clipped(value, expected):
    data = encode(Image.fromarray(np.full((8, 8), value, dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    array, _, _ = decode_image(data, 4)
    assert (np.abs(array.astype(int) - expected) <= 1).all()


def test_bilevel_image():
    image = Image.new("1", (16, 16), 0)
    image.paste(1, (8, 0, 16, 16))
    array, _, _ = decode_image(encode(image, "PNG"), 16)
    assert close_to(array[8, 1], (0, 0, 0), 0) and close_to(array[8, 14], WHITE, 0)


# --- EXIF orientation --------------------------------------------------------------------------------

def _jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_rotates_content_and_swaps_size():
    # Stored 64 wide × 32 high, left red, right blue; orientation 6 means "rotate 90° clockwise to
    # view", so the viewer sees 32 × 64 with red on top and blue at the bottom.
    array, width, height = decode_image(_jpeg_with_orientation(left_red_right_blue(64, 32), 6), 32)
    assert (width, height) == (32, 64)
    assert close_to(array[2, 16], RED, 30) and close_to(array[29, 16], BLUE, 30)


def test_exif_orientation_8_rotates_the_other_way():
    array, width, height = decode_image(_jpeg_with_orientation(left_red_right_blue(64, 32), 8), 32)
    assert (width, height) == (32, 64)
    assert close_to(array[2, 16], BLUE, 30) and close_to(array[29, 16], RED, 30)


def test_exif_orientation_3_turns_upside_down_without_swapping():
    array, width, height = decode_image(_jpeg_with_orientation(left_red_right_blue(64, 32), 3), 32)
    assert (width, height) == (64, 32)
    assert close_to(array[16, 2], BLUE, 30) and close_to(array[16, 29], RED, 30)


def test_exif_orientation_1_changes_nothing():
    array, width, height = decode_image(_jpeg_with_orientation(left_red_right_blue(64, 32), 1), 32)
    assert (width, height) == (64, 32)
    assert close_to(array[16, 2], RED, 30) and close_to(array[16, 29], BLUE, 30)


# --- errors ------------------------------------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose IHDR (CRC fixed up) claims another size."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_empty_bytes():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", 32)


def test_truncated_jpeg():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], 32)


def test_random_bytes():
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(np.random.default_rng(0).bytes(1000), 32)


def test_text_file():
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(b"a caption, not an image\n" * 20, 32)


@pytest.mark.parametrize("width,height", [(30000, 30000), (12000, 12000)])
def test_decompression_bomb_header_is_refused(width, height):
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_png_claiming(width, height), 32)


def test_max_pixels_refuses_a_normal_image_above_it():
    data = encode(solid("RGB", (64, 64), RED), "PNG")
    with pytest.raises(ImageDecodeError, match=r"too large \(64x64 pixels > 1000\)"):
        decode_image(data, 32, max_pixels=1000)
    assert decode_image(data, 32, max_pixels=64 * 64)[0].shape == (32, 32, 3)


def test_errors_are_one_line():
    for data in (b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 10, b"GIF89a" + b"\xff" * 5):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, 32)
        assert "\n" not in str(info.value)


# --- gallery thumbnails ------------------------------------------------------------------------------

def test_thumbnail_keeps_the_aspect_ratio_and_the_exif_orientation():
    # Stored 640 × 320, left red, right blue, orientation 6: seen 320 wide × 640 high, red on top.
    thumb = thumbnail(_jpeg_with_orientation(left_red_right_blue(640, 320), 6), 64)
    assert thumb.mode == "RGB" and thumb.size == (32, 64)
    assert close_to(thumb.getpixel((16, 4)), RED, 30) and close_to(thumb.getpixel((16, 59)), BLUE, 30)


def test_thumbnail_of_transparency_is_on_white_and_of_garbage_an_error():
    rgba = Image.new("RGBA", (40, 20), (0, 0, 255, 0))
    assert close_to(thumbnail(encode(rgba, "PNG"), 64).getpixel((5, 5)), WHITE)
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        thumbnail(b"not an image at all" * 10, 64)
