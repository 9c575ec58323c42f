"""Fixtures: small synthetic input folders and a store built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess.build import build_store
from tests.preprocess.factory import SALT, ramp, write_dicom

# Small chunks and shards, so that the test images span several chunks and shards.
SMALL_LAYOUT = {"chunk_size": 32, "shard_size": 64, "min_size": 8}


def write_inputs(folder: Path) -> dict[str, Path]:
    """Write a labelled input folder: PNG (8 and 16 bit), DICOM and a broken file.

    Returns:
        name -> path of every file written, including ``labels.csv``.
    """
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = {
        "png16": images / "Doe_Jane_knee.png",
        "png8": images / "b.png",
        "odd": images / "c.png",
        "dicom": images / "d.dcm",
        "broken": images / "e.png",
    }
    Image.fromarray(rng.integers(0, 65536, (150, 100)).astype(np.uint16)).save(paths["png16"])
    Image.fromarray(rng.integers(0, 256, (70, 90)).astype(np.uint8)).save(paths["png8"])
    Image.fromarray(rng.integers(0, 256, (13, 17)).astype(np.uint8)).save(paths["odd"])
    write_dicom(paths["dicom"], ramp(40, 60), PixelSpacing=[0.2, 0.2])
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    labels = folder / "labels.csv"
    labels.write_text("file,label\nimages/Doe_Jane_knee.png,fractured\nimages/b.png,normal\n"
                      "images/c.png,normal\nimages/d.dcm,fractured\nimages/e.png,normal\n")
    paths["labels"] = labels
    return paths


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    """A fresh labelled input folder per test."""
    return write_inputs(tmp_path / "inputs")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A store built once per module from a labelled input folder: (store, input paths)."""
    root = tmp_path_factory.mktemp("built")
    paths = write_inputs(root / "inputs")
    store = root / "store.zarr"
    build_store([root / "inputs"], store, labels_csv=paths["labels"], workers=0, salt=SALT,
                manifest=root / "manifest.csv", **SMALL_LAYOUT)
    return store, paths
