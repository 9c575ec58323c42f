"""One training loop for the global and patch models, diffusion and GAN alike.

A task (``TrainingTask``) supplies the networks, a dataset indexed by sample keys, and one
loss per phase; the trainer owns everything else:

* PyTorch DDP through ``accelerate`` (the same code runs on one CPU, under
  ``accelerate launch`` or under ``torchrun``), bf16 autocast, gradient accumulation and
  clipping;
* EMA of one network (``diffusers.training_utils.EMAModel``);
* training length and every interval counted in samples seen;
* checkpoints with the full training state, written atomically and rotated, and exact
  resume by rerunning the same command;
* skipping of non-finite steps, and a stop after too many in a row;
* a checkpoint and a clean stop on SIGTERM or SIGUSR1 (cluster pre-emption, time limits);
* a progress bar, one status line per log interval mirrored to ``stats.jsonl`` and to
  TensorBoard when it is installed.

Exact resume: all randomness of a sample comes from its key (``patchgen.data_order``), the
data order is a function of the optimizer step, a fresh run seeds the global RNGs from the
run seed and the process rank, and a checkpoint contains the weights, EMA, optimizer and
learning-rate states, the counters and every process's global RNG states. So on the CPU a
run resumed from a checkpoint is bit-identical to one that never stopped.

Run folder layout::

    RUN/config.yaml                resolved config of the run
    RUN/checkpoints/ckpt-<n>/      training state after n samples (state.pt + safetensors)
    RUN/model/                     inference snapshot with EMA weights (task-defined)
    RUN/samples/<n>.png            sample grids
    RUN/stats.jsonl                one JSON record per log interval
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from patchgen.config import ConfigError
from patchgen.data_order import (RankBatchSampler, SampleOrder, ShuffledOrder, derive_seed,
                                 micro_batch_index)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "ckpt-"
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)$")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_GLOBAL_RNG_STREAM = 0x6C0B
# Config keys that may change when a run resumes: none of them changes what is trained.
RESUMABLE_KEYS = {"duration", "log_every", "sample_every", "checkpoint_every",
                  "keep_checkpoints", "num_workers", "max_nonfinite", "cache_layouts"}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by every model."""

    duration: int = 2048            # samples (images or patches) seen in total
    batch_size: int = 8             # per process and micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0                 # samples of linear learning-rate warm-up
    lr_decay: int = 0               # samples; beyond them the LR falls as 1/sqrt(seen / lr_decay); 0 = constant
    lr_scale: dict[str, float] = field(default_factory=dict)  # LR multiplier per network name
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999
    mixed_precision: str = "no"     # "no" or "bf16"
    log_every: int = 256            # samples between status lines
    sample_every: int = 0           # samples between sample grids; 0 disables them
    checkpoint_every: int = 1024    # samples between checkpoints
    keep_checkpoints: int = 2
    max_nonfinite: int = 10         # consecutive non-finite steps before the run stops
    num_workers: int = 0            # DataLoader worker processes
    seed: int = 0

    def validate(self) -> None:
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"train.mixed_precision={self.mixed_precision!r}; use 'no' or 'bf16'")
        for name in ("duration", "batch_size", "grad_accum", "log_every", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup", "lr_decay", "sample_every", "num_workers", "grad_clip",
                     "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be in [0, 1)")
        if not isinstance(self.lr_scale, dict):
            raise ConfigError(f"train.lr_scale={self.lr_scale!r} must map network names to "
                              f"factors, e.g. {{discriminator: 2.0}}")
        for name, factor in self.lr_scale.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
                raise ConfigError(f"train.lr_scale.{name}={factor!r} must be a number > 0")


