"""The catalog (``catalog.csv``) and failure list (``failed.csv``) of a store, written atomically.

Catalog columns: image_id, patient_id, label, height, width, spacing_mm (empty when unknown),
levels, split, then the facts in :data:`EXTRA_COLUMNS`. ``spacing_mm`` is the mean of the row and
column spacing (``spacing_y_mm`` and ``spacing_x_mm``); radiographs almost always have square
pixels. Failure columns: file (the file key, see ``privacy``), kind, reason.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CATALOG_NAME = "catalog.csv"
FAILED_NAME = "failed.csv"
CORE_COLUMNS = ("image_id", "patient_id", "label", "height", "width", "spacing_mm", "levels",
                "split")
EXTRA_COLUMNS = ("site", "patient_source", "source_kind", "modality", "photometric",
                 "bits_stored", "transfer_syntax", "modality_transform", "voi", "inversion",
                 "intensity", "orientation", "meta_header", "spacing_y_mm", "spacing_x_mm",
                 "spacing_source", "resampled_from", "frame", "frames", "content_sha256")
FAILED_COLUMNS = ("file", "kind", "reason")
UNLABELED = "unlabeled"


@dataclass
class CatalogRow:
    """One image of the store.

    Attributes:
        image_id: the group name under ``images/``.
        patient_id: pseudonymous patient id; splits never separate one patient.
        label: class name, "unlabeled" without a label table.
        height, width: level-0 shape in pixels.
        spacing_mm: mean level-0 pixel spacing in mm, None when unknown.
        levels: number of pyramid levels.
        split: "train", "val" or "test".
        extra: the other catalog columns as strings.
    """

    image_id: str
    patient_id: str
    label: str
    height: int
    width: int
    spacing_mm: float | None
    levels: int
    split: str
    extra: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, str]:
        """Return the row as CSV fields."""
        record = {"image_id": self.image_id, "patient_id": self.patient_id, "label": self.label,
                  "height": str(self.height), "width": str(self.width),
                  "spacing_mm": "" if self.spacing_mm is None else repr(self.spacing_mm),
                  "levels": str(self.levels), "split": self.split}
        record.update(self.extra)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> "CatalogRow":
        """Parse CSV fields; unknown columns go to ``extra``."""
        spacing = (record.get("spacing_mm") or "").strip()
        extra = {key: value for key, value in record.items() if key not in CORE_COLUMNS}
        return cls(image_id=record["image_id"], patient_id=record["patient_id"],
                   label=record["label"], height=int(record["height"]),
                   width=int(record["width"]), spacing_mm=float(spacing) if spacing else None,
                   levels=int(record["levels"]), split=record["split"], extra=extra)


@dataclass(frozen=True)
class Failure:
    """One file (or frame) that did not become an image: file key, reader kind, reason."""

    file: str
    kind: str
    reason: str


def row_from_record(record: Mapping[str, Any], split: str) -> CatalogRow:
    """Build a catalog row from an image group's ``femurgen`` attribute and its split."""
    spacing = record.get("spacing_mm")
    extra = {column: _text(record.get(column)) for column in EXTRA_COLUMNS}
    if spacing:
        extra["spacing_y_mm"], extra["spacing_x_mm"] = repr(spacing[0]), repr(spacing[1])
    mean_spacing = (spacing[0] + spacing[1]) / 2 if spacing else None
    return CatalogRow(image_id=record["image_id"], patient_id=record["patient_id"],
                      label=record.get("label") or UNLABELED, height=int(record["height"]),
                      width=int(record["width"]), spacing_mm=mean_spacing,
                      levels=int(record["levels"]), split=split, extra=extra)


def _text(value: Any) -> str:
    """Return a CSV field for a record value (None becomes empty)."""
    return "" if value is None else str(value)


def read_catalog(path: Path) -> list[CatalogRow]:
    """Read ``catalog.csv``; raise FileNotFoundError with the fix when it is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; build the store with `pyramid build` first")
    with open(path, newline="", encoding="utf-8") as stream:
        return [CatalogRow.from_record(record) for record in csv.DictReader(stream)]


def write_catalog(path: Path, rows: Iterable[CatalogRow]) -> None:
    """Replace ``catalog.csv`` atomically with ``rows`` (in the order given)."""
    records = [row.to_record() for row in rows]
    columns = list(CORE_COLUMNS) + list(EXTRA_COLUMNS)
    for record in records:
        columns.extend(key for key in record if key not in columns)
    atomic_write_text(path, _csv_text(columns, records))


def read_failures(path: Path) -> list[Failure]:
    """Read ``failed.csv``; an absent file means no failures."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        return [Failure(record["file"], record.get("kind", ""), record["reason"])
                for record in csv.DictReader(stream)]


def write_failures(path: Path, failures: Iterable[Failure]) -> None:
    """Replace ``failed.csv`` atomically."""
    records = [{"file": item.file, "kind": item.kind, "reason": item.reason} for item in failures]
    atomic_write_text(path, _csv_text(list(FAILED_COLUMNS), records))


def _csv_text(columns: list[str], records: list[dict[str, str]]) -> str:
    """Return CSV text with a header row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk and rename it over.

    A reader, or a rerun after a process was killed mid-write, finds either the old or the new
    file, never a part of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
