"""A file's EXIF Orientation, read as the server and the SDK both read it (numpy and Pillow
only: the SDK imports it without torch), so that a photo sent as a file, as bytes or as a
PIL image reaches the classifier turned the same way."""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image

# Bytes per value of the TIFF field types Pillow reads, by type number (0 for those it skips).
TIFF_TYPE_SIZES = (0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 8, 8)


def exif_orientation(image: Image.Image) -> int | None:
    """An image's EXIF Orientation that turns it (an int 2-8; from an XMP packet's
    tiff:Orientation where the EXIF block has none, as ImageOps.exif_transpose reads it),
    else None: none, 1, another value (0, 9, a string, a rational 6/1 that Pillow would
    take for 6), or a block that cannot be read. Pillow warns and reads none of a block it
    takes for corrupt, but raises on others (a PNG's eXIf chunk that is no TIFF header:
    SyntaxError; cut short: struct.error), and :func:`_exif_values_fit` refuses one before
    Pillow reads it. Only the tag is unsound there, not the pixels: they are shown as
    stored, as browsers show them. The image is loaded first: a PNG's eXIf chunk may
    follow its pixels, and Pillow's getexif would load it to read the block unchecked."""
    image.load()
    try:
        if not _exif_values_fit(_exif_block(image)):
            return None
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return orientation if type(orientation) is int and 2 <= orientation <= 8 else None  # noqa: E721 - not a bool or a rational equal to one


def _exif_block(image: Image.Image) -> bytes:
    """The EXIF block Pillow's getexif reads, as it finds it (empty where there is none, or
    a TIFF's, whose tags Pillow read while it opened the file)."""
    if "exif" in image.info:
        return image.info["exif"]
    if "Raw profile type exif" in image.info:  # ImageMagick's PNG text chunk, in hex
        return bytes.fromhex("".join(image.info["Raw profile type exif"].split("\n")[3:]))
    return b""


def _exif_values_fit(block: bytes) -> bool:
    """Whether the values of an EXIF block's first directory, those not held in their
    entries, fit in the block together. Pillow 12 and older (pyproject allows 10) copy each
    entry's value from wherever it points, so a block of many entries pointing at the same
    bytes took memory many times its size (4000 entries at the same 100 KB: 400 MB from a
    148 KB PNG with Pillow 11, and a PNG's or WebP's block has no size limit); Pillow 13
    stops reading there."""
    while block.startswith(b"Exif\0\0"):
        block = block[6:]
    if block[:4] not in (b"II*\0", b"II\0*", b"MM\0*", b"MM*\0"):  # the classic TIFF headers Pillow reads
        return True  # none, or one Pillow refuses, or BigTIFF's, which it cannot read from 8 bytes
    byteorder, order = ("little", "<") if block[:2] == b"II" else ("big", ">")
    directory = int.from_bytes(block[4:8], byteorder)
    if directory + 2 > len(block):
        return True  # Pillow reads no entries
    count = min(int.from_bytes(block[directory:directory + 2], byteorder), (len(block) - directory - 2) // 12)  # those there are, as Pillow reads them
    entry = np.dtype([("tag", order + "u2"), ("type", order + "u2"), ("count", order + "u4"), ("value", order + "u4")])
    entries = np.frombuffer(block, dtype=entry, count=count, offset=directory + 2)
    types = entries["type"].astype(np.intp)
    type_sizes = np.array(TIFF_TYPE_SIZES, dtype=np.uint64)
    sizes = entries["count"].astype(np.uint64) * np.where(types < len(type_sizes), type_sizes[np.minimum(types, len(type_sizes) - 1)], 0)
    return int(sizes[sizes > 4].sum()) <= len(block)
