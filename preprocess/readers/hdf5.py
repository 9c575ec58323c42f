"""HDF5 datasets through h5py.

The dataset is the one named by ``--h5-dataset``, or the only 2-D or 3-D numeric dataset of the
file. A 2-D dataset (H, W) is one image, and a 3-D dataset (N, H, W) is one image per leading
index. A trailing axis of length 1 is dropped first. Integer data maps from its type range, float data
from [0, 1] or from its own range (``normalise``). Spacing comes from a ``spacing_mm`` attribute
(one or two values) or an ``element_size_um`` attribute (the last two values, in micrometres).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from preprocess import normalise
from preprocess.errors import IngestError
from preprocess.readers.common import (DecodedImage, ReadOptions, check_frame_count,
                                       check_megapixels, valid_spacing)

MICROMETRES_PER_MM = 1000.0


def read_hdf5(path: Path, options: ReadOptions) -> Iterator[DecodedImage]:
    """Decode the images of one HDF5 dataset, one leading index at a time.

    Yields:
        DecodedImage with (H, W) uint16 pixels per image of the dataset.
    """
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise IngestError(f"not a readable HDF5 file ({type(error).__name__})") from None
    with handle:
        dataset = _select_dataset(handle, options.h5_dataset)
        shape = tuple(dataset.shape)
        if len(shape) >= 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) not in (2, 3):
            raise IngestError(f"HDF5 dataset has shape {tuple(dataset.shape)}; expected (H, W) or "
                              "(N, H, W)")
        count = shape[0] if len(shape) == 3 else 1
        check_megapixels(shape[-2], shape[-1], options)
        check_frame_count(count, options)
        spacing = _hdf5_spacing(dataset.attrs)
        for index in range(count):
            plane = dataset[index] if len(shape) == 3 else dataset[()]
            plane = np.asarray(plane).reshape(shape[-2:])
            yield _plane_to_image(plane, index, count, spacing)


def _select_dataset(handle: object, name: str | None) -> object:
    """Return the dataset named ``name``, or the only image-shaped dataset of the file."""
    import h5py

    if name:
        node = handle.get(name)  # type: ignore[attr-defined]
        if not isinstance(node, h5py.Dataset):
            raise IngestError(f"--h5-dataset {name} is not a dataset in this file")
        return node
    candidates: list[h5py.Dataset] = []

    def collect(_: str, node: object) -> None:
        if isinstance(node, h5py.Dataset) and node.ndim in (2, 3, 4) and node.dtype.kind in "uifb":
            candidates.append(node)

    handle.visititems(collect)  # type: ignore[attr-defined]
    if len(candidates) != 1:
        raise IngestError(f"file contains {len(candidates)} image-shaped datasets; name one with "
                          "--h5-dataset PATH")
    return candidates[0]


def _hdf5_spacing(attributes: object) -> tuple[float, float] | None:
    """Return (row, column) spacing in mm from dataset attributes, or None."""
    if "spacing_mm" in attributes:  # type: ignore[operator]
        return valid_spacing(np.atleast_1d(attributes["spacing_mm"]))  # type: ignore[index]
    if "element_size_um" in attributes:  # type: ignore[operator]
        microns = np.atleast_1d(attributes["element_size_um"])[-2:]  # type: ignore[index]
        return valid_spacing(microns / MICROMETRES_PER_MM)
    return None


def _plane_to_image(plane: np.ndarray, index: int, count: int,
                    spacing: tuple[float, float] | None) -> DecodedImage:
    """Convert one (H, W) plane to a DecodedImage."""
    if plane.dtype.kind == "f":
        pixels, intensity = normalise.floats_to_store(plane)
    else:
        pixels, intensity = normalise.integers_to_store(plane), "dtype"
    attributes = {"source_kind": "hdf5", "photometric": "", "bits_stored":
                  str(plane.dtype.itemsize * 8), "intensity": intensity,
                  "spacing_source": "hdf5 attribute" if spacing else "unknown"}
    return DecodedImage(pixels=pixels, frame=index, frames=count, spacing_mm=spacing,
                        patient_id=None, attributes=attributes)
