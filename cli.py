"""femurgen command line: pyramids -> global model -> patch model -> synthesis -> evaluation.

Run as ``python cli.py <command>`` or, after ``pip install -e .``, as ``femurgen <command>``.
Each command validates its options, builds one config object, prints it with
``--dry-run`` and otherwise calls one library function.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

log = logging.getLogger("femurgen")

CONFIG_HELP = ("YAML preset name (cpu-tiny, gpu) or path to a YAML file. "
               "Default: gpu when CUDA is available, else cpu-tiny.")
SET_HELP = "Override a config value by its dotted YAML key, e.g. --set train.lr=2e-4. Repeatable."


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _load_config(cls, stage: str, preset: str | None, overrides: tuple[str, ...]):
    """Load a stage config, turning config errors into click usage errors."""
    from patchgen.config import ConfigError, load_stage_config

    try:
        config, chosen = load_stage_config(cls, stage, preset, overrides)
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint="--config/--set") from error
    if preset is None:
        click.echo(f"using the {chosen} preset for {stage} (no --config given)")
    return config


def _echo_config(config) -> None:
    import yaml

    from patchgen.config import to_dict

    click.echo(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Synthetic native-resolution radiographs from OME-Zarr pyramids."""
    _setup_logging(verbose)


# --- pyramid commands ---
@main.group()
def pyramid() -> None:
    """Build and inspect OME-Zarr pyramid stores of radiographs."""


@pyramid.command("build")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output store folder, e.g. data/store.zarr. Rerunning resumes it.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with a file column (path relative to the CSV) and a label column.")
@click.option("--label-column", default="label", help="Column of --labels that holds the class.")
@click.option("--workers", default=1, type=click.IntRange(1, 256),
              help="Parallel decode-and-write processes.")
def pyramid_build(sources, out, labels, label_column, workers) -> None:
    """Decode radiographs in SOURCES (files or folders) into a pyramid store."""
    from preprocess.build import build_store

    summary = build_store(list(sources), out, labels_csv=labels, label_column=label_column,
                          workers=workers)
    click.echo(str(summary))


@pyramid.command("info")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def pyramid_info(store) -> None:
    """Print counts per label and split, the size range and failures of STORE."""
    from preprocess.store import PyramidStore

    rows = PyramidStore(store).rows()
    click.echo(f"{len(rows)} images")
# --- end pyramid commands ---


# --- training commands ---
def _training_options(function):
    """Options shared by train-global and train-patch."""
    options = [
        click.option("--store", required=True,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Pyramid store made by `pyramid build`."),
        click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Run folder. Rerunning the same command resumes from its newest "
                          "complete checkpoint."),
        click.option("--config", "preset", default=None, help=CONFIG_HELP),
        click.option("--set", "overrides", multiple=True, help=SET_HELP),
        click.option("--duration", type=click.IntRange(1), default=None,
                     help="Training length in images (patches for train-patch) seen; "
                          "overrides train.duration."),
        click.option("--device", default=None,
                     help="torch device, e.g. cpu or cuda:0. Default: the accelerator's choice."),
        click.option("--dry-run", is_flag=True, help="Print the resolved config and stop."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run_training(kind: str, store: Path, out: Path, preset, overrides, duration, device,
                  dry_run: bool) -> None:
    from patchgen.config import ConfigError

    if kind == "global":
        from patchgen.global_model import GlobalConfig as config_class
        from patchgen.global_model import train_global as train
    else:
        from patchgen.patch_model import PatchConfig as config_class
        from patchgen.patch_model import train_patch as train
    overrides = tuple(overrides) + ((f"train.duration={duration}",) if duration else ())
    config = _load_config(config_class, kind, preset, overrides)
    if dry_run:
        _echo_config(config)
        return
    try:
        result = train(store, out, config, device=device)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    click.echo(f"{kind} model: {result}")


@main.command("train-global")
@_training_options
def train_global_command(store, out, preset, overrides, duration, device, dry_run) -> None:
    """Train the low-resolution global layout diffusion model."""
    _run_training("global", store, out, preset, overrides, duration, device, dry_run)


@main.command("train-patch")
@_training_options
def train_patch_command(store, out, preset, overrides, duration, device, dry_run) -> None:
    """Train the coordinate-conditioned patch model (diffusion or GAN)."""
    _run_training("patch", store, out, preset, overrides, duration, device, dry_run)
# --- end training commands ---


# --- synthesize command ---
@main.command("synthesize")
@click.option("--global", "global_run", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run folder of train-global.")
@click.option("--patch", "patch_run", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run folder of train-patch.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for images and their JSON sidecars.")
@click.option("--n", "count", default=2, type=click.IntRange(1), help="Number of images.")
@click.option("--label", default=None,
              help="Class of every image. Default: labels in turn, so each label appears.")
@click.option("--size", default="native",
              help="native (drawn from the training sizes of the label) or HxW in pixels.")
@click.option("--seed", default=0, type=int, help="Run seed; image i uses (seed, i).")
@click.option("--config", "preset", default=None, help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
def synthesize_command(global_run, patch_run, out, count, label, size, seed, preset,
                       overrides) -> None:
    """Synthesize native-size radiographs tile by tile."""
    raise click.UsageError("synthesize is not implemented yet")
# --- end synthesize command ---


# --- eval commands ---
@main.command("eval")
@click.option("--real", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Pyramid store of real radiographs.")
@click.option("--synthetic", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder written by synthesize.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for metrics.json and report.html.")
def eval_command(real, synthetic, out) -> None:
    """Compare real and synthetic radiographs and write a report."""
    raise click.UsageError("eval is not implemented yet")
# --- end eval commands ---


# --- weights commands ---
# --- end weights commands ---


if __name__ == "__main__":
    sys.exit(main())
