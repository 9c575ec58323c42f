"""The whole pipeline on a handful of real radiographs, through the command line.

pyramid build -> train-global -> train-patch -> synthesize -> eval with tiny networks and
a few training steps; the assertions read the real outputs back.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from cli import main

RADIOGRAPHS = Path(__file__).resolve().parents[2] / "shared" / "data" / "radiographs"
FRACATLAS = ["IMG0000002.jpg", "IMG0000003.jpg", "IMG0000008.jpg", "IMG0000009.jpg"]
DICOM = "RG2_JPLL.dcm"   # JPEG lossless CR hip radiograph, 1760 x 2140

pytestmark = pytest.mark.skipif(not (RADIOGRAPHS / "fracatlas").is_dir(),
                                reason=f"real radiographs not found at {RADIOGRAPHS}")

TINY_GLOBAL = ["--set", "model.channels=[16,32]", "--set", "model.norm_groups=8",
               "--set", "train.batch_size=4", "--set", "train.log_every=8",
               "--set", "train.checkpoint_every=8", "--set", "train.sample_every=0",
               "--set", "diffusion.sampling_steps=4"]
TINY_PATCH = ["--set", "network.channels=[16,32]", "--set", "data.patch_size=32",
              "--set", "train.batch_size=4", "--set", "train.log_every=8",
              "--set", "train.checkpoint_every=8", "--set", "diffusion.sampling_steps=2"]


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _fixture_sources(folder: Path) -> tuple[Path, Path]:
    """Copy four FracAtlas JPEGs (two per label) and one DICOM into a temporary source tree."""
    images = folder / "images"
    images.mkdir(parents=True)
    with open(RADIOGRAPHS / "fracatlas" / "labels.csv", newline="") as handle:
        labels = {Path(r["file"]).name: r["label"] for r in csv.DictReader(handle)}
    wanted = [name for name in labels if labels[name] == "fractured"][:2]
    wanted += [name for name in FRACATLAS if labels[name] == "non_fractured"][:2]
    for name in wanted:
        shutil.copy(RADIOGRAPHS / "fracatlas" / "images" / name, images / name)
    shutil.copy(RADIOGRAPHS / "dicom" / DICOM, images / DICOM)
    label_csv = folder / "labels.csv"
    with open(label_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        for name in wanted:
            writer.writerow([f"images/{name}", labels[name]])
        writer.writerow([f"images/{DICOM}", "non_fractured"])
    return images, label_csv


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    images, label_csv = _fixture_sources(root / "sources")
    paths = {name: root / name for name in ("store.zarr", "global", "patch", "synthetic", "eval")}
    _invoke("pyramid", "build", str(images), "--labels", str(label_csv),
            "--out", str(paths["store.zarr"]), "--split", "0.6,0.2,0.2", "--salt", "e2e-test")
    _invoke("train-global", "--store", str(paths["store.zarr"]), "--out", str(paths["global"]),
            "--config", "cpu-tiny", "--duration", "16", "--set", "split=train", *TINY_GLOBAL)
    _invoke("train-patch", "--store", str(paths["store.zarr"]), "--out", str(paths["patch"]),
            "--config", "cpu-tiny", "--duration", "16", *TINY_PATCH)
    _invoke("synthesize", "--global", str(paths["global"]), "--patch", str(paths["patch"]),
            "--out", str(paths["synthetic"]), "--n", "2", "--size", "150x123", "--seed", "7",
            "--config", "cpu-tiny")
    _invoke("eval", "--real", str(paths["store.zarr"]), "--synthetic", str(paths["synthetic"]),
            "--out", str(paths["eval"]), "--config", "cpu-tiny")
    return paths


def test_catalog_has_every_image(pipeline):
    with open(pipeline["store.zarr"] / "catalog.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5
    assert {"image_id", "patient_id", "label", "height", "width", "spacing_mm", "levels",
            "split"} <= set(rows[0])
    assert {r["label"] for r in rows} == {"fractured", "non_fractured"}


def test_dicom_level_shapes_halve_with_ceil(pipeline):
    with open(pipeline["store.zarr"] / "catalog.csv", newline="") as handle:
        dicom_row = next(r for r in csv.DictReader(handle) if r["source_kind"] == "dicom")
    group = zarr.open_group(pipeline["store.zarr"] / "images" / dicom_row["image_id"], mode="r")
    shapes = [group[str(level)].shape for level in range(int(dicom_row["levels"]))]
    assert shapes[0] == (2140, 1760)
    assert shapes[1] == (1070, 880)
    assert max(shapes[-1]) <= 64
    assert float(dicom_row["spacing_mm"]) == pytest.approx(0.2)


def test_store_has_ngff_multiscales(pipeline):
    with open(pipeline["store.zarr"] / "catalog.csv", newline="") as handle:
        image_id = next(csv.DictReader(handle))["image_id"]
    attributes = zarr.open_group(pipeline["store.zarr"] / "images" / image_id, mode="r").attrs
    multiscales = attributes["ome"]["multiscales"]
    assert attributes["ome"]["version"] == "0.5"
    assert [d["path"] for d in multiscales[0]["datasets"]][:2] == ["0", "1"]


def test_checkpoints_reload(pipeline):
    from patchgen.inference import load_global, load_patch

    global_sampler = load_global(pipeline["global"])
    patch_sampler = load_patch(pipeline["patch"])
    assert global_sampler.labels == ["fractured", "non_fractured"]
    assert patch_sampler.kind == "diffusion"
    assert patch_sampler.patch_size == 32


def test_synthetic_png_is_native_size_16_bit(pipeline):
    pngs = sorted(p for p in pipeline["synthetic"].glob("*.png") if ".preview" not in p.name)
    assert len(pngs) == 2
    image = Image.open(pngs[0])
    assert image.size == (123, 150)
    assert np.asarray(image).dtype == np.uint16


def test_synthetic_sidecar_records_seed_and_label(pipeline):
    sidecars = sorted(pipeline["synthetic"].glob("*.json"))
    records = [json.loads(p.read_text()) for p in sidecars]
    assert {r["label"] for r in records} == {"fractured", "non_fractured"}
    assert all(r["height"] == 150 and r["width"] == 123 for r in records)
    assert all("seed" in r for r in records)


def test_eval_writes_metrics_and_report(pipeline):
    metrics = json.loads((pipeline["eval"] / "metrics.json").read_text())
    assert (pipeline["eval"] / "report.html").stat().st_size > 1000
    assert metrics["seams"]["mean"]["status"] == "computed"
    assert 0.0 < metrics["seams"]["mean"]["value"] < 10.0
    assert "histogram" in metrics["global"]
    assert metrics["counts"]["synthetic_total"] == 2
