"""build_store: catalog, failures, privacy, resume, interruption, workers, option checks."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess import privacy
from preprocess.build import _run_tasks, build_store
from preprocess.catalog import CORE_COLUMNS, read_catalog, read_failures
from preprocess.errors import StoreError
from preprocess.ingest import FileResult, FileTask, IngestConfig
from preprocess.readers import ReadOptions
from preprocess.splits import SplitFractions, assign_splits
from preprocess.writer import ChunkLayout
from tests.preprocess.conftest import SMALL_LAYOUT
from tests.preprocess.factory import SALT, ramp, write_dicom

REPOSITORY = Path(__file__).resolve().parents[2]


def build(inputs, store, **options):
    """Build with the labelled test inputs, in this process, with small chunks."""
    settings = {"labels_csv": inputs["labels"], "workers": 0, "salt": SALT, **SMALL_LAYOUT}
    settings.update(options)
    return build_store([inputs["labels"].parent], store, **settings)


def store_files(store: Path) -> dict[str, bytes]:
    """Return every file of a store by relative path (lock file excluded)."""
    return {path.relative_to(store).as_posix(): path.read_bytes()
            for path in sorted(store.rglob("*")) if path.is_file() and path.name != ".build.lock"}


def test_catalog_rows_and_labels(built):
    store, paths = built
    rows = read_catalog(store / "catalog.csv")
    assert len(rows) == 4
    with open(store / "catalog.csv", newline="") as stream:
        header = next(csv.reader(stream))
    assert header[:len(CORE_COLUMNS)] == list(CORE_COLUMNS)
    by_kind = {row.extra["source_kind"]: row for row in rows}
    assert by_kind["dicom"].label == "fractured"
    assert by_kind["dicom"].spacing_mm == 0.2
    assert by_kind["dicom"].extra["patient_source"] == "dicom"
    odd = next(row for row in rows if (row.height, row.width) == (13, 17))
    assert odd.label == "normal"
    assert odd.spacing_mm is None
    assert odd.levels == 3  # 13 x 17, 7 x 9, 4 x 5 with min_size 8
    assert {row.split for row in rows} <= {"train", "val", "test"}


def test_failure_listed_by_file_key(built):
    store, paths = built
    failure, = read_failures(store / "failed.csv")
    assert failure.file == privacy.content_file_key(privacy.file_sha256(paths["broken"]))
    assert failure.kind == "png"
    assert "not a readable PNG" in failure.reason


def test_store_holds_no_paths_or_patient_data(built):
    store, paths = built
    forbidden = ["Doe", "Jane", "MRN-4711", "4711", "19420101", "Saint Example", "e.png",
                 "d.dcm", "images/", str(paths["labels"].parent)]
    for name, content in store_files(store).items():
        text = content.decode("latin-1")
        for secret in forbidden:
            assert secret not in text, f"{secret!r} found in {name}"


def test_manifest_maps_keys_to_paths(built):
    store, paths = built
    with open(store.parent / "manifest.csv", newline="") as stream:
        records = {Path(record["path"]).name: record for record in csv.DictReader(stream)}
    assert records["e.png"]["status"] == "failed"
    assert records["d.dcm"]["status"] == "built"
    catalog_ids = {row.image_id for row in read_catalog(store / "catalog.csv")}
    assert records["d.dcm"]["image_ids"] in catalog_ids


def test_manifest_inside_store_rejected(inputs, tmp_path):
    with pytest.raises(ValueError, match="inside the store"):
        build(inputs, tmp_path / "s.zarr", manifest=tmp_path / "s.zarr" / "m.csv")


def test_rerun_skips_and_keeps_store(inputs, tmp_path):
    store = tmp_path / "s.zarr"
    first = build(inputs, store)
    before = store_files(store)
    second = build(inputs, store)
    assert first.built == 4
    assert second.built == 0
    assert second.skipped == 4
    assert len(second.failed) == 1
    assert store_files(store) == before


def test_leftovers_of_interruption_removed(inputs, tmp_path):
    reference = tmp_path / "reference.zarr"
    build(inputs, reference)
    store = tmp_path / "s.zarr"
    build(inputs, store)
    victim = sorted((store / "images").iterdir())[0]
    (store / ".partial").mkdir()
    shutil.move(victim, store / ".partial" / "img-half-written")
    (store / "catalog.csv").write_text("image_id\n")
    (store / ".catalog.csv.x1y2.tmp").write_text("image_id,patient")
    summary = build(inputs, store)
    assert summary.built == 1
    assert not (store / ".partial").exists()
    assert store_files(store) == store_files(reference)


def test_killed_build_resumes_to_same_store(inputs, tmp_path):
    reference = tmp_path / "reference.zarr"
    build(inputs, reference)
    for index in range(6):
        write_dicom(inputs["labels"].parent / "images" / f"extra{index}.dcm",
                    ramp(300, 200, seed=index + 10))
    reference_more = tmp_path / "reference_more.zarr"
    build_store([inputs["labels"].parent], reference_more, workers=0, salt=SALT, **SMALL_LAYOUT)

    store = tmp_path / "s.zarr"
    code = ("import sys; from pathlib import Path; from preprocess.build import build_store; "
            f"build_store([Path({str(inputs['labels'].parent)!r})], Path({str(store)!r}), "
            f"workers=0, salt={SALT!r}, **{SMALL_LAYOUT!r})")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPOSITORY)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if (store / "images").exists() and len(list((store / "images").iterdir())) >= 2:
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert len(list((store / "images").iterdir())) < 10

    build_store([inputs["labels"].parent], store, workers=0, salt=SALT, **SMALL_LAYOUT)
    assert store_files(store) == store_files(reference_more)


def test_workers_match_in_process(inputs, tmp_path):
    in_process = tmp_path / "a.zarr"
    pooled = tmp_path / "b.zarr"
    build(inputs, in_process)
    summary = build(inputs, pooled, workers=2)
    assert summary.built == 4
    assert store_files(pooled) == store_files(in_process)


def test_unlabeled_without_table(inputs, tmp_path):
    summary = build(inputs, tmp_path / "s.zarr", labels_csv=None)
    rows = read_catalog(tmp_path / "s.zarr" / "catalog.csv")
    assert {row.label for row in rows} == {"unlabeled"}
    assert summary.ignored == 2  # labels.csv and notes.txt


def test_file_without_label_row_fails(inputs, tmp_path):
    extra = inputs["labels"].parent / "images" / "extra.png"
    shutil.copy(inputs["png8"], extra)
    np.save(inputs["labels"].parent / "ignored.npy", np.zeros(3))
    extra.write_bytes(extra.read_bytes() + b"\x00")  # other content, so another image
    summary = build(inputs, tmp_path / "s.zarr")
    reasons = [failure.reason for failure in summary.failed]
    assert any("no row of the label table" in reason for reason in reasons)


def test_duplicate_content_stored_once(inputs, tmp_path):
    shutil.copy(inputs["png8"], inputs["labels"].parent / "images" / "copy.png")
    summary = build(inputs, tmp_path / "s.zarr", labels_csv=None)
    assert summary.built == 4
    assert summary.skipped == 1


def test_pixel_option_change_rejected(inputs, tmp_path):
    build(inputs, tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="voi"):
        build(inputs, tmp_path / "s.zarr", voi="none")


def test_split_change_reported(inputs, tmp_path):
    first = build(inputs, tmp_path / "s.zarr", split="1,0,0")
    assert first.moved_split == []
    second = build(inputs, tmp_path / "s.zarr", split="0,0,1")
    assert len(second.moved_split) == second.images
    assert second.moved_split[0][1:] == ("train", "test")
    assert "changed split" in str(second)


def write_pngs(folder, count, start=0):
    folder.mkdir(exist_ok=True)
    for index in range(start, start + count):
        pixels = np.random.default_rng(index).integers(0, 256, (20, 30)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")


def test_added_patients_keep_existing_splits(tmp_path):
    folder, store = tmp_path / "images", tmp_path / "s.zarr"
    write_pngs(folder, 6)
    first = build_store([folder], store, workers=0, split="0.6,0.2,0.2", **SMALL_LAYOUT)
    before = {row.image_id: row.split for row in read_catalog(store / "catalog.csv")}
    write_pngs(folder, 6, start=6)
    second = build_store([folder], store, workers=0, split="0.6,0.2,0.2", **SMALL_LAYOUT)
    after = {row.image_id: row.split for row in read_catalog(store / "catalog.csv")}
    rows = read_catalog(store / "catalog.csv")
    fresh = assign_splits({row.patient_id: [row.label] for row in rows},
                          SplitFractions.parse("0.6,0.2,0.2"), 0)
    # Assigning all 12 patients afresh would move some of the first 6.
    assert any(fresh[row.patient_id] != before[row.image_id] for row in rows
               if row.image_id in before)
    assert first.images == 6
    assert second.images == 12
    assert {image_id: after[image_id] for image_id in before} == before
    assert second.moved_split == []
    assert set(after.values()) == {"train", "val", "test"}


def test_same_split_reports_no_move(inputs, tmp_path):
    build(inputs, tmp_path / "s.zarr")
    assert build(inputs, tmp_path / "s.zarr").moved_split == []


def test_salt_needed_for_dicom(inputs, tmp_path, monkeypatch):
    monkeypatch.delenv(privacy.SALT_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="--salt"):
        build(inputs, tmp_path / "s.zarr", salt=None)


def test_other_salt_rejected(inputs, tmp_path):
    build(inputs, tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="another salt"):
        build(inputs, tmp_path / "s.zarr", salt="different")


def test_spacing_resampled(inputs, tmp_path):
    summary = build(inputs, tmp_path / "s.zarr", spacing_mm=0.4)
    dicom_row, = [row for row in read_catalog(tmp_path / "s.zarr" / "catalog.csv")]
    assert (dicom_row.height, dicom_row.width) == (20, 30)
    assert dicom_row.spacing_mm == 0.4
    assert dicom_row.extra["resampled_from"] == "40x60 at 0.2x0.2 mm"
    assert sum("spacing is unknown" in failure.reason for failure in summary.failed) == 3


def test_patient_column_groups_images(inputs, tmp_path):
    table = inputs["labels"]
    rows = table.read_text().splitlines()
    table.write_text("\n".join([rows[0] + ",patient"] + [row + ",P1" for row in rows[1:]]))
    build(inputs, tmp_path / "s.zarr", patient_column="patient")
    catalog = read_catalog(tmp_path / "s.zarr" / "catalog.csv")
    assert len({row.patient_id for row in catalog}) == 1
    assert len({row.split for row in catalog}) == 1
    assert {row.extra["patient_source"] for row in catalog} == {"column"}


def test_unknown_option_listed(inputs, tmp_path):
    with pytest.raises(ValueError, match="unknown build options"):
        build(inputs, tmp_path / "s.zarr", colour="blue")


def test_existing_folder_not_overwritten(inputs, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a pyramid store"):
        build(inputs, folder)
    assert (folder / "thesis.txt").read_text() == "keep me"


def crash_on_second_file(task: FileTask, config: IngestConfig) -> FileResult:
    """A task function whose process dies on the task with index 1, like a crashing decoder."""
    if task.index == 1:
        os._exit(3)
    return FileResult(task.index, f"key{task.index}", "png")


def test_crashing_file_fails_alone(tmp_path):
    tasks = [FileTask(index, str(tmp_path / f"f{index}"), f"f{index}", "png", "x")
             for index in range(5)]
    config = IngestConfig(store=str(tmp_path), read=ReadOptions(), layout=ChunkLayout())
    results = []
    _run_tasks(tasks, config, 2, results.append, work=crash_on_second_file)
    by_index = {result.index: result for result in results}
    assert sorted(by_index) == [0, 1, 2, 3, 4]
    assert "process died" in by_index[1].failures[0].reason
    assert all(not by_index[index].failures for index in (0, 2, 3, 4))


def test_empty_folder_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no DICOM, PNG, JPEG, TIFF, HDF5 or slide files"):
        build_store([tmp_path / "empty"], tmp_path / "s.zarr", workers=0)
    assert not (tmp_path / "s.zarr").exists()


def test_unmatched_label_rows_named(inputs, tmp_path):
    with open(inputs["labels"], "a") as stream:
        stream.writelines(f"images/missing_{number}.png,normal\n" for number in range(7))
    summary = build(inputs, tmp_path / "s.zarr")
    text = str(summary)
    assert "7 label-table rows matched no input file" in text
    assert "images/missing_0.png, images/missing_1.png" in text
    assert "images/missing_5.png" not in text
    assert "and 2 more" in text
    stored = b"".join(store_files(tmp_path / "s.zarr").values())
    assert b"missing_" not in stored
