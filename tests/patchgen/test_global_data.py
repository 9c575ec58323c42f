"""Layout inputs on a real pyramid store: canvas geometry, buckets and the layout dataset.

``real_store`` builds a store from a few FracAtlas JPEGs (portrait, landscape and one
narrow image, both labels) and one CR DICOM with a 0.2 mm pixel spacing. The global-model
and trainer tests import it.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from patchgen.config import ConfigError, load_stage_config
from patchgen.conditioning import level_shape
from patchgen.global_model import (GlobalConfig, GlobalTask, fit_shape, layout_level,
                                   read_fitted, source_level, validate_buckets)

RADIOGRAPHS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "radiographs"
FRACATLAS = {  # file -> label; (H, W) after decoding in the comments
    "IMG0002424.jpg": "fractured",      # 373 x 454
    "IMG0002427.jpg": "fractured",      # 373 x 454
    "IMG0000443.jpg": "fractured",      # 454 x 373
    "IMG0000453.jpg": "fractured",      # 454 x 373
    "IMG0002588.jpg": "fractured",      # 454 x 181
    "IMG0000266.jpg": "non_fractured",  # 373 x 454
    "IMG0000268.jpg": "non_fractured",  # 373 x 454
    "IMG0000269.jpg": "non_fractured",  # 454 x 373
    "IMG0000279.jpg": "non_fractured",  # 454 x 373
}
DICOM = "RG2_UNC.dcm"   # CR hip, 2140 x 1760, PixelSpacing 0.2 mm
DICOM_SIZE = (2140, 1760)

# Tiny settings shared by the global-model tests: a 32 x 32 pixel budget and three buckets
# that separate portrait from landscape images.
TINY = ["model.resolution=32", "model.channels=[8,16]", "model.norm_groups=4",
        "model.attention_from=2", "data.strategy=buckets",
        "data.buckets=[[32,32],[36,28],[28,36]]", "diffusion.sampling_steps=3",
        "train.batch_size=2", "train.grad_accum=1", "train.duration=8", "train.log_every=4",
        "train.checkpoint_every=4", "train.sample_every=0", "train.warmup=0",
        "train.ema_decay=0.9", "train.num_workers=0"]

needs_radiographs = pytest.mark.skipif(not (RADIOGRAPHS / "fracatlas").is_dir(),
                                       reason=f"real radiographs not found at {RADIOGRAPHS}")


def tiny_config(*overrides: str) -> GlobalConfig:
    config, _ = load_stage_config(GlobalConfig, "global", "cpu-tiny", [*TINY, *overrides])
    return config


def build_real_store(folder: Path) -> Path:
    """Build a pyramid store of the FracAtlas files above and the DICOM, all in the train split."""
    from preprocess.build import build_store

    images = folder / "sources" / "images"
    images.mkdir(parents=True)
    for name in FRACATLAS:
        shutil.copy(RADIOGRAPHS / "fracatlas" / "images" / name, images / name)
    shutil.copy(RADIOGRAPHS / "dicom" / DICOM, images / DICOM)
    labels = folder / "sources" / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        writer.writerows([f"images/{name}", label] for name, label in FRACATLAS.items())
        writer.writerow([f"images/{DICOM}", "non_fractured"])
    store = folder / "store.zarr"
    build_store([images], store, labels_csv=labels, workers=0, split="1,0,0",
                salt="femurgen-tests")
    return store



@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> Path:
    if not (RADIOGRAPHS / "fracatlas").is_dir():
        pytest.skip(f"real radiographs not found at {RADIOGRAPHS}")
    return build_real_store(tmp_path_factory.mktemp("global-store"))


@pytest.mark.parametrize("native, canvas, expected", [
    ((454, 373), 64, (64, 53)), ((373, 454), (56, 72), (56, 68)),
    ((2140, 1760), (72, 56), (68, 56)), ((101, 70), (64, 64), (64, 44)), ((10, 7), 64, (64, 45)),
])
def test_fit_shape_keeps_aspect(native, canvas, expected):
    fitted = fit_shape(native, canvas)
    assert fitted == expected
    assert abs(fitted[0] / fitted[1] - native[0] / native[1]) < 1.0 / min(fitted)


def test_layout_level_fits_canvas():
    assert layout_level((2140, 1760), 64) == 6
    assert layout_level((2140, 1760), (72, 56)) == 5
    assert layout_level((373, 454), (56, 72)) == 3
    assert level_shape((373, 454), 3) == (47, 57)


def test_source_level_not_below_target():
    assert source_level((2140, 1760), levels=7, target=(68, 56)) == 4
    assert level_shape((2140, 1760), 4) == (134, 110)
    assert source_level((2140, 1760), levels=3, target=(68, 56)) == 2


def test_buckets_over_budget_rejected():
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]=40x32"):
        validate_buckets([(32, 32), (40, 32)], resolution=32, channels=(8, 16))


def test_buckets_indivisible_rejected():
    with pytest.raises(ValueError, match=r"data.buckets\[0\] width=27"):
        validate_buckets([(36, 27)], resolution=32, channels=(8, 16))


def test_buckets_same_aspect_rejected():
    with pytest.raises(ConfigError, match="aspect ratio"):
        validate_buckets([(32, 32), (16, 16)], resolution=32, channels=(8, 16))


def test_unknown_strategy_rejected():
    with pytest.raises(ConfigError, match="data.strategy='stretch'"):
        tiny_config("data.strategy=stretch")


@needs_radiographs
def test_task_assigns_canvases(real_store):
    from preprocess.store import PyramidStore

    store = PyramidStore(real_store)
    rows = store.rows(split="train")
    task = GlobalTask(store, rows, store.labels(), tiny_config())
    counts = task.plan.counts()
    assert counts == {(36, 28): 6, (28, 36): 4}
    for item, row in enumerate(rows):
        expected = (36, 28) if row.height > row.width else (28, 36)
        assert task.plan.shape_of_item(item) == expected


@needs_radiographs
def test_task_merges_small_buckets(real_store):
    from preprocess.store import PyramidStore

    store = PyramidStore(real_store)
    task = GlobalTask(store, store.rows(), store.labels(), tiny_config("train.batch_size=5"))
    assert task.plan.counts() == {(36, 28): 10}


@needs_radiographs
def test_dataset_items_on_their_canvas(real_store):
    from preprocess.store import PyramidStore

    store = PyramidStore(real_store)
    rows = store.rows()
    task = GlobalTask(store, rows, store.labels(), tiny_config())
    dataset = task.dataset()
    for item, row in enumerate(rows):
        sample = dataset[(item, 123)]
        canvas = task.plan.shape_of_item(item)
        fitted = fit_shape((row.height, row.width), canvas)
        assert tuple(sample["x0"].shape) == (1, *canvas)
        assert tuple(sample["mask"].shape) == (1, *canvas)
        assert float(sample["mask"].sum()) == fitted[0] * fitted[1]
        assert bool((sample["x0"][sample["mask"] == 0] == -1).all())
        assert float(sample["x0"].min()) >= -1.0
        assert float(sample["x0"].max()) <= 1.0
        assert int(sample["seed"]) == 123


@needs_radiographs
def test_dataset_size_features(real_store):
    from preprocess.store import PyramidStore

    store = PyramidStore(real_store)
    rows = store.rows()
    dataset = GlobalTask(store, rows, store.labels(), tiny_config()).dataset()
    dicom = next(i for i, r in enumerate(rows) if (r.height, r.width) == DICOM_SIZE)
    jpeg = next(i for i, r in enumerate(rows) if r.spacing_mm is None)
    size = dataset[(dicom, 0)]["size"]
    assert torch.allclose(size, torch.tensor([np.log2(2140) / 12, np.log2(1760) / 12, 1.0,
                                              np.log(0.2)], dtype=torch.float32))
    assert dataset[(jpeg, 0)]["size"][2:].tolist() == [0.0, 0.0]


@needs_radiographs
def test_read_fitted_matches_level(real_store):
    from preprocess.store import PyramidStore

    store = PyramidStore(real_store)
    row = next(r for r in store.rows() if (r.height, r.width) == (373, 454))
    fitted = read_fitted(store, row, (47, 57))
    assert fitted.shape == (47, 57)
    assert np.array_equal(fitted, store.read_level(row.image_id, 3))


@needs_radiographs
def test_layout_cache_same_items(real_store):
    from preprocess.store import PyramidStore

    store = PyramidStore(real_store)
    rows = store.rows()
    plain = GlobalTask(store, rows, store.labels(), tiny_config()).dataset()
    cached = GlobalTask(store, rows, store.labels(), tiny_config("data.cache_layouts=true")).dataset()
    for item in range(len(rows)):
        first, second = cached[(item, 5)], cached[(item, 5)]
        expected = plain[(item, 5)]
        for key in expected:
            assert torch.equal(first[key], expected[key])
            assert torch.equal(second[key], expected[key])
    assert len(cached.cache) == len(rows)


@needs_radiographs
def test_letterbox_single_square_canvas(real_store):
    from preprocess.store import PyramidStore

    from patchgen.data_order import ShuffledOrder
    from patchgen.inference import LayoutSampler

    store = PyramidStore(real_store)
    rows = store.rows()
    task = GlobalTask(store, rows, store.labels(), tiny_config("data.strategy=letterbox"))
    assert task.plan.counts() == {(32, 32): len(rows)}
    assert isinstance(task.sample_order(2, 0), ShuffledOrder)
    sample = task.dataset()[(0, 0)]
    assert tuple(sample["x0"].shape) == (1, 32, 32)

    sampler = LayoutSampler.from_task_info(task.networks["model"].eval(), task.snapshot_info())
    assert sampler.canvases == [(32, 32)]
    layout = sampler.sample("fractured", DICOM_SIZE, torch.Generator().manual_seed(0), steps=2)
    assert layout.shape == level_shape(DICOM_SIZE, layout_level(DICOM_SIZE, 32))
