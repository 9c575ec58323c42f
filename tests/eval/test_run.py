"""End-to-end `eval` on a real store built from FracAtlas radiographs and a synthetic folder."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main

FAST = ["--set", "global_view.max_real=20", "--set", "patch.levels=[1,2]", "--set", "patch.real_crops=12",
        "--set", "patch.synthetic_crops=12", "--set", "diversity.pairs=3", "--set", "distance.kid_subset_size=3",
        "--set", "distance.kid_subsets=5", "--set", "distance.prdc_k=2",
        "--set", "features.extractors=[radiomics,encoder]", "--set", "encoder.duration=64",
        "--set", "encoder.batch_size=16", "--set", "memorization.embedding=encoder"]


@pytest.fixture(scope="module")
def evaluation(store_path, synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = CliRunner().invoke(main, ["eval", "--real", str(store_path), "--synthetic", str(synthetic_dir),
                                       "--out", str(out), "--config", "cpu-tiny", *FAST, "--fail-on-memorization"])
    return result, out


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, float):
        yield value


def test_memorization_gate_exit_code(evaluation):
    result, _ = evaluation
    assert result.exit_code == 3, result.output
    assert "memorization check failed" in result.output


def test_planted_copy_flagged(evaluation, planted_id, planted_name):
    _, out = evaluation
    memorization = json.loads((out / "metrics.json").read_text())["memorization"]
    assert memorization["flagged"] == [planted_name]
    assert memorization["closest_pairs"][0]["synthetic"] == planted_name
    assert memorization["closest_pairs"][0]["train_id"] == planted_id
    assert memorization["closest_pairs"][0]["ncc"] == pytest.approx(1.0, abs=1e-4)
    assert memorization["ncc"]["share_above"]["count"] == 1


def test_metrics_keys_and_finite(evaluation):
    _, out = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("counts", "global", "patch", "diversity", "seams", "memorization"):
        assert key in metrics
    assert metrics["counts"]["synthetic_total"] == 3
    assert all(np.isfinite(value) for value in _numbers(metrics))


def test_small_sets_not_computed(evaluation):
    _, out = evaluation
    fid = json.loads((out / "metrics.json").read_text())["global"]["distances"]["radiomics"]["all"]["fid"]
    assert fid["status"] == "not_computed"
    assert "feature dimension 49" in fid["reason"]
    assert "--allow-small" in fid["reason"]


def test_patch_levels_computed(evaluation):
    _, out = evaluation
    patch = json.loads((out / "metrics.json").read_text())["patch"]
    assert patch["level_1"]["status"] == "computed"
    assert patch["level_1"]["distances"]["encoder"]["all"]["kid"]["status"] == "computed"
    assert len(patch["level_2"]["spectrum"]["real_log10_power"]) == 32


def test_seam_scores_present(evaluation):
    _, out = evaluation
    seams = json.loads((out / "metrics.json").read_text())["seams"]
    assert seams["mean"]["status"] == "computed"
    assert 0.5 < seams["mean"]["value"] < 2.0


def test_encoder_saved_next_to_store(evaluation, store_path):
    assert (store_path.parent / f"{store_path.name}.encoder" / "model.safetensors").is_file()


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headings, self.tables, self._heading = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._heading = tag == "h2"
        self.tables += tag == "table"

    def handle_data(self, data):
        if self._heading:
            self.headings.append(data.strip())
            self._heading = False


def test_report_renders(evaluation):
    _, out = evaluation
    parser = _ReportParser()
    parser.feed((out / "report.html").read_text())
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert len(parser.images) >= 10  # grids, plots and pairs
    assert "Memorization" in parser.headings
    assert "Intensity histograms and power spectra" in parser.headings
    assert parser.tables >= 5


def test_eval_missing_option(store_path):
    result = CliRunner().invoke(main, ["eval", "--real", str(store_path)])
    assert result.exit_code == 2
    assert "--synthetic" in result.output


def test_store_with_train_split_only(synthetic_dir, tmp_path):
    from preprocess.build import build_store
    from tests.eval.conftest import FRACATLAS

    files = sorted(FRACATLAS.rglob("*.jpg"))[:2]
    store = tmp_path / "train-only.zarr"
    build_store(files, store, workers=0, split="1,0,0")
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval", "--real", str(store), "--synthetic", str(synthetic_dir),
                                       "--out", str(out), "--config", "cpu-tiny", *FAST])
    assert result.exit_code == 0, result.output
    memorization = json.loads((out / "metrics.json").read_text())["memorization"]
    assert memorization["n_calibration"] == 0
    assert memorization["ncc"]["threshold"]["status"] == "not_computed"
    assert len(memorization["ncc"]["nearest_train_id"]) == 3
