"""Boundaries of the server's image decoding and fitting that the engine's tests leave
open: each test here failed against a small change to explaind.imaging (a limit off by
one, a check on one side only, a rounding dropped) that the other tests let through."""

from __future__ import annotations

import functools
import io
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, features
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from explaind.errors import InvalidArgument
from explaind.imaging import ENCODED_FORMATS, MAX_IMAGE_SIDE, InputGeometry, PixelBudget, _grey16_to_rgb8, decode_array, decode_encoded, decode_pixels, encode_png, to_uint8_hwc
from explaind.service.convert import new_sample
from explaind.v1 import common_pb2, sample_sets_pb2


def _encoded(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("height, width", [(1, MAX_IMAGE_SIDE + 1), (MAX_IMAGE_SIDE + 1, 1)])
def test_an_image_file_longer_than_the_largest_side_either_way_is_refused(height, width):
    data = encode_png(np.zeros((height, width, 3), np.uint8))
    with pytest.raises(InvalidArgument, match=rf"^images\[0\].encoded: image is {width}x{height}; the largest side allowed is {MAX_IMAGE_SIDE}$"):
        decode_encoded(data, field="images[0].encoded")
    fits = encode_png(np.zeros((min(height, MAX_IMAGE_SIDE), min(width, MAX_IMAGE_SIDE), 3), np.uint8))
    assert decode_encoded(fits, field="x").shape == (3, min(height, MAX_IMAGE_SIDE), min(width, MAX_IMAGE_SIDE))


def _with_width(format: str, width: int) -> bytes:
    """An 8x8 file of ``format`` whose header says it is ``width`` wide (the pixels left as they are)."""
    if format == "GIF":  # its logical screen and its image, to which Pillow widens the screen
        gif, first_image = _gif_and_first_image()
        data = bytearray(gif)
        data[6:8] = data[first_image + 5:first_image + 7] = struct.pack("<H", width)
        return bytes(data)
    data = bytearray(_encoded(np.zeros((8, 8, 3), np.uint8), format))
    if format == "PNG":  # IHDR first, its CRC recomputed
        return bytes(data[:8] + _png_chunk(b"IHDR", struct.pack(">I", width) + data[20:29]) + data[33:])
    if format == "TIFF":  # the ImageWidth entry (tag 256) of the first directory
        directory = struct.unpack("<I", data[4:8])[0]
        at = next(entry for entry in range(directory + 2, len(data), 12) if struct.unpack("<H", data[entry:entry + 2])[0] == 256)
        data[at + 8:at + 12] = struct.pack("<H", width) + b"\0\0" if struct.unpack("<H", data[at + 2:at + 4])[0] == 3 else struct.pack("<I", width)
    elif format == "JPEG":  # SOF0: its height, then its width
        at = data.index(b"\xff\xc0") + 7
        data[at:at + 2] = struct.pack(">H", width)
    elif format == "WEBP":  # the VP8 frame header after its start code
        at = data.index(b"\x9d\x01\x2a") + 3
        data[at:at + 2] = struct.pack("<H", width)
    else:  # BMP's info header
        data[18:22] = struct.pack("<i", width)
    return bytes(data)


@pytest.mark.parametrize("format", ENCODED_FORMATS)
def test_an_image_file_zero_pixels_wide_is_refused_in_every_format_decoded(format):
    # decode_pixels keeps no zero-size check of its own: Pillow (10.0, the lowest the
    # project admits, as 13) refuses such a header as no image while opening it, and
    # libwebp its VP8 frame. (A GIF's screen alone is widened to its image's width.)
    with Image.open(io.BytesIO(_with_width(format, 4))) as narrower:
        assert narrower.size == (4, 8)  # the field patched is the width
    zero_wide = _with_width(format, 0)
    with pytest.raises(OSError):  # UnidentifiedImageError, or libwebp's OSError: refused as it is opened
        Image.open(io.BytesIO(zero_wide), formats=ENCODED_FORMATS)
    with pytest.raises(InvalidArgument) as refused:
        decode_encoded(zero_wide, field="images[0].encoded")
    assert refused.value.field == "images[0].encoded"


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_float_tensor_with_a_nan_or_an_infinity_is_refused(bad, dtype):
    pixels = np.full((3, 4, 4), 0.5, dtype)
    pixels[1, 2, 3] = bad
    with pytest.raises(InvalidArgument, match=r"^x: tensor contains NaN or infinite values$"):
        decode_array(pixels, field="x")


class _FullSizeAllocations(TorchDispatchMode):
    """The dtypes of the tensors of at least ``numel`` elements that the torch ops run
    inside allocate: outputs sharing no input's storage (an in-place op or a view
    allocates none)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.dtypes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        given = {leaf.untyped_storage().data_ptr() for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)}
        self.dtypes += [leaf.dtype for leaf in pytree.tree_leaves(output)
                        if isinstance(leaf, torch.Tensor) and leaf.numel() >= self.numel and leaf.untyped_storage().data_ptr() not in given]
        return output


@pytest.mark.parametrize("shape", [(3, 40, 50), (40, 50, 3)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_float_tensor_is_checked_and_clamped_in_its_one_float32_copy(shape, dtype):
    # Every gRPC worker thread may decode a max_message_bytes tensor at once: a temporary of
    # its size per check (isfinite's) or an out-of-place clamp multiplied the server's peak.
    pixels = np.random.default_rng(0).uniform(-5e-4, 1 + 5e-4, shape).astype(dtype)
    with _FullSizeAllocations(pixels.size) as allocations:
        decoded = decode_array(pixels, field="x")
    assert allocations.dtypes == []
    expected = np.clip(pixels.astype(np.float32), 0, 1)
    assert torch.equal(decoded, torch.from_numpy(expected if shape[0] == 3 else expected.transpose(2, 0, 1)))


def test_float_pixels_become_uint8_through_one_float_copy_leaving_the_given_tensor_as_it_was():
    image = torch.rand(3, 40, 50) * 1.2 - 0.1
    given = image.clone()
    with _FullSizeAllocations(image.numel()) as allocations:
        pixels = to_uint8_hwc(image)
    assert allocations.dtypes == [torch.float32, torch.uint8]
    assert torch.equal(image, given)
    assert np.array_equal(pixels, np.round(np.clip(given.numpy(), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0))


@pytest.mark.parametrize("dtype, kind", [(np.float16, common_pb2.DATA_TYPE_FLOAT16), (np.float32, common_pb2.DATA_TYPE_FLOAT32)])
def test_an_uploaded_float_tensor_becomes_png_through_its_one_float32_copy(dtype, kind):
    # An upload's tensor was copied again to scale it to uint8: one more float32 copy per
    # worker thread at once, the largest allocation of a maximal CreateSampleSet.
    pixels = np.random.default_rng(0).random((3, 40, 50)).astype(dtype)
    sample = sample_sets_pb2.Sample(image=common_pb2.Image(tensor=common_pb2.Tensor(dtype=kind, shape=pixels.shape, data=pixels.tobytes())), label=1)
    with _FullSizeAllocations(pixels.size) as allocations:
        stored = new_sample(sample, field="samples[0]", budget=PixelBudget(10**6, field="samples"), jpeg_min_side=0)
    assert allocations.dtypes == [torch.uint8]
    expected = np.round(pixels.astype(np.float32) * 255).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(decode_pixels(stored.encoded, field="x"), expected)


def test_a_16_bit_greyscale_file_becomes_rgb_through_one_uint32_copy():
    # Every worker thread may decode a 4096² file at once, however small the file: the
    # scaling's temporaries held 8 bytes a pixel besides the file's own.
    values = np.random.default_rng(0).integers(0, 65536, (300, 200), dtype=np.uint16)
    tracemalloc.start()
    try:
        pixels = _grey16_to_rgb8(values, field="x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5.5 * values.size  # the uint32 copy and the uint8 grey, then the grey and the RGB
    grey = ((values.astype(np.uint64) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(pixels, np.stack([grey] * 3, axis=2))


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 4), np.uint8), r"expected 3 dimensions \(H, W, 3\) or \(3, H, W\), got shape \(4, 4\)"),
    (np.zeros((4, 4, 3), np.int32), r"unsupported dtype int32; use uint8, float16 or float32"),  # not read as uint8 or as floats in [0, 1]
    (np.zeros((4, 4, 3), np.float64), r"unsupported dtype float64; use uint8, float16 or float32"),
])
def test_an_array_decode_array_cannot_read_as_pixels_is_refused_naming_why(array, message):
    # A request's tensor is checked by array_from_buffer first; decode_array keeps its own
    # check for code that calls it with an array (an int32 one read as floats would be garbage).
    with pytest.raises(InvalidArgument, match=rf"^x: {message}$"):
        decode_array(array, field="x")


def test_a_geometry_with_an_interpolation_torchvision_s_transforms_do_not_name_is_refused():
    # [classifier].interpolation is checked with the config; a loader's own value (a
    # torchvision weights' transforms) is checked here, before any image is resized with it.
    with pytest.raises(ValueError, match=r"^interpolation must be one of \('bilinear', 'bicubic'\), got 'nearest'$"):
        InputGeometry(64, interpolation="nearest")


@pytest.mark.parametrize("shape, data, field, message", [
    ((-1, -2, 3), bytes(6), "x.shape", r"negative dimension in shape \(-1, -2, 3\)"),  # its product, 6, matches the bytes
    ((2, 2, 3), bytes(13), "x.data", r"shape \(2, 2, 3\) of uint8 needs 12 bytes, got 13"),  # one byte too many, not too few
    ((4, 4), bytes(16), "x.shape", r"expected 3 dimensions \(H, W, 3\) or \(3, H, W\), got 2"),
    ((0, 4, 3), b"", "x.shape", r"tensor is empty \(shape \(0, 4, 3\)\)"),  # its product, 0, matches the bytes
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
    profile = _png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(bytes(100)))
    data = encode_png(np.full((8, 8, 3), 7, np.uint8)) + profile * 2
    assert decode_pixels(data, field="f").shape == (8, 8, 3)


def test_empty_image_bytes_are_refused_as_empty():
    with pytest.raises(InvalidArgument, match=r"^images\[0\].encoded: image bytes are empty$"):
        decode_encoded(b"", field="images[0].encoded")


def test_an_image_file_is_charged_to_the_request_s_pixel_budget_before_its_pixels_decode():
    from explaind.imaging import PixelBudget

    data = encode_png(np.zeros((8, 10, 3), np.uint8))
    budget = PixelBudget(100, field="images")
    assert decode_encoded(data, field="images[0].encoded", budget=budget).shape == (3, 8, 10)
    assert budget.used == 80
    # Cut after its header and the start of its image data, the second file would fail to
    # decode; it is refused from its header first.
    with pytest.raises(InvalidArgument, match=r"^images: the images decode to more than the limit of 100 pixels per request"):
        decode_encoded(data[:8 + 25 + 10], field="images[1].encoded", budget=budget)


def _progressive_jpeg(**options) -> tuple[bytes, bytes]:
    """A 16x16 progressive JPEG and its last scan, from its SOS marker up to EOI."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, "JPEG", progressive=True, **options)
    data = buffer.getvalue()
    return data, data[data.rindex(b"\xff\xda"):-2]


@pytest.mark.parametrize("before_scans, options", [
    (b"\xff\xfe\x00\x02\xff", {}),  # an empty comment, then a fill byte (which libjpeg skips) before each scan's marker
    (b"", {"restart_marker_blocks": 1}),  # restart markers (FF D0-D7) inside each scan's data
])
def test_repeated_scans_are_counted_past_fill_bytes_and_restart_markers(before_scans, options):
    from explaind.imaging import MAX_JPEG_SCANS

    data, last_scan = _progressive_jpeg(**options)
    scans = data.count(b"\xff\xda")
    bomb = data[:-2] + (before_scans + last_scan) * (MAX_JPEG_SCANS + 1 - scans) + data[-2:]
    with Image.open(io.BytesIO(bomb)) as image:
        image.load()  # libjpeg decodes every scan
    with pytest.raises(InvalidArgument, match=rf"^f: JPEG has {MAX_JPEG_SCANS + 1} scans; at most {MAX_JPEG_SCANS} are decoded$"):
        decode_encoded(bomb, field="f")


def test_a_stray_byte_between_segments_does_not_hide_the_scans_after_it():
    # libjpeg, as Pillow while it opens the file, skips bytes that are no marker between
    # segments and decodes every scan after them: the walk ended at such a byte, so a scan
    # bomb behind one byte was decoded uncounted.
    from explaind.imaging import MAX_JPEG_SCANS

    data, last_scan = _progressive_jpeg()
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    scans = data.count(b"\xff\xda")
    bomb = data[:after_app0] + b"\x00" + data[after_app0:-2] + last_scan * (MAX_JPEG_SCANS + 1 - scans) + data[-2:]
    with Image.open(io.BytesIO(bomb)) as image:
        image.load()  # libjpeg decodes every scan
    with pytest.raises(InvalidArgument, match=rf"^f: JPEG has {MAX_JPEG_SCANS + 1} scans; at most {MAX_JPEG_SCANS} are decoded$"):
        decode_encoded(bomb, field="f")


def test_a_marker_without_a_length_between_scans_does_not_hide_the_scans_after_it():
    # TEM (FF 01), like SOI and RSTn, has no length field; libjpeg skips it between scans.
    from explaind.imaging import MAX_JPEG_SCANS

    data, last_scan = _progressive_jpeg()
    bomb = data[:-2] + b"\xff\x01" + last_scan * MAX_JPEG_SCANS + data[-2:]
    with Image.open(io.BytesIO(bomb)) as image:
        image.load()
    with pytest.raises(InvalidArgument, match=r"^f: JPEG has \d+ scans"):
        decode_encoded(bomb, field="f")


def test_a_second_jpeg_after_the_first_one_s_end_is_not_counted():
    # Pillow decodes the first image; what follows its EOI (here two bytes of padding and
    # another file) is never decoded, whatever scans it holds.
    from explaind.imaging import MAX_JPEG_SCANS

    data, last_scan = _progressive_jpeg()
    second = data[:-2] + last_scan * MAX_JPEG_SCANS + data[-2:]
    assert decode_encoded(data + b"\x00\x02" + second, field="f").shape == (3, 16, 16)


def test_a_jpeg_of_as_many_markers_as_the_limit_decodes():
    from explaind.imaging import MAX_JPEG_MARKERS

    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, "JPEG")
    plain = buffer.getvalue()
    markers = len(re.findall(rb"\xff[^\x00\xd0-\xd7\xff]", plain[2:]))  # a baseline file: its segments, SOS and EOI
    padded = plain[:-2] + b"\xff\xfe\x00\x02" * (MAX_JPEG_MARKERS - markers) + plain[-2:]
    assert decode_encoded(padded, field="f").shape == (3, 16, 16)
    with pytest.raises(InvalidArgument, match=rf"^f: JPEG has over {MAX_JPEG_MARKERS} markers"):
        decode_encoded(padded[:-2] + b"\xff\xfe\x00\x02" + plain[-2:], field="f")


