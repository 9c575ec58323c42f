"""``pyramid verify`` and ``pyramid info``: check a store completely, or describe it.

``verify_store`` re-reads every level of every image. It checks that the store has no Zarr v2
metadata and that catalog rows and image groups match one to one. Per image it checks the NGFF
metadata (levels, scale, translation), the level shapes of the pyramid rule, dtype uint16, the
axis names, and the CRC32C of each level's pixels against the checksum written at build time.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import ngff, pyramid
from preprocess.catalog import CATALOG_NAME, FAILED_NAME, CatalogRow, read_catalog, read_failures
from preprocess.errors import StoreError
from preprocess.ingest import CHECKSUM_KEY, level_checksum
from preprocess.store import ZARR_V3_METADATA, check_zarr_format, image_group_path
from preprocess.writer import read_image_records, read_store_attributes

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`: images checked and every problem found."""

    store: Path
    images_checked: int = 0
    levels_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def __str__(self) -> str:
        head = (f"store {self.store}: {self.images_checked} images, {self.levels_checked} levels "
                f"checked, {len(self.problems)} problems")
        return "\n".join([head, *(f"  {problem}" for problem in self.problems)])


def verify_store(path: Path, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Re-read every level of a store and check it against its metadata and checksums.

    Raises:
        StoreError: the store is not a Zarr v3 store or mixes v2 and v3 metadata.
    """
    path = Path(path)
    check_zarr_format(path, deep=True)
    report = VerifyReport(path)
    min_size = read_store_attributes(path).get("pixel_options", {}).get(
        "min_size", pyramid.DEFAULT_MIN_SIZE)
    try:
        rows = read_catalog(path / CATALOG_NAME)
    except (FileNotFoundError, KeyError, ValueError) as error:
        report.problems.append(f"{CATALOG_NAME}: {error}")
        return report
    _check_membership(path, rows, report)
    for number, row in enumerate(rows, start=1):
        if image_group_path(path, row.image_id).exists():
            _check_image(path, row, int(min_size), report)
        if progress is not None:
            progress(number, len(rows))
    _check_failures_file(path, report)
    return report


def _check_membership(path: Path, rows: list[CatalogRow], report: VerifyReport) -> None:
    """Report catalog rows without a group, groups without a row, and duplicate rows."""
    listed = Counter(row.image_id for row in rows)
    report.problems.extend(f"{image_id}: listed {count} times in {CATALOG_NAME}"
                           for image_id, count in listed.items() if count > 1)
    stored = set(read_image_records(path))
    report.problems.extend(f"{image_id}: in {CATALOG_NAME} but no complete image group"
                           for image_id in sorted(set(listed) - stored))
    report.problems.extend(f"{image_id}: image group not in {CATALOG_NAME}"
                           for image_id in sorted(stored - set(listed)))


def _check_image(path: Path, row: CatalogRow, min_size: int, report: VerifyReport) -> None:
    """Check one image group: attributes, level arrays and checksums."""
    import zarr

    group_path = image_group_path(path, row.image_id)
    attributes = json.loads((group_path / ZARR_V3_METADATA).read_text("utf-8"))["attributes"]
    record = attributes.get("femurgen", {})
    spacing = tuple(record["spacing_mm"]) if record.get("spacing_mm") else None
    problems = _record_problems(row, record, min_size)
    problems += ngff.check_multiscales(attributes.get("ome"), row.levels, spacing)
    expected = pyramid.level_shapes(row.height, row.width, min_size)[:row.levels]
    checksums = record.get(CHECKSUM_KEY, [])
    for level, shape in enumerate(expected):
        try:
            array = zarr.open_array(str(group_path / str(level)), mode="r", zarr_format=3)
            problems += _array_problems(level, array, shape, checksums)
        except Exception as error:  # noqa: BLE001 - any read error is a finding
            problems.append(f"level {level}: cannot read ({type(error).__name__}: {error})")
        report.levels_checked += 1
    report.images_checked += 1
    report.problems.extend(f"{row.image_id}: {problem}" for problem in problems)


def _record_problems(row: CatalogRow, record: dict[str, Any], min_size: int) -> list[str]:
    """Compare the catalog row with the group's femurgen attribute and the pyramid rule."""
    problems = [f"catalog {name} {getattr(row, name)} differs from the group's {record.get(name)}"
                for name in ("height", "width", "levels") if record.get(name) != getattr(row, name)]
    expected_levels = len(pyramid.level_shapes(row.height, row.width, min_size))
    if row.levels != expected_levels:
        problems.append(f"{row.levels} levels, expected {expected_levels} for min_size {min_size}")
    if len(record.get(CHECKSUM_KEY, [])) != row.levels:
        problems.append("level checksums missing")
    return problems


def _array_problems(level: int, array: Any, shape: tuple[int, int],
                    checksums: list[str]) -> list[str]:
    """Check one level array's shape, dtype, axis names and checksum."""
    problems = []
    if tuple(array.shape) != shape:
        problems.append(f"level {level} has shape {tuple(array.shape)}, expected {shape}")
    if array.dtype != np.uint16:
        problems.append(f"level {level} has dtype {array.dtype}, expected uint16")
    if tuple(array.metadata.dimension_names or ()) != ngff.AXIS_NAMES:
        problems.append(f"level {level} has dimension_names {array.metadata.dimension_names}")
    if not problems and level < len(checksums) and level_checksum(array[...]) != checksums[level]:
        problems.append(f"level {level} pixels do not match their checksum")
    return problems


def _check_failures_file(path: Path, report: VerifyReport) -> None:
    """Check that failed.csv parses (when present)."""
    try:
        read_failures(path / FAILED_NAME)
    except (KeyError, ValueError) as error:
        report.problems.append(f"{FAILED_NAME}: cannot parse ({error})")


@dataclass
class StoreInfo:
    """Counts and ranges of a store, for ``pyramid info``."""

    store: Path
    images: int
    patients: int
    by_label_split: dict[str, dict[str, int]]
    height_range: tuple[int, int]
    width_range: tuple[int, int]
    megapixel_range: tuple[float, float]
    spacing_known: int
    failures: int
    failure_reasons: list[tuple[str, int]]

    def __str__(self) -> str:
        splits = sorted({split for counts in self.by_label_split.values() for split in counts})
        lines = [f"store {self.store}: {self.images} images of {self.patients} patients, "
                 f"{self.failures} failed files",
                 "label" + "".join(f"\t{split}" for split in splits) + "\ttotal"]
        for label, counts in sorted(self.by_label_split.items()):
            cells = "".join(f"\t{counts.get(split, 0)}" for split in splits)
            lines.append(f"{label}{cells}\t{sum(counts.values())}")
        lines.append(f"height {self.height_range[0]}..{self.height_range[1]} px, width "
                     f"{self.width_range[0]}..{self.width_range[1]} px, "
                     f"{self.megapixel_range[0]:.2f}..{self.megapixel_range[1]:.2f} megapixels; "
                     f"spacing known for {self.spacing_known}")
        lines.extend(f"  {count} x {reason}" for reason, count in self.failure_reasons)
        return "\n".join(lines)


def store_info(path: Path) -> StoreInfo:
    """Describe a store from its catalog and failure list."""
    path = Path(path)
    check_zarr_format(path)
    try:
        rows = read_catalog(path / CATALOG_NAME)
    except FileNotFoundError as error:
        raise StoreError(str(error)) from None
    by_label_split: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = by_label_split.setdefault(row.label, {})
        counts[row.split] = counts.get(row.split, 0) + 1
    failures = read_failures(path / FAILED_NAME)
    heights = [row.height for row in rows] or [0]
    widths = [row.width for row in rows] or [0]
    megapixels = [row.height * row.width / 1e6 for row in rows] or [0.0]
    return StoreInfo(
        store=path, images=len(rows), patients=len({row.patient_id for row in rows}),
        by_label_split=by_label_split, height_range=(min(heights), max(heights)),
        width_range=(min(widths), max(widths)), megapixel_range=(min(megapixels), max(megapixels)),
        spacing_known=sum(row.spacing_mm is not None for row in rows), failures=len(failures),
        failure_reasons=Counter(item.reason for item in failures).most_common(10))
