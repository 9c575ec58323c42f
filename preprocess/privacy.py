"""Pseudonymous ids, the user's salt, and scrubbing of messages.

Privacy rules of the store:

- Image ids are ``img-`` plus 16 hex digits of HMAC-SHA256(salt, content SHA-256 and frame index).
  They contain no file name and no patient data, and they stay the same when the same file is
  built again with the same salt.
- Patient ids are ``pat-`` plus 16 hex digits of HMAC-SHA256(salt, identifier). The identifier is,
  in this order: the ``--patient-column`` value of the label table, the DICOM PatientID, or the
  SHA-256 of the file content when neither exists. The last case treats every file as its own
  patient (FracAtlas has no patient ids), so all frames of one file share a patient and a split.
- Site values of ``--site-column`` are pseudonymised the same way (``site-`` prefix), because
  institution names identify hospitals.
- The salt comes from ``--salt`` or the ``FEMURGEN_SALT`` environment variable and is never
  written anywhere. A build whose inputs carry patient identifiers (DICOM files or a patient column)
  requires a salt, because an unsalted hash of a short patient id can be reversed by trying all ids.
- Input paths and file names are never stored. A failing file is named by its file key: ``sha256:``
  plus the first 16 hex digits of the SHA-256 of its bytes, which ``sha256sum`` reproduces, or a
  salted hash of its relative path when the file cannot be read. ``--manifest PATH`` writes the
  mapping from keys and image ids to the paths to a file outside the store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from pathlib import Path

SALT_ENV_VAR = "FEMURGEN_SALT"
ID_HEX_DIGITS = 16
REDACTED = "<redacted>"

# DICOM keywords whose values identify a patient, a visit or an institution. None of them is
# copied into the store; their values are scrubbed from every message of a DICOM file.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "PatientAge", "MilitaryRank", "MedicalRecordLocator",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID", "MediaStorageSOPInstanceUID",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "StationName", "DeviceSerialNumber",
    "StudyDescription", "SeriesDescription", "RequestAttributesSequence",
)


def resolve_salt(salt: str | None) -> bytes | None:
    """Return the salt from the ``--salt`` value or the ``FEMURGEN_SALT`` environment variable.

    An empty string counts as no salt. The option wins over the environment variable.
    """
    value = salt if salt else os.environ.get(SALT_ENV_VAR, "")
    return value.encode("utf-8") if value else None


def keyed_digest(kind: str, value: str, salt: bytes | None) -> str:
    """Return the first 16 hex digits of HMAC-SHA256(salt, kind + NUL + value)."""
    message = f"{kind}\0{value}".encode("utf-8")
    return hmac.new(salt or b"", message, hashlib.sha256).hexdigest()[:ID_HEX_DIGITS]


def image_id(content_sha256: str, frame: int, salt: bytes | None) -> str:
    """Return the image id of one frame of a file with the given content hash."""
    return "img-" + keyed_digest("image", f"{content_sha256}:{frame}", salt)


def patient_id(identifier: str, source: str, salt: bytes | None) -> str:
    """Return the pseudonymous patient id for an identifier from ``source`` (column, dicom, file)."""
    return "pat-" + keyed_digest(f"patient:{source}", identifier, salt)


def site_id(site: str, salt: bytes | None) -> str:
    """Return the pseudonymous id of a site (hospital) name."""
    return "site-" + keyed_digest("site", site, salt)


def content_file_key(content_sha256: str) -> str:
    """Return the file key of a readable file: ``sha256:`` and 16 hex digits of its content hash."""
    return "sha256:" + content_sha256[:ID_HEX_DIGITS]


def path_file_key(relative_path: str, salt: bytes | None) -> str:
    """Return the file key of a file whose bytes could not be read."""
    return "path:" + keyed_digest("path", relative_path, salt)


def file_sha256(path: Path, block_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def path_secrets(path: Path) -> list[str]:
    """Return the spellings of ``path`` that may appear in library error messages.

    The bare stem is not among them; :func:`scrub_path` removes it where it is a path part.
    """
    secrets = {str(path), path.name}
    try:
        secrets.add(str(path.resolve()))
    except OSError:
        pass
    return [secret for secret in secrets if secret]


def scrub_path(text: str, path: Path) -> str:
    """Remove the paths, the file name and the file stem of ``path`` from ``text``."""
    return scrub(text, path_secrets(path), stems=[path.stem])


def scrub(text: str, secrets: Iterable[str], min_length: int = 3,
          stems: Iterable[str] = ()) -> str:
    """Replace each secret (and each ``^``-separated name part) in ``text`` where it is a whole token.

    A secret matches only where no letter, digit or underscore touches its ends, so the stem
    ``trunc`` is kept inside "truncated". Parts shorter than ``min_length`` characters are kept,
    because they identify no one and replacing them would blank out digits and words of the
    message. A file stem in ``stems`` is replaced only as a path part: next to a path separator,
    followed by a file extension, or in quotes. A stem such as ``data`` that appears as a word
    of the message text is kept.
    """
    parts: set[str] = set()
    for secret in secrets:
        pieces = [secret, *re.split(r"[\^\\=]", secret)]
        parts.update(piece.strip() for piece in pieces if len(piece.strip()) >= min_length)
    patterns = [_token_pattern(part) for part in parts]
    patterns += [_stem_pattern(stem) for stem in stems if len(stem) >= min_length]
    # Longer secrets first, so a whole path is replaced before its name or stem.
    for _, pattern in sorted(patterns, key=lambda item: item[0], reverse=True):
        text = pattern.sub(REDACTED, text)
    return text


def _token_pattern(secret: str) -> tuple[int, re.Pattern[str]]:
    """Return (length, pattern) matching ``secret`` with no word character against its ends."""
    start = r"(?<!\w)" if re.match(r"\w", secret[0]) else ""
    end = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
    return len(secret), re.compile(start + re.escape(secret) + end)


def _stem_pattern(stem: str) -> tuple[int, re.Pattern[str]]:
    """Return (length, pattern) matching ``stem`` as a path part (see :func:`scrub`)."""
    token = _token_pattern(stem)[1].pattern
    after_separator = rf"(?<=[/\\]){token}"
    before_separator_or_suffix = rf"{token}(?=[/\\]|\.\w)"
    quoted = rf"(?<=['\"`]){token}(?=['\"`])"
    return len(stem), re.compile(f"{after_separator}|{before_separator_or_suffix}|{quoted}")
