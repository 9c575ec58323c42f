"""Pseudonymous ids, salt handling and message scrubbing."""

from __future__ import annotations

from pathlib import Path

from preprocess import privacy


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
