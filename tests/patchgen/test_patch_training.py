"""Both patch model kinds train on real radiographs, reload for synthesis and resume exactly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchgen.config import from_dict
from patchgen.patch_model import PatchConfig, PatchSampler, train_patch
from tests.patchgen.test_patch_data import build_fracatlas_store  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]

TRAIN = {"duration": 8, "batch_size": 2, "log_every": 4, "checkpoint_every": 4,
         "sample_every": 4, "keep_checkpoints": 3, "warmup": 4}
DATA = {"patch_size": 16, "large_patch_size": 32, "large_probability": 0.5}
NETWORK = {"channels": [8, 16], "norm_groups": 4}
CONFIGS = {
    "diffusion": {"model": "diffusion", "network": NETWORK, "data": DATA, "train": TRAIN},
    "gan": {"model": "gan", "network": NETWORK, "data": DATA, "train": TRAIN,
            "gan": {"noise_channels": 2, "disc_channels": [8, 16], "r1_interval": 2,
                    "l1_weight": 0.1}},
}


def config_of(kind: str, duration: int) -> PatchConfig:
    data = {**CONFIGS[kind], "train": {**TRAIN, "duration": duration}}
    return from_dict(PatchConfig, data)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_fracatlas_store(tmp_path_factory.mktemp("patch-training") / "store.zarr")


@pytest.fixture(scope="module", params=["diffusion", "gan"])
def runs(request, store, tmp_path_factory):
    """One run trained to 8 patches, and one trained to 4 then resumed to 8."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"runs-{kind}")
    train_patch(store.path, root / "full", config_of(kind, 8), device="cpu")
    train_patch(store.path, root / "resumed", config_of(kind, 4), device="cpu")
    train_patch(store.path, root / "resumed", config_of(kind, 8), device="cpu")
    return kind, root


def weight_files(run, checkpoint="ckpt-000000000008"):
    folder = run / "checkpoints" / checkpoint
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_resume_gives_identical_weights(runs):
    kind, root = runs
    names = weight_files(root / "full")
    assert names == weight_files(root / "resumed")
    assert len(names) == (2 if kind == "gan" else 1)
    for name in names:
        full = load_file(root / "full" / "checkpoints" / "ckpt-000000000008" / name)
        resumed = load_file(root / "resumed" / "checkpoints" / "ckpt-000000000008" / name)
        for key in full:
            assert torch.equal(full[key], resumed[key]), (name, key)


def test_resume_gives_identical_ema_snapshot(runs):
    kind, root = runs
    folder = "generator" if kind == "gan" else "unet"
    full = load_file(next((root / "full" / "model" / folder).glob("*.safetensors")))
    resumed = load_file(next((root / "resumed" / "model" / folder).glob("*.safetensors")))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_resume_gives_identical_optimizer_state(runs):
    _, root = runs
    path = "checkpoints/ckpt-000000000008/state.pt"
    full = torch.load(root / "full" / path, weights_only=True)
    resumed = torch.load(root / "resumed" / path, weights_only=True)
    for name, state in full["optimizers"].items():
        for index, values in state["state"].items():
            other = resumed["optimizers"][name]["state"][index]
            for key, value in values.items():
                assert torch.equal(value, other[key]), (name, index, key)


def test_training_logs_losses(runs):
    kind, root = runs
    lines = (root / "full" / "stats.jsonl").read_text().splitlines()
    assert len(lines) == 2
    expected = "g_loss" if kind == "gan" else "loss"
    assert expected in lines[-1]


def test_sampler_reloads_snapshot(runs, store):
    kind, root = runs
    sampler = PatchSampler(root / "full")
    assert sampler.kind == kind
    assert sampler.patch_size == 16
    batch = 2
    cond = torch.zeros(batch, 1, 16, 16)
    coords = torch.zeros(batch, 2, 16, 16)
    mask = torch.ones(batch, 1, 16, 16)
    label = torch.tensor([sampler.label_index(name) for name in store.labels()])
    level = torch.zeros(batch, dtype=torch.long)
    if kind == "gan":
        noise = torch.randn(batch, sampler.noise_channels, 16, 16)
        output = sampler.gan_fn(noise, cond, coords, mask, label, level)
        assert output.abs().max() <= 1
    else:
        x_t = torch.randn(batch, 1, 16, 16)
        output = sampler.denoise_fn(x_t, cond, coords, mask, 500, label, level)
    assert output.shape == (batch, 1, 16, 16)
    assert torch.isfinite(output).all()


def test_sample_grids(runs):
    kind, root = runs
    grids = [p.stem for p in sorted((root / "full" / "samples").glob("*.png"))]
    expected = ["000000000004", "000000000008"] if kind == "gan" else []
    assert grids == expected


def test_losses_are_finite(runs):
    _, root = runs
    record = json.loads((root / "full" / "stats.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))


@pytest.mark.slow
def test_gan_trains_in_two_processes(store, tmp_path):
    """The GAN, its R1 penalty and mixed patch sizes under 2-process DDP (gloo on the CPU)."""
    overrides = {"network.channels": "[8,16]", "network.norm_groups": "4",
                 "data.patch_size": "16", "data.large_patch_size": "32",
                 "data.large_probability": "0.5", "gan.disc_channels": "[8,16]",
                 "gan.noise_channels": "2", "gan.r1_interval": "1", "train.batch_size": "2",
                 "train.duration": "16", "train.log_every": "8", "train.checkpoint_every": "8"}
    settings = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "cli.py", "train-patch", "--store", str(store.path), "--out", str(run),
               "--config", "gan-cpu-tiny", "--device", "cpu", *settings]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "ckpt-000000000016" / "state.pt", weights_only=True)
    assert state["world_size"] == 2
    record = json.loads((run / "stats.jsonl").read_text().splitlines()[-1])
    assert record["d_r1"] > 0