def _png_of_chunks(*chunks: bytes) -> bytes:
    """An 8x8 black RGB PNG of its IHDR, ``chunks``, its one IDAT and IEND."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    pixels = _png_chunk(b"IDAT", zlib.compress(bytes(1 + 8 * 3) * 8))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + pixels + _png_chunk(b"IEND", b"")


def test_compressed_international_text_chunks_count_against_the_text_limit():
    from explaind.imaging import MAX_PNG_COMPRESSED_TEXT_CHUNKS

    text = _png_chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + zlib.compress(bytes(1000)))  # compressed, no language or translation
    assert decode_encoded(_png_of_chunks(*[text] * MAX_PNG_COMPRESSED_TEXT_CHUNKS), field="f").shape == (3, 8, 8)
    with pytest.raises(InvalidArgument, match=rf"^f: PNG has over {MAX_PNG_COMPRESSED_TEXT_CHUNKS} zTXt/iTXt chunks"):
        decode_encoded(_png_of_chunks(*[text] * (MAX_PNG_COMPRESSED_TEXT_CHUNKS + 1)), field="f")


def test_a_png_of_as_many_chunks_as_the_limit_decodes():
    from explaind.imaging import MAX_PNG_CHUNKS

    text = _png_chunk(b"tEXt", b"k\x00v")
    assert decode_encoded(_png_of_chunks(*[text] * (MAX_PNG_CHUNKS - 3)), field="f").shape == (3, 8, 8)  # and IHDR, IDAT, IEND
    with pytest.raises(InvalidArgument, match=rf"^f: PNG has over {MAX_PNG_CHUNKS} chunks"):
        decode_encoded(_png_of_chunks(*[text] * (MAX_PNG_CHUNKS - 2)), field="f")


def _gif_and_first_image() -> tuple[bytes, int]:
    """An 8x8 GIF with no extension blocks, and where its image descriptor starts."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "GIF")
    data = buffer.getvalue()
    first_image = 13 + (3 << ((data[10] & 7) + 1))  # after the global colour table
    assert data[first_image] == 0x2C
    return data, first_image


