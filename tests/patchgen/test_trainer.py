"""The shared trainer on the global layout task: failures, checkpoints, resume rules, schedules."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from patchgen.config import ConfigError, to_dict
from patchgen.global_model import GlobalTask
from patchgen.networks import LayoutUNet
from patchgen.trainer import (Trainer, TrainingInterrupted, TrainingStopped, capture_rng_state,
                              list_checkpoints, lr_factor, restore_rng_state, seeded_init)
from tests.patchgen.test_global_data import needs_radiographs, real_store, tiny_config

__all__ = ["real_store"]
pytestmark = [needs_radiographs, pytest.mark.usefixtures("one_thread")]


class LossHook:
    """A layout task whose loss is changed on chosen optimizer steps (a test fixture).

    ``action(loss)`` replaces the loss of every step in ``steps``. Steps are counted from
    the first loss call of this object, one call per step (``grad_accum`` 1).
    """

    def __init__(self, task: GlobalTask, steps: set[int], action: Callable[[torch.Tensor], torch.Tensor]):
        self.task = task
        self.steps = steps
        self.action = action
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def loss(self, phase, networks, batch):
        loss, parts = self.task.loss(phase, networks, batch)
        step, self.calls = self.calls, self.calls + 1
        if step in self.steps:
            loss = self.action(loss)
        return loss, parts


def make_nan(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan")


def send_stop_signal(loss: torch.Tensor) -> torch.Tensor:
    os.kill(os.getpid(), signal.SIGUSR1)
    return loss


def make_trainer(store_path: Path, run: Path, *overrides: str, hook_steps: set[int] = frozenset(),
                 action: Callable = make_nan) -> Trainer:
    from preprocess.store import PyramidStore

    store = PyramidStore(store_path)
    config = tiny_config(*overrides)
    rows = store.rows(split="train")
    with seeded_init(config.train.seed):
        task = GlobalTask(store, rows, sorted({r.label for r in rows}), config)
    if hook_steps:
        task = LossHook(task, set(hook_steps), action)
    return Trainer(task, config.train, run, to_dict(config), device="cpu")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def _state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)


def test_nan_step_skipped_and_counted(real_store, tmp_path):
    trainer = make_trainer(real_store, tmp_path / "run", hook_steps={2})
    record = trainer.fit()
    assert record["nonfinite_steps"] == 1
    assert trainer.steps == 4
    state = _state(list_checkpoints(tmp_path / "run")[-1])
    assert state["nonfinite_total"] == 1
    assert int(state["optimizers"]["model"]["state"][0]["step"]) == 3
    assert state["ema"]["optimization_step"] == 3
    assert trainer._weights_are_finite()
    assert _records(tmp_path / "run")[-1]["nonfinite_steps"] == 1


def test_nonfinite_streak_stops_run(real_store, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(real_store, run, "train.max_nonfinite=2", hook_steps={2, 3})
    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row at 8 samples"):
        trainer.fit()
    checkpoints = list_checkpoints(run)
    assert [p.name for p in checkpoints] == ["ckpt-000000000004"]
    weights = load_file(str(checkpoints[0] / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_nonfinite_weights_not_checkpointed(real_store, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(real_store, run)
    trainer.fit()
    parameter = next(trainer.networks["model"].parameters())
    with torch.no_grad():
        parameter.fill_(float("nan"))
    trainer.images_seen += 2
    assert trainer.save_checkpoint() is None
    assert [p.name for p in list_checkpoints(run)][-1] == "ckpt-000000000008"


@pytest.mark.parametrize("key", ["duration", "log_every", "checkpoint_every", "sample_every"])
def test_interval_shorter_than_step_rejected(real_store, tmp_path, key):
    with pytest.raises(ConfigError, match=f"train.{key}=3 samples is shorter than one optimizer "
                                          f"step of 4 samples"):
        make_trainer(real_store, tmp_path / "run", "train.batch_size=4", f"train.{key}=3")


def test_config_change_on_resume_names_key(real_store, tmp_path):
    run = tmp_path / "run"
    make_trainer(real_store, run).fit()
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.0005 -> 0\.001"):
        make_trainer(real_store, run, "train.lr=0.001")
    with pytest.raises(ConfigError, match=r"data\.buckets"):
        make_trainer(real_store, run, "data.buckets=[[32,32],[28,36]]")
    resumed = make_trainer(real_store, run, "train.duration=12", "train.log_every=8")
    assert resumed.fit()["images_seen"] == 12


def test_checkpoint_formats(real_store, tmp_path):
    run = tmp_path / "run"
    make_trainer(real_store, run).fit()
    latest = list_checkpoints(run)[-1]
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["images_seen"] == 8
    assert state["next_micro_batch"] == 4
    assert set(state["rng"][0]) == {"torch", "numpy", "python"}
    weights = load_file(str(latest / "model.safetensors"))
    snapshot = LayoutUNet.from_pretrained(run / "model" / "unet")
    assert set(weights) == set(snapshot.state_dict())
    for parameter, ema in zip(snapshot.parameters(), state["ema"]["shadow_params"]):
        assert torch.equal(parameter, ema)
    assert json.loads((run / "model" / "training.json").read_text())["images_seen"] == 8


def test_checkpoints_rotated(real_store, tmp_path):
    run = tmp_path / "run"
    make_trainer(real_store, run, "train.checkpoint_every=2", "train.keep_checkpoints=2").fit()
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000000006", "ckpt-000000000008"]


def test_stale_temporaries_ignored(real_store, tmp_path):
    run = tmp_path / "run"
    make_trainer(real_store, run).fit()
    folder = run / "checkpoints"
    (folder / ".tmp-ckpt-000000000012").mkdir()
    (folder / "ckpt-000000000012.old").mkdir()
    (folder / "ckpt-000000000012.old" / "state.pt").write_bytes(b"")
    assert [p.name for p in list_checkpoints(run)][-1] == "ckpt-000000000008"
    make_trainer(real_store, run)
    assert not (folder / ".tmp-ckpt-000000000012").exists()


def test_stop_signal_checkpoints_and_resumes(real_store, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    make_trainer(real_store, straight).fit()
    interrupted = make_trainer(real_store, stopped, hook_steps={1}, action=send_stop_signal)
    with pytest.raises(TrainingInterrupted, match="SIGUSR1 at 4 samples"):
        interrupted.fit()
    assert [p.name for p in list_checkpoints(stopped)] == ["ckpt-000000000004"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    make_trainer(real_store, stopped).fit()
    ema_a = _state(list_checkpoints(straight)[-1])["ema"]["shadow_params"]
    ema_b = _state(list_checkpoints(stopped)[-1])["ema"]["shadow_params"]
    assert all(torch.equal(a, b) for a, b in zip(ema_a, ema_b))


def test_status_records(real_store, tmp_path):
    run = tmp_path / "run"
    make_trainer(real_store, run, "train.sample_every=8").fit()
    records = _records(run)
    assert [r["images_seen"] for r in records] == [4, 8]
    assert {"steps", "lr", "images_per_s", "nonfinite_steps", "loss",
            "model_grad_norm"} <= set(records[0])
    grid = Image.open(run / "samples" / "000000000008.png")
    assert grid.size == (4 * 36, 2 * 36)


def test_lr_scale_per_network(real_store, tmp_path):
    trainer = make_trainer(real_store, tmp_path / "run", "train.lr_scale={model: 0.5}")
    assert trainer.optimizers["model"].param_groups[0]["initial_lr"] == pytest.approx(2.5e-4)
    with pytest.raises(ConfigError, match=r"unknown networks \['discriminator'\]"):
        make_trainer(real_store, tmp_path / "other", "train.lr_scale={discriminator: 2.0}")
    with pytest.raises(ConfigError, match="train.lr_scale.model=0"):
        tiny_config("train.lr_scale={model: 0}")


def test_lr_factor_warmup_and_decay():
    assert lr_factor(0, samples_per_step=4, warmup=16, decay=0) == 0.25
    assert lr_factor(3, samples_per_step=4, warmup=16, decay=0) == 1.0
    assert lr_factor(99, samples_per_step=4, warmup=16, decay=0) == 1.0
    assert lr_factor(15, samples_per_step=4, warmup=0, decay=16) == pytest.approx(0.5)
    assert lr_factor(3, samples_per_step=4, warmup=0, decay=16) == 1.0


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
