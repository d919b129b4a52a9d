"""Image decoding, validation and encoding shared by the service and the engines.

Decoded images are float32 tensors (3, H, W) in [0, 1], RGB. Every check raises
:class:`~explaind.errors.InvalidArgument` naming the field it was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import INTERPOLATIONS, MAX_IMAGE_SIDE
from .decode_memory import ENCODED_DECODE_BYTES_PER_PIXEL, DecodeLease
from .errors import ExplaindError, InvalidArgument, ResourceExhausted
from .methods.memory import is_host_out_of_memory
from .exif import directories_read, exif_orientation, stored_value_bytes, values_fit

# Encoded formats accepted. Pillow's other decoders (DDS, SPIDER, ...) see little use and
# fail on malformed input with errors other than OSError.
ENCODED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Most scans a JPEG may hold. libjpeg decodes every scan over the whole image and sets no
# limit, so a few hundred KB of repeated empty scans cost minutes ("scan bomb"); encoders
# write 6-12 (libjpeg's progression) to a few dozen, and libtiff's JPEG codec stops at 100 too.
# Counted by walking the file's markers up to its end (EOI), so that bytes FF DA in an
# EXIF thumbnail, a colour profile or data appended after the image (a phone's
# motion-photo video: 8 MB held about 120 by chance) are not taken for scans.
MAX_JPEG_SCANS = 100
# Most markers that walk reads, in Python (restart markers inside scans are not counted):
# encoders write a few dozen; a bound on a file of millions of empty segments.
MAX_JPEG_MARKERS = 65536
# The next marker after a scan's entropy-coded data, where FF 00 is a data byte FF and
# FF D0-D7 a restart marker within the scan.
_JPEG_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# The next marker between segments: FF (the last of any fill bytes FF) then a byte other
# than 00. Searched for, so that other bytes there are skipped as libjpeg and Pillow skip
# them: a stray byte ended the walk, and libjpeg decoded every scan after it uncounted.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff]")
# Start-of-frame markers of JPEG's lossless processes (SOF3, 7, 11, 15 of ITU T.81), which
# have no DCT to scale: libjpeg-turbo (3.0 on) decodes them whole only.
_JPEG_LOSSLESS_FRAMES = (0xC3, 0xC7, 0xCB, 0xCF)
# Start-of-frame markers of JPEG's progressive processes (SOF2, 6, 10, 14 of ITU T.81).
_JPEG_PROGRESSIVE_FRAMES = (0xC2, 0xC6, 0xCA, 0xCE)
# The sampling factors libjpeg takes (its MAX_SAMP_FACTOR 4, jdinput.c); it refuses a frame
# with others before it allocates anything.
_JPEG_SAMPLING_FACTORS = range(1, 5)
# Most zTXt/iTXt chunks a PNG may hold. Pillow inflates each (up to 1 MB from about 1 KB)
# while it reads the file; the PNG spec allows one iCCP, and Pillow inflated every one of
# 300 (4.7 s for a 670 KB file).
MAX_PNG_COMPRESSED_TEXT_CHUNKS = 16
# Most chunks of any type: Pillow handles each in Python (385k one-byte IDAT chunks: 1.9 s),
# while encoders write image data in chunks of 8 KiB or more (a 64 MiB file: 8k of them).
MAX_PNG_CHUNKS = 65536
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Most extension blocks and their data sub-blocks a GIF may hold before its first image.
# Pillow reads them one at a time in Python while it opens the file (60,000 empty comments,
# 300 KB, added 2.8 s); encoders write a handful.
MAX_GIF_BLOCKS = 4096
# Most strips or tiles a TIFF may hold. Pillow reads each one's offset into a Python tuple
# while it opens the file, then decodes them one at a time: an 8x8 image with a million
# strips (8 MB) took 5.6 s and 270 MB; encoders write one per 8 KiB or a few rows (a
# 4096x4096 RGB image: about 6,000) or tiles of 16x16 and larger (at most 65,536).
MAX_TIFF_STRIPS = 65536
# Most entries (tags) a TIFF directory may hold: classic TIFF's 16-bit count; encoders write a few dozen.
MAX_TIFF_DIRECTORY_ENTRIES = 65535
# The headers Pillow opens as TIFF: each byte order's versions (42: TIFF, 43: BigTIFF, with
# 8-byte counts and offsets), and version 42 in the other byte order, which it reads as TIFF.
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II\x00*", b"MM*\x00", b"II+\x00", b"MM\x00+")
# StripOffsets, StripByteCounts, TileOffsets, TileByteCounts: one value per strip or tile.
_TIFF_STRIP_TAGS = (273, 279, 324, 325)
_DTYPES = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}
# What :func:`decode_pixels` makes of a file's bytes, as a number raised with every change
# to it: a stored image's cached features are keyed by its bytes, so those an earlier
# release computed from other pixels must not be reused (engine.models' feature_cache_key).
# 2: EXIF Orientation turns the pixels, unless its block cannot be read or the values of
# the directories Pillow reads would not fit in it (explaind.exif.values_fit).
DECODING_VERSION = 2


class PixelBudget:
    """The decoded pixels one request may still use: each image is charged from its size
    before its pixels are decoded, so many small files cannot decode to gigabytes. With
    ``memory``, the call's lease of the server's decode memory: each image reserves what
    it may take to decode before it does; ``with`` the budget gives it back."""

    def __init__(self, limit: int, *, field: str, memory: DecodeLease | None = None) -> None:
        self.limit, self.field, self.used = limit, field, 0
        self.memory = memory

    def reserve(self, nbytes: int) -> None:
        """Hold at least ``nbytes`` of decode memory (none without ``memory``)."""
        if self.memory is not None:
            self.memory.reserve(nbytes)

    def __enter__(self) -> PixelBudget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.memory is not None:
            self.memory.release()

    @property
    def exceeded(self) -> bool:
        """Whether the request's images have passed the limit: a fault of the request as a
        whole, never of the image being decoded when it did."""
        return self.used > self.limit

    def charge(self, width: int, height: int) -> None:
        self.used += width * height
        if self.used > self.limit:
            raise InvalidArgument(
                f"the images decode to more than the limit of {self.limit} pixels per request ([server].max_pixels_per_request); "
                "send fewer or smaller images per call",
                field=self.field,
            )


# How Pillow's C decoders say an allocation failed (IMAGING_CODEC_MEMORY, ImageFile's
# "out of memory when reading image file"): an OSError, where Python's own allocations
# raise MemoryError.
_PILLOW_OUT_OF_MEMORY = "out of memory"


class DecodeOutOfMemory(ResourceExhausted):
    """An allocation refused decoding an image (MemoryError, or Pillow's OSError saying so)
    or preparing it for the model (:func:`preparing_images`): the server's memory was short, full of
    concurrent work, which may pass; the file is not at fault (not INVALID_ARGUMENT, nor a
    stored image's "does not decode now")."""

    retry_delay_s = 1.0


@contextlib.contextmanager
def preparing_images(field: str | None) -> Iterator[None]:
    """Around preparing decoded images for the model (resizing, converting to float,
    stacking a batch): the host's memory running out there (numpy's MemoryError, PyTorch's
    allocator's RuntimeError) is the server's, as the decoder's is, a
    :class:`DecodeOutOfMemory` naming ``field``, not a bug (INTERNAL), and asking a
    call's caller to wait a second. Elsewhere (the model's own run on a CPU) the same
    error is RESOURCE_EXHAUSTED too, by :func:`~explaind.errors.report_unexpected`, which
    names no field and asks no delay."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not is_host_out_of_memory(error):
            raise
        raise DecodeOutOfMemory("the server ran out of memory preparing the images for the model; retry later, or with fewer or smaller images",
                                field=field) from None


def decode_pixels(data: bytes, *, field: str, budget: PixelBudget | None = None, jpeg_min_side: int = 0) -> np.ndarray:
    """PNG/JPEG/WebP/BMP/GIF/TIFF bytes -> (H, W, 3) uint8 RGB as a viewer shows them
    (turned by the EXIF Orientation, :func:`_as_viewed`; possibly read-only); any failure
    of the file is INVALID_ARGUMENT, the decoder out of memory :class:`DecodeOutOfMemory`. ``jpeg_min_side`` N > 0 decodes a JPEG at 1/2, 1/4 or 1/8 of its
    size (libjpeg's DCT scaling, several times faster), the smallest with both sides still
    at least N (:attr:`InputGeometry.jpeg_min_side`); other formats, a lossless JPEG
    (which has no DCT: libjpeg-turbo fails to scale one), and 0, decode whole.
    The side and pixel budget are checked on the file's own size either way."""
    if not data:
        raise InvalidArgument("image bytes are empty", field=field)
    jpeg: _JpegStream | None = None
    # Costly chunks and blocks of PNG and GIF are read while Pillow opens the file, so they
    # are checked before it; JPEG's scans and BMP's compression once it has named the format.
    if data.startswith(_PNG_SIGNATURE):
        _check_png_chunks(data, field)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _check_gif_blocks(data, field)
    elif data.startswith(_TIFF_SIGNATURES):
        _check_tiff_directory(data, field)
    elif data.startswith(b"\xff\xd8\xff"):  # what Pillow opens as JPEG (MPO with a multi-picture segment)
        jpeg = _jpeg_stream(data, field)
        _check_jpeg_tag_values(jpeg, field)
    try:
        with Image.open(io.BytesIO(data), formats=ENCODED_FORMATS) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise InvalidArgument(f"image is {image.size[0]}x{image.size[1]}; the largest side allowed is {MAX_IMAGE_SIDE}", field=field)
            stored_size = image.size
            if budget is not None:
                budget.charge(*stored_size)
            _check_decode_cost(image, jpeg, field)
            if image.mode == "F":
                raise InvalidArgument("floating-point image files are not supported; send a FLOAT32 tensor with pixels in [0, 1]", field=field)
            # Pillow's JPEG (and MPO) files reduce; other formats' draft does nothing.
            if jpeg_min_side and not (jpeg is not None and jpeg.frame in _JPEG_LOSSLESS_FRAMES):
                # A square request: the Orientation turns the image after it is decoded.
                image.draft(None, (jpeg_min_side, jpeg_min_side))
            if budget is not None:
                budget.reserve(_decode_bytes(image.size, stored_size, jpeg))
            image.load()  # before its EXIF Orientation is read: a PNG's eXIf chunk may follow the pixels
            shown = _as_viewed(image, exif_orientation(image))
            if shown.mode == "I" or shown.mode.startswith("I;16"):
                return _grey16_to_rgb8(np.asarray(shown), field=field)
            if shown.mode == "RGB":  # convert("RGB") would copy it whole: an extra copy per image
                return np.asarray(shown)
            return np.asarray(shown.convert("RGB"))
    except ExplaindError:  # the file's fault as INVALID_ARGUMENT, or a wait for decode memory that ended (CANCELLED, DEADLINE_EXCEEDED)
        raise
    except Image.UnidentifiedImageError:
        raise InvalidArgument(f"bytes are not an image in a supported format ({', '.join(ENCODED_FORMATS)})", field=field) from None
    except Exception as error:  # noqa: BLE001 - a decoder's failure on bad bytes is the caller's, whatever it raises
        if isinstance(error, MemoryError) or (isinstance(error, OSError) and str(error).startswith(_PILLOW_OUT_OF_MEMORY)):
            # The process's memory, not the file: a stored image that decoded at upload still does.
            raise DecodeOutOfMemory("the server ran out of memory decoding the image; retry later, or with fewer or smaller images", field=field) from None
        raise InvalidArgument(f"cannot decode image bytes ({type(error).__name__}: {error})", field=field) from None


def _decode_bytes(decoded_size: tuple[int, int], stored_size: tuple[int, int], jpeg: _JpegStream | None) -> int:
    """What an image file may take while it decodes (bytes): ENCODED_DECODE_BYTES_PER_PIXEL
    of the size it decodes to, which a JPEG decoded at reduced scale makes 4 to 64 times
    smaller than its stored size, plus, for a JPEG libjpeg reads as one of several scans
    (:attr:`_JpegStream.buffers_coefficients`: a progressive one, however few it has), the
    DCT coefficients it keeps for the whole stored image before any pixel comes out: two
    bytes per pixel and component at most, each side padded to the frame's MCU (8 pixels
    times its largest sampling factor: 24 for a factor of 3, which padding to 32 missed).
    libjpeg pads each component's blocks to a multiple of its own factor (jdcoefct.c), which
    at full size never passes the MCU's padding; a subsampled component keeps fewer.
    bench/decode_bytes_per_pixel.py measures both against this."""
    width, height = decoded_size
    reserved = width * height * ENCODED_DECODE_BYTES_PER_PIXEL
    if jpeg is not None and jpeg.buffers_coefficients:
        padded_width, padded_height = (-(-side // (8 * factor)) * 8 * factor for side, factor in zip(stored_size, jpeg.largest_sampling))
        reserved += 2 * jpeg.components * padded_width * padded_height
    return reserved


# The EXIF Orientation values (TIFF tag 274) other than 1 (as stored): how the stored
# pixels are turned into those shown, as Pillow's ImageOps.exif_transpose turns them: 2
# mirrors, 3 rotates 180 degrees, 4 flips, 5 transposes, 6 rotates 90 degrees clockwise (a
# phone held upright), 7 transverses, 8 rotates 90 anticlockwise.
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _as_viewed(image: Image.Image, orientation: int | None) -> Image.Image:
    """A loaded image as stored -> as a viewer shows it, by the file's EXIF Orientation,
    as browsers (CSS ``image-orientation: from-image``) and ``ImageOps.exif_transpose`` do:
    a phone's photo stored sideways with Orientation 6 is classified upright. Turned by
    Pillow, before it is an array: a numpy view turned 90 degrees took 150 ms to copy for a
    12-megapixel photo, Pillow's transpose 55 ms. The side and pixel count checked before
    are the same either way round. None (:func:`explaind.exif.exif_orientation`) leaves
    the image as stored."""
    return image if orientation is None else image.transpose(_ORIENTATIONS[orientation])


def _check_decode_cost(image: Image.Image, jpeg: _JpegStream | None, field: str) -> None:
    """Refuse files whose decode costs far more than their pixel count suggests (``jpeg``:
    a JPEG's stream, walked before Pillow opened it)."""
    if jpeg is not None and jpeg.scans > MAX_JPEG_SCANS:
        raise InvalidArgument(f"JPEG has {jpeg.scans} scans; at most {MAX_JPEG_SCANS} are decoded", field=field)
    # Pillow decodes RLE bitmaps in Python, a pixel or a command at a time: a 17 KB RLE8
    # file of 4096 one-pixel rows took 5.8 s (a 4096x4096 PNG: 0.4 s).
    if image.format == "BMP" and image.info.get("compression") in (1, 2):
        raise InvalidArgument("run-length encoded (RLE4/RLE8) BMP files are not supported; send PNG or an uncompressed BMP", field=field)


@dataclass(frozen=True)
class _JpegStream:
    """What one walk of a JPEG's own stream (:func:`_jpeg_stream`) finds."""

    scans: int  # SOS markers
    frame: int | None  # the first start-of-frame marker's second byte
    components: int  # the colour components that frame names (1 grey, 3 YCbCr, 4 CMYK); 0 where none
    # The largest horizontal and vertical sampling factors of that frame's components (1
    # to 4); (4, 4), the largest libjpeg takes, where there are none or it refuses one.
    largest_sampling: tuple[int, int]
    first_scan_components: int  # the components the first scan (SOS) names; 0 where none
    multi_picture_index: bytes  # the last MPF (APP2) segment's TIFF structure before the first scan; empty where none
    exif: bytes  # the EXIF block of its APP1 segments before the first scan, joined as Pillow joins them; empty where none

    @property
    def buffers_coefficients(self) -> bool:
        """Whether libjpeg keeps the whole image's coefficients before any pixel comes out.
        It decides at the first scan (its ``has_multiple_scans``, jdinput.c): for a
        progressive frame, or a first scan that leaves out some of the frame's components,
        however many scans follow: a progressive file cut after its first scan, or a
        baseline one of a single scan of one component, held 96 MiB at 4096² all the same."""
        return self.frame in _JPEG_PROGRESSIVE_FRAMES or self.first_scan_components < self.components


def _jpeg_stream(data: bytes, field: str) -> _JpegStream:
    """A JPEG's own stream, walked once: its segments by their lengths up to EOI, each
    scan's data up to the next marker, and other bytes between segments skipped, as libjpeg
    and Pillow skip them; a malformed file is left for the decoder to refuse."""
    scans = markers = 0
    frame: int | None = None
    components = first_scan_components = 0
    largest_sampling = (4, 4)
    multi_picture_index = b""
    exif: list[bytes] = []
    position = 2  # after SOI
    while (found := _JPEG_MARKER.search(data, position)) is not None:
        position = found.start()
        marker = data[position + 1]
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise InvalidArgument(f"JPEG has over {MAX_JPEG_MARKERS} markers; encoders write far fewer", field=field)
        if marker == 0xD9:  # EOI: what follows is not decoded
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            position += 2
            continue
        if frame is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn, not DHT, JPG or DAC
            frame = marker
            components = data[position + 9] if position + 9 < len(data) else 0  # after length, precision, height and width
            # Each component's identifier, sampling factors (a byte: horizontal, vertical) and quantization table.
            factors = [(byte >> 4, byte & 15) for byte in data[position + 11:position + 10 + 3 * components:3]]
            if factors and all(h in _JPEG_SAMPLING_FACTORS and v in _JPEG_SAMPLING_FACTORS for h, v in factors):
                largest_sampling = (max(h for h, _ in factors), max(v for _, v in factors))
        end = position + 2 + int.from_bytes(data[position + 2:position + 4], "big")
        # Pillow reads the segments before the first scan while it opens the file: the last
        # MPF one's index, and the EXIF ones joined, the first whole, the others past "Exif\0\0".
        if marker == 0xE2 and not scans and data[position + 4:position + 8] == b"MPF\0":
            multi_picture_index = data[position + 8:end]
        if marker == 0xE1 and not scans and data[position + 4:position + 10] == b"Exif\0\0":
            exif.append(data[position + (10 if exif else 4):end])
        if marker == 0xDA and not scans:
            first_scan_components = data[position + 4] if position + 4 < len(data) else 0  # after length
        position = end
        if marker == 0xDA:
            scans += 1
            after_scan = _JPEG_MARKER_AFTER_SCAN.search(data, position)
            if after_scan is None:
                break
            position = after_scan.start()
    return _JpegStream(scans, frame, components, largest_sampling, first_scan_components, multi_picture_index, b"".join(exif))


def _check_jpeg_tag_values(jpeg: _JpegStream, field: str) -> None:
    """Refuse a JPEG whose multi-picture (MPF, APP2) index's or EXIF block's values would
    not fit in it together: Pillow reads them while it opens the file (the EXIF block's
    first directory for its resolution, where no JFIF segment gives it), 12 and older each
    value wherever it points (2600 entries at the same 33 KB of a 65 KB MPF segment took 82
    MB with Pillow 12; 1000 at the same 300 KB of an EXIF block in 5 APP1 segments, 290
    MB). Either is read only once it fits, as :func:`explaind.exif.exif_orientation` reads
    other formats' blocks."""
    if not values_fit(jpeg.multi_picture_index):
        raise InvalidArgument("JPEG's multi-picture (MPF) index has tag values that add up to more than its segment", field=field)
    if not values_fit(jpeg.exif):
        raise InvalidArgument("JPEG's EXIF block has tag values that add up to more than the block", field=field)


def _check_png_chunks(data: bytes, field: str) -> None:
    """Refuse PNGs whose chunks Pillow would inflate many times, or handle one by one in
    Python, while reading them. Walks the chunks by their lengths (not a search for their
    type names, which compressed image data can hold by chance); a malformed tail is left
    for Pillow to refuse."""
    profiles = texts = chunks = 0
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidArgument(f"PNG has over {MAX_PNG_CHUNKS} chunks; encoders write far fewer", field=field)
        kind = data[position + 4:position + 8]
        if kind == b"iCCP":
            profiles += 1
            if profiles > 1:
                raise InvalidArgument("PNG has 2 or more iCCP (colour profile) chunks; at most one is allowed", field=field)
        elif kind in (b"zTXt", b"iTXt"):
            texts += 1
            if texts > MAX_PNG_COMPRESSED_TEXT_CHUNKS:
                raise InvalidArgument(f"PNG has over {MAX_PNG_COMPRESSED_TEXT_CHUNKS} zTXt/iTXt chunks; at most {MAX_PNG_COMPRESSED_TEXT_CHUNKS} are allowed",
                                      field=field)
        elif kind == b"IEND":
            return
        position += 12 + int.from_bytes(data[position:position + 4], "big")


def _check_gif_blocks(data: bytes, field: str) -> None:
    """Refuse GIFs with more extension blocks (and sub-blocks) before their first image
    than MAX_GIF_BLOCKS: Pillow reads each in Python. Walks the blocks by their sizes; a
    malformed file is left for Pillow to refuse."""
    if len(data) < 13:
        return
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while position < len(data) and data[position] == 0x21:  # an extension; 0x2C is the first image
        position += 2  # introducer and label
        while position < len(data):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise InvalidArgument(f"GIF has over {MAX_GIF_BLOCKS} extension blocks before its image; encoders write a few", field=field)
            size = data[position]
            position += 1 + size
            if size == 0:  # the terminator
                break


def _check_tiff_directory(data: bytes, field: str) -> None:
    """Refuse TIFFs whose first directory (the image Pillow opens) has more than
    MAX_TIFF_DIRECTORY_ENTRIES entries or lists more than MAX_TIFF_STRIPS strips or
    tiles. Reads the directory's entries by their offsets; a malformed file is left for
    Pillow to refuse."""
    order = "little" if data[:2] == b"II" else "big"
    # Pillow takes a file for BigTIFF by its third byte alone, so it reads a big-endian
    # BigTIFF header (MM 00 2B) as classic TIFF's: that file is checked both ways.
    for big in {data[2:4] in (b"+\x00", b"\x00+"), data[2] == 43}:
        _check_tiff_layout(data, order, big, field)


def _check_tiff_layout(data: bytes, order: str, big: bool, field: str) -> None:
    """:func:`_check_tiff_directory` for one layout: BigTIFF's (``big``) or classic TIFF's."""
    count_size = 8 if big else 2  # bytes of a directory's entry count
    directory = int.from_bytes(data[8:16] if big else data[4:8], order)
    entries = int.from_bytes(data[directory:directory + count_size], order)
    if entries > MAX_TIFF_DIRECTORY_ENTRIES:  # BigTIFF's count allows billions; Pillow reads each in Python
        raise InvalidArgument(f"TIFF directory has {entries} entries; at most {MAX_TIFF_DIRECTORY_ENTRIES} are read", field=field)
    directories = directories_read(data, directory, order, big)
    strips = directories[0]["count"][np.isin(directories[0]["tag"], _TIFF_STRIP_TAGS)]
    if (over := strips[strips > MAX_TIFF_STRIPS]).size:
        raise InvalidArgument(f"TIFF has {int(over[0])} strips or tiles; at most {MAX_TIFF_STRIPS} are decoded", field=field)
    # Pillow 12 and older read each value wherever it points, however many point at the
    # same bytes: 4000 tags at the same 100 KB of a 148 KB file took 1.3 GB (Pillow 13 stops
    # there); and those of the EXIF and GPS directories as it loads the pixels.
    value_bytes = sum(stored_value_bytes(data, entries, big) for entries in directories)
    if value_bytes > len(data):
        raise InvalidArgument(f"TIFF tag values add up to {value_bytes} bytes, more than the file's {len(data)}", field=field)


def _grey16_to_rgb8(values: np.ndarray, *, field: str) -> np.ndarray:
    """16-bit greyscale (H, W) -> (H, W, 3) uint8, 65535 -> 255 rounded. Pillow's own
    ``convert("RGB")`` clips every value above 255 to white instead of scaling."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise InvalidArgument(f"integer greyscale pixels must lie in [0, 65535], got [{low}, {high}]", field=field)
    # Scaled in place in one uint32 copy, gone before the RGB pixels are made: a 4096² file
    # held 8 bytes a pixel here, now 5.
    scaled = values.astype(np.uint32)
    scaled *= 255
    scaled += 32767
    scaled //= 65535
    grey = scaled.astype(np.uint8)
    del scaled
    return np.repeat(grey[:, :, None], 3, axis=2)


# How many times the side the fit resizes from (resize_size, or size) a JPEG decoded at a
# reduced scale keeps at least, so the antialiased resize still does most of the reduction.
# On photo-like 12 and 2 megapixel JPEGs (bench/jpeg_reduced_decode.py) the 224 input
# differed from the full decode's by 0.3 levels of 255 on average and at most 3 at 2x, by
# 0.9-1.0 and at most 12 at 1x, which took a fifth less time.
JPEG_REDUCED_DECODE_MARGIN = 2


# Longest side an image is resized to before its centre crop; a longer one (an extreme
# aspect ratio, such as 1x4096) has only its central part resized.
_MAX_RESIZED_SIDE = MAX_IMAGE_SIDE


@dataclass(frozen=True)
class InputGeometry:
    """How an image of any size becomes the classifier's (size, size) input.

    ``resize_size`` 0 resizes the whole image to (size, size), so other aspect ratios are
    stretched. Otherwise the shorter side is resized to ``resize_size``, keeping the aspect
    ratio, and the central (size, size) square is cropped: torchvision's evaluation
    transform (``Resize(resize_size)``, ``CenterCrop(size)``; e.g. 256 then 224 for ResNet-50's
    IMAGENET1K_V1 weights, 232 then 224 for V2), so a model sees what its reference pipeline
    would show it.
    ``interpolation`` is "bilinear" or "bicubic", antialiased as torchvision resizes tensors.
    ``jpeg_reduced_decode`` ([classifier].jpeg_reduced_decode) decodes JPEG files at a
    reduced scale (:attr:`jpeg_min_side`): faster, in pixels that differ slightly from those
    of the whole image resized. Out of the repr, which keys the feature cache
    (engine.models' ``feature_cache_key``), so that keys made without it stay those of off.
    """

    size: int
    resize_size: int = 0
    interpolation: str = "bilinear"
    jpeg_reduced_decode: bool = dataclasses.field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def jpeg_min_side(self) -> int:
        """The least side a JPEG is decoded to (:func:`decode_pixels`), 0 for its whole size:
        with ``jpeg_reduced_decode``, :data:`JPEG_REDUCED_DECODE_MARGIN` times the side
        :meth:`fit` resizes from, the shorter one's ``resize_size`` or (stretched) both to
        ``size``, so :meth:`fit` only ever reduces the image."""
        return JPEG_REDUCED_DECODE_MARGIN * (self.resize_size or self.size) if self.jpeg_reduced_decode else 0

    def fit(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 or float in [0, 1] -> contiguous (3, size, size), same dtype."""
        if not self.resize_size:
            return self._resize(image, (self.size, self.size)).contiguous()
        image = self._central_window(image)
        height, width = image.shape[1:]
        short, long = min(height, width), max(height, width)
        scaled = self.resize_size, int(self.resize_size * long / short)  # torchvision's size for Resize(int)
        target = scaled if height <= width else scaled[::-1]
        image = self._resize(image, target)
        top, left = round((target[0] - self.size) / 2.0), round((target[1] - self.size) / 2.0)  # CenterCrop's offsets
        return image[:, top:top + self.size, left:left + self.size].contiguous()

    def _central_window(self, image: torch.Tensor) -> torch.Tensor:
        """The image, or, if its resized long side would exceed ``_MAX_RESIZED_SIDE`` (a
        1x4096 strip would become 256x1048576), the central part of its long side that the
        crop keeps, with a margin for the filter, centred as the whole image is. The crop
        then lands within a pixel of where it would on the whole image."""
        height, width = image.shape[1:]
        short, long = min(height, width), max(height, width)
        if self.resize_size * long / short <= _MAX_RESIZED_SIDE:
            return image
        scale = self.resize_size / short  # resized pixels per source pixel
        keep = max(short, math.ceil(self.size / scale) + 2 * (math.ceil(2 / scale) + 2))
        keep += (long - keep) % 2  # an even remainder: the window's centre is the image's
        start = (long - keep) // 2
        return image[:, start:start + keep] if height > width else image[:, :, start:start + keep]

    def _resize(self, image: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
        if tuple(image.shape[1:]) == target:
            return image
        resized = torch.nn.functional.interpolate(image[None], size=target, mode=self.interpolation, antialias=True, align_corners=False)[0]
        return resized.clamp_(0.0, 1.0) if resized.is_floating_point() else resized


def stacked_batch(images: list[torch.Tensor], *, field: str | None) -> torch.Tensor:
    """``images``, each (3, S, S), as one batch (n, 3, S, S); out of memory,
    :class:`DecodeOutOfMemory` naming ``field`` (:func:`preparing_images`)."""
    with preparing_images(field):
        return torch.stack(images)


def decode_encoded(data: bytes, *, field: str, geometry: InputGeometry | None = None, budget: PixelBudget | None = None) -> torch.Tensor:
    """Encoded bytes -> (3, H, W) float32 in [0, 1]; with ``geometry``, (3, size, size),
    resized while still uint8 so a large image never exists as float, from a JPEG decoded
    at a reduced scale where the geometry asks for it (``jpeg_reduced_decode``)."""
    pixels = decode_pixels(data, field=field, budget=budget, jpeg_min_side=0 if geometry is None else geometry.jpeg_min_side)
    with preparing_images(field):
        return uint8_hwc_to_float_chw(_fit_uint8(pixels, geometry))


def _fit_uint8(pixels: np.ndarray, geometry: InputGeometry | None) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by ``geometry``, resized as uint8."""
    if geometry is None or (pixels.shape[:2] == (geometry.size, geometry.size) and not geometry.resize_size):
        return pixels
    channels_last = torch.from_numpy(np.require(pixels, requirements=("C", "W"))).permute(2, 0, 1)
    return geometry.fit(channels_last).permute(1, 2, 0).numpy()


def uint8_hwc_to_float_chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> contiguous (3, H, W) float32 in [0, 1].

    One numpy ufunc rather than four torch ops: it runs once per Predict on a cold cache,
    where it measured 0.10 ms against 0.26 ms. The division is the same IEEE float32
    division torch's ``div`` does, so the pixels are bit-identical.
    """
    return torch.from_numpy(np.divide(pixels.transpose(2, 0, 1), np.float32(255), dtype=np.float32, order="C"))


def decode_array(array: np.ndarray, *, field: str, geometry: InputGeometry | None = None, budget: PixelBudget | None = None) -> torch.Tensor:
    """A raw pixel array -> (3, H, W) float32 in [0, 1]; with ``geometry``, (3, size, size).

    Accepts uint8 (H, W, 3) in [0, 255], or float (3, H, W) / (H, W, 3) in [0, 1].
    uint8 pixels are resized as :func:`decode_encoded` does, so a PNG and its raw pixels
    give the same input.
    """
    if array.ndim != 3:
        raise InvalidArgument(f"expected 3 dimensions (H, W, 3) or (3, H, W), got shape {tuple(array.shape)}", field=field)
    if array.size == 0:
        raise InvalidArgument(f"tensor is empty (shape {tuple(array.shape)})", field=field)
    if array.dtype == np.uint8:
        if array.shape[2] != 3:
            raise InvalidArgument(f"uint8 images must be (H, W, 3), got shape {tuple(array.shape)}", field=f"{field}.shape")
        _check_side(array.shape[1], array.shape[0], field, budget)
        with preparing_images(field):
            return uint8_hwc_to_float_chw(_fit_uint8(array, geometry))
    if array.dtype in (np.float16, np.float32):
        if array.shape[0] != 3 and array.shape[2] != 3:
            raise InvalidArgument(f"float images must be (3, H, W) or (H, W, 3), got shape {tuple(array.shape)}", field=f"{field}.shape")
        height, width = array.shape[1:] if array.shape[0] == 3 else array.shape[:2]
        _check_side(width, height, field, budget)
        # The one copy, float32, writeable (the array may be a read-only view of the request's
        # bytes); the checks and the clamp below allocate no other: isfinite's temporaries
        # and an out-of-place clamp took 2.25 more of its size, per worker thread at once.
        with preparing_images(field):
            tensor = torch.from_numpy(np.array(array, dtype=np.float32))
        if array.shape[0] != 3:
            tensor = tensor.permute(2, 0, 1)
        low, high = (float(bound) for bound in torch.aminmax(tensor))  # a NaN makes both NaN
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InvalidArgument("tensor contains NaN or infinite values", field=field)
        if low < -1e-3 or high > 1 + 1e-3:
            raise InvalidArgument(f"float pixels must lie in [0, 1], got [{low:.3g}, {high:.3g}] (normalisation happens on the server)", field=field)
        tensor = tensor.clamp_(0.0, 1.0)
        if geometry is None:
            return tensor
        with preparing_images(field):
            return geometry.fit(tensor)
    raise InvalidArgument(f"unsupported dtype {array.dtype}; use uint8, float16 or float32", field=field)


def _check_side(width: int, height: int, field: str, budget: PixelBudget | None) -> None:
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InvalidArgument(f"image is {width}x{height}; the largest side allowed is {MAX_IMAGE_SIDE}", field=field)
    if budget is not None:
        budget.charge(width, height)


def array_from_buffer(dtype: str, shape: tuple[int, ...], data: bytes, *, field: str) -> np.ndarray:
    """Interpret raw little-endian bytes as an image array; checks the byte count against dtype x shape."""
    if len(shape) != 3:  # before the reshape: numpy refuses over 64 dimensions with its own error
        raise InvalidArgument(f"expected 3 dimensions (H, W, 3) or (3, H, W), got {len(shape)}", field=f"{field}.shape")
    if dtype not in _DTYPES:
        raise InvalidArgument(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}", field=f"{field}.dtype")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"negative dimension in shape {shape}", field=f"{field}.shape")
    if 0 in shape:  # before the byte count: a zero dimension makes any other dimension "fit" no bytes
        raise InvalidArgument(f"tensor is empty (shape {shape})", field=f"{field}.shape")
    np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    expected = math.prod(shape) * np_dtype.itemsize  # Python ints: a forged shape cannot overflow
    if expected != len(data):
        raise InvalidArgument(f"shape {shape} of {dtype} needs {expected} bytes, got {len(data)}", field=f"{field}.data")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def to_uint8_hwc(image: torch.Tensor, *, overwrite: bool = False) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, through one float copy of ``image``
    scaled and rounded in place (an upload's 64 MiB tensor made two more), or none where
    ``overwrite`` says the caller has no further use for ``image``'s values."""
    scaled = image.clamp_(0, 1) if overwrite else image.clamp(0, 1)
    return scaled.mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()


# zlib level of the images a job makes (progress previews, grids, visualisations): the
# fastest, lossless as any. Level 6, Pillow's default, took 4.6 times as long on a
# visualisation preview (50 ms against 11 ms, 16 noisy 128 px tiles) for files 10 % smaller,
# and 7 % of a VisualizeNeurons job went to its PNGs (bench/png_encoding.py, docs/performance.md).
JOB_IMAGE_COMPRESS_LEVEL = 1


def encode_png(pixels: np.ndarray, *, compress_level: int | None = None) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; ``compress_level`` 0-9 is zlib's (None: Pillow's
    default, 6). Stored samples keep the default: their bytes, and so their digests, stay
    those earlier versions stored for the same pixels."""
    buffer = io.BytesIO()
    options = {} if compress_level is None else {"compress_level": compress_level}
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


# Captioned tiles are at least this wide (small images scaled up by a whole factor), so a
# caption like "triangle>square" fits in the default font's 6 px per character.
MIN_CAPTIONED_TILE_WIDTH = 128


def image_grid(images: list[np.ndarray], captions: list[str] | None = None, *, columns: int = 8) -> np.ndarray:
    """Tile (H, W, 3) uint8 images into one (rows*H', columns*W', 3) uint8 image, H' x W'
    a tile: H x W, or with captions scaled up (nearest neighbour) to at least
    :data:`MIN_CAPTIONED_TILE_WIDTH` wide, with a 12-pixel caption strip under it."""
    from PIL import ImageDraw

    if not images:
        return np.zeros((16, 16, 3), dtype=np.uint8)
    height, width = images[0].shape[:2]
    scale = -(-MIN_CAPTIONED_TILE_WIDTH // width) if captions else 1
    height, width = height * scale, width * scale
    strip = 12 if captions else 0
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * width, rows * (height + strip)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, pixels in enumerate(images):
        x, y = (index % columns) * width, (index // columns) * (height + strip)
        canvas.paste(Image.fromarray(pixels).resize((width, height), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 1, y + height), captions[index][: max(1, width // 6)], fill=(0, 0, 0))
    return np.asarray(canvas)
