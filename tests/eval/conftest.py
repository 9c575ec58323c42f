"""Shared fixtures: a small real pyramid store from FracAtlas and a synthetic output folder.

The store is built by preprocess.build.build_store from 24 small FracAtlas radiographs (8 fractured,
16 non-fractured). The synthetic folder contains two smooth random images and one copy of a training
image (the planted copy that memorization must flag), each with a sidecar like `synthesize` writes.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

RADIOGRAPHS = Path(__file__).resolve().parents[3] / "shared" / "data" / "radiographs"
FRACATLAS = RADIOGRAPHS / "fracatlas"
TILE_SIZE, OVERLAP = 128, 32


def tile_grid(height: int, width: int) -> dict:
    """Tile origins covering (height, width) like the stitching canvas: last row/column flush with the edge."""
    stride = TILE_SIZE - OVERLAP
    ys = sorted({*range(0, max(height - TILE_SIZE, 0) + 1, stride), max(height - TILE_SIZE, 0)})
    xs = sorted({*range(0, max(width - TILE_SIZE, 0) + 1, stride), max(width - TILE_SIZE, 0)})
    return {"level": 0, "tile_size": TILE_SIZE, "overlap": OVERLAP, "origins_yx": [[y, x] for y in ys for x in xs]}


def write_synthetic(folder: Path, name: str, label: str, pixels: np.ndarray, index: int) -> None:
    """Write a 16-bit PNG and its sidecar as the synthesize command does."""
    height, width = pixels.shape
    Image.fromarray((np.clip(pixels, 0, 1) * 65535 + 0.5).astype(np.uint16)).save(folder / f"{name}.png")
    sidecar = {"name": name, "label": label, "seed": 0, "image_index": index, "height": height, "width": width,
               "spacing_mm": None, "tile_grid": tile_grid(height, width)}
    (folder / f"{name}.json").write_text(json.dumps(sidecar))


def smooth_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random image in [0.1, 0.8] with a bright vertical band, roughly radiograph-like."""
    field = gaussian_filter(rng.normal(size=(height, width)), sigma=6)
    field = (field - field.min()) / (np.ptp(field) + 1e-9) * 0.4 + 0.1
    field[:, width // 3: width // 2] += 0.3
    return field


@pytest.fixture(scope="session")
def store_path(tmp_path_factory):
    if not FRACATLAS.is_dir():
        pytest.skip(f"real radiographs not found at {FRACATLAS}")
    from preprocess.build import build_store

    rows = list(csv.DictReader(open(FRACATLAS / "labels.csv")))
    small = [r for r in rows if int(r["width"]) < 1000]
    chosen = [r for r in small if r["label"] == "fractured"][:8] + [r for r in small if r["label"] != "fractured"][:16]
    folder = tmp_path_factory.mktemp("store")
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        for row in chosen:
            writer.writerow([os.path.relpath(FRACATLAS / row["file"], folder), row["label"]])
    summary = build_store([FRACATLAS / r["file"] for r in chosen], folder / "store.zarr",
                          labels_csv=folder / "labels.csv", workers=0, split="0.6,0.2,0.2")
    assert not summary.failed
    return folder / "store.zarr"


@pytest.fixture(scope="session")
def planted_id(store_path):
    """Id of the training image copied into the synthetic folder."""
    from preprocess.store import PyramidStore

    return sorted(row.image_id for row in PyramidStore(store_path).rows(split="train"))[0]


@pytest.fixture(scope="session")
def planted_name(store_path, planted_id):
    """Name of the planted copy in the synthetic folder."""
    from preprocess.store import PyramidStore

    return f"{PyramidStore(store_path).row(planted_id).label}_00002"


@pytest.fixture(scope="session")
def synthetic_dir(store_path, planted_id, tmp_path_factory):
    from preprocess.store import PyramidStore

    store = PyramidStore(store_path)
    folder = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    write_synthetic(folder, "fractured_00000", "fractured", smooth_field(rng, 520, 430), 0)
    write_synthetic(folder, "non_fractured_00001", "non_fractured", smooth_field(rng, 480, 400), 1)
    label = store.row(planted_id).label
    write_synthetic(folder, f"{label}_00002", label, store.read_level(planted_id, 0), 2)
    return folder


@pytest.fixture(scope="session")
def alexnet_features():
    """State dict of a randomly initialised torchvision AlexNet `features` block (the LPIPS backbone)."""
    import torch
    from torchvision.models import alexnet

    torch.manual_seed(0)
    return {key: value.contiguous() for key, value in alexnet(weights=None).features.state_dict().items()}
