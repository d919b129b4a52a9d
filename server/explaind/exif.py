"""A file's EXIF Orientation, read as the server and the SDK both read it (numpy and Pillow
only: the SDK imports it without torch), so that a photo sent as a file, as bytes or as a
PIL image reaches the classifier turned the same way; and the TIFF directories Pillow reads
(an EXIF block's, a TIFF file's, a JPEG's MPF index), whose values Pillow 12 and older copy
however many entries point at the same bytes, added up before Pillow is let read them."""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image

# Bytes per value of the TIFF field types Pillow reads, by type number (0 for those it skips).
TIFF_TYPE_SIZES = (0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 8, 8)
# Those whose one value Pillow reads as an int: BYTE, SHORT, LONG, their signed types, IFD, LONG8 and the rest.
_INTEGER_TYPES = (1, 3, 4, 6, 8, 9, 13, 16, 17, 18)
# The tags of the directories Pillow's Image.Exif.get_ifd reads besides the first: EXIF's
# and GPS's, pointed at from the first, and Interop's, from EXIF's.
EXIF_IFD, GPS_IFD, INTEROP_IFD = 34665, 34853, 40965


def exif_orientation(image: Image.Image) -> int | None:
    """An image's EXIF Orientation that turns it (an int 2-8; from an XMP packet's
    tiff:Orientation where the EXIF block has none, as ImageOps.exif_transpose reads it),
    else None: none, 1, another value (0, 9, a string, a rational 6/1 that Pillow would
    take for 6), or a block that cannot be read. Pillow warns and reads none of a block it
    takes for corrupt, but raises on others (a PNG's eXIf chunk that is no TIFF header:
    SyntaxError; cut short: struct.error), and :func:`values_fit` refuses one before
    Pillow reads it. Only the tag is unsound there, not the pixels: they are shown as
    stored, as browsers show them. The image is loaded first: a PNG's eXIf chunk may
    follow its pixels, and Pillow's getexif would load it to read the block unchecked."""
    image.load()
    try:
        if not values_fit(_exif_block(image)):
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


def values_fit(block: bytes) -> bool:
    """Whether the values of an EXIF block's directories that Pillow reads (or a JPEG's MPF
    index's), those not held in their entries, fit in the block together. Pillow 12 and
    older (pyproject allows 10.1) copy each entry's value from wherever it points, so a
    block of many entries pointing at the same bytes took memory many times its size (4000
    entries at the same 100 KB: 400 MB from a 148 KB PNG with Pillow 11, and a PNG's or
    WebP's block has no size limit); Pillow 13 stops reading there. The EXIF, GPS and
    Interop directories count too: ImageOps.exif_transpose, which the SDK turns a PIL image
    with, reads them (2000 entries at the same 100 KB of a 124 KB PNG's EXIF directory: 1.2
    GB with Pillow 12), and so the server and the SDK turn the same files."""
    while block.startswith(b"Exif\0\0"):
        block = block[6:]
    if block[:4] not in (b"II*\0", b"II\0*", b"MM\0*", b"MM*\0"):  # the classic TIFF headers Pillow reads
        return True  # none, or one Pillow refuses, or BigTIFF's, which it cannot read from 8 bytes
    order = "little" if block[:2] == b"II" else "big"
    directories = directories_read(block, int.from_bytes(block[4:8], order), order)
    return sum(stored_value_bytes(block, entries) for entries in directories) <= len(block)