def test_a_gif_of_as_many_extension_blocks_as_the_limit_decodes():
    from explaind.imaging import MAX_GIF_BLOCKS

    data, first_image = _gif_and_first_image()
    empty_comment = b"\x21\xfe\x00"  # one block: its terminator
    assert decode_encoded(data[:first_image] + empty_comment * MAX_GIF_BLOCKS + data[first_image:], field="f").shape == (3, 8, 8)
    with pytest.raises(InvalidArgument, match=rf"^f: GIF has over {MAX_GIF_BLOCKS} extension blocks"):
        decode_encoded(data[:first_image] + empty_comment * (MAX_GIF_BLOCKS + 1) + data[first_image:], field="f")


def test_the_extension_blocks_of_a_gif_with_only_a_local_colour_table_are_counted():
    from explaind.imaging import MAX_GIF_BLOCKS

    data, first_image = _gif_and_first_image()
    flags, palette = data[10], data[13:first_image]
    descriptor = data[first_image:first_image + 9] + bytes((0x80 | (flags & 7),)) + palette  # the table moved to the image
    local_only = data[:10] + bytes((flags & 0x7F,)) + data[11:13] + descriptor + data[first_image + 10:]
    assert decode_encoded(local_only, field="f")[:, 0, 0].tolist() == decode_encoded(data, field="f")[:, 0, 0].tolist()
    with pytest.raises(InvalidArgument, match=rf"^f: GIF has over {MAX_GIF_BLOCKS} extension blocks"):
        decode_encoded(local_only[:13] + b"\x21\xfe\x00" * (MAX_GIF_BLOCKS + 1) + local_only[13:], field="f")


def test_a_file_shorter_than_a_gif_header_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument, match=r"^images\[0\].encoded: bytes are not an image") as refused:
        decode_encoded(b"GIF89a\x08\x00\x08", field="images[0].encoded")
    assert refused.value.field == "images[0].encoded"


def test_an_empty_tensor_is_refused_before_its_pixels_are_read():
    for empty in (np.zeros((0, 4, 3), np.uint8), np.zeros((3, 0, 4), np.float32)):  # NumPy arrays of the engine's callers
        with pytest.raises(InvalidArgument, match=r"^x: tensor is empty \(shape \(\d, \d, \d\)\)$"):
            decode_array(empty, field="x")


def test_uint8_pixels_of_four_channels_are_refused_naming_the_shape():
    with pytest.raises(InvalidArgument, match=r"^x.shape: uint8 images must be \(H, W, 3\), got shape \(4, 4, 4\)$") as refused:
        decode_array(np.zeros((4, 4, 4), np.uint8), field="x")
    assert refused.value.field == "x.shape"


@pytest.mark.parametrize("shape", [(3, 1, MAX_IMAGE_SIDE + 1), (1, MAX_IMAGE_SIDE + 1, 3)])
def test_a_float_tensor_too_wide_is_refused_giving_its_width_and_height(shape):
    with pytest.raises(InvalidArgument, match=rf"^x: image is {MAX_IMAGE_SIDE + 1}x1; the largest side allowed is {MAX_IMAGE_SIDE}$"):
        decode_array(np.zeros(shape, np.float32), field="x")


def test_an_unsupported_tensor_dtype_is_refused_naming_the_dtype():
    from explaind.imaging import array_from_buffer

    with pytest.raises(InvalidArgument, match=r"^x.dtype: unsupported dtype 'float64'; use one of \['float16', 'float32', 'uint8'\]$"):
        array_from_buffer("float64", (1, 1, 3), bytes(24), field="x")


