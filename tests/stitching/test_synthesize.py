"""The synthesize driver: files, sidecar, reruns, failures, seeds and shards."""

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from patchgen.config import ConfigError, from_dict
from stitching.config import SynthConfig
from stitching.synthesize import patch_levels, synthesize_with
from tests.stitching.tiny_models import CPU, StubGlobalSampler, StubPatchSampler

SIDECAR_KEYS = {"name", "label", "seed", "image_index", "height", "width", "spacing_mm", "levels",
                "tile_grid", "checkpoints", "config", "software_version", "file_bytes",
                "file_sha256"}


@pytest.fixture
def checkpoints(tmp_path):
    global_path = tmp_path / "global-model"
    global_path.mkdir()
    (global_path / "weights.safetensors").write_bytes(b"global")
    patch_path = tmp_path / "patch-model.safetensors"
    patch_path.write_bytes(b"patch")
    return global_path, patch_path


def config_for(**overrides):
    data = {"n": 3, "seed": 5, "canvas": {"overlap": 8, "tile_batch": 4},
            "patch": {"steps": 2}, "output": {"formats": ["png"]}}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return from_dict(SynthConfig, data)


def run(tmp_path, checkpoints, out_name="out", kind="diffusion", level_gap=1, fail_size=None,
        **overrides):
    global_sampler = StubGlobalSampler(checkpoints[0], fail_size=fail_size)
    patch_sampler = StubPatchSampler(checkpoints[1], kind=kind, level_gap=level_gap)
    out_dir = tmp_path / out_name
    summary = synthesize_with(global_sampler, patch_sampler, out_dir, config_for(**overrides), CPU,
                              progress=False)
    return summary, out_dir


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image).astype(np.uint16)


def test_writes_png_and_sidecar(tmp_path, checkpoints):
    summary, out_dir = run(tmp_path, checkpoints)
    assert summary.written == ["fractured_00000", "non_fractured_00001", "fractured_00002"]
    assert summary.failed == []
    for name in summary.written:
        record = json.loads((out_dir / f"{name}.json").read_text())
        assert SIDECAR_KEYS <= set(record)
        pixels = read_png(out_dir / f"{name}.png")
        assert pixels.shape == (record["height"], record["width"])
        assert (out_dir / f"{name}.preview.png").is_file()


def test_sidecar_records_provenance(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints, n=1)
    record = json.loads((out_dir / "fractured_00000.json").read_text())
    assert record["seed"] == 5
    assert record["label"] == "fractured"
    assert record["checkpoints"]["patch"]["path"] == str(checkpoints[1])
    assert len(record["checkpoints"]["global"]["sha256"]) == 64
    assert record["config"]["canvas"]["tile_batch"] == 4
    assert record["levels"][0] == [record["height"], record["width"]]
    assert record["tile_grid"]["tile_size"] == 32
    assert record["tile_grid"]["origins_yx"][0] == [0, 0]


def test_png_is_16_bit_with_detail(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints, n=1)
    with Image.open(out_dir / "fractured_00000.png") as image:
        assert image.mode.startswith("I;16") or image.mode == "I"
    pixels = read_png(out_dir / "fractured_00000.png")
    assert pixels.max() > 255
    assert len(np.unique(pixels)) > 256


def test_writes_dicom_and_zarr(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints, n=1, output__formats=["png", "dicom", "zarr"])
    record = json.loads((out_dir / "fractured_00000.json").read_text())
    ds = pydicom.dcmread(out_dir / "fractured_00000.dcm")
    assert (ds.Rows, ds.Columns) == (record["height"], record["width"])
    assert str(ds.PatientName) == "SYNTHETIC"
    assert np.array_equal(ds.pixel_array, read_png(out_dir / "fractured_00000.png"))
    assert (out_dir / "fractured_00000.ome.zarr" / "zarr.json").is_file()


def test_rerun_skips_finished_images(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints)
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    summary, _ = run(tmp_path, checkpoints)
    assert summary.skipped == ["fractured_00000", "non_fractured_00001", "fractured_00002"]
    assert summary.written == []
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def test_rerun_with_other_seed_fails(tmp_path, checkpoints):
    run(tmp_path, checkpoints, n=1)
    summary, _ = run(tmp_path, checkpoints, n=1, seed=6)
    assert summary.written == []
    assert [name for name, _ in summary.failed] == ["fractured_00000"]
    assert "seed 5 -> 6" in summary.failed[0][1]


def test_rerun_with_other_strength_fails(tmp_path, checkpoints):
    run(tmp_path, checkpoints, n=1)
    summary, _ = run(tmp_path, checkpoints, n=1, patch__strength=0.5)
    assert summary.written == []
    assert "patch.strength 1.0 -> 0.5" in summary.failed[0][1]