class TrainingTask(Protocol):
    """Interface a model family implements for ``Trainer``.

    A task may also define ``sample_order(batch_size, seed) -> SampleOrder`` to choose the
    data order (for example aspect-ratio buckets); without it the trainer uses
    ``ShuffledOrder``, and ``sample_unit`` (for example "patch") to name a training sample in
    the progress bar; without it a sample is an "img". Phase names are network names: phase
    ``p`` steps ``networks[p]``.
    """

    networks: dict[str, torch.nn.Module]   # trainable networks by name
    ema_network: str                       # name of the network whose EMA is kept
    phases: tuple[str, ...]                # optimizer phases per step, e.g. ("model",)

    def dataset(self) -> torch.utils.data.Dataset: ...

    def num_items(self) -> int: ...

    def loss(self, phase: str, networks: dict[str, torch.nn.Module],
             batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def save_snapshot(self, network: torch.nn.Module, folder: Path) -> None: ...

    def sample_grid(self, network: torch.nn.Module, seed: int) -> np.ndarray | None: ...


@contextlib.contextmanager
def seeded_init(seed: int):
    """Seed the global torch RNG while networks are built, then restore it.

    Weight initialisation in ``torch.nn`` draws from the global generator; seeding it here
    makes the initial weights a function of the run seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class TrainingHalted(RuntimeError):
    """Training ended before ``duration``; the message states why and how to go on."""


class TrainingStopped(TrainingHalted):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


class TrainingInterrupted(TrainingHalted):
    """A stop signal arrived; a checkpoint was written and rerunning resumes."""


# --- run folder ------------------------------------------------------------------------------
def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def checkpoint_samples(path: Path) -> int:
    """Samples seen at checkpoint folder ``ckpt-<n>``."""
    return int(_CHECKPOINT_NAME.match(path.name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first.

    A checkpoint is complete once its temporary folder was renamed to ``ckpt-<n>``;
    temporary folders and the ``.old`` folder of an interrupted replacement are ignored.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and _CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_samples)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary checkpoint and snapshot folders left by a killed run."""
    folder = run_dir / "checkpoints"
    stale = list(folder.glob(".tmp-*")) if folder.is_dir() else []
    stale += [p for p in (run_dir / ".tmp-model",) if p.exists()]
    for path in stale:
        log.info("removing %s left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_run_config(run_dir: Path, config_dict: dict[str, Any], write: bool) -> None:
    """Check that a resumed run uses a compatible config; write the config when ``write``.

    Only keys in ``RESUMABLE_KEYS`` (lengths, intervals, workers) may differ; any other
    difference raises ``ConfigError`` naming each differing key with both values.
    """
    path = run_dir / "config.yaml"
    if path.exists():
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        old, new = flatten_config(saved), flatten_config(config_dict)
        differing = sorted(k for k in set(old) | set(new)
                           if old.get(k) != new.get(k) and k.split(".")[-1] not in RESUMABLE_KEYS)
        if differing:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing)
            raise ConfigError(f"{path} was written with another config ({details}); resume with "
                              f"the same config or choose a new --out folder")
    if write:
        _write_text_atomic(path, yaml.safe_dump(config_dict, sort_keys=False))


# --- random number generator states -----------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Global RNG states of torch (CPU and CUDA), numpy and Python as tensors and numbers.

    The mapping holds only types that ``torch.load(weights_only=True)`` accepts.
    """
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_global_rngs(seed: int) -> None:
    """Seed the global torch, numpy and Python RNGs (a fresh run's starting state)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs from ``capture_rng_state``'s mapping."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()),
                     python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- learning rate ----------------------------------------------------------------------------
def lr_factor(step: int, samples_per_step: int, warmup: int, decay: int) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup`` samples, then constant, or with ``decay`` > 0 an inverse
    square-root decay ``1 / sqrt(seen / decay)`` once ``seen`` exceeds ``decay`` samples.
    Both depend on samples seen, not on the run's duration, so extending ``duration``
    on resume leaves the schedule unchanged.
    """
    seen = (step + 1) * samples_per_step
    factor = min(1.0, seen / warmup) if warmup > 0 else 1.0
    if decay > 0 and seen > decay:
        factor /= math.sqrt(seen / decay)
    return factor


# --- stop signals -----------------------------------------------------------------------------
def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start-up: leave stop signals to the main process, which checkpoints."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


class StopRequest:
    """Record SIGTERM / SIGUSR1 while installed, so the loop can checkpoint and stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received %s: stopping after this step with a checkpoint",
                    signal.Signals(signum).name)
        self.received = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for stop_signal in STOP_SIGNALS:
                self._previous[stop_signal] = signal.signal(stop_signal, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for stop_signal, handler in self._previous.items():
            signal.signal(stop_signal, handler)
        self._previous.clear()


class Trainer:
    """Run a ``TrainingTask`` to ``config.duration`` samples, resuming where a run stopped."""

    def __init__(self, task: TrainingTask, config: TrainConfig, run_dir: Path,
                 full_config: dict[str, Any], device: str | None = None):
        from accelerate import Accelerator

        self.task = task
        self.config = config
        self.run_dir = Path(run_dir)
        cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
        self.is_main = self.accelerator.is_main_process
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.samples_per_step = config.batch_size * config.grad_accum * self.world_size
        self._check_intervals()
        self._check_lr_scale()
        check_run_config(self.run_dir, full_config, write=False)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            check_run_config(self.run_dir, full_config, write=True)
            _remove_stale_temporaries(self.run_dir)
        self.accelerator.wait_for_everyone()
        self._build_optimizers()

    # -- set-up ---------------------------------------------------------------------------
    def _check_intervals(self) -> None:
        """Intervals are in samples and must hold at least one optimizer step."""
        step = self.samples_per_step
        for name in ("duration", "log_every", "checkpoint_every"):
            value = getattr(self.config, name)
            if value < step:
                raise ConfigError(
                    f"train.{name}={value} samples is shorter than one optimizer step of "
                    f"{step} samples (batch_size {self.config.batch_size} x grad_accum "
                    f"{self.config.grad_accum} x {self.world_size} processes); raise it to "
                    f"at least {step}")
        if 0 < self.config.sample_every < step:
            raise ConfigError(f"train.sample_every={self.config.sample_every} samples is shorter "
                              f"than one optimizer step of {step} samples; raise it to at least "
                              f"{step} or set 0 to disable sample grids")

    def _check_lr_scale(self) -> None:
        unknown = sorted(set(self.config.lr_scale) - set(self.task.networks))
        if unknown:
            raise ConfigError(f"train.lr_scale names unknown networks {unknown}; this model "
                              f"trains {sorted(self.task.networks)}")

    def _build_optimizers(self) -> None:
        from diffusers.training_utils import EMAModel

        config = self.config
        self.networks = {}
        self.optimizers = {}
        self.lr_schedulers = {}
        for name, network in self.task.networks.items():
            lr = config.lr * config.lr_scale.get(name, 1.0)
            optimizer = torch.optim.AdamW(network.parameters(), lr=lr,
                                          betas=tuple(config.adam_betas),
                                          weight_decay=config.weight_decay)
            network, optimizer = self.accelerator.prepare(network, optimizer)
            self.networks[name] = network
            self.optimizers[name] = optimizer
            self.lr_schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                optimizer, self._lr_lambda())
        ema_source = self.accelerator.unwrap_model(self.networks[self.task.ema_network])
        self.ema = EMAModel(ema_source.parameters(), decay=config.ema_decay, foreach=True)
        self.images_seen = 0
        self.steps = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.last_checkpoint = -1

    def _lr_lambda(self) -> Callable[[int], float]:
        """LR multiplier by optimizer step; a plain function, so LambdaLR stores no state for it."""
        samples_per_step, warmup, decay = (self.samples_per_step, self.config.warmup,
                                           self.config.lr_decay)

        def factor(step: int) -> float:
            return lr_factor(step, samples_per_step, warmup, decay)
        return factor

    # -- checkpoints ----------------------------------------------------------------------
    def _gather_rng_states(self) -> list[dict[str, Any]]:
        """RNG states of every process, in rank order (a collective call)."""
        state = capture_rng_state()
        if self.world_size == 1:
            return [state]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def _state_dict(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "images_seen": self.images_seen,
            "steps": self.steps,
            "nonfinite_total": self.nonfinite_total,
            "samples_per_step": self.samples_per_step,
            "world_size": self.world_size,
            "next_micro_batch": micro_batch_index(self.steps, 0, self.config.grad_accum,
                                                  self.world_size, 0),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "lr_schedulers": {k: s.state_dict() for k, s in self.lr_schedulers.items()},
            "ema": self.ema.state_dict(),
            "rng": rng_states,
        }

    def _weights_are_finite(self) -> bool:
        for network in self.networks.values():
            for parameter in network.parameters():
                if not torch.isfinite(parameter).all():
                    return False
        return all(torch.isfinite(p).all() for p in self.ema.shadow_params)

    def save_checkpoint(self) -> Path | None:
        """Write the full training state atomically; refuse non-finite weights.

        Every process must call this (RNG states are gathered); the main process writes.
        Returns the checkpoint folder on the main process, else None.
        """
        self.accelerator.wait_for_everyone()
        rng_states = self._gather_rng_states()
        if not self._weights_are_finite():
            log.error("weights are not finite after %d samples; checkpoint not written",
                      self.images_seen)
            return None
        self.last_checkpoint = self.images_seen
        if not self.is_main:
            return None
        folder = self.run_dir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{CHECKPOINT_PREFIX}{self.images_seen:012d}"
        tmp = folder / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, network in self.networks.items():
            weights = self.accelerator.unwrap_model(network).state_dict()
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(self._state_dict(rng_states), tmp / STATE_FILE)
        _atomic_replace_dir(tmp, final)
        for stale in list_checkpoints(self.run_dir)[:-self.config.keep_checkpoints]:
            shutil.rmtree(stale)
        self._save_snapshot()
        log.info("checkpoint %s", final)
        return final

    def _save_snapshot(self) -> None:
        """Write the inference snapshot (EMA weights) to RUN/model atomically."""
        network = self.accelerator.unwrap_model(self.networks[self.task.ema_network])
        self.ema.store(network.parameters())
        self.ema.copy_to(network.parameters())
        try:
            tmp = self.run_dir / ".tmp-model"
            if tmp.exists():
                shutil.rmtree(tmp)
            self.task.save_snapshot(network, tmp)
            (tmp / "training.json").write_text(json.dumps(
                {"images_seen": self.images_seen, "steps": self.steps}, indent=2))
            _atomic_replace_dir(tmp, self.run_dir / "model")
        finally:
            self.ema.restore(network.parameters())

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any. Returns True when resumed."""
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            return False
        latest = checkpoints[-1]
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
        if state["samples_per_step"] != self.samples_per_step:
            raise ConfigError(
                f"{latest} was trained with {state['samples_per_step']} samples per optimizer "
                f"step, now {self.samples_per_step}; resume with the same batch_size x "
                f"grad_accum x processes, or start a new --out folder")
        for name, network in self.networks.items():
            weights = load_file(str(latest / f"{name}.safetensors"))
            self.accelerator.unwrap_model(network).load_state_dict(weights)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.lr_schedulers.items():
            scheduler.load_state_dict(state["lr_schedulers"][name])
        self.ema.load_state_dict(state["ema"])
        self._restore_rng(state["rng"], latest)
        self.images_seen = state["images_seen"]
        self.steps = state["steps"]
        self.nonfinite_total = state["nonfinite_total"]
        self.last_checkpoint = self.images_seen
        self._truncate_stats()
        log.info("resumed from %s (%d samples seen)", latest, self.images_seen)
        return True

    def _restore_rng(self, rng_states: list[dict[str, Any]], checkpoint: Path) -> None:
        if len(rng_states) != self.world_size:
            log.warning("%s was written by %d processes, now %d: each process takes the RNG "
                        "state of rank 0, so the run is not bit-identical to an uninterrupted one",
                        checkpoint, len(rng_states), self.world_size)
            restore_rng_state(rng_states[0])
            return
        restore_rng_state(rng_states[self.rank])

    def _truncate_stats(self) -> None:
        """Drop status records written after the checkpoint a run resumes from."""
        path = self.run_dir / "stats.jsonl"
        if not self.is_main or not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["images_seen"] <= self.images_seen]
        _write_text_atomic(path, "".join(line + "\n" for line in kept))

    # -- the loop -------------------------------------------------------------------------
    def sample_order(self) -> SampleOrder:
        """Return the task's data order, or a shuffled order of its items."""
        make_order = getattr(self.task, "sample_order", None)
        if make_order is not None:
            return make_order(self.config.batch_size, self.config.seed)
        return ShuffledOrder(self.task.num_items(), self.config.batch_size, self.config.seed)

    def _data_loader(self) -> torch.utils.data.DataLoader:
        sampler = RankBatchSampler(self.sample_order(), start_step=self.steps,
                                   grad_accum=self.config.grad_accum,
                                   world_size=self.world_size, rank=self.rank)
        workers = self.config.num_workers
        # The loader draws its workers' base seed from this generator instead of the global
        # RNG, so creating a loader on resume leaves the global RNG state as checkpointed.
        # Samples take their randomness from their keys, not from worker seeds.
        base_seed = torch.Generator().manual_seed(derive_seed(self.config.seed, self.rank))
        return torch.utils.data.DataLoader(self.task.dataset(), batch_sampler=sampler,
                                           num_workers=workers,
                                           persistent_workers=workers > 0,
                                           worker_init_fn=_ignore_stop_signals if workers else None,
                                           generator=base_seed,
                                           pin_memory=torch.cuda.is_available())

    def _count_processes(self, flag: bool) -> int:
        """Count the processes whose ``flag`` is true (a collective call when distributed)."""
        if self.world_size == 1:
            return int(flag)
        count = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return int(self.accelerator.reduce(count, reduction="sum").item())

    def _run_phase(self, phase: str, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float] | None:
        """Run one optimizer step of one phase over the accumulated micro-batches.

        Returns the phase's statistics, or None without an update when a loss or the
        gradient norm is not finite on any process.
        """
        network = self.networks[phase]
        optimizer = self.optimizers[phase]
        optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(network)
            with sync:
                with self.accelerator.autocast():
                    loss, parts = self.task.loss(phase, self.networks, batch)
                if self._count_processes(bool(torch.isfinite(loss).all())) < self.world_size:
                    optimizer.zero_grad(set_to_none=True)
                    return None
                self.accelerator.backward(loss / len(micro_batches))
            for key, value in parts.items():
                stats[key] = stats.get(key, 0.0) + value / len(micro_batches)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(network.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return None
        stats[f"{phase}_grad_norm"] = grad_norm
        optimizer.step()
        self.lr_schedulers[phase].step()
        return stats

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float] | None:
        """Run all phases of one optimizer step, then the EMA update; return None when skipped.

        NOTE: when a later phase is skipped, earlier phases of the same step have already
        updated their networks.
        """
        stats: dict[str, float] = {}
        for phase in self.task.phases:
            phase_stats = self._run_phase(phase, micro_batches)
            if phase_stats is None:
                return None
            stats.update(phase_stats)
        ema_network = self.accelerator.unwrap_model(self.networks[self.task.ema_network])
        self.ema.step(ema_network.parameters())
        return stats

    def _handle_nonfinite(self) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("non-finite loss or gradient at %d samples; step skipped (%d in a row, %d "
                    "in total)", self.images_seen, self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.config.max_nonfinite:
            raise TrainingStopped(
                f"{self.nonfinite_run} non-finite steps in a row at {self.images_seen} samples; "
                f"the last good checkpoint in {self.run_dir / 'checkpoints'} is intact. Lower "
                f"train.lr, check the data, or raise train.max_nonfinite")

    def fit(self) -> dict[str, Any]:
        """Train until ``duration`` samples; returns the last status record.

        Raises ``TrainingStopped`` after ``max_nonfinite`` skipped steps in a row and
        ``TrainingInterrupted`` after a stop signal (with a checkpoint written).
        """
        from tqdm import tqdm

        if not self.resume():
            seed_global_rngs(derive_seed(self.config.seed, self.rank, _GLOBAL_RNG_STREAM))
        logger = StatusLogger(self.run_dir, enabled=self.is_main, images_seen=self.images_seen)
        progress = tqdm(total=self.config.duration,
                        initial=min(self.images_seen, self.config.duration),
                        unit=getattr(self.task, "sample_unit", "img"),
                        disable=not self.is_main, dynamic_ncols=True)
        try:
            with StopRequest() as stop:
                record = self._loop(logger, progress, stop)
        finally:
            progress.close()
            logger.close()
        if self.last_checkpoint != self.images_seen:
            self.save_checkpoint()
        return record

    def _loop(self, logger: "StatusLogger", progress, stop: StopRequest) -> dict[str, Any]:
        """Optimizer steps until ``duration``; one status record per log interval."""
        config = self.config
        record: dict[str, Any] = {"images_seen": self.images_seen, "steps": self.steps}
        if self.images_seen >= config.duration:
            log.info("%s has already seen %d samples (duration %d); nothing to train",
                     self.run_dir, self.images_seen, config.duration)
            return record
        loader = iter(self._data_loader())
        interval = IntervalStats()
        while self.images_seen < config.duration:
            micro_batches = [self._to_device(next(loader)) for _ in range(config.grad_accum)]
            stats = self._train_step(micro_batches)
            before = self.images_seen
            self.images_seen += self.samples_per_step
            self.steps += 1
            progress.update(self.samples_per_step)
            if stats is None:
                self._handle_nonfinite()
            else:
                self.nonfinite_run = 0
                interval.add(stats)

            if self._crossed(before, config.log_every) or self.images_seen >= config.duration:
                record = logger.write(self.images_seen, self.steps, self.nonfinite_total,
                                      self._learning_rates(), self._mean_over_processes(
                                          interval.means()))
                interval = IntervalStats()
            if config.sample_every and self._crossed(before, config.sample_every):
                self._write_samples()
            if self._crossed(before, config.checkpoint_every):
                self.save_checkpoint()
            if self._count_processes(stop.received is not None) > 0:
                self._stop_for_signal(stop)
        return record

    def _mean_over_processes(self, stats: dict[str, float]) -> dict[str, float]:
        """Average interval statistics over processes (a collective call when distributed)."""
        if self.world_size == 1 or not stats:
            return stats
        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64,
                              device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _stop_for_signal(self, stop: StopRequest) -> None:
        if self.last_checkpoint != self.images_seen:
            self.save_checkpoint()
        name = signal.Signals(stop.received).name if stop.received else "a stop signal"
        raise TrainingInterrupted(
            f"stopped by {name} at {self.images_seen} samples after writing a checkpoint; "
            f"rerun the same command to resume")

    def _crossed(self, before: int, interval: int) -> bool:
        return before // interval != self.images_seen // interval

    def _learning_rates(self) -> dict[str, float]:
        """Current LR of every network: ``lr`` for a single one, ``lr_<name>`` for several."""
        rates = {name: float(o.param_groups[0]["lr"]) for name, o in self.optimizers.items()}
        if len(rates) == 1:
            return {"lr": next(iter(rates.values()))}
        return {f"lr_{name}": rate for name, rate in rates.items()}

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _write_samples(self) -> None:
        """Save a grid of EMA samples per label (main process only)."""
        if not self.is_main:
            return
        from PIL import Image

        network = self.accelerator.unwrap_model(self.networks[self.task.ema_network])
        self.ema.store(network.parameters())
        self.ema.copy_to(network.parameters())
        was_training = network.training
        network.eval()
        try:
            grid = self.task.sample_grid(network, seed=self.config.seed)
        finally:
            network.train(was_training)
            self.ema.restore(network.parameters())
        if grid is None:
            return
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(np.clip(grid * 255.0 + 0.5, 0, 255).astype(np.uint8))
        image.save(folder / f"{self.images_seen:012d}.png")


class IntervalStats:
    """Running sums of per-step statistics between two status lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, stats: dict[str, float]) -> None:
        self.steps += 1
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


class StatusLogger:
    """One status line per interval, mirrored to stats.jsonl and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, images_seen: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "stats.jsonl"
        self.started = time.perf_counter()
        self.last_time = self.started
        self.last_images = images_seen
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.debug("tensorboard is not installed; logging to stats.jsonl only")

    def write(self, images_seen: int, steps: int, nonfinite: int, learning_rates: dict[str, float],
              stats: dict[str, float]) -> dict[str, Any]:
        now = time.perf_counter()
        rate = 0.0
        if now > self.last_time:
            rate = (images_seen - self.last_images) / (now - self.last_time)
        self.last_images, self.last_time = images_seen, now
        record = {"images_seen": images_seen, "steps": steps, **learning_rates,
                  "images_per_s": round(rate, 3), "nonfinite_steps": nonfinite,
                  "elapsed_s": round(now - self.started, 2)}
        record.update({k: round(v, 6) for k, v in stats.items()})
        if not self.enabled:
            return record
        line = " ".join(f"{k}={v}" for k, v in record.items())
        log.info(line)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "images_seen":
                    self.tensorboard.add_scalar(key, value, images_seen)
        return record

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
