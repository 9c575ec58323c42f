"""The eval subcommands and weights commands through the CLI, on the shared real store."""

import csv
import json
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli import main
from eval.weights import sha256_file

TINY = ["--set", "global_view.max_real=12", "--set", "patch.levels=[2]", "--set", "patch.real_crops=8",
        "--set", "patch.synthetic_crops=8", "--set", "diversity.pairs=2", "--set", "distance.kid_subsets=3"]


def _run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory, alexnet_features):
    """A TorchScript stand-in for Inception (2048 features) and a random AlexNet backbone for LPIPS."""
    folder = tmp_path_factory.mktemp("weights")

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).repeat(1, 683)[:, :2048]

    torch.jit.script(Probe()).save(str(folder / "inception-fid.pt"))
    save_file(alexnet_features, str(folder / "lpips-alex.safetensors"))
    return folder


@pytest.fixture(scope="module")
def weighted_eval(store_path, synthetic_dir, local_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-weights")
    inception, backbone = local_weights / "inception-fid.pt", local_weights / "lpips-alex.safetensors"
    result = _run("eval", "--real", store_path, "--synthetic", synthetic_dir, "--out", out, "--config", "cpu-tiny",
                  *TINY, "--allow-small", "--set", "features.extractors=[radiomics,inception]",
                  "--set", f"features.inception_path={inception}",
                  "--set", f"features.inception_sha256={sha256_file(inception)}",
                  "--set", "diversity.lpips_net=alex", "--set", f"diversity.lpips_path={backbone}",
                  "--set", f"diversity.lpips_sha256={sha256_file(backbone)}")
    return result, out


def test_weighted_eval_runs(weighted_eval):
    result, out = weighted_eval
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()


def test_allow_small_computes_fid(weighted_eval):
    _, out = weighted_eval
    fid = json.loads((out / "metrics.json").read_text())["global"]["distances"]["inception"]["all"]["fid"]
    assert fid["status"] == "computed"
    assert fid["value"] >= 0.0


def test_lpips_in_pipeline(weighted_eval):
    _, out = weighted_eval
    diversity = json.loads((out / "metrics.json").read_text())["diversity"]
    assert diversity["synthetic"]["lpips"]["status"] == "computed"
    assert diversity["real"]["lpips"]["value"] > 0.0


def test_missing_inception_fails_fast(store_path, synthetic_dir, tmp_path):
    result = _run("eval", "--real", store_path, "--synthetic", synthetic_dir, "--out", tmp_path / "out",
                  "--config", "cpu-tiny", "--set", "features.extractors=[inception]",
                  "--set", f"features.weights_dir={tmp_path / 'empty'}")
    assert result.exit_code == 1
    assert "inception-fid.pt" in result.output
    assert "weights fetch inception" in result.output


def test_classify_command(store_path, synthetic_dir, tmp_path):
    out = tmp_path / "classify"
    result = _run("eval", "classify", "--real", store_path, "--synthetic", synthetic_dir, "--out", out,
                  "--config", "cpu-tiny", "--set", "classify.epochs=1", "--set", "classify.image_size=32",
                  "--set", "classify.bootstrap=20", "--set", "classify.batch_size=8")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "classify.json").read_text())
    assert set(data["runs"]) == {"real", "synthetic", "real+synthetic"}
    assert data["runs"]["real"]["accuracy"]["status"] == "computed"
    assert data["test"]["n"] >= 2
    assert data["label_fidelity"]["overall"]["n"] == 3
    assert (out / "classify.html").is_file()


def test_compare_command(weighted_eval, tmp_path):
    _, first = weighted_eval
    second = tmp_path / "copy"
    second.mkdir()
    (second / "metrics.json").write_text((first / "metrics.json").read_text())
    result = _run("eval", "compare", first, second, "--out", tmp_path / "compare")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(open(tmp_path / "compare" / "compare.csv")))
    by_metric = {row[0]: row[1:] for row in rows[1:]}
    assert rows[0] == ["metric", first.name, second.name]
    assert by_metric["global/distances/inception/all/fid"][0] == by_metric["global/distances/inception/all/fid"][1]
    assert "<img src=\"data:image/png;base64," in (tmp_path / "compare" / "compare.html").read_text()


def test_reader_study_round_trip(store_path, synthetic_dir, tmp_path):
    out = tmp_path / "study"
    result = _run("eval", "reader-study", "--real", store_path, "--synthetic", synthetic_dir, "--out", out,
                  "--config", "cpu-tiny", "--n-real", 3, "--n-synthetic", 3)
    assert result.exit_code == 0, result.output
    key = list(csv.DictReader(open(out / "key.csv")))
    assert len(key) == 6
    assert not (out / "reader" / "key.csv").exists()
    form = (out / "reader" / "index.html").read_text()
    assert all(f"cases/{row['case_id']}.png" in form for row in key)
    assert "synthetic" not in " ".join(p.name for p in (out / "reader" / "cases").iterdir())

    perfect, wrong = tmp_path / "perfect.csv", tmp_path / "wrong.csv"
    for path, reader, flip in ((perfect, "A", False), (wrong, "B", True)):
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["reader", "case_id", "source", "label", "confidence"])
            for row in key:
                source = row["source"] if not flip else {"real": "synthetic", "synthetic": "real"}[row["source"]]
                writer.writerow([reader, row["case_id"], source, row["label"], 5])
    result = _run("eval", "reader-score", perfect, wrong, "--key", out / "key.csv", "--out", tmp_path / "scores")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores" / "reader_scores.json").read_text())
    assert scores["readers"]["A"]["source_accuracy"]["value"] == 1.0
    assert scores["readers"]["A"]["source_auc"]["value"] == 1.0
    assert scores["readers"]["B"]["source_accuracy"]["value"] == 0.0
    assert scores["agreement_between_readers"]["A vs B"]["value"] == pytest.approx(-1.0)


def test_weights_fetch_from_file(local_weights, tmp_path):
    probe = local_weights / "inception-fid.pt"
    result = _run("weights", "fetch", "inception", "--cache-dir", tmp_path / "cache", "--from", probe,
                  "--sha256", sha256_file(probe))
    assert result.exit_code == 0, result.output
    assert sha256_file(tmp_path / "cache" / "inception-fid.pt") == sha256_file(probe)


def test_weights_fetch_wrong_file(local_weights, tmp_path):
    result = _run("weights", "fetch", "inception", "--cache-dir", tmp_path / "cache", "--from",
                  local_weights / "inception-fid.pt")
    assert result.exit_code == 1
    assert "expected 7ff4a85c" in result.output


def test_weights_list_reports_missing(tmp_path):
    result = _run("weights", "list", "--cache-dir", tmp_path)
    assert result.exit_code == 0
    assert result.output.count("missing") == 3