def test_rerun_with_other_checkpoint_fails(tmp_path, checkpoints):
    run(tmp_path, checkpoints, n=1)
    checkpoints[1].write_bytes(b"retrained patch")
    summary, _ = run(tmp_path, checkpoints, n=1)
    assert summary.written == []
    assert "patch checkpoint" in summary.failed[0][1]


def test_rerun_with_other_tile_batch_skips(tmp_path, checkpoints):
    run(tmp_path, checkpoints, n=1)
    summary, _ = run(tmp_path, checkpoints, n=1, canvas__tile_batch=7)
    assert summary.failed == []
    assert summary.skipped == ["fractured_00000"]


def test_rerun_redoes_image_without_sidecar(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints)
    original = read_png(out_dir / "non_fractured_00001.png")
    (out_dir / "non_fractured_00001.json").unlink()
    summary, _ = run(tmp_path, checkpoints)
    assert summary.written == ["non_fractured_00001"]
    assert np.array_equal(read_png(out_dir / "non_fractured_00001.png"), original)


def test_rerun_redoes_truncated_png(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints)
    png = out_dir / "non_fractured_00001.png"
    original = read_png(png)
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    summary, _ = run(tmp_path, checkpoints)
    assert summary.written == ["non_fractured_00001"]
    assert summary.skipped == ["fractured_00000", "fractured_00002"]
    assert np.array_equal(read_png(png), original)


def test_rerun_redoes_changed_file(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints, n=1)
    preview = out_dir / "fractured_00000.preview.png"
    preview.write_bytes(bytes(preview.stat().st_size))
    summary, _ = run(tmp_path, checkpoints, n=1)
    assert summary.written == ["fractured_00000"]
    with Image.open(preview) as image:
        assert image.size[0] > 0


def test_rerun_redoes_missing_zarr_chunk(tmp_path, checkpoints):
    formats = ["png", "zarr"]
    _, out_dir = run(tmp_path, checkpoints, n=1, output__formats=formats)
    chunks = [p for p in (out_dir / "fractured_00000.ome.zarr").rglob("*")
              if p.is_file() and p.name != "zarr.json"]
    chunks[0].unlink()
    summary, _ = run(tmp_path, checkpoints, n=1, output__formats=formats)
    assert summary.written == ["fractured_00000"]


def test_size_above_max_megapixels_rejected():
    with pytest.raises(ConfigError, match="max_megapixels"):
        config_for(size="100000x100000")


def test_native_sizes_respect_max_megapixels(tmp_path, checkpoints):
    summary, out_dir = run(tmp_path, checkpoints, n=3, max_megapixels=0.006)
    assert summary.failed == []
    for name in summary.written:
        record = json.loads((out_dir / f"{name}.json").read_text())
        assert record["height"] * record["width"] <= 6000


def test_failed_image_does_not_stop_others(tmp_path, checkpoints):
    summary, out_dir = run(tmp_path, checkpoints, fail_size=(90, 61))
    assert summary.written == ["fractured_00000", "fractured_00002"]
    assert [name for name, _ in summary.failed] == ["non_fractured_00001"]
    assert "failed on purpose" in summary.failed[0][1]
    assert not (out_dir / "non_fractured_00001.json").exists()
    assert not (out_dir / ".work").exists()


def test_same_seed_any_tile_batch(tmp_path, checkpoints):
    _, first = run(tmp_path, checkpoints, out_name="a", n=2, canvas__tile_batch=1)
    _, second = run(tmp_path, checkpoints, out_name="b", n=2, canvas__tile_batch=7)
    for name in ("fractured_00000", "non_fractured_00001"):
        assert np.array_equal(read_png(first / f"{name}.png"), read_png(second / f"{name}.png"))


def test_other_seed_other_image(tmp_path, checkpoints):
    _, first = run(tmp_path, checkpoints, out_name="a", n=1, seed=1, size="100x70")
    _, second = run(tmp_path, checkpoints, out_name="b", n=1, seed=2, size="100x70")
    difference = read_png(first / "fractured_00000.png").astype(int) - read_png(second / "fractured_00000.png")
    assert np.abs(difference).max() > 0


def test_shards_match_single_run(tmp_path, checkpoints):
    _, single = run(tmp_path, checkpoints, out_name="single")
    _, sharded = run(tmp_path, checkpoints, out_name="sharded", shard_index=0, shard_count=2)
    summary, _ = run(tmp_path, checkpoints, out_name="sharded", shard_index=1, shard_count=2)
    assert summary.written == ["non_fractured_00001"]
    for name in ("fractured_00000", "non_fractured_00001", "fractured_00002"):
        assert np.array_equal(read_png(single / f"{name}.png"), read_png(sharded / f"{name}.png"))


def test_given_size_and_label(tmp_path, checkpoints):
    summary, out_dir = run(tmp_path, checkpoints, n=1, size="77x130", label="non_fractured")
    assert summary.written == ["non_fractured_00000"]
    assert read_png(out_dir / "non_fractured_00000.png").shape == (77, 130)