def test_an_rgba_file_decodes_to_its_rgb_pixels_without_the_alpha():
    rgba = np.random.default_rng(0).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    assert np.array_equal(decode_pixels(_encoded(rgba, "PNG"), field="f"), rgba[:, :, :3])


def test_a_job_image_png_is_lossless_and_a_sample_s_keeps_pillow_s_default_bytes():
    from explaind.imaging import JOB_IMAGE_COMPRESS_LEVEL

    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    fast = encode_png(pixels, compress_level=JOB_IMAGE_COMPRESS_LEVEL)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast))), pixels)
    # A stored sample's bytes, and so its digest, are those Pillow's default level made:
    # an upgrade re-encoding the same pixels otherwise stored every image a second time.
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert encode_png(pixels) == buffer.getvalue() != fast


def _with_orientation(array: np.ndarray, format: str, orientation: int) -> bytes:
    """``array`` stored as a ``format`` file whose EXIF Orientation tag is ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format, exif=exif, **({"lossless": True} if format == "WEBP" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("format", ["PNG", "WEBP", "TIFF", "JPEG"])
def test_a_file_decodes_to_the_pixels_a_viewer_shows_by_its_exif_orientation(format, orientation):
    # A phone stores a photo taken upright sideways, with Orientation 6; browsers and
    # Pillow's exif_transpose show it turned, and so the classifier must see it.
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # not square: a transpose shows
    data = _with_orientation(pixels, format, orientation)
    with Image.open(io.BytesIO(data)) as stored:
        shown = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    decoded = decode_pixels(data, field="f")
    assert np.array_equal(decoded, shown)
    assert decoded.shape == ((7, 5, 3) if orientation >= 5 else (5, 7, 3))
    if format != "JPEG":  # lossless: the stored pixels themselves
        assert np.array_equal(decoded, pixels) == (orientation == 1)
    if orientation == 6 and format == "PNG":  # the phone's: 90 degrees clockwise
        assert np.array_equal(decoded, np.rot90(pixels, -1))
        tensor = decode_encoded(data, field="f")
        assert np.array_equal(tensor.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy(), np.rot90(pixels, -1))


@pytest.mark.parametrize("mode, format", [("I;16", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "TIFF"), ("CMYK", "JPEG")])
def test_a_file_of_any_mode_is_turned_by_its_exif_orientation_as_an_rgb_one_is(mode, format):
    # The 16-bit grey path and convert("RGB") decode apart from an RGB file's.
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).quantize(8)
    else:
        image = Image.frombytes(mode, (7, 5), rng.integers(0, 256, 5 * 7 * len(mode), dtype=np.uint8).tobytes())
    assert image.mode == mode
    exif = Image.Exif()
    exif[0x0112] = 6
    as_stored, turned = io.BytesIO(), io.BytesIO()
    image.save(as_stored, format=format)
    image.save(turned, format=format, exif=exif)
    assert np.array_equal(decode_pixels(turned.getvalue(), field="f"), np.rot90(decode_pixels(as_stored.getvalue(), field="f"), -1))


def _exif_orientation_entry(type: int, count: int, value: bytes) -> bytes:
    """An EXIF block of one entry, Orientation of TIFF ``type`` and ``count``; ``value``
    in the entry if it fits in 4 bytes, else after the directory."""
    directory = struct.pack("<H", 1) + struct.pack("<HHI", 0x0112, type, count)
    directory += value.ljust(4, b"\0") if len(value) <= 4 else struct.pack("<I", 8 + len(directory) + 8)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + (value if len(value) > 4 else b"")


def _exif_of_values(counts: list[int], padding: int, order: str = "<") -> bytes:
    """An EXIF block of byte ``order`` (``padding`` bytes after its directory): Orientation
    6, then an entry of ``count`` bytes for each of ``counts``, every one at the block's start."""
    entries = 1 + len(counts)
    directory = struct.pack(order + "H", entries) + struct.pack(order + "HHIH2x", 0x0112, 3, 1, 6)
    directory += b"".join(struct.pack(order + "HHII", 0x9000 + index, 7, count, 0) for index, count in enumerate(counts))
    header = b"II*\0" if order == "<" else b"MM\0*"
    return b"Exif\0\0" + header + struct.pack(order + "I", 8) + directory + struct.pack(order + "I", 0) + bytes(padding)


