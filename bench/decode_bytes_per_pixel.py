"""What an image file takes while it decodes, per pixel, against what its call reserves
(explaind.decode_memory.ENCODED_DECODE_BYTES_PER_PIXEL), measured in one run.

    python bench/decode_bytes_per_pixel.py [--side 4096]

Writes one ``--side``² file of random pixels per format and mode (incompressible, so the
file is as large as it gets; those with EXIF Orientation 6 are turned as decoded), then
decodes each in a fresh process as Predict does (decode_encoded to 224 px) and prints the
peak resident growth per pixel and its ratio to the reservation: above 1, the budget
under-counts that file.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from explaind.decode_memory import ENCODED_DECODE_BYTES_PER_PIXEL

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path


def _write_files(directory: Path, side: int) -> list[Path]:
    rng = np.random.default_rng(0)
    turned = Image.Exif()
    turned[274] = 6  # Orientation: a phone held upright
    rgb = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
    rgba = rgb.convert("RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), "L")
    files = {
        "palette.png": (grey.convert("P"), {}),
        "palette-transparent-turned.png": (grey.convert("P"), {"transparency": 0, "exif": turned}),
        "grey16-turned.png": (Image.fromarray(rng.integers(0, 65536, (side, side), dtype=np.uint16)), {"exif": turned}),
        "rgb.png": (rgb, {}),
        "rgb-turned.png": (rgb, {"exif": turned}),
        "rgba.png": (rgba, {}),
        "rgba-turned.png": (rgba, {"exif": turned}),
        "rgb-turned.jpg": (rgb, {"exif": turned, "quality": 90}),
        "cmyk-turned.jpg": (rgb.convert("CMYK"), {"exif": turned, "quality": 90}),
        "rgb-turned.tif": (rgb, {"exif": turned}),
        "rgba-turned.tif": (rgba, {"exif": turned}),
        "rgb-lossy-turned.webp": (rgb, {"exif": turned, "quality": 90}),
        "rgba-lossless.webp": (rgba, {"lossless": True}),
        "rgba-lossless-turned.webp": (rgba, {"exif": turned, "lossless": True}),
    }
    for name, (image, options) in files.items():
        image.save(directory / name, **options)
    return [directory / name for name in files]


def _decode_peak(path: Path) -> int:
    """Peak resident growth (bytes) of decoding ``path`` in a fresh process (Linux)."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's, this one's large files and all.
    code = ("import sys; from explaind.imaging import InputGeometry, decode_encoded\n"
            "def peak(): return int(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]) * 1024\n"
            "data = open(sys.argv[1], 'rb').read(); before = peak()\n"
            "decode_encoded(data, field='x', geometry=InputGeometry(size=224, resize_size=256)); print(peak() - before)")
    return int(subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--side", type=positive_int, default=4096, help="each file's width and height (pixels)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        for path in _write_files(Path(directory), args.side):
            per_pixel = _decode_peak(path) / args.side**2
            print(f"{path.name:28s} {path.stat().st_size / args.side**2:5.2f} B/px file, decode +{per_pixel:5.2f} B/px, "
                  f"{per_pixel / ENCODED_DECODE_BYTES_PER_PIXEL:.2f} x the reservation ({ENCODED_DECODE_BYTES_PER_PIXEL} B/px)")


if __name__ == "__main__":
    main()
