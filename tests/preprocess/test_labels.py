"""Label tables: matching by relative path, then by unique file name."""

from __future__ import annotations

import pytest

from preprocess.labels import LabelTable


def write_table(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_relative_path_then_name(tmp_path):
    (tmp_path / "images").mkdir()
    table = LabelTable(write_table(tmp_path / "labels.csv",
                                   "file,label\nimages/a.jpg,fractured\nb.jpg,normal\n"))
    assert table.lookup(tmp_path / "images" / "a.jpg").label == "fractured"
    assert table.lookup(tmp_path / "elsewhere" / "b.jpg").label == "normal"
    assert table.lookup(tmp_path / "images" / "c.jpg") is None
    assert table.unmatched_count() == 0


def test_same_name_twice_needs_path(tmp_path):
    table = LabelTable(write_table(tmp_path / "labels.csv",
                                   "file,label\nx/a.jpg,one\ny/a.jpg,two\n"))
    assert table.lookup(tmp_path / "y" / "a.jpg").label == "two"
    assert table.lookup(tmp_path / "z" / "a.jpg") is None


def test_missing_column_names_option(tmp_path):
    path = write_table(tmp_path / "labels.csv", "file,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="--patient-column 'patient'"):
        LabelTable(path, patient_column="patient")


def test_conflicting_rows_rejected(tmp_path):
    path = write_table(tmp_path / "labels.csv", "file,label\na.jpg,x\n./a.jpg,y\n")
    with pytest.raises(ValueError, match="appears twice"):
        LabelTable(path)


def test_unmatched_files_in_csv_order(tmp_path):
    (tmp_path / "labels.csv").write_text("file,label\nb.png,normal\na.png,normal\n")
    table = LabelTable(tmp_path / "labels.csv")
    assert table.unmatched_files() == ["b.png", "a.png"]


def test_non_utf8_table_named(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match="labels.csv is not UTF-8 text") as raised:
        LabelTable(path)
    assert "must be a UTF-8 CSV" in str(raised.value)


def test_empty_label_warned(tmp_path, caplog):
    rows = "".join(f"{name}.png,\n" for name in "abcdefg")
    path = write_table(tmp_path / "labels.csv", "file,label\nz.png,normal\n" + rows)
    with caplog.at_level("WARNING", logger="preprocess.labels"):
        LabelTable(path)
    message = caplog.records[0].getMessage()
    assert "7 rows have an empty 'label' cell" in message
    assert "lines 3, 4, 5, 6, 7 and 2 more" in message


@pytest.mark.parametrize("label", ["AFF/NFF", "a\\b", "..", "what?"])
def test_label_unfit_for_file_name_rejected(tmp_path, label):
    path = write_table(tmp_path / "labels.csv", f'file,label\na.jpg,x\nb.jpg,"{label}"\n')
    with pytest.raises(ValueError, match="line 3: label .* cannot be part of a file name"):
        LabelTable(path)


def test_label_with_space_and_dash_accepted(tmp_path):
    path = write_table(tmp_path / "labels.csv", "file,label\na.jpg,non fractured\nb.jpg,AFF-1\n")
    assert LabelTable(path).lookup(tmp_path / "a.jpg").label == "non fractured"


def test_overlong_label_rejected(tmp_path):
    path = write_table(tmp_path / "labels.csv", f"file,label\na.jpg,{'x' * 201}\n")
    with pytest.raises(ValueError, match="line 2: label .* 201 bytes long"):
        LabelTable(path)