def _decoded_png_with_exif(pixels: np.ndarray, exif: bytes) -> np.ndarray:
    """``pixels`` saved as a PNG holding the EXIF block ``exif``, decoded by the server."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    return decode_pixels(buffer.getvalue(), field="f")


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Corrupt EXIF data")
@pytest.mark.parametrize("order", ["<", ">"])
def test_an_exif_block_whose_values_would_not_fit_in_it_is_not_read(order):
    # Pillow 12 and older copied every entry's value, however many entries pointed at the
    # same bytes: 4000 at the same 100 KB of a 148 KB PNG took 400 MB while it decoded,
    # and a PNG's or WebP's EXIF block has no size limit. Such a block is corrupt: the
    # pixels are left as stored, without Pillow reading it.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decoded = functools.partial(_decoded_png_with_exif, pixels)

    padding = 1024
    block = len(_exif_of_values([padding, 0], padding)) - len(b"Exif\0\0")  # the TIFF structure Pillow reads
    assert np.array_equal(decoded(_exif_of_values([padding, block - padding], padding, order)), np.rot90(pixels, -1))  # as large as the block
    assert np.array_equal(decoded(_exif_of_values([padding, block - padding + 1], padding, order)), pixels)
    assert np.array_equal(decoded(_exif_of_values([padding] * 64, padding, order)), pixels)
    alone = _exif_of_values([], 0, order)
    cut_short = alone[:14] + struct.pack(order + "H", 3) + alone[16:]  # 3 entries said, 1 there: Pillow reads that one
    assert np.array_equal(decoded(cut_short), np.rot90(pixels, -1))


def _exif_segments(exif: bytes, segment: int) -> bytes:
    """JPEG APP1 segments holding the EXIF block ``exif``, ``segment`` bytes of it in each,
    each after the first past its own "Exif\\0\\0" (as a block over one segment's 64 KB is written)."""
    parts = [exif[:segment]] + [b"Exif\0\0" + exif[start:start + segment] for start in range(segment, len(exif), segment)]
    return b"".join(b"\xff\xe1" + struct.pack(">H", 2 + len(part)) + part for part in parts)


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Corrupt EXIF data")
def test_a_jpeg_whose_exif_block_values_would_not_fit_in_it_is_refused_before_pillow_opens_it():
    # Pillow joins a JPEG's EXIF segments and, where no JFIF segment gives the resolution,
    # reads the block's first directory as it opens the file, 12 and older each value
    # however many entries point at it: 1000 at the same 300 KB in 5 segments took 290 MB.
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    stored = buffer.getvalue()
    after_app0 = 4 + struct.unpack(">H", stored[4:6])[0]

    def with_exif(exif: bytes) -> bytes:  # in place of the JFIF segment, as cameras write it
        return stored[:2] + _exif_segments(exif, 600) + stored[after_app0:]

    padding = 1024
    block = len(_exif_of_values([padding, 0], padding)) - len(b"Exif\0\0")
    as_stored = decode_pixels(stored, field="f")
    assert np.array_equal(decode_pixels(with_exif(_exif_of_values([padding, block - padding], padding)), field="f"), np.rot90(as_stored, -1))
    with pytest.raises(InvalidArgument, match=r"^f: JPEG's EXIF block has tag values that add up to more than the block$"):
        decode_pixels(with_exif(_exif_of_values([padding, block - padding + 1], padding)), field="f")
    # Segments after the first scan Pillow does not read.
    after_scan = stored[:-2] + _exif_segments(_exif_of_values([padding] * 64, padding), 600) + stored[-2:]  # before EOI
    assert np.array_equal(decode_pixels(after_scan, field="f"), as_stored)


def _exif_directory_of_values(counts: list[int], padding: int, order: str = "<", path: tuple[int, ...] = (0x8769,), pointer_type: int = 4) -> bytes:
    """As :func:`_exif_of_values`, but the entries of ``counts`` bytes are those of a
    directory the first points at through ``path``, each tag of which (a LONG, or a SHORT:
    ``pointer_type`` 3) points at the next directory, after it: (0x8769,) EXIF's,
    (0x8825,) GPS's, (0x8769, 0xA005) the Interop directory EXIF's points at."""
    sizes = [2 + 2 * 12 + 4] + [2 + 12 + 4] * (len(path) - 1) + [2 + 12 * len(counts) + 4]
    offsets = [8 + sum(sizes[:index]) for index in range(len(sizes))]

    def pointer(tag: int, offset: int) -> bytes:
        return struct.pack(order + "HHII", tag, 4, 1, offset) if pointer_type == 4 else struct.pack(order + "HHIH2x", tag, 3, 1, offset)

    directories = [[struct.pack(order + "HHIH2x", 0x0112, 3, 1, 6)]] + [[] for _ in path]
    for depth, tag in enumerate(path):
        directories[depth].append(pointer(tag, offsets[depth + 1]))
    directories[-1] += [struct.pack(order + "HHII", 0x9000 + index, 7, count, 0) for index, count in enumerate(counts)]
    header = b"II*\0" if order == "<" else b"MM\0*"
    return (b"Exif\0\0" + header + struct.pack(order + "I", 8)
            + b"".join(struct.pack(order + "H", len(entries)) + b"".join(entries) + struct.pack(order + "I", 0) for entries in directories) + bytes(padding))


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Corrupt EXIF data")
@pytest.mark.parametrize("path", [(0x8769,), (0x8825,), (0x8769, 0xA005)], ids=["exif", "gps", "interop"])
@pytest.mark.parametrize("order, pointer_type", [("<", 4), (">", 4), (">", 3)], ids=["long", "long-big-endian", "short-big-endian"])
def test_an_exif_block_whose_exif_directory_values_would_not_fit_in_it_is_not_read(order, pointer_type, path):
    # ImageOps.exif_transpose, which the SDK turns a PIL image with, reads the EXIF, GPS and
    # Interop directories too: with Pillow 12, 2000 entries at the same 100 KB of a 124 KB
    # PNG's EXIF directory took 1.2 GB. The server leaves such a block unread as the SDK
    # does, so that both turn the same files. A SHORT pointer is read as Pillow reads it,
    # from the first two bytes of its entry's value.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decoded = functools.partial(_decoded_png_with_exif, pixels)

    padding = 1024
    assert np.array_equal(decoded(_exif_directory_of_values([padding], padding, order, path, pointer_type)), np.rot90(pixels, -1))
    assert np.array_equal(decoded(_exif_directory_of_values([padding] * 64, padding, order, path, pointer_type)), pixels)


@pytest.mark.parametrize("type, count", [(4, 2), (2, 1), (99, 1)], ids=["two-longs", "text", "unknown-type"])
def test_an_exif_directory_pointer_pillow_does_not_follow_leaves_that_directory_uncounted(type, count):
    # Pillow takes one value of an integer type for an offset, nothing else (two LONGs, a
    # string, a type it skips): the directory there is never read, whatever its values.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = bytearray(_exif_directory_of_values([1024] * 64, 1024))
    struct.pack_into("<HI", exif, 6 + 8 + 2 + 12 + 2, type, count)  # the type and count of the first directory's second entry, the pointer
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=bytes(exif))
    assert np.array_equal(decode_pixels(buffer.getvalue(), field="f"), np.rot90(pixels, -1))


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Corrupt EXIF data")
@pytest.mark.parametrize("values, turned", [(1, True), (64, False)], ids=["fits", "unfit"])
def test_an_exif_directory_pointer_wider_than_its_entry_is_read_where_it_points(values, turned):
    # A LONG8 (8 bytes) does not fit in a classic TIFF entry's 4: Pillow reads the pointer at
    # the offset the entry holds, and follows it; with Pillow 12, 1000 entries at the same
    # 200 KB of a 212 KB block reached so took 1.1 GB in exif_transpose.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = bytearray(_exif_directory_of_values([1024] * values, 1024))
    pointer = 6 + 8 + 2 + 12  # the first directory's second entry, the EXIF directory's pointer
    long8_at = len(exif) - 6 - 8  # in the padding
    struct.pack_into("<Q", exif, 6 + long8_at, struct.unpack_from("<I", exif, pointer + 8)[0])
    struct.pack_into("<HHII", exif, pointer, 0x8769, 16, 1, long8_at)
    assert np.array_equal(_decoded_png_with_exif(pixels, bytes(exif)), np.rot90(pixels, -1) if turned else pixels)


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Corrupt EXIF data")
@pytest.mark.parametrize("pointers", [("unfit", "empty"), ("empty", "unfit"), ("empty", "unfit", "skipped")], ids="-".join)
def test_an_exif_directory_pointed_at_twice_counts_both_directories(pointers):
    # Of a directory holding the ExifIFD tag twice, Pillow 13 follows the first entry and 12
    # and older the last they keep (each replaced the one before; one of a type they skip
    # does not): with Pillow 12, an empty directory first and 1000 entries at the same 200
    # KB last took 1.1 GB in exif_transpose.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    padding = 1024
    tiff = _exif_directory_of_values([padding] * 64, padding)[len(b"Exif\0\0"):]  # its EXIF directory's values do not fit
    unfit = tiff[8 + 2 + 2 * 12 + 4:]  # that directory and the padding after it, its values at the block's start
    unfit_at = 8 + 2 + (1 + len(pointers)) * 12 + 4
    entries = {"unfit": struct.pack("<HHII", 0x8769, 4, 1, unfit_at),
               "empty": struct.pack("<HHII", 0x8769, 4, 1, unfit_at + len(unfit) - 4),  # in the padding: no entries
               "skipped": struct.pack("<HHII", 0x8769, 99, 1, 0)}  # a type Pillow does not read
    orientation = tiff[8 + 2:8 + 2 + 12]
    block = tiff[:8] + struct.pack("<H", 1 + len(pointers)) + orientation + b"".join(entries[name] for name in pointers) + bytes(4) + unfit
    assert np.array_equal(_decoded_png_with_exif(pixels, b"Exif\0\0" + block), pixels)


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Possibly corrupt EXIF data", "ignore:Truncated File Read")
def test_an_exif_block_with_a_value_running_past_its_end_is_still_read():
    # A corrupt count (cameras write them: Pillow's "Possibly corrupt EXIF data") makes
    # Pillow skip that value, or stop reading the directory there (12 and older), not read
    # it many times: the block's Orientation still turns the pixels, as before it was checked.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=_exif_of_values([1 << 30], 1024))
    assert np.array_equal(decode_pixels(buffer.getvalue(), field="f"), np.rot90(pixels, -1))


