"""NGFF 0.5 multiscales metadata: scale and translation per level."""

from __future__ import annotations

from preprocess import ngff


def test_scale_and_translation_with_spacing():
    ome = ngff.multiscales_attributes("img-1", 3, (0.2, 0.25))
    datasets = ome["multiscales"][0]["datasets"]
    assert [dataset["path"] for dataset in datasets] == ["0", "1", "2"]
    assert datasets[2]["coordinateTransformations"][0]["scale"] == [0.8, 1.0]
    assert datasets[2]["coordinateTransformations"][1]["translation"] == [0.30000000000000004,
                                                                          0.375]
    assert ome["multiscales"][0]["axes"][0]["unit"] == "millimeter"


def test_unknown_spacing_in_pixels():
    ome = ngff.multiscales_attributes("img-1", 2, None)
    transforms = ome["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    assert transforms[0]["scale"] == [2.0, 2.0]
    assert transforms[1]["translation"] == [0.5, 0.5]
    assert "unit" not in ome["multiscales"][0]["axes"][0]


def test_check_finds_wrong_scale():
    ome = ngff.multiscales_attributes("img-1", 2, (0.2, 0.2))
    assert ngff.check_multiscales(ome, 2, (0.2, 0.2)) == []
    assert ngff.check_multiscales(ome, 2, (0.1, 0.1)) != []
    assert ngff.check_multiscales(ome, 3, (0.2, 0.2)) != []
