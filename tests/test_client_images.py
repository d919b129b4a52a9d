"""How the SDK turns what a user passes as images into Image messages, without a server:
each test failed against a small change to explaind.client._images that the tests of the
SDK against a server let through."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from explaind.client._images import image_count, iter_image_messages, to_image_message
from explaind.v1 import common_pb2


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_tensor_that_requires_grad_travels_as_its_values():
    # As a model's input often is (an attack, a visualisation being optimised).
    pixels = torch.rand(3, 4, 5, requires_grad=True)
    tensor = to_image_message(pixels * 1).tensor  # not a leaf either
    assert (tensor.dtype, list(tensor.shape)) == (common_pb2.DATA_TYPE_FLOAT32, [3, 4, 5])
    assert np.array_equal(np.frombuffer(tensor.data, "<f4").reshape(3, 4, 5), pixels.detach().numpy())


def test_one_encoded_file_or_an_array_of_paths_is_counted_and_sent_as_its_images(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    png = _png(pixels)
    assert image_count(png) == 1  # one file, not a batch of its bytes
    assert list(iter_image_messages(png)) == [common_pb2.Image(encoded=png)]
    paths = np.array([str(tmp_path / "a.png"), str(tmp_path / "b.png")])  # as pandas' .to_numpy() gives a column
    for path, data in zip(paths, (png, png[::-1]), strict=True):
        with open(path, "wb") as file:
            file.write(data)
    assert image_count(paths) == 2
    assert list(iter_image_messages(paths)) == [common_pb2.Image(encoded=png), common_pb2.Image(encoded=png[::-1])]


def test_encoded_bytes_in_a_bytearray_or_memoryview_travel_as_the_file():
    png = _png(np.zeros((4, 5, 3), np.uint8))
    for data in (bytearray(png), memoryview(png)):
        assert to_image_message(data) == common_pb2.Image(encoded=png), type(data)


def test_the_pixels_of_a_jpeg_or_other_non_png_file_are_counted_from_its_header():
    # The SDK splits a predict or upload by the server's pixels per request: a JPEG counted
    # as 0 pixels would go in one request with others, for the server to refuse it.
    from explaind.client._images import pixel_count

    for format in ("JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (301, 37)).save(buffer, format=format)
        assert pixel_count(common_pb2.Image(encoded=buffer.getvalue())) == 301 * 37, format


def test_an_image_folder_lists_its_files_in_sorted_order_whatever_order_they_were_made_in(tmp_path):
    from explaind.client import image_folder

    names = [f"{i:02d}.png" for i in range(40)]
    for name in np.random.default_rng(0).permutation(names):
        (tmp_path / "heart").mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "heart" / str(name))
    images, labels = image_folder(tmp_path)
    assert [path.name for path in images] == names and labels == ["heart"] * 40


def test_an_image_as_wide_as_its_box_is_inlined_as_jpeg_and_a_narrower_one_as_png():
    from explaind.client._images import IMAGE_BOX, image_data_uri

    assert image_data_uri(Image.new("RGB", (IMAGE_BOX, IMAGE_BOX))).startswith("data:image/jpeg;base64,")
    assert image_data_uri(Image.new("RGB", (IMAGE_BOX - 1, IMAGE_BOX - 1))).startswith("data:image/png;base64,")


def test_one_file_in_a_bytearray_or_memoryview_is_one_image_not_a_batch_of_its_bytes():
    # Alone, not in a list, they were iterated byte by byte: "cannot send int as an image".
    png = _png(np.zeros((4, 5, 3), np.uint8))
    for data in (bytearray(png), memoryview(png)):
        assert image_count(data) == 1, type(data)
        assert list(iter_image_messages(data)) == [common_pb2.Image(encoded=png)], type(data)


def test_a_generator_of_paths_is_not_read_by_the_file_check_and_its_count_is_unknown(tmp_path):
    # The up-front check of a list's paths must not consume an iterator: the call after it
    # would send no images.
    from explaind.client._images import require_files

    png = _png(np.zeros((4, 5, 3), np.uint8))
    (tmp_path / "a.png").write_bytes(png)
    paths = (str(tmp_path / name) for name in ("a.png", "a.png"))
    require_files(paths)
    assert image_count(paths) is None
    assert list(iter_image_messages(paths)) == [common_pb2.Image(encoded=png)] * 2


def test_a_missing_file_in_an_array_of_paths_is_named_before_any_call(tmp_path):
    # As pandas' .to_numpy() gives a column of paths.
    import pytest

    from explaind.client._images import require_files

    (tmp_path / "a.png").write_bytes(_png(np.zeros((4, 5, 3), np.uint8)))
    with pytest.raises(FileNotFoundError, match=r"^images\[1\]: no such file: .*gone\.png$"):
        require_files(np.array([str(tmp_path / "a.png"), str(tmp_path / "gone.png")]))


def test_a_big_endian_16_bit_pil_image_travels_as_its_values_not_clipped_to_8_bits():
    # Mode I;16B (some TIFF and PNM readers give it) was converted to RGB like an 8-bit
    # image: every value above 255 white.
    values = np.array([[0, 1000, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())
    sent = Image.open(io.BytesIO(to_image_message(image).encoded))
    assert np.asarray(sent).astype(np.int64).tolist() == [[0, 1000, 65535]]


def test_a_two_dimensional_uint8_array_is_sent_as_it_is_for_the_server_to_refuse():
    # Three rows high it was taken for torchvision's (3, H, W) and transposed: numpy's
    # "axes don't match array" in place of the server's INVALID_ARGUMENT naming the shape.
    pixels = np.arange(15, dtype=np.uint8).reshape(3, 5)
    tensor = to_image_message(pixels).tensor
    assert list(tensor.shape) == [3, 5] and tensor.data == pixels.tobytes()


def test_an_image_with_alpha_or_a_palette_as_wide_as_its_box_is_inlined_as_jpeg():
    # JPEG has no alpha: an RGBA visualisation failed with "cannot write mode RGBA as JPEG".
    from explaind.client._images import IMAGE_BOX, image_data_uri

    for mode in ("RGBA", "LA", "P"):
        assert image_data_uri(Image.new(mode, (IMAGE_BOX, IMAGE_BOX))).startswith("data:image/jpeg;base64,"), mode


def test_an_image_folder_takes_every_suffix_the_server_decodes_whatever_its_case(tmp_path):
    from explaind.client import image_folder

    suffixes = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".JPEG", ".Png"]
    (tmp_path / "star").mkdir()
    for index, suffix in enumerate(suffixes):
        (tmp_path / "star" / f"{index:02d}{suffix}").write_bytes(b"")
    (tmp_path / "star" / "notes.txt").write_bytes(b"")
    (tmp_path / "star" / "frames.png").mkdir()  # a folder, whatever its name
    images, labels = image_folder(tmp_path)
    assert [path.suffix for path in images] == suffixes and labels == ["star"] * len(suffixes)


def test_a_path_object_or_a_pil_image_alone_is_one_image_and_a_built_message_is_sent_as_it_is(tmp_path):
    png = _png(np.zeros((4, 5, 3), np.uint8))
    (tmp_path / "a.png").write_bytes(png)
    pil = Image.open(io.BytesIO(png))
    for image in (tmp_path / "a.png", pil):
        assert image_count(image) == 1 and len(list(iter_image_messages(image))) == 1, type(image)
    assert list(iter_image_messages(tmp_path / "a.png")) == [common_pb2.Image(encoded=png)]
    tensor = list(iter_image_messages(pil))[0].tensor
    assert list(tensor.shape) == [4, 5, 3] and tensor.data == bytes(4 * 5 * 3)
    message = common_pb2.Image(encoded=png)  # built already, e.g. for another call
    assert list(iter_image_messages([message, pil])) == [message, common_pb2.Image(tensor=tensor)]


def test_a_uint8_array_of_other_than_3_channels_is_sent_in_the_shape_it_has():
    # Only (3, H, W) is torchvision's layout: an RGBA (H, W, 4) array, which the server
    # refuses naming its shape, must reach it as the user made it, not as (W, 4, H).
    pixels = np.zeros((6, 5, 4), np.uint8)
    assert list(to_image_message(pixels).tensor.shape) == [6, 5, 4]


def test_an_array_of_an_unsupported_dtype_is_refused_naming_the_dtypes_that_are_taken():
    import pytest

    with pytest.raises(TypeError, match=r"^unsupported image dtype int64; use uint8, float16 or float32$"):
        to_image_message(np.zeros((4, 5, 3), np.int64))


def test_a_downloaded_image_that_is_cut_short_fails_where_it_is_read_not_where_it_is_used():
    # Pillow decodes lazily: the error came from the first use of the pixels instead.
    import pytest

    from explaind.client._images import open_image

    png = _png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert np.asarray(open_image(png)).shape == (64, 64, 3)
    with pytest.raises(OSError):
        open_image(png[: len(png) // 2])


def _file_with_orientation(image: Image.Image, format: str, exif: bytes | Image.Exif) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, exif=exif)
    return buffer.getvalue()


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_a_pil_image_opened_from_a_file_reaches_the_server_as_the_same_pixels_as_the_file(tmp_path, format, orientation):
    # The server turns a file by its EXIF Orientation (a phone's photo stored sideways is
    # shown upright); Image.open keeps the tag, so the same photo passed as a PIL image
    # must be turned too, not classified otherwise than by its path.
    from explaind.service.convert import decode_image

    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # not square: a transpose shows
    path = tmp_path / f"photo.{format.lower()}"
    path.write_bytes(_file_with_orientation(Image.fromarray(pixels), format, _orientation(orientation)))
    by_path = decode_image(to_image_message(path), field="x")
    with Image.open(path) as opened:
        for image in (opened, opened.convert("RGB")):  # convert keeps the tag
            assert torch.equal(decode_image(to_image_message(image), field="x"), by_path)
    assert by_path.shape[1:] == ((7, 5) if orientation >= 5 else (5, 7))
    if format == "PNG" and orientation == 6:  # lossless: 90 degrees clockwise, exactly
        tensor = to_image_message(Image.open(path)).tensor
        assert np.array_equal(np.frombuffer(tensor.data, np.uint8).reshape(tensor.shape), np.rot90(pixels, -1))


def test_a_pil_image_turned_by_exif_transpose_is_not_turned_again():
    from PIL import ImageOps

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(_file_with_orientation(Image.fromarray(pixels), "PNG", _orientation(6)))) as opened:
        tensor = to_image_message(ImageOps.exif_transpose(opened)).tensor
    assert np.array_equal(np.frombuffer(tensor.data, np.uint8).reshape(tensor.shape), np.rot90(pixels, -1))


def test_a_16_bit_pil_image_with_an_exif_orientation_reaches_the_server_as_its_file_does():
    # Sent as a TIFF: turned once, on the client; the server must not find the tag again.
    from explaind.service.convert import decode_image

    values = np.random.default_rng(0).integers(0, 65536, (5, 7), dtype=np.uint16)
    png = _file_with_orientation(Image.fromarray(values), "PNG", _orientation(6))
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.mode == "I;16"
        message = to_image_message(opened)
    by_file = decode_image(common_pb2.Image(encoded=png), field="x")
    assert by_file.shape[1:] == (7, 5)
    assert torch.equal(decode_image(message, field="x"), by_file)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("exif", [
    pytest.param(b"Exif\0\0not a TIFF header", id="not-tiff"),
    pytest.param(b"Exif\0\0II*\0\x08\0", id="header-cut-short"),
    # Orientation 6 as a RATIONAL 6/1, which Pillow compares equal to 6: not a value on the server
    pytest.param(b"Exif\0\0II*\0" + struct.pack("<IHHHII", 8, 1, 0x0112, 5, 1, 26) + struct.pack("<III", 0, 6, 1), id="orientation-rational-6"),
])
def test_a_pil_image_with_an_unreadable_exif_orientation_travels_as_stored_as_on_the_server(exif):
    from explaind.service.convert import decode_image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    png = _file_with_orientation(Image.fromarray(pixels), "PNG", exif)
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.info["exif"] == exif
        tensor = to_image_message(opened).tensor
    sent = np.frombuffer(tensor.data, np.uint8).reshape(tensor.shape)
    assert np.array_equal(sent, pixels)
    assert torch.equal(decode_image(common_pb2.Image(encoded=png), field="x"), torch.from_numpy(sent.transpose(2, 0, 1) / np.float32(255)))


def _with_exif_after_pixels(png: bytes) -> bytes:
    """``png`` with its eXIf chunk moved after its IDAT, where the PNG spec allows it and
    Pillow finds it only as it loads the pixels."""
    chunks, position = [], 8
    while position < len(png):
        length = struct.unpack(">I", png[position:position + 4])[0]
        chunks.append(png[position:position + 12 + length])
        position += 12 + length
    exif = next(chunk for chunk in chunks if chunk[4:8] == b"eXIf")
    chunks.remove(exif)
    chunks.insert(len(chunks) - 1, exif)  # before IEND
    return png[:8] + b"".join(chunks)


@pytest.mark.filterwarnings("ignore:Tag data larger than file", "ignore:Corrupt EXIF data")
@pytest.mark.parametrize("after_pixels", [False, True])
def test_an_exif_block_whose_values_would_not_fit_in_it_is_not_read_by_the_sdk_either(after_pixels):
    # A stored sample's file is another caller's upload: with Pillow 12 and older, reading
    # a block of many entries at the same bytes took memory many times its size. The SDK
    # leaves it unread as the server does, wherever the PNG holds it: an eXIf chunk after
    # the pixels is found as they load, which Pillow's getexif does to read it unchecked.
    from explaind.client._images import open_image
    from test_service_imaging import _exif_of_values

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    png = _file_with_orientation(Image.fromarray(pixels), "PNG", _exif_of_values([1024] * 64, 1024))
    if after_pixels:
        png = _with_exif_after_pixels(png)
    read: list[bool] = []
    with Image.open(io.BytesIO(png)) as opened:
        assert ("exif" in opened.info) != after_pixels
        getexif = opened.getexif
        opened.getexif = lambda: (read.append(True), getexif())[1]
        tensor = to_image_message(opened).tensor
    assert np.array_equal(np.frombuffer(tensor.data, np.uint8).reshape(tensor.shape), pixels) and read == []
    assert np.array_equal(np.asarray(open_image(png)), pixels)


@pytest.mark.filterwarnings("ignore:Tag data larger than file")
def test_an_exif_block_whose_exif_directory_values_would_not_fit_in_it_is_not_read_by_the_sdk():
    # ImageOps.exif_transpose, which turns a PIL image here, writes the block again and so
    # reads its EXIF and GPS directories: with Pillow 12, 2000 entries at the same 100 KB of
    # a 124 KB PNG's EXIF directory took 1.2 GB. Left unread, as the server leaves it.
    from explaind.client._images import open_image
    from test_service_imaging import _exif_directory_of_values

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    png = _file_with_orientation(Image.fromarray(pixels), "PNG", _exif_directory_of_values([1024] * 64, 1024))
    assert np.array_equal(np.asarray(open_image(png)), pixels)
    with Image.open(io.BytesIO(png)) as opened:
        tensor = to_image_message(opened).tensor
    assert np.array_equal(np.frombuffer(tensor.data, np.uint8).reshape(tensor.shape), pixels)
    fits = _file_with_orientation(Image.fromarray(pixels), "PNG", _exif_directory_of_values([1024], 1024))
    assert np.array_equal(np.asarray(open_image(fits)), np.rot90(pixels, -1))


def test_a_stored_sample_s_file_opens_as_the_server_classified_it():
    # Client.samples opens each stored file: a phone's photo (Orientation 6) was shown
    # sideways beside the mistake the model made on it upright.
    from explaind.client._images import open_image
    from explaind.service.convert import decode_image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    png = _file_with_orientation(Image.fromarray(pixels), "PNG", _orientation(6))
    opened = open_image(png)
    assert np.array_equal(np.asarray(opened), np.rot90(pixels, -1))
    assert torch.equal(decode_image(to_image_message(opened), field="x"), decode_image(common_pb2.Image(encoded=png), field="x"))


def test_a_pil_image_turned_by_hand_is_turned_again_unless_its_tag_is_cleared_as_the_readme_says():
    # Pillow keeps no sign of a hand-made turn: a rotated image is as a converted one, which
    # must be turned, so the SDK turns both; the README's ways out send it as it is.
    from PIL import ExifTags

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    upright = np.rot90(pixels, -1)  # Orientation 6: 90 degrees clockwise

    def sent(image: Image.Image | np.ndarray) -> np.ndarray:
        tensor = to_image_message(image).tensor
        return np.frombuffer(tensor.data, np.uint8).reshape(tensor.shape)

    with Image.open(io.BytesIO(_file_with_orientation(Image.fromarray(pixels), "PNG", _orientation(6)))) as opened:
        converted, rotated = opened.convert("RGB"), opened.rotate(-90, expand=True)
        assert (type(converted), converted.format, converted.info) == (type(rotated), rotated.format, rotated.info)
        assert np.array_equal(sent(converted), upright) and np.array_equal(sent(rotated), np.rot90(upright, -1))
        del rotated.getexif()[ExifTags.Base.Orientation]
        assert np.array_equal(sent(rotated), upright)
        del opened.getexif()[ExifTags.Base.Orientation]  # cleared before the turn: the turned copy has it again
        assert np.array_equal(sent(opened.rotate(-90, expand=True)), np.rot90(upright, -1))
        assert np.array_equal(sent(np.asarray(opened.rotate(-90, expand=True))), upright)