def _tiff_with_values_at_one_place(values: int, size: int) -> bytes:
    """A valid 8x8 TIFF whose directory also has ``values`` private tags, each of the same
    ``size`` bytes appended after its pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)).save(buffer, format="TIFF")
    stored = buffer.getvalue()
    directory = struct.unpack("<I", stored[4:8])[0]
    entries = [stored[directory + 2 + 12 * index:directory + 14 + 12 * index] for index in range(struct.unpack("<H", stored[directory:directory + 2])[0])]
    entries += [struct.pack("<HHII", 65000 + index, 7, size, len(stored)) for index in range(values)]  # UNDEFINED bytes, sorted after the image's tags
    return b"II*\0" + struct.pack("<I", len(stored) + size) + stored[8:] + bytes(size) + struct.pack("<H", len(entries)) + b"".join(entries) + bytes(4)


def test_a_tiff_whose_tag_values_add_up_to_more_than_the_file_is_refused_before_pillow_reads_them():
    # Pillow 12 and older read every tag's value while opening a TIFF, wherever it points:
    # 4000 tags at the same 100 KB of a 148 KB file took 1.3 GB (Pillow 11.0).
    pixels = np.arange(192, dtype=np.uint8).reshape(8, 8, 3)
    size = 4096
    assert np.array_equal(decode_pixels(_tiff_with_values_at_one_place(1, size), field="f"), pixels)
    several = _tiff_with_values_at_one_place(3, size)
    assert 3 * size > len(several)
    with pytest.raises(InvalidArgument, match=r"TIFF tag values add up to \d+ bytes, more than the file's \d+") as refused:
        decode_pixels(several, field="images[0].encoded")
    assert refused.value.field == "images[0].encoded"


def _tiff_with_exif_directory_values_at_one_place(values: int, size: int) -> bytes:
    """A valid 8x8 TIFF whose first directory also points at an EXIF directory (ExifIFD,
    tag 34665) of ``values`` private tags, each of the same ``size`` bytes appended after its pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)).save(buffer, format="TIFF")
    stored = buffer.getvalue()
    directory = struct.unpack("<I", stored[4:8])[0]
    entries = [stored[directory + 2 + 12 * index:directory + 14 + 12 * index] for index in range(struct.unpack("<H", stored[directory:directory + 2])[0])]
    exif_at = len(stored) + size
    entries.append(struct.pack("<HHII", 34665, 4, 1, exif_at))  # sorted after the image's tags
    exif = struct.pack("<H", values) + b"".join(struct.pack("<HHII", 0x9000 + index, 7, size, len(stored)) for index in range(values)) + bytes(4)
    return b"II*\0" + struct.pack("<I", exif_at + len(exif)) + stored[8:] + bytes(size) + exif + struct.pack("<H", len(entries)) + b"".join(entries) + bytes(4)


@pytest.mark.filterwarnings("ignore:Tag data larger than file")
def test_a_tiff_whose_exif_directory_values_add_up_to_more_than_the_file_is_refused_too():
    # Pillow reads a TIFF's EXIF and GPS directories as it loads its pixels: with Pillow 12,
    # 2000 tags of its EXIF directory at the same 100 KB of a 124 KB file took 190 MB.
    pixels = np.arange(192, dtype=np.uint8).reshape(8, 8, 3)
    size = 4096
    assert np.array_equal(decode_pixels(_tiff_with_exif_directory_values_at_one_place(1, size), field="f"), pixels)
    with pytest.raises(InvalidArgument, match=r"TIFF tag values add up to \d+ bytes, more than the file's \d+"):
        decode_pixels(_tiff_with_exif_directory_values_at_one_place(3, size), field="f")


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Possibly corrupt EXIF data", "ignore:Truncated File Read")
def test_a_tiff_with_a_tag_value_running_past_its_end_still_decodes():
    # Pillow skips a value its count says runs past the file's end (a corrupt count), or
    # stops reading the directory there (12 and older), and decodes the image: it was
    # refused as if that count were read, once values were added up.
    stored = bytearray(_tiff_with_values_at_one_place(1, 4096))
    struct.pack_into("<I", stored, len(stored) - 12, 1 << 30)  # the count of the last entry, the private tag's
    assert np.array_equal(decode_pixels(bytes(stored), field="f"), np.arange(192, dtype=np.uint8).reshape(8, 8, 3))


