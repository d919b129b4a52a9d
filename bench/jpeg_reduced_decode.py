"""[classifier].jpeg_reduced_decode: what decoding a large JPEG at 1/2, 1/4 or 1/8 scale
saves, and what it changes, against decoding it whole, in one run.

    python bench/jpeg_reduced_decode.py [--photos 3] [--repeats 5] [--scenes 60] [--threads 1]

1. Seeded photo-like JPEGs (smooth random fields, hard edges and grain, quality 90) of
   4032x3024 (a phone's 12 megapixels) and 1920x1080, fitted as an ImageNet model's input
   (shorter side to 256, centre crop 224) by ``imaging.decode_encoded``: the seconds per
   image of each setting (median of ``--repeats``, alternating) and their ratio, and how
   far the 224x224 input's pixels move (mean and largest absolute difference, in levels of
   255), at the shipped margin (the JPEG keeps at least twice the side it is resized from)
   and at none (1x), for comparison.
2. Upload validation (CreateSampleSet and AppendSamples decode each encoded sample only
   to check it, as the served classifier will decode it): the seconds per photo of the
   check whole and at the reduced scale, and their ratio; then, on ``--damaged`` copies of
   the first 12 MP photo, truncated or with a marker written into its coded data, how
   many each setting refuses and on how many they disagree (refused or not, and why).
3. The shipped world classifier (balanced) on world scenes drawn at 512 and upscaled to
   2048x2048 (bicubic) as JPEG, fitted to its 64x64 input: the share whose top-1 class is
   the same with and without the option, and each setting's accuracy.

Decoding and resizing run on ``--threads`` torch threads (1: what one image costs one of
the server's decode threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import io

import numpy as np
from PIL import Image

from _cli import bench_parser, median_seconds, positive_int  # bench/, the script's directory, is on sys.path

PHOTO_SIZES = ((4032, 3024), (1920, 1080))
SCENE_SIZE, SCENE_UPSCALED = 512, 2048


def _photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG (quality 90) that compresses as a photograph does: a smooth random colour
    field, the hard edges of a checkerboard of unequal tiles, and sensor-like grain."""
    import torch

    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, height // 64 + 2, width // 64 + 2), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    rows, columns = np.ogrid[0:height, 0:width]
    edges = ((rows // 97 + columns // 131) % 2) * np.float32(0.25)
    grain = rng.normal(0, 4, (height, width, 3)).astype(np.float32)
    pixels = np.clip((smooth * 0.7 + edges[..., None]) * 255 + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _scene_jpegs(count: int) -> tuple[list[bytes], list[int]]:
    """``count`` world scenes, shapes in turn, drawn at SCENE_SIZE and upscaled to
    SCENE_UPSCALED, as JPEG (quality 90), and their shapes' class indices."""
    from explaind.world.render import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, SceneSpec, render

    colours = list(COLOURS)
    files, labels = [], []
    for index in range(count):
        spec = SceneSpec(SHAPES[index % len(SHAPES)], colours[index % len(colours)], TEXTURES[index % len(TEXTURES)],
                         BACKGROUNDS[index % len(BACKGROUNDS)], seed=index, size=SCENE_SIZE)
        upscaled = Image.fromarray(render(spec).image).resize((SCENE_UPSCALED, SCENE_UPSCALED), Image.BICUBIC)
        buffer = io.BytesIO()
        upscaled.save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
        labels.append(index % len(SHAPES))
    return files, labels


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--photos", type=positive_int, default=3, help="photo-like JPEGs of each size")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs of each setting, alternating; the median is printed")
    parser.add_argument("--scenes", type=positive_int, default=60, help="upscaled world scenes the classifiers' top-1 classes are compared on")
    parser.add_argument("--damaged", type=positive_int, default=40, help="truncated or corrupted copies the upload check is compared on")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    args = parser.parse_args()
    # Here, after the arguments: --help and a usage error answer without the seconds of torch.
    import torch

    torch.set_num_threads(args.threads)
    _photos(args)
    _upload_validation(args)
    _classifier_agreement(args)


def _photos(args: argparse.Namespace) -> None:
    from explaind import imaging

    full = imaging.InputGeometry(224, 256)
    reduced = dataclasses.replace(full, jpeg_reduced_decode=True)
    print(f"decode + fit to 224 (shorter side 256, centre crop), {args.threads} thread(s), median of {args.repeats}, per image:")
    shipped_margin = imaging.JPEG_REDUCED_DECODE_MARGIN
    for width, height in PHOTO_SIZES:
        photos = [_photo(width, height, seed) for seed in range(args.photos)]
        for margin in (shipped_margin, 1):
            imaging.JPEG_REDUCED_DECODE_MARGIN = margin  # read by jpeg_min_side at each decode
            try:
                def decode_all(geometry: imaging.InputGeometry) -> list[np.ndarray]:
                    return [imaging.to_uint8_hwc(imaging.decode_encoded(photo, field="photo", geometry=geometry)) for photo in photos]

                seconds = median_seconds({"full": lambda: decode_all(full), "reduced": lambda: decode_all(reduced)}, args.repeats)
                difference = np.abs(np.stack(decode_all(full)).astype(np.int16) - np.stack(decode_all(reduced)).astype(np.int16))
            finally:
                imaging.JPEG_REDUCED_DECODE_MARGIN = shipped_margin
            with Image.open(io.BytesIO(photos[0])) as image:
                image.draft(None, (margin * 256, margin * 256))
                decoded = image.size
            label = "shipped" if margin == shipped_margin else "for comparison"
            print(f"  {width}x{height} ({len(photos[0]) / 1e6:.1f} MB), margin {margin}x ({label}): decoded at {decoded[0]}x{decoded[1]}; "
                  f"full {seconds['full'] / len(photos) * 1e3:6.1f} ms, reduced {seconds['reduced'] / len(photos) * 1e3:6.1f} ms "
                  f"({seconds['full'] / seconds['reduced']:.1f}x); 224x224 input differs by mean {difference.mean():.2f}, "
                  f"max {difference.max()} levels of 255")


def _upload_validation(args: argparse.Namespace) -> None:
    from explaind import imaging
    from explaind.errors import InvalidArgument
    from explaind.service import convert
    from explaind.v1 import common_pb2, sample_sets_pb2

    jpeg_min_side = dataclasses.replace(imaging.InputGeometry(224, 256), jpeg_reduced_decode=True).jpeg_min_side
    print(f"upload check of an encoded sample (convert.new_sample), whole and reduced to {jpeg_min_side} a side, median of {args.repeats}, per image:")

    def check(data: bytes, side: int) -> str:
        """The check's refusal; "" where it passes."""
        sample = sample_sets_pb2.Sample(image=common_pb2.Image(encoded=data))
        try:
            convert.new_sample(sample, field="samples[0]", budget=imaging.PixelBudget(1 << 40, field="samples"), jpeg_min_side=side)
        except InvalidArgument as error:
            return str(error)
        return ""

    first = b""
    for width, height in PHOTO_SIZES:
        photos = [_photo(width, height, seed) for seed in range(args.photos)]
        first = first or photos[0]
        seconds = median_seconds({side: lambda side=side: [check(photo, side) for photo in photos] for side in (0, jpeg_min_side)}, args.repeats)
        print(f"  {width}x{height}: whole {seconds[0] / len(photos) * 1e3:6.1f} ms, reduced {seconds[jpeg_min_side] / len(photos) * 1e3:6.1f} ms "
              f"({seconds[0] / seconds[jpeg_min_side]:.1f}x)")
    rng = np.random.default_rng(0)
    scan = first.index(b"\xff\xda")
    damaged = []
    for index in range(args.damaged):
        at = int(rng.integers(scan + 16, len(first) - 2))
        # Truncated, or a marker (EOI, SOS, DHT, a restart out of turn, an undefined one) written into the coded data.
        damaged.append(first[:at] if index % 2 == 0 else first[:at] + bytes([0xFF, int(rng.choice([0xD9, 0xDA, 0xC4, 0xD4, 0x55]))]) + first[at + 2:])
    verdicts = [(check(data, 0), check(data, jpeg_min_side)) for data in damaged]
    print(f"  {len(damaged)} damaged copies of the first {PHOTO_SIZES[0][0]}x{PHOTO_SIZES[0][1]}: whole refuses {sum(bool(whole) for whole, _ in verdicts)}, "
          f"reduced {sum(bool(reduced) for _, reduced in verdicts)}, they disagree on {sum(whole != reduced for whole, reduced in verdicts)}")


def _classifier_agreement(args: argparse.Namespace) -> None:
    import torch

    from explaind.config import default_config
    from explaind.engine.models import load_classifier
    from explaind.imaging import decode_encoded

    version = load_classifier(default_config().classifier)
    reduced = dataclasses.replace(version, jpeg_reduced_decode=True)
    files, labels = _scene_jpegs(args.scenes)
    predicted = {}
    for name, each in (("full", version), ("reduced", reduced)):
        images = torch.stack([decode_encoded(data, field="scene", geometry=each.input_geometry) for data in files])
        predicted[name] = each.logits(each.features(images)).argmax(dim=1)
    truth = torch.tensor(labels)
    same = int((predicted["full"] == predicted["reduced"]).sum())
    geometry = version.input_geometry
    print(f"{version.name} on {len(files)} world scenes drawn at {SCENE_SIZE}, upscaled to {SCENE_UPSCALED}x{SCENE_UPSCALED} JPEG, "
          f"fitted to {geometry.size}x{geometry.size} (JPEG decoded at least {reduced.input_geometry.jpeg_min_side} a side):")
    print(f"  top-1 agreement {same}/{len(files)} ({same / len(files):.1%}); accuracy full {float((predicted['full'] == truth).float().mean()):.1%}, "
          f"reduced {float((predicted['reduced'] == truth).float().mean()):.1%}")


if __name__ == "__main__":
    main()