def directory_entries(data: bytes, directory: int, order: str, big: bool = False) -> np.ndarray:
    """The entries (tag, type, count, value) of the TIFF directory at offset ``directory``
    of ``data``, those there are, as Pillow reads them; classic TIFF's layout, or BigTIFF's
    (``big``: 8-byte counts and values); none where it lies past the end."""
    count_size, entry_size, width = (8, 20, "u8") if big else (2, 12, "u4")
    if directory + count_size > len(data):
        return np.empty(0, dtype=_entry_dtype(order, width))
    count = min(int.from_bytes(data[directory:directory + count_size], order), (len(data) - directory - count_size) // entry_size)
    return np.frombuffer(data, dtype=_entry_dtype(order, width), count=count, offset=directory + count_size)


def _entry_dtype(order: str, width: str) -> np.dtype:
    prefix = "<" if order == "little" else ">"
    return np.dtype([("tag", prefix + "u2"), ("type", prefix + "u2"), ("count", prefix + width), ("value", prefix + width)])


def directories_read(data: bytes, first: int, order: str, big: bool = False) -> list[np.ndarray]:
    """The entries of the directories Pillow reads from a TIFF structure: the first, and
    those its ``Image.Exif.get_ifd`` follows (a TIFF's load and ImageOps.exif_transpose
    call it): EXIF's and GPS's, pointed at from the first, and Interop's, from EXIF's."""
    entries = directory_entries(data, first, order, big)
    exif = _pointed_at(data, entries, EXIF_IFD, order, big)
    interop = [found for directory in exif for found in _pointed_at(data, directory, INTEROP_IFD, order, big)]
    return [entries, *exif, *_pointed_at(data, entries, GPS_IFD, order, big), *interop]


def _pointed_at(data: bytes, entries: np.ndarray, tag: int, order: str, big: bool) -> list[np.ndarray]:
    """The entries of the directories entries of ``tag`` point at: of the first and of the
    last of them Pillow keeps, the one Pillow 13 reads of a directory holding the tag twice
    and the one 12 and older read (each entry replaced the one before)."""
    found = entries[entries["tag"] == tag]
    kept = found[_value_sizes(data, found, big) > 0]
    ends = kept[[0, -1]] if len(kept) else kept
    offsets = sorted({offset for entry in ends if (offset := _pointer(data, entry, order, big)) is not None})
    return [directory_entries(data, offset, order, big) for offset in offsets]


def _pointer(data: bytes, entry: np.void, order: str, big: bool) -> int | None:
    """The offset an entry holds, read as Pillow reads it: one value of an integer type,
    left-justified in the entry's value field, or, one wider than that field (a LONG8 in
    classic TIFF), at the offset the field holds; else None."""
    if entry["count"] != 1 or int(entry["type"]) not in _INTEGER_TYPES:
        return None
    size = TIFF_TYPE_SIZES[int(entry["type"])]
    field = int(entry["value"]).to_bytes(8 if big else 4, order)
    if size > len(field):
        start = int.from_bytes(field, order)
        field = data[start:start + size]
    return int.from_bytes(field[:size], order)


def _value_sizes(data: bytes, entries: np.ndarray, big: bool) -> np.ndarray:
    """Bytes of each entry's value, 0 for one Pillow skips: of a type it does not read, of
    no values, or held outside its entry and said by its count to run past the end of
    ``data`` (a corrupt count: Pillow 13 skips it, and older ones stop reading its
    directory there, having copied no more than ``data``)."""
    types = entries["type"].astype(np.intp)
    units = np.array(TIFF_TYPE_SIZES, dtype=np.uint64)[np.minimum(types, len(TIFF_TYPE_SIZES) - 1)] * (types < len(TIFF_TYPE_SIZES))
    counts = entries["count"].astype(np.uint64)
    per_unit = np.maximum(units, np.uint64(1))
    available = np.uint64(len(data)) - np.minimum(entries["value"].astype(np.uint64), np.uint64(len(data)))
    held = (units > 0) & ((counts <= np.uint64(8 if big else 4) // per_unit) | (counts <= available // per_unit))  # no count x size: BigTIFF's 8-byte counts overflow it
    return np.where(held, counts * units, np.uint64(0))


def stored_value_bytes(data: bytes, entries: np.ndarray, big: bool = False) -> int:
    """Bytes of the values of ``entries`` not held in them (more than a value field's
    bytes) that Pillow copies (:func:`_value_sizes`)."""
    sizes = _value_sizes(data, entries, big)
    return int(sizes[sizes > (8 if big else 4)].sum())