def _jpeg_with_multi_picture_values_at_one_place(values: int, size: int) -> bytes:
    """An 8x8 JPEG with an MPF (APP2) segment, as cameras write for the pictures a file
    holds, whose directory has ``values`` entries of the same ``size`` bytes after it."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="JPEG")
    stored = buffer.getvalue()
    after_directory = 8 + 2 + 12 * values + 4
    index = b"II*\0" + struct.pack("<IH", 8, values) + b"".join(struct.pack("<HHII", 0xB100 + n, 7, size, after_directory) for n in range(values)) + bytes(4 + size)
    after_app0 = 4 + struct.unpack(">H", stored[4:6])[0]  # where cameras write it: after JFIF's (or EXIF's) segment
    return stored[:after_app0] + b"\xff\xe2" + struct.pack(">H", 2 + 4 + len(index)) + b"MPF\0" + index + stored[after_app0:]


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Image appears to be a malformed MPO file")
def test_a_jpeg_whose_multi_picture_index_values_add_up_to_more_than_its_segment_is_refused():
    # Pillow reads a JPEG's MPF directory as it opens the file, 12 and older each value
    # wherever it points: 2600 entries at the same 33 KB of a 65 KB file took 82 MB.
    assert decode_pixels(_jpeg_with_multi_picture_values_at_one_place(1, 4096), field="f").shape == (8, 8, 3)
    with pytest.raises(InvalidArgument, match=r"^images\[0\]\.encoded: JPEG's multi-picture \(MPF\) index has tag values that add up to more than its segment"):
        decode_pixels(_jpeg_with_multi_picture_values_at_one_place(3, 4096), field="images[0].encoded")
    # A camera's file of several pictures (MPO) is read as its first, as before.
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="MPO", save_all=True, append_images=[Image.fromarray(pixels[::-1])], quality=100)
    with Image.open(io.BytesIO(buffer.getvalue())) as stored:
        assert stored.format == "MPO" and stored.n_frames == 2
        first = np.asarray(stored.convert("RGB"))
    assert np.array_equal(decode_pixels(buffer.getvalue(), field="f"), first)


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Image appears to be a malformed MPO file")
def test_the_multi_picture_index_checked_is_the_one_pillow_reads_the_last_before_the_first_scan():
    # Pillow reads the segments before the first scan as it opens the file, keeping the
    # last MPF one: a small index after the scan does not stand for the one it reads.
    unfit = _jpeg_with_multi_picture_values_at_one_place(3, 4096)
    fit = _jpeg_with_multi_picture_values_at_one_place(1, 4096)
    start = fit.index(b"\xff\xe2")
    segment = fit[start:start + 2 + struct.unpack(">H", fit[start + 2:start + 4])[0]]  # the MPF segment of a fitting index
    with pytest.raises(InvalidArgument, match=r"^f: JPEG's multi-picture \(MPF\) index has tag values"):
        decode_pixels(unfit[:-2] + segment + unfit[-2:], field="f")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("exif", [
    pytest.param(b"Exif\0\0not a TIFF header", id="not-tiff"),
    pytest.param(b"Exif\0\0II*\0\x08\0", id="header-cut-short"),
    pytest.param(b"Exif\0\0II*\0" + struct.pack("<IH", 8, 5), id="directory-cut-short"),
    pytest.param(b"Exif\0\0II*\0" + struct.pack("<I", 1 << 30), id="directory-past-the-end"),
    pytest.param(_exif_orientation_entry(3, 1, struct.pack("<H", 0)), id="orientation-0"),
    pytest.param(_exif_orientation_entry(3, 1, struct.pack("<H", 9)), id="orientation-9"),
    pytest.param(_exif_orientation_entry(2, 2, b"6\0"), id="orientation-text-6"),
    pytest.param(_exif_orientation_entry(5, 1, struct.pack("<II", 6, 1)), id="orientation-rational-6"),
])
def test_a_file_with_an_unreadable_exif_block_or_orientation_decodes_to_its_stored_pixels(exif):
    # The pixels are sound: only the tag is not (as browsers show such a file), so the
    # file is not refused and not turned. Pillow reads an unreadable block as empty.
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)

    def png(exif: bytes) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
        with Image.open(io.BytesIO(buffer.getvalue())) as stored:
            assert stored.info["exif"] == exif  # the block written as it was given
        return buffer.getvalue()

    assert np.array_equal(decode_pixels(png(exif), field="f"), pixels)
    # The blocks are built as a readable one is: the SHORT 6 of a camera turns the pixels.
    readable = _exif_orientation_entry(3, 1, struct.pack("<H", 6))
    assert np.array_equal(decode_pixels(png(readable), field="f"), np.rot90(pixels, -1))


def _smooth_jpeg(width: int, height: int, *, exif: Image.Exif | None = None, format: str = "JPEG") -> bytes:
    """A ``width`` x ``height`` file of gradients and a hard edge, as photographs are, quality 90."""
    rows, columns = np.mgrid[0:height, 0:width]
    pixels = np.stack([columns * 255 // width, rows * 255 // height, np.where(columns < width // 3, 40, 200)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    options = ({} if exif is None else {"exif": exif}) | ({"save_all": True, "append_images": [Image.new("RGB", (8, 8))]} if format == "MPO" else {})
    Image.fromarray(pixels).save(buffer, format=format, quality=90, **options)
    return buffer.getvalue()


def test_the_reduced_jpeg_decode_keeps_twice_the_side_the_fit_resizes_from_and_only_when_asked():
    # The shorter side is resized to resize_size; stretched (0), both sides to size. Twice
    # that leaves the antialiased resize most of the reduction (bench/jpeg_reduced_decode.py).
    assert InputGeometry(16, 20, jpeg_reduced_decode=True).jpeg_min_side == 40
    assert InputGeometry(16, 0, jpeg_reduced_decode=True).jpeg_min_side == 32
    assert InputGeometry(16, 20).jpeg_min_side == InputGeometry(16).jpeg_min_side == 0  # off unless chosen: decoded whole


@pytest.mark.parametrize("landscape", [True, False])
@pytest.mark.parametrize("format", ["JPEG", "MPO"])  # a camera's JPEG with a multi-picture segment opens as MPO
def test_a_jpeg_decodes_at_the_largest_reduction_that_keeps_both_sides_at_least_the_side_asked_for(format, landscape):
    def shape(long: int, short: int) -> tuple[int, int, int]:
        return (short, long, 3) if landscape else (long, short, 3)

    data = _smooth_jpeg(*(shape(160, 96)[1::-1]), format=format)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == format
    assert decode_pixels(data, field="f").shape == shape(160, 96)
    # 1/4 would make the 96 pixels of the short side 24, below 40: 1/2. Asked for 24, 1/4; for 12, 1/8, the most there is.
    assert decode_pixels(data, field="f", jpeg_min_side=40).shape == shape(80, 48)
    assert decode_pixels(data, field="f", jpeg_min_side=24).shape == shape(40, 24)
    assert decode_pixels(data, field="f", jpeg_min_side=6).shape == shape(20, 12)


def test_a_jpeg_turned_by_its_exif_orientation_is_reduced_as_stored_then_turned():
    # The side asked for holds whichever way the Orientation turns the stored image.
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held upright: 90 degrees clockwise
    stored, turned = _smooth_jpeg(160, 96), _smooth_jpeg(160, 96, exif=exif)
    reduced = decode_pixels(turned, field="f", jpeg_min_side=40)
    assert reduced.shape == (80, 48, 3)
    assert np.array_equal(reduced, np.rot90(decode_pixels(stored, field="f", jpeg_min_side=40), -1))


@pytest.mark.parametrize("format", ["PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_only_jpeg_files_are_decoded_at_a_reduced_scale(format):
    pixels = np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    data = _encoded(pixels, format)
    assert np.array_equal(decode_pixels(data, field="f", jpeg_min_side=40), decode_pixels(data, field="f"))


@pytest.mark.parametrize("progressive", [False, True])
def test_a_damaged_jpeg_is_refused_at_every_reduced_scale_as_it_is_whole(progressive):
    # The upload check decodes at the served classifier's reduced scale: libjpeg's scaled
    # IDCT still reads every scan's coded data to its end, so truncation and a marker
    # written into the data are met, and refused, at 1/2, 1/4 and 1/8 as they are whole.
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_smooth_jpeg(320, 192))).save(buffer, format="JPEG", quality=90, progressive=progressive)
    data = buffer.getvalue()
    middle = (data.rindex(b"\xff\xda") + len(data)) // 2  # within the last scan's coded data
    damaged = [data[:middle], data[:-2], *(data[:middle] + marker + data[middle + 2:] for marker in (b"\xff\xda", b"\xff\xc4", b"\xff\x55"))]
    for file in damaged:
        with pytest.raises(InvalidArgument) as whole:
            decode_pixels(file, field="f")
        for side in (80, 40, 20):
            with pytest.raises(InvalidArgument) as reduced:
                decode_pixels(file, field="f", jpeg_min_side=side)
            assert str(reduced.value) == str(whole.value)
    # What libjpeg only warns of (an early EOI: the rest grey) passes either way, as it did whole.
    early_end = data[:middle] + b"\xff\xd9" + data[middle + 2:]
    assert decode_pixels(early_end, field="f").shape == (192, 320, 3) and decode_pixels(early_end, field="f", jpeg_min_side=20).shape == (24, 40, 3)


def test_a_jpeg_cut_off_inside_its_frame_header_is_refused_as_undecodable():
    # Its component count (the header's tenth byte) is read for the decode's reservation:
    # a file ending before it is the decoder's to refuse, not an IndexError (INTERNAL).
    data = _smooth_jpeg(64, 48)
    frame = data.index(b"\xff\xc0")
    for end in range(frame + 2, frame + 11):
        with pytest.raises(InvalidArgument):
            decode_pixels(data[:end], field="f")


@pytest.mark.parametrize("resize_size", [0, 20])
def test_a_jpeg_decoded_at_a_reduced_scale_fits_to_nearly_the_input_of_the_whole_image(resize_size):
    # Not the same pixels (the classifier was trained on the whole image resized), hence
    # opt-in; on a smooth photo-like file within a few levels of 255.
    data = _smooth_jpeg(320, 192)
    whole, reduced = InputGeometry(16, resize_size), InputGeometry(16, resize_size, jpeg_reduced_decode=True)
    expected = decode_encoded(data, field="f", geometry=whole)
    fitted = decode_encoded(data, field="f", geometry=reduced)
    assert fitted.shape == expected.shape == (3, 16, 16)
    difference = (fitted - expected).abs() * 255
    assert 0 < float(difference.mean()) < 0.5 and float(difference.max()) < 4  # decoded at 1x the side: 0.8 and 12
    # Off, the file decodes whole as it did before the option: the same pixels bit for bit.
    assert torch.equal(expected, decode_encoded(data, field="f", geometry=InputGeometry(16, resize_size, "bilinear", False)))
    whole_pixels = torch.from_numpy(np.array(decode_pixels(data, field="f"))).permute(2, 0, 1)
    assert torch.equal(expected, whole.fit(whole_pixels) / np.float32(255))


def _lossless_jpeg(grey: np.ndarray) -> bytes:
    """An 8-bit greyscale lossless JPEG (SOF3, ITU T.81 annex H; Pillow writes none):
    each pixel coded as its difference from the one on its left (above, at a row's start;
    128 first) in the DC luminance Huffman table's categories."""
    codes = ["00", "010", "011", "100", "101", "110", "1110", "11110", "111110"]  # categories 0-8
    values, bits = grey.astype(np.int64), []
    for y, x in np.ndindex(grey.shape):
        predicted = 128 if y == x == 0 else values[y - 1, x] if x == 0 else values[y, x - 1]
        difference = int(values[y, x] - predicted)
        category = abs(difference).bit_length()
        bits.append(codes[category] + (format(difference if difference > 0 else difference + (1 << category) - 1, f"0{category}b") if category else ""))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytes(int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)).replace(b"\xff", b"\xff\x00")
    frame = struct.pack(">BHHB3B", 8, grey.shape[0], grey.shape[1], 1, 1, 0x11, 0)
    table = bytes([0, 0, 1, 5, 1, 1, 1, 1, 1, 1] + [0] * 7) + bytes(range(12))
    scan = bytes([1, 1, 0x00, 1, 0, 0])  # component 1, table 0, predictor 1 (left)
    # The table before the frame, as some encoders write it: a marker of the C0-CF range that starts no frame.
    segments = b"".join(b"\xff" + bytes([marker]) + struct.pack(">H", 2 + len(body)) + body for marker, body in
                        [(0xC4, table), (0xC3, frame), (0xDA, scan)])
    return b"\xff\xd8" + segments + data + b"\xff\xd9"


