"""Patch sampling from a real pyramid store of FracAtlas radiographs."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from patchgen.conditioning import coordinate_grid, upsample_to
from patchgen.config import ConfigError, from_dict
from patchgen.data_order import ShuffledOrder
from patchgen.patch_data import (PatchDataConfig, PatchDataset, chunk_origin_ranges,
                                 draw_aligned, origin_range)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "radiographs"
FRACATLAS = DATA / "fracatlas"


def pick_fracatlas(count_per_label: int, width: str = "373", height: str = "454") -> list[Path]:
    """The first FracAtlas files of each label with the given size in ``labels.csv``."""
    with open(FRACATLAS / "labels.csv", newline="", encoding="utf-8") as handle:
        records = [r for r in csv.DictReader(handle)
                   if (r["width"], r["height"]) == (width, height)]
    picked = []
    for label in ("fractured", "non_fractured"):
        picked += [FRACATLAS / r["file"] for r in records if r["label"] == label][:count_per_label]
    return picked


def build_fracatlas_store(out: Path, per_label: int = 2, **options):
    """A store of small FracAtlas radiographs of both labels, all in the train split."""
    if not FRACATLAS.is_dir():
        pytest.skip(f"real radiographs not found at {FRACATLAS}")
    from preprocess.build import build_store
    from preprocess.store import PyramidStore

    build_store(pick_fracatlas(per_label), out, labels_csv=FRACATLAS / "labels.csv", workers=0,
                split="1,0,0", **options)
    return PyramidStore(out)



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_fracatlas_store(tmp_path_factory.mktemp("patch-data") / "store.zarr",
                                 chunk_size=64)


def make_dataset(store, **data) -> PatchDataset:
    config = from_dict(PatchDataConfig, {"patch_size": 32, **data})
    return PatchDataset(store, store.rows(), store.labels(), config)


def test_store_levels_are_odd_and_non_square(store):
    row = store.rows()[0]
    shapes = [store.level_shape(row.image_id, level) for level in range(row.levels)]
    assert any(h != w for h, w in shapes)
    assert any(h % 2 or w % 2 for h, w in shapes)


def test_coords_match_whole_grid(store):
    dataset = make_dataset(store, border_fraction=0.5)
    for seed in range(40):
        sample = dataset[(seed % len(dataset), seed)]
        row = store.rows()[seed % len(dataset)]
        height, width = store.level_shape(row.image_id, int(sample["level"]))
        y0, x0 = sample["origin"].tolist()
        pad = 32
        whole = coordinate_grid(-pad, -pad, height + 2 * pad, width + 2 * pad, height, width)
        expected = whole[:, y0 + pad:y0 + pad + 32, x0 + pad:x0 + pad + 32]
        assert torch.equal(sample["coords"], expected), (seed, y0, x0, height, width)


def test_border_patch_mask(store):
    dataset = make_dataset(store)
    row = store.rows()[1]
    height, width = store.level_shape(row.image_id, 1)
    x0 = (width - 24 + 1) // 2 * 2
    inside = width - x0
    sample = dataset.patch_at(1, 1, -8, x0, 32)
    mask = sample["mask"][0]
    assert width % 2 == 1
    assert torch.all(mask[:8] == 0)
    assert torch.all(mask[:, inside:] == 0)
    assert torch.all(mask[8:, :inside] == 1)
    assert torch.all(sample["x0"][0][mask == 0] == -1)


def test_patch_inside_has_full_mask(store):
    dataset = make_dataset(store)
    sample = dataset.patch_at(0, 0, 100, 60, 32)
    assert torch.all(sample["mask"] == 1)


@pytest.mark.parametrize("level_gap", [1, 2])
def test_cond_equals_crop_of_upsampled_level(store, level_gap):
    dataset = make_dataset(store, level_gap=level_gap)
    row = store.rows()[2]
    factor = 2 ** level_gap
    for level in range(row.levels - level_gap):
        height, width = store.level_shape(row.image_id, level)
        above = torch.from_numpy(store.read_level(row.image_id, level + level_gap))[None, None]
        whole = upsample_to(above, (height, width), factor=factor)[0, 0] * 2 - 1
        for y0, x0 in [(0, 0), (height // 2 // factor * factor, width // 3 // factor * factor),
                       (-8, width - 24 - width % factor)]:
            sample = dataset.patch_at(2, level, y0, x0, 32)
            mask = sample["mask"][0] == 1
            top, left = max(y0, 0), max(x0, 0)
            expected = whole[top:y0 + 32, left:x0 + 32]
            got = sample["cond"][0][mask].reshape(expected.shape)
            assert torch.allclose(got, expected, atol=1e-6), (level, y0, x0)


def test_cond_rejects_unaligned_origin(store):
    dataset = make_dataset(store)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        dataset.patch_at(0, 0, 3, 0, 32)


def test_sample_holds_label_level_spacing(store):
    dataset = make_dataset(store)
    sample = dataset[(0, 123)]
    row = store.rows()[0]
    assert store.labels()[int(sample["label"])] == row.label
    assert 0 <= int(sample["level"]) < row.levels - 1
    assert float(sample["spacing_mm"]) == float(row.spacing_mm or 0.0)
    assert int(sample["seed"]) == 123


def loader_batches(dataset, keys, workers, context=None):
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=workers,
                                         multiprocessing_context=context)
    return list(loader)


def test_same_samples_for_any_workers(store):
    dataset = make_dataset(store, large_patch_size=64, large_probability=0.5)
    order = ShuffledOrder(len(dataset), batch_size=3, seed=7)
    keys = [order.micro_batch(index) for index in range(6)]
    reference = loader_batches(dataset, keys, 0)
    sizes = {batch["x0"].shape[-1] for batch in reference}
    assert sizes == {32, 64}
    for workers, context in [(2, "fork"), (2, "spawn")]:
        batches = loader_batches(dataset, keys, workers, context)
        for expected, got in zip(reference, batches):
            for name in expected:
                assert torch.equal(expected[name], got[name]), (context, name)


def test_batch_shares_one_patch_size(store):
    dataset = make_dataset(store, large_patch_size=64, large_probability=0.5)
    samples = dataset.__getitems__([(0, 1), (1, 2), (2, 3), (3, 4)])
    assert len({tuple(s["x0"].shape) for s in samples}) == 1


def test_large_batch_share_follows_probability(store):
    dataset = make_dataset(store, large_patch_size=64, large_probability=0.25)
    sizes = [dataset.batch_patch_size([(0, seed)]) for seed in range(4000)]
    share = sizes.count(64) / len(sizes)
    assert abs(share - 0.25) < 0.03


def test_aligned_origins_are_uniform():
    rng = np.random.default_rng(0)
    low, high = origin_range(227, 32, 0.25)
    draws = np.array([draw_aligned(rng, low, high, 2) for _ in range(20000)])
    assert np.all(draws % 2 == 0)
    assert draws.min() == low
    assert draws.max() == high - high % 2
    counts = np.bincount((draws - low) // 2)
    assert counts.min() > 0.7 * counts.mean()
    assert counts.max() < 1.3 * counts.mean()


def test_chunk_origins_read_one_chunk():
    low, high = origin_range(300, 32, 0.25)
    ranges = chunk_origin_ranges(300, 32, 64, low, high, 2)
    for first, last in ranges:
        for origin in (first, last):
            inside = max(origin, 0), min(origin + 32, 300) - 1
            assert inside[0] // 64 == inside[1] // 64, (origin, ranges)
    assert ranges[0][0] == low
    assert ranges[-1][1] == high - high % 2


def test_chunk_mode_samples_stay_in_one_chunk(store):
    dataset = make_dataset(store, position="chunk")
    for seed in range(30):
        sample = dataset[(seed % len(dataset), seed)]
        row = store.rows()[seed % len(dataset)]
        level = int(sample["level"])
        chunk = store.chunk_shape(row.image_id, level)
        shape = store.level_shape(row.image_id, level)
        for axis, origin in enumerate(sample["origin"].tolist()):
            if shape[axis] < 32 or chunk[axis] < 32:
                continue
            first, last = max(origin, 0), min(origin + 32, shape[axis]) - 1
            assert first // chunk[axis] == last // chunk[axis], (seed, axis, origin)


@pytest.mark.parametrize("data, message", [
    ({"large_patch_size": 48}, "large_patch_size"),
    ({"large_patch_size": 33, "patch_size": 32}, "large_patch_size"),
    ({"large_probability": 0.5}, "needs data.large_patch_size"),
    ({"position": "random"}, "data.position"),
    ({"patch_size": 31}, "multiple of 2"),
])
def test_config_rejects_invalid(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PatchDataConfig, {"patch_size": 64, **data})
