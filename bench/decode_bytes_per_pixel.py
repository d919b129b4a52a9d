"""What an image file takes while it decodes, per pixel, against what its call reserves
(explaind.imaging's reservation: ENCODED_DECODE_BYTES_PER_PIXEL of the size it decodes
to, and the coefficients of a JPEG libjpeg buffers whole: progressive, or a first scan
leaving out a component), measured in one run.

    python bench/decode_bytes_per_pixel.py [--side 4096]

Writes one ``--side``² file per format and mode, of random pixels (incompressible, so the
file is as large as it gets) but for the progressive and one-scan JPEGs, of a smooth ramp
(random pixels overflow Pillow's progressive encoder), and the crafted JPEGs Pillow cannot
write (sampling factors of 3, lossless), of mid-grey; those with EXIF Orientation 6 are
turned as decoded. JPEG-in-TIFF comes striped, in one strip, tiled and old-style. Then
decodes each in a fresh process as Predict does (decode_encoded to 224 px; the JPEGs
marked "reduced" as with [classifier].jpeg_reduced_decode, at the least scale leaving
both sides at least 512: 1/8 of their size at 4096², 1/4 at 2048²) and prints the peak resident growth per pixel of the stored size and its ratio to what
the decode reserved: above 1, the budget under-counts that file. Each process first decodes a
64² file of the same kind, so that what the first decode sets up once (torch's resize, the
codec's tables) is not counted as the file's.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path


def _write_files(directory: Path, side: int) -> list[Path]:
    rng = np.random.default_rng(0)
    turned = Image.Exif()
    turned[274] = 6  # Orientation: a phone held upright
    rgb = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
    rgba = rgb.convert("RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), "L")
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    smooth = Image.fromarray(np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1).astype(np.uint8), "RGB")
    files = {
        "palette.png": (grey.convert("P"), {}),
        "palette-transparent-turned.png": (grey.convert("P"), {"transparency": 0, "exif": turned}),
        "grey16-turned.png": (Image.fromarray(rng.integers(0, 65536, (side, side), dtype=np.uint16)), {"exif": turned}),
        "rgb.png": (rgb, {}),
        "rgb-turned.png": (rgb, {"exif": turned}),
        "rgba.png": (rgba, {}),
        "rgba-turned.png": (rgba, {"exif": turned}),
        "rgb-turned.jpg": (rgb, {"exif": turned, "quality": 90}),
        "rgb-turned.jpg reduced": (rgb, {"exif": turned, "quality": 90}),
        # Smooth: random pixels at this quality overflow the progressive encoder's buffer.
        "progressive.jpg reduced": (smooth, {"quality": 90, "progressive": True}),
        "progressive-444.jpg": (smooth, {"quality": 95, "progressive": True, "subsampling": 0}),
        "progressive-444.jpg reduced": (smooth, {"quality": 95, "progressive": True, "subsampling": 0}),
        "progressive-cmyk.jpg reduced": (smooth.convert("CMYK"), {"quality": 95, "progressive": True}),
        # One scan each (_ONE_SCAN), which libjpeg still buffers whole before any pixel comes out.
        "first-scan-only.jpg reduced": (smooth, {"quality": 95, "progressive": True, "subsampling": 0}),
        "one-component-scan.jpg reduced": (smooth, {"quality": 95, "subsampling": 0}),
        "cmyk-turned.jpg": (rgb.convert("CMYK"), {"exif": turned, "quality": 90}),
        "rgb-turned.tif": (rgb, {"exif": turned}),
        "rgba-turned.tif": (rgba, {"exif": turned}),
        # JPEG-in-TIFF (Compression 7), decoded by libtiff's libjpeg: in strips of 64 KiB, or one.
        "rgb-jpeg.tif": (rgb, {"compression": "jpeg", "quality": 90}),
        "rgb-jpeg-one-strip.tif": (rgb, {"compression": "jpeg", "quality": 90, "strip_size": 1 << 40}),
        "ycbcr-jpeg.tif": (rgb.convert("YCbCr"), {"compression": "jpeg", "quality": 90}),
        "cmyk-jpeg.tif": (rgb.convert("CMYK"), {"compression": "jpeg", "quality": 90}),
        "grey-jpeg.tif": (grey, {"compression": "jpeg", "quality": 90}),
        "rgb-lossy-turned.webp": (rgb, {"exif": turned, "quality": 90}),
        "rgba-lossless.webp": (rgba, {"lossless": True}),
        "rgba-lossless-turned.webp": (rgba, {"exif": turned, "lossless": True}),
    }
    for name, (image, options) in files.items():
        for side_name, shown in (("", image), ("small-", image.resize((64, 64)))):
            path = directory / (side_name + name)
            shown.save(path, format=Path(name.split()[0]).suffix[1:].replace("jpg", "jpeg").replace("tif", "tiff"), **options)
            if name in _ONE_SCAN:
                path.write_bytes(_ONE_SCAN[name](path.read_bytes()))
    for name, crafted in _CRAFTED.items():
        for side_name, shown in (("", rgb), ("small-", rgb.resize((64, 64)))):
            (directory / (side_name + name)).write_bytes(crafted(shown))
    return [directory / name for name in [*files, *_CRAFTED]]


def first_scan_only(data: bytes) -> bytes:
    """A JPEG cut after its first scan's data, then ended (EOI): a progressive one's DC scan."""
    start = data.index(b"\xff\xda")
    return data[:re.compile(rb"\xff[^\x00]").search(data, start + 2).start()] + b"\xff\xd9"


def first_component_scanned_only(data: bytes) -> bytes:
    """A baseline JPEG whose one scan names only its first component (its data, read as
    that component's alone, still decodes)."""
    start = data.index(b"\xff\xda")
    named = data[start + 4]
    return data[:start] + b"\xff\xda\x00\x08\x01" + data[start + 5:start + 7] + data[start + 5 + 2 * named:]


def grey_jpeg(side: int, factors: list[tuple[int, int]], *, lossless: bool = False, interleaved: bool = True) -> bytes:
    """A ``side``² JPEG of mid-grey whose components have the sampling ``factors``
    (horizontal, vertical) of 1 to 4 each, which Pillow cannot write (3, or any but 4:4:4,
    4:2:2 and 4:2:0), or of the lossless process (SOF3, predictor 1); ``interleaved``
    False gives each component a scan of its own. Every difference is zero, coded as the
    one Huffman code "0" (DC/lossless category 0, AC end of block), so each block (each
    sample, lossless) takes its 1 or 2 bits of zeros."""
    unit = 1 if lossless else 8  # pixels on a side of a component's block (lossless: a sample)
    largest_h, largest_v = (max(axis) for axis in zip(*factors))

    def segment(marker: int, body: bytes) -> bytes:
        return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body

    one_code_zero = bytes((1,) + (0,) * 15) + b"\x00"  # one code of length 1, for the symbol 0
    header = b"\xff\xd8" + segment(0xC4, b"\x00" + one_code_zero + (b"" if lossless else b"\x10" + one_code_zero))
    if not lossless:
        header += segment(0xDB, b"\x00" + b"\x01" * 64)
    frame = bytes((8,)) + side.to_bytes(2, "big") * 2 + bytes((len(factors),))
    frame += b"".join(bytes((index + 1, h << 4 | v, 0)) for index, (h, v) in enumerate(factors))
    spectral = b"\x01\x00\x00" if lossless else b"\x00\x3f\x00"  # lossless: predictor 1, point transform 0
    bits_per_block = 1 if lossless else 2
    scans = b""
    if interleaved:
        units = -(-side // (unit * largest_h)) * -(-side // (unit * largest_v)) * sum(h * v for h, v in factors)
        scans = segment(0xDA, bytes((len(factors),)) + b"".join(bytes((index + 1, 0)) for index in range(len(factors))) + spectral)
        scans += bytes(-(-units * bits_per_block // 8))
    else:
        for index, (h, v) in enumerate(factors):  # a scan of one component codes its own blocks, unpadded
            units = -(-side * h // (unit * largest_h)) * -(-side * v // (unit * largest_v))
            scans += segment(0xDA, bytes((1, index + 1, 0)) + spectral) + bytes(-(-units * bits_per_block // 8))
    return header + segment(0xC3 if lossless else 0xC0, frame) + scans + b"\xff\xd9"


def _jpeg(image: Image.Image) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=90)  # 4:2:0 YCbCr
    return encoded.getvalue()


# StripOffsets and TileOffsets: the tags of their blocks' byte counts.
_BYTE_COUNTS_TAGS = {273: 279, 324: 325}


def _little_endian_tiff(tags: dict[int, tuple[int, ...]], blocks: list[bytes], offsets_tag: int) -> bytes:
    """A TIFF of ``blocks`` (its strips or tiles, in order) and one directory of ``tags``
    (SHORT values; LONG those of sizes and offsets) and of the blocks' offsets
    (``offsets_tag``: 273 strips, 324 tiles) and byte counts."""
    data = bytearray(b"II*\x00\x00\x00\x00\x00")
    offsets = []
    for block in blocks:
        offsets.append(len(data))
        data += block + b"\x00" * (len(block) % 2)  # values start on a word boundary
    tags = {**tags, offsets_tag: tuple(offsets), _BYTE_COUNTS_TAGS[offsets_tag]: tuple(len(block) for block in blocks)}
    directory = len(data)
    data[4:8] = directory.to_bytes(4, "little")
    values = bytearray()
    values_at = directory + 2 + 12 * len(tags) + 4
    entries = b""
    for tag, value in sorted(tags.items()):
        long = tag in (256, 257, 273, 279, 322, 323, 324, 325, 513, 514)
        packed = b"".join(number.to_bytes(4 if long else 2, "little") for number in value)
        if len(packed) > 4:
            packed, values = (values_at + len(values)).to_bytes(4, "little"), values + packed
        entries += tag.to_bytes(2, "little") + (4 if long else 3).to_bytes(2, "little") + len(value).to_bytes(4, "little") + packed.ljust(4, b"\x00")
    return bytes(data + len(tags).to_bytes(2, "little") + entries + bytes(4) + values)


def old_style_jpeg_tiff(image: Image.Image) -> bytes:
    """An RGB ``image`` as a TIFF of old-style JPEG compression (6): one JPEG interchange
    stream (JPEGInterchangeFormat) as its one strip, 4:2:0 YCbCr as libtiff reads it."""
    width, height, stream = *image.size, _jpeg(image)
    tags = {256: (width,), 257: (height,), 258: (8, 8, 8), 259: (6,), 262: (6,), 277: (3,), 278: (height,), 530: (2, 2)}
    tags |= {513: (8,), 514: (len(stream),)}  # JPEGInterchangeFormat: the strip, the first block after the header
    return _little_endian_tiff(tags, [stream], 273)


def tiled_jpeg_tiff(image: Image.Image, tile: int = 256) -> bytes:
    """An RGB ``image`` as a TIFF of JPEG compression (7) in ``tile``² tiles, each a JPEG
    stream of its own (4:2:0 YCbCr), which Pillow cannot write."""
    width, height = image.size
    tiles = [_jpeg(image.crop((left, top, left + tile, top + tile))) for top in range(0, height, tile) for left in range(0, width, tile)]
    tags = {256: (width,), 257: (height,), 258: (8, 8, 8), 259: (7,), 262: (6,), 277: (3,), 322: (tile,), 323: (tile,), 530: (2, 2)}
    return _little_endian_tiff(tags, tiles, 324)


# Also tests/test_decode_memory.py's files: rewrites of a JPEG libjpeg buffers whole though it has one scan.
_ONE_SCAN = {"first-scan-only.jpg reduced": first_scan_only, "one-component-scan.jpg reduced": first_component_scanned_only}
# Files Pillow cannot write, of the random RGB image or its size. libjpeg buffers whole the
# JPEGs of a scan for each component. A factor of 3 makes a 24-pixel MCU; 3x3 for all three
# components, 11 blocks to an MCU, libjpeg takes only in scans of one component.
_CRAFTED = {
    "sampling-3-scan-each.jpg reduced": lambda rgb: grey_jpeg(rgb.width, [(3, 3)] * 3, interleaved=False),
    "sampling-3-1-scan-each.jpg": lambda rgb: grey_jpeg(rgb.width, [(3, 1), (1, 1), (1, 1)], interleaved=False),
    "lossless.jpg reduced": lambda rgb: grey_jpeg(rgb.width, [(1, 1)] * 3, lossless=True),
    "lossless-scan-each.jpg reduced": lambda rgb: grey_jpeg(rgb.width, [(1, 1)] * 3, lossless=True, interleaved=False),
    "old-style-jpeg.tif": old_style_jpeg_tiff,
    "tiled-jpeg.tif": tiled_jpeg_tiff,
}


def _decode_peak(path: Path) -> tuple[int, int]:
    """(peak resident growth, largest reservation) in bytes of decoding ``path`` in a fresh
    process (Linux), after a decode of its 64² copy."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's, this one's large files and all.
    code = ("import sys; from explaind.imaging import InputGeometry, PixelBudget, decode_encoded\n"
            "reserved = [0]\n"
            "class Recording(PixelBudget):\n"
            "    def reserve(self, nbytes): reserved.append(nbytes)\n"
            "def peak(): return int(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]) * 1024\n"
            "geometry = InputGeometry(size=224, resize_size=256, jpeg_reduced_decode=sys.argv[1].endswith(' reduced'))\n"
            "small = open(sys.argv[2], 'rb').read(); data = open(sys.argv[1], 'rb').read()\n"
            "decode_encoded(small, field='x', geometry=geometry); before = peak()\n"
            "decode_encoded(data, field='x', geometry=geometry, budget=Recording(sys.maxsize, field='x')); print(peak() - before, max(reserved))")
    small = path.with_name("small-" + path.name)
    grown, reserved = subprocess.run([sys.executable, "-c", code, str(path), str(small)], check=True, capture_output=True, text=True).stdout.split()
    return int(grown), int(reserved)


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--side", type=positive_int, default=4096, help="each file's width and height (pixels)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        for path in _write_files(Path(directory), args.side):
            grown, reserved = _decode_peak(path)
            pixels = args.side**2
            print(f"{path.name:30s} {path.stat().st_size / pixels:5.2f} B/px file, decode +{grown / pixels:5.2f} B/px, "
                  f"{grown / reserved:.2f} x the reservation ({reserved / pixels:5.2f} B/px)")


if __name__ == "__main__":
    main()
