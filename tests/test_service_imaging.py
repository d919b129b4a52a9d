"""Boundaries of the server's image decoding and fitting that the engine's tests leave
open: each test here failed against a small change to explaind.imaging (a limit off by
one, a check on one side only, a rounding dropped) that the other tests let through."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from explaind.errors import InvalidArgument
from explaind.imaging import MAX_IMAGE_SIDE, InputGeometry, decode_array, decode_encoded, encode_png


def _encoded(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("height, width", [(1, MAX_IMAGE_SIDE + 1), (MAX_IMAGE_SIDE + 1, 1)])
def test_an_image_file_longer_than_the_largest_side_either_way_is_refused(height, width):
    data = encode_png(np.zeros((height, width, 3), np.uint8))
    with pytest.raises(InvalidArgument, match=rf"^images\[0\].encoded: image is {width}x{height}; the largest side allowed is {MAX_IMAGE_SIDE}$"):
        decode_encoded(data, field="images[0].encoded")
    fits = encode_png(np.zeros((min(height, MAX_IMAGE_SIDE), min(width, MAX_IMAGE_SIDE), 3), np.uint8))
    assert decode_encoded(fits, field="x").shape == (3, min(height, MAX_IMAGE_SIDE), min(width, MAX_IMAGE_SIDE))


def test_negative_integer_greyscale_pixels_are_refused_not_wrapped_round():
    # A signed 32-bit TIFF (mode I) may hold values below 0; cast to unsigned they would
    # become near-white pixels.
    with pytest.raises(InvalidArgument, match=r"^f: integer greyscale pixels must lie in \[0, 65535\], got \[-1, 300\]$"):
        decode_encoded(_encoded(np.array([[-1, 0, 300]], np.int32), "TIFF"), field="f")


def test_a_jpeg_of_as_many_scans_as_the_limit_decodes_and_one_more_is_refused():
    from explaind.imaging import MAX_JPEG_SCANS

    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    scans = data.count(b"\xff\xda")  # entropy-coded data stuffs its FF bytes with 00: these are the markers
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # up to EOI; libjpeg decodes a repeated scan again

    def with_scans(count: int) -> bytes:
        return data[:-2] + last_scan * (count - scans) + data[-2:]

    assert decode_encoded(with_scans(MAX_JPEG_SCANS), field="f").shape == (3, 16, 16)
    with pytest.raises(InvalidArgument, match=rf"^f: JPEG has {MAX_JPEG_SCANS + 1} scans; at most {MAX_JPEG_SCANS} are decoded$"):
        decode_encoded(with_scans(MAX_JPEG_SCANS + 1), field="f")


def test_the_centre_crop_of_a_tall_image_splits_an_odd_margin_as_centercrop_does():
    # CenterCrop's top is int(round(203 / 2)) = 102 rows, as its left is for a wide image.
    tall = np.random.default_rng(0).integers(0, 256, (403, 300, 3), dtype=np.uint8)
    cropped = decode_array(tall, field="x", geometry=InputGeometry(200, 300))  # the shorter side is already 300: no resampling
    assert torch.equal(cropped, decode_array(np.ascontiguousarray(tall[102:302, 50:250]), field="x"))


@pytest.mark.parametrize("low, high", [(-2e-3, 1.0), (0.0, 1.002)])
def test_float_pixels_past_the_rounding_tolerance_are_refused_not_clamped(low, high):
    # 1e-3 either side of [0, 1] is rounding (and clamped); beyond it the pixels were made
    # for another range, which clamping would hide.
    with pytest.raises(InvalidArgument, match=r"^x: float pixels must lie in \[0, 1\]"):
        decode_array(np.array([[[low, high]]] * 3, np.float32), field="x")


@pytest.mark.parametrize("shape, data, field, message", [
    ((-1, -2, 3), bytes(6), "x.shape", r"negative dimension in shape \(-1, -2, 3\)"),  # its product, 6, matches the bytes
    ((2, 2, 3), bytes(13), "x.data", r"shape \(2, 2, 3\) of uint8 needs 12 bytes, got 13"),  # one byte too many, not too few
])
def test_a_tensor_whose_shape_does_not_describe_its_bytes_is_refused_naming_the_part(shape, data, field, message):
    from explaind.imaging import array_from_buffer

    with pytest.raises(InvalidArgument, match=rf"^{re.escape(field)}: {message}$") as refused:
        array_from_buffer("uint8", shape, data, field="x")
    assert refused.value.field == field


def test_captioned_tiles_are_scaled_up_by_a_whole_factor_to_at_least_the_caption_width():
    from explaind.imaging import MIN_CAPTIONED_TILE_WIDTH, image_grid

    tile = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    grid = image_grid([tile], ["x"])
    scale = 3  # 2 x 50 is under 128
    assert 50 * scale >= MIN_CAPTIONED_TILE_WIDTH > 50 * (scale - 1)
    assert grid.shape == (30 * scale + 12, 50 * scale, 3)
    assert np.array_equal(grid[:90], np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1))  # nearest neighbour


def test_a_caption_stays_under_its_own_tile_and_each_row_starts_below_the_captions_above():
    from explaind.imaging import image_grid

    red, blue, green = (np.full((128, 128, 3), colour, np.uint8) for colour in ((200, 0, 0), (0, 0, 200), (0, 200, 0)))
    grid = image_grid([red, blue, green], ["a very long caption that would run on past its tile", "", ""], columns=2)
    assert grid.shape == (2 * (128 + 12), 2 * 128, 3)
    inked = (grid[128:140] < 128).all(axis=2)  # the first row's caption strip
    assert inked[:, :128].any() and not inked[:, 128:].any()
    assert (grid[:128, 128:] == (0, 0, 200)).all() and (grid[140:268, :128] == (0, 200, 0)).all()


def test_bytes_after_a_png_s_end_are_not_read_as_its_chunks():
    # What follows IEND (a file appended by some tools) is not read by Pillow: chunks that
    # would be refused before it are no reason to refuse the image after it.
    import struct
    import zlib

    from explaind.imaging import decode_pixels

    profile = b"p\x00\x00" + zlib.compress(bytes(100))
    chunk = struct.pack(">I", len(profile)) + b"iCCP" + profile + struct.pack(">I", zlib.crc32(b"iCCP" + profile))
    data = encode_png(np.full((8, 8, 3), 7, np.uint8)) + chunk * 2
    assert decode_pixels(data, field="f").shape == (8, 8, 3)
