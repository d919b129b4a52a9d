"""Turning user images (arrays, tensors, PIL images, files, bytes) into Image messages."""

from __future__ import annotations

import base64
import io
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageOps
from PIL import Image as PILImage

from explaind.exif import exif_orientation
from explaind.v1 import common_pb2

# Encoded files as bytes-like objects (a memoryview has an ndim, but is one file).
_ENCODED_TYPES = (bytes, bytearray, memoryview)
_DTYPES = {np.dtype(np.uint8): common_pb2.DATA_TYPE_UINT8, np.dtype(np.float16): common_pb2.DATA_TYPE_FLOAT16, np.dtype(np.float32): common_pb2.DATA_TYPE_FLOAT32}


def to_image_message(image: Any) -> common_pb2.Image:
    """One image as a message. Arrays and tensors travel raw (uint8 in [0, 255] or float
    in [0, 1], (H, W, 3) or (3, H, W): uint8 (3, H, W), as torchvision's ``decode_image``
    gives it, is sent as the (H, W, 3) the server takes); PIL images as raw uint8 (see
    :func:`_pil_message`); paths and bytes as encoded files."""
    if isinstance(image, common_pb2.Image):
        return image
    if isinstance(image, _ENCODED_TYPES):
        return common_pb2.Image(encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        return common_pb2.Image(encoded=Path(image).read_bytes())
    if isinstance(image, PILImage.Image):
        return _pil_message(image)
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # torch.Tensor without importing torch
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        image = image.astype(image.dtype.newbyteorder("="), copy=False)  # big-endian (FITS, some TIFF readers) as the others
        if image.dtype == np.float64:
            image = image.astype(np.float32)
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.transpose(1, 2, 0)  # torchvision's uint8 layout to the (H, W, 3) of uint8 pixels
        return _raw(image)
    raise TypeError(f"cannot send {type(image).__name__} as an image; use a numpy array, torch tensor, PIL image, path or bytes")


def iter_image_messages(images: Any) -> Iterator[common_pb2.Image]:
    """The messages of a batch (a list or iterable of images, or one (N, 3, H, W) /
    (N, H, W, 3) array or tensor), each made when it is needed: a folder of 50,000
    photographs is read file by file, not into memory at once."""
    if _is_one_image(images):
        return iter([to_image_message(images)])
    if not isinstance(images, Iterable):
        # Its type, not its repr: an Image message's repr is every byte of its image, escaped.
        raise TypeError(f"images must be an image, or a list, batch array or iterable of images, got {type(images).__name__}")
    return (_indexed_message(index, image) for index, image in enumerate(images))


def _indexed_message(index: int, image: Any) -> common_pb2.Image:
    """:func:`to_image_message`, its error naming the image's index in the batch, as the
    server's refusals of one do."""
    try:
        return to_image_message(image)
    except OSError as error:  # a file of an iterable, read as its request is made
        raise type(error)(f"images[{index}]: cannot read {image}: {error.strerror or error}") from None
    except TypeError as error:  # no image (a 1-D array's numbers), or an array of a dtype not taken
        raise TypeError(f"images[{index}]: {error}") from None


def image_count(images: Any) -> int | None:
    """How many images :func:`iter_image_messages` will give; None for an iterator."""
    if _is_one_image(images):
        return 1
    return len(images) if hasattr(images, "__len__") else None


def require_files(images: Any) -> None:
    """Raise FileNotFoundError naming the first path in a list of images that does not
    exist (IsADirectoryError for a directory); checked before a call starts, since one
    streamed in requests would fail part way through (an iterable's files are read, and
    named, as they come). Not regular files only: a pipe (/dev/stdin) reads as well."""
    if _is_one_image(images) or not isinstance(images, (list, tuple, np.ndarray)):
        return
    for index, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            if not os.path.exists(image):
                raise FileNotFoundError(f"images[{index}]: no such file: {image}")
            if os.path.isdir(image):
                raise IsADirectoryError(f"images[{index}]: a directory, not an image file: {image}")


# Image files :func:`image_folder` takes, by suffix (what the server decodes).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_folder(root: str | os.PathLike[str]) -> tuple[list[Path], list[str]]:
    """The image files and labels of a folder with one subfolder per class,
    ``root/<class name>/**/*.png`` (the layout torchvision's ``ImageFolder`` reads), in
    sorted order: ``create_sample_set(*image_folder("images/"))``. Only the listing is
    made here; the files are read as their requests are sent. Hidden class folders
    (``root/.cache``) and files of other suffixes are skipped, but not hidden files or
    folders below a class folder (as torchvision lists them); images directly in ``root``
    have no class and are not taken. Raises NotADirectoryError for a missing folder,
    ValueError for one without images, or an empty path (an unset variable; "." is this
    folder)."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder's path, got {root!r}")
    if not os.fspath(root):  # Path("") is "."
        raise ValueError('root is empty: give a folder\'s path ("." for the working directory)')
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{'not a directory' if root.exists() else 'no such directory'}: {root}")
    images: list[Path] = []
    labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        images += files
        labels += [class_dir.name] * len(files)
    if not images:
        raise ValueError(f"no images in {root}/<class name>/ ({', '.join(IMAGE_SUFFIXES)})")
    return images, labels


def _is_one_image(images: Any) -> bool:
    """One image rather than several: an array of 2 or 3 dimensions (a 4-D one is a batch,
    a 1-D one a list, such as an array of paths), a path, encoded bytes or a PIL image."""
    if isinstance(images, (*_ENCODED_TYPES, str, os.PathLike, PILImage.Image)):
        return True
    return hasattr(images, "ndim") and images.ndim not in (1, 4)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pixel_count(image: common_pb2.Image) -> int:
    """Pixels the server will decode ``image`` to (H x W), from the tensor's shape or the
    encoded file's header (no decoding); 0 where the header cannot be read."""
    if image.HasField("tensor"):
        shape = list(image.tensor.shape)
        return int(np.prod(shape)) // 3 if len(shape) == 3 else 0
    encoded = image.encoded
    # A PNG's size is in its first chunk, IHDR, at a fixed place: read there, with its CRC
    # checked as Pillow checks it. Opening the file with Pillow cost 25x as much (0.02-0.05
    # ms a file, per image of every split predict or upload).
    if encoded[:8] == _PNG_SIGNATURE and encoded[8:16] == b"\x00\x00\x00\x0dIHDR" and len(encoded) >= 33:
        if zlib.crc32(encoded[12:29]) == int.from_bytes(encoded[29:33], "big"):
            return int.from_bytes(encoded[16:20], "big") * int.from_bytes(encoded[20:24], "big")
    try:
        with PILImage.open(io.BytesIO(image.encoded)) as opened:
            return opened.size[0] * opened.size[1]
    except Exception:  # noqa: BLE001 - unreadable bytes: the server says why
        return 0


def _pil_message(image: PILImage.Image) -> common_pb2.Image:
    """An 8-bit PIL image travels as raw RGB uint8. Integer greyscale (modes I and I;16)
    travels as a lossless TIFF, which the server scales to 8 bits as it does such files:
    Pillow's ``convert("RGB")`` would clip every value above 255 to white. A float (F)
    image is refused, for its pixel range is unknown. Either way its pixels are first
    turned as its EXIF Orientation says (see :func:`_as_viewed`)."""
    if image.mode == "F":
        raise ValueError("a PIL image of mode F (float) has no known pixel range; send a float32 array with pixels in [0, 1]")
    image = _as_viewed(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
        return common_pb2.Image(encoded=buffer.getvalue())
    return _raw(np.asarray(image.convert("RGB")))


def _as_viewed(image: PILImage.Image) -> PILImage.Image:
    """The image as a viewer shows it: turned by its EXIF Orientation, read as the server
    reads a file's (:func:`explaind.exif.exif_orientation`). ``Image.open`` of a phone's
    photo keeps the tag, and so does ``convert``; sent as stored, it would be classified
    sideways, and otherwise than the same file sent by its path. ``ImageOps.exif_transpose``
    removes the tag, so an image already turned by it is not turned again; one turned by
    hand (``rotate``, ``transpose``) keeps it and is turned again. No rule tells the two
    apart: Pillow's rotated image is as its converted, copied or resized one (a plain
    Image, ``format`` None, the same ``info["exif"]``), and those must be turned. Its
    caller clears the tag, ``del image.getexif()[ExifTags.Base.Orientation]`` on the
    turned image (the rotated copy reads ``info["exif"]`` again, so cleared on the
    original it comes back), or sends ``np.asarray(image)``, which carries none."""
    return image if exif_orientation(image) is None else ImageOps.exif_transpose(image)


def _raw(array: np.ndarray) -> common_pb2.Image:
    array = np.ascontiguousarray(array)
    if array.dtype not in _DTYPES:
        raise TypeError(f"unsupported image dtype {array.dtype}; use uint8, float16 or float32")
    tensor = common_pb2.Tensor(dtype=_DTYPES[array.dtype], shape=list(array.shape), data=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return common_pb2.Image(tensor=tensor)


def open_image(data: bytes) -> PILImage.Image:
    """A file the server returned (a stored sample, a preview, an artifact) as a PIL image,
    turned by its EXIF Orientation as the server turned it to classify it: a sample
    uploaded as a phone's photo is shown upright, as the model saw it, not sideways."""
    image = PILImage.open(io.BytesIO(data))
    image.load()
    return _as_viewed(image)


# Side in CSS pixels an image is shown at in the report and a notebook's table: smaller
# ones are drawn enlarged, as crisp pixels.
IMAGE_BOX = 128
# Quality of the JPEG the images at least as large as their box are inlined as.
JPEG_QUALITY = 90


def image_data_uri(image: PILImage.Image) -> str:
    """The image as a data URI: PNG below the box (drawn enlarged as crisp pixels, where
    JPEG's artefacts would show), else JPEG. A 224 px visualisation was a ~90 kB PNG,
    two per neuron and every ranked neuron shown: tens of MB for an ImageNet model."""
    buffer = io.BytesIO()
    if image.width < IMAGE_BOX:
        image.save(buffer, format="PNG")
        kind = "png"
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
