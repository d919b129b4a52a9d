"""What an image file takes while it decodes, per pixel, against what its call reserves
(explaind.imaging's reservation: ENCODED_DECODE_BYTES_PER_PIXEL of the size it decodes
to, and the coefficients of a JPEG libjpeg buffers whole: progressive, or a first scan
leaving out a component), measured in one run.

    python bench/decode_bytes_per_pixel.py [--side 4096]

Writes one ``--side``² file per format and mode, of random pixels (incompressible, so the
file is as large as it gets) but for the progressive and one-scan JPEGs, of a smooth ramp
(random pixels overflow Pillow's progressive encoder); those with EXIF Orientation 6 are
turned as decoded. Then decodes each in a fresh process as Predict does (decode_encoded
to 224 px; the JPEGs marked "reduced" as with [classifier].jpeg_reduced_decode, at the
least scale leaving both sides at least 512: 1/8 of their size at 4096², 1/4 at 2048²)
and prints the peak resident growth per pixel of the stored size and its ratio to what
the decode reserved: above 1, the budget under-counts that file. Each process first decodes a
64² file of the same kind, so that what the first decode sets up once (torch's resize, the
codec's tables) is not counted as the file's.
"""

from __future__ import annotations

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
    return [directory / name for name in files]


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


# Also tests/test_decode_memory.py's files: rewrites of a JPEG libjpeg buffers whole though it has one scan.
_ONE_SCAN = {"first-scan-only.jpg reduced": first_scan_only, "one-component-scan.jpg reduced": first_component_scanned_only}


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
