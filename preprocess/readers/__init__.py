"""Readers: detect the kind of an input file and decode it into store pixels.

``read_images(path, kind, options)`` yields one :class:`DecodedImage` per image (frame) of the
file. Every failure is an :class:`IngestError` whose message names neither the path nor the file
name (they are scrubbed), so it can go to ``failed.csv`` and to logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from preprocess import privacy
from preprocess.errors import IngestError
from preprocess.readers.common import DecodedImage, ReadOptions

__all__ = ["DecodedImage", "ReadOptions", "detect_kind", "read_images", "KINDS"]

KIND_BY_SUFFIX = {
    ".dcm": "dicom", ".dicom": "dicom", ".dic": "dicom", ".ima": "dicom",
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg", ".jfif": "jpeg",
    ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff", ".btf": "tiff",
    ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".he5": "hdf5",
    ".svs": "slide", ".ndpi": "slide", ".scn": "slide", ".mrxs": "slide", ".vms": "slide",
    ".vmu": "slide", ".bif": "slide", ".svslide": "slide",
}
KINDS = tuple(sorted(set(KIND_BY_SUFFIX.values())))
MAGIC_PREFIXES = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"), (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"), (b"\x89HDF\r\n\x1a\n", "hdf5"),
    (b"BM", "bmp"),
)
# Files that sit in DICOM folders but hold no image.
IGNORED_NAMES = frozenset({"DICOMDIR", "LOCKFILE", "VERSION"})


def detect_kind(path: Path) -> str | None:
    """Return the reader kind of a file from its first bytes, else its suffix; None if unknown.

    DICOM files are recognised by the ``DICM`` marker at byte 128, or, without preamble, by a
    first element in group 0002 or 0008 (implicit or explicit VR, little endian).
    """
    if path.name.upper() in IGNORED_NAMES:
        return None
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return KIND_BY_SUFFIX.get(path.suffix.lower())
    # The DICM marker goes first: a DICOM preamble may itself be a TIFF header.
    if head[128:132] == b"DICM":
        return "dicom"
    for prefix, kind in MAGIC_PREFIXES:
        if head.startswith(prefix):
            return kind
    if _looks_like_headerless_dicom(head):
        return "dicom"
    return KIND_BY_SUFFIX.get(path.suffix.lower())


def _looks_like_headerless_dicom(head: bytes) -> bool:
    """Return True when the bytes start with a little-endian element of group 0002 or 0008."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and element < 0x0100


def read_images(path: Path, kind: str, options: ReadOptions) -> Iterator[DecodedImage]:
    """Decode every image of a file with the reader of ``kind``.

    Args:
        path: the input file.
        kind: one of :data:`KINDS`, usually from :func:`detect_kind`.
        options: read options.
    Yields:
        DecodedImage per image, (H, W) uint16 pixels.
    Raises:
        IngestError: for any failure; the message contains no path or file name.
    """
    try:
        yield from _reader(kind)(path, options)
    except IngestError as error:
        raise IngestError(privacy.scrub_path(str(error), path)) from None
    except MemoryError:
        raise IngestError("out of memory while decoding; lower --max-megapixels or --workers") \
            from None
    except Exception as error:  # noqa: BLE001 - third-party decoders raise many types
        message = f"{kind} reader failed ({type(error).__name__}: {error})"
        raise IngestError(privacy.scrub_path(message, path)) from None


def _reader(kind: str):
    """Return the reader function for ``kind``, importing heavy modules only when needed."""
    if kind == "dicom":
        from preprocess.readers.dicom import read_dicom

        return read_dicom
    if kind in ("png", "jpeg", "bmp"):
        from preprocess.readers.raster import read_pillow

        return lambda path, options: read_pillow(path, kind, options)
    if kind == "tiff":
        from preprocess.readers.raster import read_tiff

        return read_tiff
    if kind == "hdf5":
        from preprocess.readers.hdf5 import read_hdf5

        return read_hdf5
    if kind == "slide":
        from preprocess.readers.slide import read_slide

        return read_slide
    raise IngestError(f"unsupported file kind {kind!r}; supported: {', '.join(KINDS)}")