def test_gan_patch_model(tmp_path, checkpoints):
    summary, out_dir = run(tmp_path, checkpoints, kind="gan", n=1)
    assert summary.written == ["fractured_00000"]
    assert read_png(out_dir / "fractured_00000.png").shape == (100, 70)


def test_level_gap_two(tmp_path, checkpoints):
    summary, out_dir = run(tmp_path, checkpoints, level_gap=2, n=1)
    record = json.loads((out_dir / "fractured_00000.json").read_text())
    assert summary.written == ["fractured_00000"]
    assert record["tile_grid"]["patch_levels"] == [2, 0]
    assert read_png(out_dir / "fractured_00000.png").shape == (100, 70)


def test_size_that_fits_layout(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints, n=1, size="12x9")
    record = json.loads((out_dir / "fractured_00000.json").read_text())
    assert record["tile_grid"]["origins_yx"] == []
    assert read_png(out_dir / "fractured_00000.png").shape == (12, 9)


def test_disk_canvas_same_image(tmp_path, checkpoints):
    _, host = run(tmp_path, checkpoints, out_name="host", n=1)
    _, disk = run(tmp_path, checkpoints, out_name="disk", n=1, canvas__disk_megapixels=0.001,
                  canvas__band_rows=16)
    difference = read_png(host / "fractured_00000.png").astype(int) - read_png(disk / "fractured_00000.png")
    # The banded conditioning upsample rounds differently by about 1e-7, which can move a
    # 16-bit value by one step.
    assert np.abs(difference).max() <= 1


def test_patch_levels_cover_chain():
    assert patch_levels(3, 1) == (3, [2, 1, 0])
    assert patch_levels(3, 2) == (4, [2, 0])
    assert patch_levels(0, 1) == (0, [])


def test_config_rejects_bad_size():
    with pytest.raises(ConfigError, match="size"):
        config_for(size="12by9")


def test_config_rejects_unknown_format():
    with pytest.raises(ConfigError, match="formats"):
        config_for(output__formats=["png", "tiff"])


def test_unknown_label_fails_before_any_image(tmp_path, checkpoints):
    with pytest.raises(ValueError, match="labels"):
        run(tmp_path, checkpoints, label="comminuted")
    assert not (tmp_path / "out").exists()


def test_overlap_above_tile_fails_before_any_image(tmp_path, checkpoints):
    with pytest.raises(ValueError, match="overlap"):
        run(tmp_path, checkpoints, canvas__overlap=32)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["patch__steps", "layout__steps"])
def test_single_sampling_step_rejected(key):
    with pytest.raises(ConfigError, match="use 2 or more"):
        config_for(**{key: 1})


def test_nan_max_megapixels_rejected():
    with pytest.raises(ConfigError, match="max_megapixels"):
        config_for(max_megapixels=float("nan"))


def test_tile_size_above_limit_rejected(tmp_path, checkpoints):
    with pytest.raises(ValueError, match="canvas.tile_size=512 is above 256"):
        run(tmp_path, checkpoints, n=1, canvas__tile_size=512)


def test_unknown_device_rejected():
    from stitching.synthesize import resolve_device

    with pytest.raises(ValueError, match="device 'foo' is not a torch device"):
        resolve_device("foo")


def test_empty_shard_warns(tmp_path, checkpoints, caplog):
    summary, _ = run(tmp_path, checkpoints, n=3, shard_index=5, shard_count=10)
    assert summary.written == []
    assert "shard 5/10 has no image" in caplog.text


def test_added_format_written_from_saved_png(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints, n=1)
    png = out_dir / "fractured_00000.png"
    png_time = png.stat().st_mtime_ns
    summary, _ = run(tmp_path, checkpoints, n=1, output__formats=["png", "dicom"])
    record = json.loads((out_dir / "fractured_00000.json").read_text())
    assert summary.written == ["fractured_00000"]
    assert png.stat().st_mtime_ns == png_time
    assert np.array_equal(pydicom.dcmread(out_dir / "fractured_00000.dcm").pixel_array,
                          read_png(png))
    assert record["config"]["output"]["formats"] == ["png", "dicom"]
    assert set(record["file_sha256"]) == {"png", "preview", "dicom"}


def test_deleted_preview_written_from_saved_png(tmp_path, checkpoints):
    _, out_dir = run(tmp_path, checkpoints, n=1)
    png_time = (out_dir / "fractured_00000.png").stat().st_mtime_ns
    (out_dir / "fractured_00000.preview.png").unlink()
    summary, _ = run(tmp_path, checkpoints, n=1)
    assert summary.written == ["fractured_00000"]
    assert (out_dir / "fractured_00000.preview.png").is_file()
    assert (out_dir / "fractured_00000.png").stat().st_mtime_ns == png_time
    again, _ = run(tmp_path, checkpoints, n=1)
    assert again.skipped == ["fractured_00000"]
