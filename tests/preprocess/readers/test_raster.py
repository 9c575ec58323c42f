"""PNG, JPEG, TIFF and OpenSlide reading: bit depth, orientation, colour, size guard."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from preprocess.errors import IngestError
from preprocess.readers import ReadOptions, detect_kind, read_images
from preprocess.readers.raster import apply_orientation

EDGE_VALUES = np.array([0, 1, 254, 255, 256, 32767, 32768, 65534, 65535], dtype=np.uint16)


def decode(path, **options):
    """Return all DecodedImages of a file, detecting its kind."""
    return list(read_images(path, detect_kind(path), ReadOptions(**options)))


def image16(height=24, width=40, seed=0):
    """Return a uint16 image containing the edge values and random ones."""
    values = np.random.default_rng(seed).integers(0, 65536, (height, width)).astype(np.uint16)
    values.flat[:EDGE_VALUES.size] = EDGE_VALUES
    return values


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """Return one PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """Return PNG bytes from an IHDR description and filtered, uncompressed row bytes."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def test_png_16bit_exact(tmp_path):
    pixels = image16()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image, = decode(tmp_path / "a.png")
    assert np.array_equal(image.pixels, pixels)
    assert image.attributes["bits_stored"] == "16"


def test_png_8bit_scaled_exactly(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image, = decode(tmp_path / "a.png")
    assert np.array_equal(image.pixels, pixels.astype(np.uint16) * 257)


@pytest.mark.parametrize("layout", [{}, {"tile": (16, 16)}, {"compression": "zlib"},
                                    {"tile": (16, 16), "compression": "lzw"}],
                         ids=["strip", "tiled", "strip-zlib", "tiled-lzw"])
def test_tiff_16bit_exact(tmp_path, layout):
    pixels = image16(48, 40)
    tifffile.imwrite(tmp_path / "a.tif", pixels, photometric="minisblack", **layout)
    image, = decode(tmp_path / "a.tif")
    assert np.array_equal(image.pixels, pixels)
    assert image.attributes["source_kind"] == "tiff"


def test_tiff_12bit_scaled(tmp_path):
    pixels = (np.arange(64 * 64) % 4096).astype(np.uint16).reshape(64, 64)
    tifffile.imwrite(tmp_path / "a.tif", pixels, bitspersample=12, photometric="minisblack")
    image, = decode(tmp_path / "a.tif")
    expected = np.rint(pixels / 4095 * 65535).astype(np.uint16)
    assert np.array_equal(image.pixels, expected)


def test_tiff_miniswhite_inverted(tmp_path):
    pixels = image16()
    tifffile.imwrite(tmp_path / "a.tif", pixels, photometric="miniswhite")
    image, = decode(tmp_path / "a.tif")
    assert np.array_equal(image.pixels, 65535 - pixels)


def test_tiff_orientation_applied(tmp_path):
    pixels = image16(20, 30)
    tifffile.imwrite(tmp_path / "a.tif", pixels, photometric="minisblack",
                     extratags=[(274, "H", 1, 6, True)])
    image, = decode(tmp_path / "a.tif")
    assert np.array_equal(image.pixels, np.rot90(pixels, k=-1))


def test_tiff_stack_frames(tmp_path):
    stack = np.stack([image16(seed=seed) for seed in range(3)])
    tifffile.imwrite(tmp_path / "a.tif", stack, photometric="minisblack")
    images = decode(tmp_path / "a.tif")
    assert len(images) == 3
    for image, plane in zip(images, stack):
        assert np.array_equal(image.pixels, plane)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(tmp_path, orientation):
    pixels = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "a.png", exif=exif)
    image, = decode(tmp_path / "a.png")
    assert np.array_equal(image.pixels, apply_orientation(pixels, orientation).astype(np.uint16)
                          * 257)
    assert image.attributes["orientation"] == str(orientation)


def test_jpeg_exif_rotation_once(tmp_path):
    pixels = np.tile(np.linspace(0, 255, 60, dtype=np.uint8), (40, 1))  # (40, 60) gradient
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "a.jpg", exif=exif, quality=95)
    image, = decode(tmp_path / "a.jpg")
    assert image.pixels.shape == (60, 40)
    error = np.abs(image.pixels.astype(int) - np.rot90(pixels, k=-1).astype(int) * 257)
    assert error.mean() < 2 * 257


def test_rgb_greyscale_one_channel(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (20, 30)).astype(np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(tmp_path / "a.png")
    image, = decode(tmp_path / "a.png")
    assert image.pixels.shape == (20, 30)
    assert np.array_equal(image.pixels, grey.astype(np.uint16) * 257)


def test_true_colour_rejected(tmp_path):
    colour = np.random.default_rng(2).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "a.png")
    with pytest.raises(IngestError, match="true colour"):
        decode(tmp_path / "a.png")


def test_png_16bit_colour_rejected(tmp_path):
    rows = b"".join(b"\x00" + bytes(6 * 4) for _ in range(3))
    (tmp_path / "a.png").write_bytes(raw_png(4, 3, 16, 2, rows))
    with pytest.raises(IngestError, match="16-bit colour PNG"):
        decode(tmp_path / "a.png")


def test_size_guard_before_decoding(tmp_path):
    # A 10000 x 10000 all-zero PNG header with an IDAT of one row: decoding would need 100 MB.
    (tmp_path / "big.png").write_bytes(raw_png(10000, 10000, 8, 0, b"\x00" * 10001))
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(IngestError, match="100.0 megapixels"):
        decode(tmp_path / "big.png")
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 10_000_000


def test_truncated_jpeg_rejected(tmp_path):
    buffer = io.BytesIO()
    gradient = np.tile(np.arange(200, dtype=np.uint8), (120, 1))
    Image.fromarray(gradient).save(buffer, format="JPEG")
    (tmp_path / "a.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 2 // 3])
    with pytest.raises(IngestError, match="truncated JPEG"):
        decode(tmp_path / "a.jpg")


def test_error_has_no_file_name(tmp_path):
    path = tmp_path / "Doe_Jane_19420101.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken")
    with pytest.raises(IngestError) as caught:
        decode(path)
    assert "Doe_Jane" not in str(caught.value)
    assert str(tmp_path) not in str(caught.value)


def write_pyramid_tiff(path, pixels):
    """Write a tiled two-level TIFF pyramid (level 1 as a reduced-resolution page)."""
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(pixels, tile=(64, 64), photometric="minisblack")
        tiff.write(pixels[::2, ::2].copy(), tile=(64, 64), subfiletype=1,
                   photometric="minisblack")


def test_pyramidal_8bit_tiff_via_openslide(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (256, 320)).astype(np.uint8)
    write_pyramid_tiff(tmp_path / "a.tif", pixels)
    image, = decode(tmp_path / "a.tif")
    assert image.attributes["source_kind"] == "openslide"
    assert np.array_equal(image.pixels, pixels.astype(np.uint16) * 257)


def test_pyramidal_16bit_tiff_via_tifffile(tmp_path):
    pixels = image16(256, 320)
    write_pyramid_tiff(tmp_path / "a.tif", pixels)
    image, = decode(tmp_path / "a.tif")
    assert image.attributes["source_kind"] == "tiff"
    assert np.array_equal(image.pixels, pixels)
