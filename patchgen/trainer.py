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
* a progress bar, one status line per log interval mirrored to ``stats.jsonl`` and to
  TensorBoard when it is installed.

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from patchgen.config import ConfigError
from patchgen.data_order import RankBatchSampler, ShuffledOrder

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "ckpt-"


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


class TrainingTask(Protocol):
    """What a model family supplies to ``Trainer``."""

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


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (too many non-finite steps)."""


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a checkpoint is complete once renamed)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _check_run_config(run_dir: Path, config_dict: dict[str, Any]) -> None:
    """Write the run's config, or check that a resumed run uses a compatible one."""
    path = run_dir / "config.yaml"
    if not path.exists():
        _write_text_atomic(path, yaml.safe_dump(config_dict, sort_keys=False))
        return
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    free_keys = {"duration", "log_every", "sample_every", "checkpoint_every",
                 "keep_checkpoints", "num_workers", "max_nonfinite"}

    def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    old, new = flatten(saved), flatten(config_dict)
    differing = sorted(k for k in set(old) | set(new)
                       if old.get(k) != new.get(k) and k.split(".")[-1] not in free_keys)
    if differing:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing)
        raise ConfigError(f"{run_dir} was started with another config ({details}); resume with "
                          f"the same config or choose a new --out folder")
    _write_text_atomic(path, yaml.safe_dump(config_dict, sort_keys=False))


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
        self.samples_per_step = config.batch_size * config.grad_accum * self.world_size
        self._check_intervals()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _check_run_config(self.run_dir, full_config)
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
            raise ConfigError(f"train.sample_every={self.config.sample_every} is shorter than "
                              f"one optimizer step of {step} samples")

    def _build_optimizers(self) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        config = self.config
        self.networks = {}
        self.optimizers = {}
        self.lr_schedulers = {}
        warmup_steps = math.ceil(config.warmup / self.samples_per_step)
        for name, network in self.task.networks.items():
            optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr,
                                          betas=tuple(config.adam_betas),
                                          weight_decay=config.weight_decay)
            network, optimizer = self.accelerator.prepare(network, optimizer)
            self.networks[name] = network
            self.optimizers[name] = optimizer
            self.lr_schedulers[name] = get_scheduler("constant_with_warmup", optimizer,
                                                     num_warmup_steps=warmup_steps)
        ema_source = self.accelerator.unwrap_model(self.networks[self.task.ema_network])
        self.ema = EMAModel(ema_source.parameters(), decay=config.ema_decay)
        self.images_seen = 0
        self.steps = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0

    # -- checkpoints ----------------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        state = {
            "images_seen": self.images_seen,
            "steps": self.steps,
            "nonfinite_total": self.nonfinite_total,
            "samples_per_step": self.samples_per_step,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "lr_schedulers": {k: s.state_dict() for k, s in self.lr_schedulers.items()},
            "ema": self.ema.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _weights_are_finite(self) -> bool:
        for network in self.networks.values():
            for parameter in network.parameters():
                if not torch.isfinite(parameter).all():
                    return False
        return all(torch.isfinite(p).all() for p in self.ema.shadow_params)

    def save_checkpoint(self) -> Path | None:
        """Write the full training state atomically; refuse non-finite weights."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        if not self._weights_are_finite():
            log.error("weights are not finite after %d samples; checkpoint not written",
                      self.images_seen)
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
        torch.save(self._state_dict(), tmp / STATE_FILE)
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
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.images_seen = state["images_seen"]
        self.steps = state["steps"]
        self.nonfinite_total = state["nonfinite_total"]
        self._truncate_stats()
        log.info("resumed from %s (%d samples seen)", latest, self.images_seen)
        return True

    def _truncate_stats(self) -> None:
        """Drop status records written after the checkpoint a run resumes from."""
        path = self.run_dir / "stats.jsonl"
        if not self.is_main or not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["images_seen"] <= self.images_seen]
        _write_text_atomic(path, "".join(line + "\n" for line in kept))

    # -- the loop -------------------------------------------------------------------------
    def _data_loader(self) -> torch.utils.data.DataLoader:
        order = ShuffledOrder(self.task.num_items(), self.config.batch_size, self.config.seed)
        sampler = RankBatchSampler(order, start_step=self.steps, grad_accum=self.config.grad_accum,
                                   world_size=self.world_size,
                                   rank=self.accelerator.process_index)
        workers = self.config.num_workers
        return torch.utils.data.DataLoader(self.task.dataset(), batch_sampler=sampler,
                                           num_workers=workers,
                                           persistent_workers=workers > 0,
                                           pin_memory=torch.cuda.is_available())

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if torch.isfinite(loss).all() else 0.0],
                            device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.world_size)

    def _run_phase(self, phase: str, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float] | None:
        """One optimizer step of one phase over the accumulated micro-batches."""
        network = self.networks[phase]
        optimizer = self.optimizers[phase]
        optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(network)
            with sync, self.accelerator.autocast():
                loss, parts = self.task.loss(phase, self.networks, batch)
            if not self._all_finite(loss):
                optimizer.zero_grad(set_to_none=True)
                return None
            self.accelerator.backward(loss / len(micro_batches))
            for key, value in parts.items():
                stats[key] = stats.get(key, 0.0) + value / len(micro_batches)
        if self.config.grad_clip > 0:
            stats[f"{phase}_grad_norm"] = float(
                self.accelerator.clip_grad_norm_(network.parameters(), self.config.grad_clip))
        optimizer.step()
        self.lr_schedulers[phase].step()
        return stats

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float] | None:
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
        log.warning("non-finite loss at %d samples; step skipped (%d in a row, %d in total)",
                    self.images_seen, self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.config.max_nonfinite:
            raise TrainingStopped(
                f"{self.nonfinite_run} non-finite steps in a row at {self.images_seen} samples; "
                f"the last good checkpoint in {self.run_dir / 'checkpoints'} is intact. Lower "
                f"train.lr, check the data, or raise train.max_nonfinite")

    def fit(self) -> dict[str, Any]:
        """Train until ``duration`` samples; returns the last status record."""
        from tqdm import tqdm

        self.resume()
        config = self.config
        logger = StatusLogger(self.run_dir, enabled=self.is_main, images_seen=self.images_seen)
        loader = iter(self._data_loader())
        progress = tqdm(total=config.duration, initial=min(self.images_seen, config.duration),
                        unit="img", disable=not self.is_main, dynamic_ncols=True)
        interval_stats: dict[str, float] = {}
        interval_steps = 0
        last_record: dict[str, Any] = {"images_seen": self.images_seen}
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
                interval_steps += 1
                for key, value in stats.items():
                    interval_stats[key] = interval_stats.get(key, 0.0) + value
            if self._crossed(before, config.log_every) or self.images_seen >= config.duration:
                means = {k: v / max(interval_steps, 1) for k, v in interval_stats.items()}
                last_record = logger.write(self.images_seen, self.steps, self.nonfinite_total,
                                           self._lr(), means)
                interval_stats, interval_steps = {}, 0
            if config.sample_every and self._crossed(before, config.sample_every):
                self._write_samples()
            if self._crossed(before, config.checkpoint_every):
                self.save_checkpoint()
        progress.close()
        if not list_checkpoints(self.run_dir) or \
                int(list_checkpoints(self.run_dir)[-1].name[len(CHECKPOINT_PREFIX):]) != self.images_seen:
            self.save_checkpoint()
        logger.close()
        return last_record

    def _crossed(self, before: int, interval: int) -> bool:
        return before // interval != self.images_seen // interval

    def _lr(self) -> float:
        first = next(iter(self.optimizers.values()))
        return float(first.param_groups[0]["lr"])

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
        try:
            grid = self.task.sample_grid(network, seed=self.config.seed)
        finally:
            self.ema.restore(network.parameters())
        if grid is None:
            return
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(np.clip(grid * 255.0 + 0.5, 0, 255).astype(np.uint8))
        image.save(folder / f"{self.images_seen:012d}.png")


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

    def write(self, images_seen: int, steps: int, nonfinite: int, lr: float,
              stats: dict[str, float]) -> dict[str, Any]:
        now = time.perf_counter()
        rate = 0.0
        if now > self.last_time:
            rate = (images_seen - self.last_images) / (now - self.last_time)
        self.last_images, self.last_time = images_seen, now
        record = {"images_seen": images_seen, "steps": steps, "lr": lr,
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


def config_as_dict(config: Any) -> dict[str, Any]:
    """Plain mapping of a dataclass config (tuples as lists) for YAML and JSON."""
    from patchgen.config import to_dict
    return to_dict(config) if dataclasses.is_dataclass(config) else dict(config)


SampleFunction = Callable[[torch.nn.Module, int], np.ndarray | None]
