"""The pyramid commands of cli.py: build, info, verify, exit codes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli import main
from tests.preprocess.factory import SALT


def run(*arguments):
    return CliRunner().invoke(main, list(arguments), catch_exceptions=False)


def test_build_info_verify(inputs, tmp_path):
    store = str(tmp_path / "s.zarr")
    folder = str(inputs["labels"].parent)
    result = run("pyramid", "build", folder, "--out", store, "--labels", str(inputs["labels"]),
                 "--workers", "0", "--salt", SALT, "--min-size", "8")
    assert result.exit_code == 0, result.output
    assert "built 4" in result.output
    assert "failed 1" in result.output
    assert "--manifest" in result.output
    assert run("pyramid", "info", store).exit_code == 0
    verify = run("pyramid", "verify", store)
    assert verify.exit_code == 0
    assert "0 problems" in verify.output


def test_strict_exit_code(inputs, tmp_path):
    result = run("pyramid", "build", str(inputs["labels"].parent), "--out",
                 str(tmp_path / "s.zarr"), "--workers", "0", "--salt", SALT, "--strict")
    assert result.exit_code == 1


def test_salt_from_environment(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("FEMURGEN_SALT", SALT)
    result = run("pyramid", "build", str(inputs["dicom"]), "--out", str(tmp_path / "s.zarr"),
                 "--workers", "0")
    assert result.exit_code == 0, result.output


def test_missing_salt_is_usage_error(inputs, tmp_path, monkeypatch):
    monkeypatch.delenv("FEMURGEN_SALT", raising=False)
    result = CliRunner().invoke(main, ["pyramid", "build", str(inputs["dicom"]), "--out",
                                       str(tmp_path / "s.zarr")])
    assert result.exit_code == 2
    assert "FEMURGEN_SALT" in result.output


def test_dry_run_hides_salt(inputs, tmp_path):
    result = run("pyramid", "build", str(inputs["dicom"]), "--out", str(tmp_path / "s.zarr"),
                 "--salt", "secret-value", "--dry-run")
    shown = json.loads(result.output)
    assert shown["salt"] == "(set)"
    assert "secret-value" not in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_verify_exit_code_on_damage(built, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(built[0], copy)
    victim = sorted((copy / "images").iterdir())[0]
    shutil.rmtree(victim)
    result = run("pyramid", "verify", str(copy))
    assert result.exit_code == 1
    assert "no complete image group" in result.output


def test_empty_folder_is_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("pyramid", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "b.zarr"))
    assert result.exit_code == 2
    assert "check the path" in result.output
    assert not (tmp_path / "b.zarr").exists()


def test_all_files_failing_exits_1(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg either")
    result = run("pyramid", "build", str(folder), "--out", str(tmp_path / "s.zarr"),
                 "--workers", "0")
    assert result.exit_code == 1
    assert "contains no image" in result.output
    assert "failed 2" in result.output


def test_full_disk_is_a_message(inputs, tmp_path, monkeypatch):
    import errno

    import preprocess.build

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s.zarr"))

    monkeypatch.setattr(preprocess.build, "build_store", full_disk)
    result = CliRunner().invoke(main, ["pyramid", "build", str(inputs["dicom"]), "--out",
                                       str(tmp_path / "s.zarr"), "--salt", SALT])
    assert result.exit_code == 1
    assert "no space left on the device writing" in result.output
    assert "Traceback" not in result.output