@pytest.mark.skipif(int((features.version("libjpeg_turbo") or "0").split(".")[0]) < 3, reason="libjpeg-turbo decodes lossless JPEG from 3.0 on")
def test_a_lossless_jpeg_is_decoded_whole_when_a_reduced_scale_is_asked_for():
    # Lossless JPEG has no DCT to scale: libjpeg-turbo failed the reduced decode ("broken
    # data stream"), so with the option on a file that uploaded (decoded whole) was refused.
    rows, columns = np.mgrid[0:48, 0:80]
    grey = ((columns + 3 * rows) % 256).astype(np.uint8)
    data = _lossless_jpeg(grey)
    assert np.array_equal(decode_pixels(data, field="f"), np.repeat(grey[:, :, None], 3, axis=2))
    assert np.array_equal(decode_pixels(data, field="f", jpeg_min_side=12), decode_pixels(data, field="f"))
    # A lossy file of that size is still reduced: only the frame's process decides.
    assert decode_pixels(_smooth_jpeg(80, 48), field="f", jpeg_min_side=12).shape == (12, 20, 3)


def test_out_of_memory_fitting_an_image_is_decode_out_of_memory_and_another_runtime_error_is_not(monkeypatch):
    # PyTorch's CPU allocator says it with a RuntimeError of its own words, numpy with a
    # MemoryError; any other RuntimeError there is a bug, not the server's memory short.
    from explaind import imaging
    from explaind.imaging import DecodeOutOfMemory

    png, pixels = encode_png(np.zeros((32, 32, 3), np.uint8)), np.zeros((3, 32, 32), np.float32)
    allocator = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 64 bytes.")
    for error, expected in ((allocator, DecodeOutOfMemory), (MemoryError(), DecodeOutOfMemory), (RuntimeError("a kernel's own failure"), RuntimeError)):
        def failing(self, image, error=error):
            raise error

        monkeypatch.setattr(InputGeometry, "fit", failing)
        for decode in (lambda: decode_encoded(png, field="images[0]", geometry=InputGeometry(16)),
                       lambda: decode_array(pixels, field="images[0]", geometry=InputGeometry(16)),
                       lambda: decode_array(np.zeros((32, 32, 3), np.uint8), field="images[0]", geometry=InputGeometry(16))):
            with pytest.raises(expected) as raised:
                decode()
            assert type(raised.value) is expected
            if expected is DecodeOutOfMemory:
                assert raised.value.field == "images[0]" and raised.value.retry_delay_s == 1.0
    # A float tensor's one copy alike.
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(imaging.np, "array", no_memory)
    with pytest.raises(DecodeOutOfMemory, match="ran out of memory preparing the images for the model"):
        decode_array(pixels, field="images[0]")
