"""Global layout model training on a real store: both modes, sampling, exact resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from patchgen.conditioning import level_shape
from patchgen.config import ConfigError, to_dict
from patchgen.global_model import GlobalTask, train_global
from patchgen.inference import load_global
from patchgen.trainer import Trainer, list_checkpoints, seeded_init
from tests.patchgen.test_global_data import (DICOM_SIZE, TINY, needs_radiographs,
                                             real_store, tiny_config)

REPO = Path(__file__).resolve().parents[2]
LABELS = ["fractured", "non_fractured"]

__all__ = ["real_store"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conditional_run(real_store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("conditional") / "run"
    train_global(real_store, run, tiny_config(), device="cpu")
    return run


@needs_radiographs
def test_conditional_writes_snapshot(conditional_run):
    info = json.loads((conditional_run / "model" / "femurgen.json").read_text())
    assert info["labels"] == LABELS
    assert info["mode"] == "conditional"
    assert info["canvases"] == [[36, 28], [28, 36]]
    assert [p.name for p in list_checkpoints(conditional_run)] == ["ckpt-000000000004",
                                                                  "ckpt-000000000008"]


@needs_radiographs
def test_conditional_samples_every_label(conditional_run):
    sampler = load_global(conditional_run)
    assert sampler.labels == LABELS
    for label in LABELS:
        native = sampler.draw_native_size(label, np.random.default_rng(0))
        layout = sampler.sample_layout(label, native, torch.Generator().manual_seed(1))
        assert layout.shape == level_shape(native, sampler.layout_level(native))
        assert layout.dtype == np.float32
        assert float(layout.min()) >= 0.0
        assert float(layout.max()) <= 1.0


@needs_radiographs
def test_layout_same_seed_same_output(conditional_run):
    sampler = load_global(conditional_run)
    first = sampler.sample_layout("fractured", (454, 373), torch.Generator().manual_seed(3))
    second = sampler.sample_layout("fractured", (454, 373), torch.Generator().manual_seed(3))
    other = sampler.sample_layout("fractured", (454, 373), torch.Generator().manual_seed(4))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


@needs_radiographs
@pytest.mark.parametrize("sampler_name", ["ddim", "dpmsolver++"])
def test_layout_for_requested_size(conditional_run, sampler_name):
    from patchgen.inference import LayoutSampler

    global_sampler = load_global(conditional_run)
    layout_sampler = global_sampler._check_label("non_fractured")
    layout_sampler.diffusion.sampler = sampler_name
    native = (300, 520)   # a size no training image has, landscape
    layout = global_sampler.sample_layout("non_fractured", native, torch.Generator().manual_seed(0),
                                          steps=2, guidance_scale=3.0)
    assert isinstance(layout_sampler, LayoutSampler)
    assert layout_sampler.canvas_for(native) == (28, 36)
    assert layout.shape == level_shape(native, global_sampler.layout_level(native))


@needs_radiographs
def test_native_sizes_from_catalog(conditional_run):
    sampler = load_global(conditional_run)
    rng = np.random.default_rng(0)
    drawn = {sampler.draw_native_size("non_fractured", rng) for _ in range(60)}
    assert drawn == {(373, 454), (454, 373), DICOM_SIZE}
    assert sampler.draw_native_size("non_fractured", rng, min_megapixels=1.0) == DICOM_SIZE
    with pytest.raises(ValueError, match="5.0 to inf megapixels"):
        sampler.draw_native_size("fractured", rng, min_megapixels=5.0)
    small = {sampler.draw_native_size("non_fractured", rng, max_megapixels=0.5) for _ in range(30)}
    assert small == {(373, 454), (454, 373)}


@needs_radiographs
def test_spacing_follows_size(conditional_run):
    sampler = load_global(conditional_run)
    assert sampler.spacing_mm("non_fractured") == pytest.approx(0.2)
    assert sampler.spacing_mm("non_fractured", DICOM_SIZE) == pytest.approx(0.2)
    assert sampler.spacing_mm("fractured") is None


@needs_radiographs
def test_per_class_trains_model_per_label(real_store, tmp_path):
    run = tmp_path / "run"
    summaries = train_global(real_store, run, tiny_config("mode=per-class"), device="cpu")
    assert sorted(summaries) == LABELS
    assert json.loads((run / "per-class.json").read_text()) == {"labels": LABELS}
    sampler = load_global(run)
    assert sampler.labels == LABELS
    for label in LABELS:
        info = json.loads((run / label / "model" / "femurgen.json").read_text())
        assert info["labels"] == [label]
        assert {s["label"] for s in info["sizes"]} == {label}
        assert sampler.checkpoint_for(label) == run / label / "model"
        layout = sampler.sample_layout(label, (454, 373), torch.Generator().manual_seed(0))
        assert layout.shape == level_shape((454, 373), sampler.layout_level((454, 373)))


@needs_radiographs
def test_mode_switch_rejected(real_store, conditional_run):
    with pytest.raises(ConfigError, match="mode=conditional"):
        train_global(real_store, conditional_run, tiny_config("mode=per-class"), device="cpu")


def _fit(store_path: Path, run: Path, *overrides: str) -> None:
    from preprocess.store import PyramidStore

    store = PyramidStore(store_path)
    config = tiny_config("train.grad_accum=2", "train.checkpoint_every=8", *overrides)
    rows = store.rows(split="train")
    with seeded_init(config.train.seed):
        task = GlobalTask(store, rows, sorted({r.label for r in rows}), config)
    Trainer(task, config.train, run, to_dict(config), device="cpu").fit()


def _state(run: Path, samples: int) -> tuple[dict, dict]:
    folder = run / "checkpoints" / f"ckpt-{samples:012d}"
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    return state, load_file(str(folder / "model.safetensors"))


def _next_batch(store_path: Path, run: Path) -> dict[str, torch.Tensor]:
    """The first micro-batch a resumed run would train on."""
    from preprocess.store import PyramidStore

    store = PyramidStore(store_path)
    config = tiny_config("train.grad_accum=2", "train.checkpoint_every=8")
    rows = store.rows(split="train")
    task = GlobalTask(store, rows, sorted({r.label for r in rows}), config)
    trainer = Trainer(task, config.train, run, to_dict(config), device="cpu")
    trainer.resume()
    return next(iter(trainer._data_loader()))


@needs_radiographs
def test_resume_is_exact(real_store, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _fit(real_store, straight, "train.duration=16")
    _fit(real_store, resumed, "train.duration=8")
    _fit(real_store, resumed, "train.duration=16")
    state_a, weights_a = _state(straight, 16)
    state_b, weights_b = _state(resumed, 16)

    for ema_a, ema_b in zip(state_a["ema"]["shadow_params"], state_b["ema"]["shadow_params"]):
        assert torch.equal(ema_a, ema_b)
    moments_a, moments_b = state_a["optimizers"]["model"]["state"], state_b["optimizers"]["model"]["state"]
    for index in moments_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments_a[index][name], moments_b[index][name])
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key])
    assert state_a["lr_schedulers"] == state_b["lr_schedulers"]
    assert torch.equal(state_a["rng"][0]["torch"], state_b["rng"][0]["torch"])

    batch_a, batch_b = _next_batch(real_store, straight), _next_batch(real_store, resumed)
    for key in batch_a:
        assert torch.equal(batch_a[key], batch_b[key])


def _torchrun(store: Path, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    settings = [item for override in [*TINY, *overrides] for item in ("--set", override)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "cli.py", "train-global", "--store", str(store), "--out", str(run),
               "--config", "cpu-tiny", "--device", "cpu", *settings]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=240)


@needs_radiographs
def test_ddp_two_processes_gloo(real_store, tmp_path):
    run = tmp_path / "ddp"
    result = _torchrun(real_store, run, "train.duration=8", "train.checkpoint_every=8",
                       "train.log_every=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000000008"]
    state = torch.load(run / "checkpoints" / "ckpt-000000000008" / "state.pt",
                       weights_only=True)
    assert state["world_size"] == 2
    assert state["steps"] == 2
    assert len(state["rng"]) == 2
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in records] == [8]

    # One process with two accumulated micro-batches trains on the same micro-batches.
    single = tmp_path / "single"
    _fit(real_store, single, "train.duration=8")
    _, ddp_weights = _state(run, 8)
    _, single_weights = _state(single, 8)
    for key in ddp_weights:
        assert torch.allclose(ddp_weights[key], single_weights[key], atol=1e-5), key
