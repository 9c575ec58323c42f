"""Pseudonymous ids, salt handling and message scrubbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess import privacy
from preprocess.build import build_store


def test_image_id_stable_and_salted():
    first = privacy.image_id("ab" * 32, 0, b"salt")
    assert first == privacy.image_id("ab" * 32, 0, b"salt")
    assert first != privacy.image_id("ab" * 32, 0, b"other")
    assert first != privacy.image_id("ab" * 32, 1, b"salt")
    assert first.startswith("img-")
    assert len(first) == 4 + privacy.ID_HEX_DIGITS


def test_patient_id_hides_identifier():
    pseudonym = privacy.patient_id("MRN-4711", "dicom", b"salt")
    assert "4711" not in pseudonym
    assert pseudonym != privacy.patient_id("MRN-4711", "column", b"salt")


def test_salt_option_wins(monkeypatch):
    monkeypatch.setenv(privacy.SALT_ENV_VAR, "from-env")
    assert privacy.resolve_salt("given") == b"given"
    assert privacy.resolve_salt(None) == b"from-env"
    monkeypatch.delenv(privacy.SALT_ENV_VAR)
    assert privacy.resolve_salt(None) is None
    assert privacy.resolve_salt("") is None


def test_scrub_names_and_parts():
    text = "value Doe^Jane at /data/Doe_Jane.dcm, born 19420101"
    secrets = ["Doe^Jane", "19420101", *privacy.path_secrets(Path("/data/Doe_Jane.dcm"))]
    cleaned = privacy.scrub(text, secrets)
    assert "Doe" not in cleaned
    assert "Jane" not in cleaned
    assert "19420101" not in cleaned
    assert "/data" not in cleaned


def test_scrub_keeps_short_parts():
    assert privacy.scrub("BitsStored 12", ["12"]) == "BitsStored 12"


def test_content_file_key_matches_sha256sum(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"radiograph")
    digest = privacy.file_sha256(path)
    assert privacy.content_file_key(digest) == "sha256:" + digest[:16]


# "trunc" is inside the word "truncated"; "data" is a whole word of the message.
@pytest.mark.parametrize("path", ["bad/trunc.jpg", "bad/data.jpg"])
def test_scrub_keeps_words_matching_stem(path):
    message = "truncated JPEG: the image data ends before the last row"
    assert privacy.scrub_path(message, Path(path)) == message


def test_scrub_removes_stem_as_path_part():
    cleaned = privacy.scrub_path("see /tmp/Doe_Jane/x and 'Doe_Jane' and Doe_Jane.tif",
                                 Path("/in/Doe_Jane.dcm"))
    assert "Doe_Jane" not in cleaned


def test_scrub_removes_name_and_path():
    cleaned = privacy.scrub_path("cannot open /in/data.jpg or data.jpg", Path("/in/data.jpg"))
    assert "data.jpg" not in cleaned
    assert "/in" not in cleaned


def test_scrub_matches_whole_tokens():
    assert privacy.scrub("Janet and Jane", ["Doe^Jane"]) == "Janet and <redacted>"


def test_truncated_jpeg_reason_readable(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), np.uint8))
    image.save(folder / "trunc.jpg", quality=95)
    data = (folder / "trunc.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(data[:len(data) // 2])
    summary = build_store([folder], tmp_path / "s.zarr", workers=0, min_size=8)
    failure, = summary.failed
    assert "truncated" in failure.reason
    assert privacy.REDACTED not in failure.reason
