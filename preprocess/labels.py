"""Label tables: which label (and optionally patient and site) belongs to which input file.

A label table is a CSV with a file column (path relative to the CSV's folder, such as
``images/IMG0000002.jpg``) and a label column. An input file is matched by its path relative to
the CSV's folder. When that fails, it is matched by its file name, if exactly one row has it.
"""

from __future__ import annotations

import csv
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from preprocess.catalog import UNLABELED

# Max number of CSV line numbers with an empty label cell that the warning lists.
EMPTY_LABELS_SHOWN = 5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelEntry:
    """Label-table values of one file; patient and site are None when no column was named."""

    label: str
    patient: str | None
    site: str | None


class LabelTable:
    """A label CSV indexed by relative path and by file name."""

    def __init__(self, csv_path: Path, file_column: str = "file", label_column: str = "label",
                 patient_column: str | None = None, site_column: str | None = None) -> None:
        self.csv_path = csv_path
        self.folder = csv_path.resolve().parent
        records, columns = _read_records(csv_path)
        _require_columns(csv_path, columns, {"--file-column": file_column,
                                             "--label-column": label_column,
                                             "--patient-column": patient_column,
                                             "--site-column": site_column})
        self._by_path: dict[str, LabelEntry] = {}
        empty_label_lines: list[int] = []
        for number, record in enumerate(records, start=2):
            key = normalise_key(record.get(file_column) or "")
            if not key:
                continue
            label = (record.get(label_column) or "").strip()
            if not label:
                empty_label_lines.append(number)
            _check_label_name(csv_path, number, label)
            entry = LabelEntry(label=label or UNLABELED,
                               patient=_optional(record, patient_column),
                               site=_optional(record, site_column))
            previous = self._by_path.get(key)
            if previous is not None and previous != entry:
                raise ValueError(f"{csv_path} line {number}: file {key} appears twice with "
                                 "different values; keep one row per file")
            self._by_path[key] = entry
        self._by_name = _index_by_name(self._by_path)
        self._matched: set[str] = set()
        _warn_empty_labels(csv_path, label_column, empty_label_lines)

    def __len__(self) -> int:
        return len(self._by_path)

    def lookup(self, path: Path) -> LabelEntry | None:
        """Return the entry of an input file, or None when no row matches it."""
        relative = os.path.relpath(path.resolve(), self.folder)
        key = normalise_key(relative) if not relative.startswith("..") else ""
        if key not in self._by_path:
            key = self._by_name.get(path.name) or ""
        entry = self._by_path.get(key)
        if entry is not None:
            self._matched.add(key)
        return entry

    def unmatched_count(self) -> int:
        """Return how many rows matched no input file in the lookups so far."""
        return len(self._by_path) - len(self._matched)

    def unmatched_files(self) -> list[str]:
        """Return the file values (normalised, in CSV order) of rows that matched no input file."""
        return [key for key in self._by_path if key not in self._matched]


# Labels name run folders (one model per class) and output files, so they must be file names.
UNSAFE_LABEL = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


# Output files are named <label>_<index>.preview.png and most file systems allow 255 bytes.
MAX_LABEL_BYTES = 200


def _check_label_name(csv_path: Path, line: int, label: str) -> None:
    """Raise ValueError when a label cannot be part of a file name."""
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        raise ValueError(f"{csv_path} line {line}: label {label[:40]!r}... is "
                         f"{len(label.encode('utf-8'))} bytes long; labels name model folders and "
                         f"output files, so shorten it to at most {MAX_LABEL_BYTES} bytes")
    if UNSAFE_LABEL.search(label) or label in {".", ".."}:
        raise ValueError(f"{csv_path} line {line}: label {label!r} cannot be part of a file "
                         f"name (it names model folders and output files); rename it without "
                         f'/ \\ : * ? " < > | or control characters')


def normalise_key(text: str) -> str:
    """Return a relative path as a normalised POSIX string (backslashes and ./ removed)."""
    text = text.strip().replace("\\", "/")
    if not text:
        return ""
    return posixpath.normpath(text).lstrip("/")


def _read_records(csv_path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Read CSV rows (a UTF-8 byte order mark is dropped) and the header.

    Raises:
        ValueError: naming the file when it is not UTF-8 text or not valid CSV.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            records = list(reader)
            return records, list(reader.fieldnames or [])
    except UnicodeDecodeError as error:
        raise ValueError(f"label table {csv_path} is not UTF-8 text (invalid byte "
                         f"0x{error.object[error.start]:02x} at offset {error.start}); "
                         "it must be a UTF-8 CSV file") from None
    except csv.Error as error:
        raise ValueError(f"label table {csv_path} is not a valid CSV file ({error}); "
                         "it must be a UTF-8 CSV file") from None


def _warn_empty_labels(csv_path: Path, label_column: str, lines: list[int]) -> None:
    """Log one warning listing the first CSV line numbers whose label cell is empty."""
    if not lines:
        return
    listed = ", ".join(str(number) for number in lines[:EMPTY_LABELS_SHOWN])
    more = len(lines) - EMPTY_LABELS_SHOWN
    log.warning("%s: %d rows have an empty %r cell and are labelled %r (lines %s%s); fill in "
                "the label to use these images for training", csv_path, len(lines), label_column,
                UNLABELED, listed, f" and {more} more" if more > 0 else "")


def _require_columns(csv_path: Path, columns: list[str], wanted: dict[str, str | None]) -> None:
    """Raise ValueError naming the option when a requested column is missing."""
    for option, column in wanted.items():
        if column is not None and column not in columns:
            raise ValueError(f"{option} {column!r} is not a column of {csv_path}; its columns "
                             f"are {', '.join(columns)}")


def _optional(record: dict[str, str], column: str | None) -> str | None:
    """Return a stripped optional column value (None when no column or empty)."""
    if column is None:
        return None
    return (record.get(column) or "").strip() or None


def _index_by_name(by_path: dict[str, LabelEntry]) -> dict[str, str]:
    """Return file name -> key for names that occur in exactly one row."""
    counts: dict[str, list[str]] = {}
    for key in by_path:
        counts.setdefault(posixpath.basename(key), []).append(key)
    return {name: keys[0] for name, keys in counts.items() if len(keys) == 1}
