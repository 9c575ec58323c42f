"""``build_store``: input files -> OME-Zarr pyramid store with catalog, splits and failure list.

Steps:

1. Find the input files, read the label table, check the salt and the store.
2. Lock the store, delete leftovers of interrupted builds, read the images already present.
3. Ingest every file in worker processes (``ingest.ingest_file``). Files whose images are all
   present (same content hash, same salt) are skipped without decoding. When a worker dies (a
   decoder crash, the out-of-memory killer), the files that were running are retried one at a
   time in a fresh process, so only the file that kills its process fails.
4. Rewrite ``catalog.csv`` (every 30 s and at the end) and ``failed.csv`` atomically, and the
   ``--manifest`` file when one was requested.

Privacy: the store, the logs and the summary name files only by their file key (``sha256:`` and
16 hex digits of the content hash, which ``sha256sum`` reproduces). The real paths are written
only to the manifest, which must lie outside the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocess import privacy, pyramid
from preprocess.catalog import (CATALOG_NAME, FAILED_NAME, UNLABELED, CatalogRow, Failure,
                                atomic_write_text, read_catalog, row_from_record, write_catalog,
                                write_failures)
from preprocess.discover import SourceFile, discover_sources
from preprocess.errors import StoreError
from preprocess.ingest import FileResult, FileTask, IngestConfig, ingest_file
from preprocess.labels import LabelTable
from preprocess.readers import ReadOptions
from preprocess.splits import SplitFractions, assign_splits
from preprocess.store import PARTIAL_FOLDER
from preprocess.writer import (ChunkLayout, build_lock, layout_options, prepare_store,
                               read_image_records, remove_partial_images)

# Max number of unmatched label-table rows that the build summary lists by file value.
UNMATCHED_SHOWN = 5
# Patient splits of the last complete build; pseudonymous ids only, as in catalog.csv.
SPLITS_NAME = "patient_splits.json"

log = logging.getLogger(__name__)

CATALOG_INTERVAL_S = 30.0
Work = Callable[[FileTask, IngestConfig], FileResult]
WORKER_PRELOAD = ["preprocess.build", "preprocess.readers.dicom", "preprocess.readers.raster",
                  "torch", "numcodecs.blosc"]


@dataclass(frozen=True)
class BuildOptions:
    """Options of ``build_store`` beyond sources, output, labels and workers.

    Attributes:
        file_column, patient_column, site_column: label-table columns (file path relative to the
            table; optional patient identifier; optional site name).
        voi: "first" or "none", see ``ReadOptions``.
        max_megapixels: size limit per image, checked from the header.
        multiframe: "each" or "refuse".
        h5_dataset: dataset path inside HDF5 files.
        spacing_mm: resample every image to this isotropic spacing (mm); None keeps native.
        min_size: the pyramid ends at the first level with long side <= min_size pixels.
        chunk_size, shard_size, compression, compression_level: see ``ChunkLayout``.
        split: train/val/test fractions (``SplitFractions`` or text "0.8,0.1,0.1").
        split_seed: seed of the patient split.
        salt: key of the pseudonymous ids; None reads the FEMURGEN_SALT environment variable.
        manifest: CSV outside the store that maps file keys and image ids to input paths.
    """

    file_column: str = "file"
    patient_column: str | None = None
    site_column: str | None = None
    voi: str = "first"
    max_megapixels: float = 60.0
    multiframe: str = "each"
    h5_dataset: str | None = None
    spacing_mm: float | None = None
    min_size: int = pyramid.DEFAULT_MIN_SIZE
    chunk_size: int = 128
    shard_size: int = 4096
    compression: str = "blosc-zstd"
    compression_level: int = 3
    split: SplitFractions | str = field(default_factory=SplitFractions)
    split_seed: int = 0
    salt: str | None = field(default=None, repr=False)
    manifest: Path | None = None

    def split_options(self) -> dict[str, Any]:
        """Return the split fractions and seed as a JSON-ready mapping."""
        fractions = self.fractions()
        return {"train": fractions.train, "val": fractions.val, "test": fractions.test,
                "seed": self.split_seed}

    def fractions(self) -> SplitFractions:
        """Return the split fractions, parsing text if needed."""
        return self.split if isinstance(self.split, SplitFractions) else \
            SplitFractions.parse(self.split)

    def layout(self) -> ChunkLayout:
        """Return the chunk layout."""
        return ChunkLayout(self.chunk_size, self.shard_size, self.compression,
                           self.compression_level)

    def pixel_options(self) -> dict[str, Any]:
        """Return the options that change stored pixels or arrays (fixed for a store's life)."""
        return {"voi": self.voi, "spacing_mm": self.spacing_mm, "min_size": self.min_size,
                "h5_dataset": self.h5_dataset, **layout_options(self.layout())}


@dataclass
class BuildSummary:
    """Counts and failures of one build.

    Attributes:
        store: the store folder.
        built: images written by this build.
        skipped: images that were already in the store.
        failed: files (or frames) that failed, with reasons.
        ignored: files in SRC folders of unknown type.
        unmatched_label_rows: label-table rows that matched no input file.
        unmatched_label_files: the file values of the first of those rows, for the console only
            (they are the user's paths and never go into the store).
        split_counts: catalog images per split.
        label_counts: catalog images per label.
        megapixels: level-0 megapixels written by this build.
        seconds: wall time.
        moved_split: (image id, split before, split now) of images already in the store
            whose split this build changed.
    """

    store: Path
    built: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    ignored: int = 0
    unmatched_label_rows: int = 0
    unmatched_label_files: list[str] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)
    megapixels: float = 0.0
    seconds: float = 0.0
    moved_split: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def images(self) -> int:
        """Number of images in the catalog."""
        return sum(self.split_counts.values())

    def exit_code(self, strict: bool) -> int:
        """Return 1 when the store contains no image, or when ``strict`` and any file failed."""
        return 1 if self.images == 0 or (strict and self.failed) else 0

    def __str__(self) -> str:
        rate = self.megapixels / self.seconds if self.seconds else 0.0
        lines = [f"store {self.store}: {self.images} images "
                 f"({', '.join(f'{name} {count}' for name, count in self.split_counts.items())})",
                 f"built {self.built} ({self.megapixels:.1f} megapixels, {rate:.1f} MP/s), "
                 f"skipped {self.skipped} already present, failed {len(self.failed)}, "
                 f"ignored {self.ignored} files of unknown type, in {self.seconds:.1f} s",
                 "labels: " + ", ".join(f"{name} {count}" for name, count in
                                        sorted(self.label_counts.items()))]
        if self.unmatched_label_rows:
            lines.append(self._unmatched_line())
        if self.failed:
            lines.append(f"failed files (keys are sha256 prefixes of the file content; see "
                         f"{self.store / FAILED_NAME}):")
            lines.extend(f"  {item.file} ({item.kind}): {item.reason}" for item in self.failed)
        if self.moved_split:
            image_id, before, after = self.moved_split[0]
            lines.append(f"WARNING: {len(self.moved_split)} images changed split (e.g. {image_id}: "
                         f"{before} -> {after}) because every patient was assigned again (another "
                         f"--split or --split-seed, or no complete earlier build); models "
                         f"trained before this build may have seen images that are now in val "
                         f"or test, so retrain them")
        if self.images == 0:
            lines.append("the store contains no image: every input file failed or was ignored; fix "
                         "the failures above or point SOURCES at radiographs")
        return "\n".join(lines)

    def _unmatched_line(self) -> str:
        """Return the line naming the first label-table rows that matched no input file."""
        line = f"{self.unmatched_label_rows} label-table rows matched no input file"
        if not self.unmatched_label_files:
            return line
        more = self.unmatched_label_rows - len(self.unmatched_label_files)
        line += ": " + ", ".join(self.unmatched_label_files)
        return line + (f" and {more} more" if more > 0 else "")


def build_store(sources: list[Path], out: Path, labels_csv: Path | None = None,
                label_column: str = "label", workers: int = 1,
                progress: Callable[[int, int], None] | None = None,
                **options: Any) -> BuildSummary:
    """Build or resume a pyramid store from radiograph files.

    Args:
        sources: files or folders (searched recursively).
        out: the store folder; rerunning with the same arguments resumes it.
        labels_csv: label table; without it every image is labelled "unlabeled".
        label_column: column of ``labels_csv`` holding the class.
        workers: parallel worker processes; 0 runs in this process (no crash isolation).
        progress: called as progress(files done, files total) after each file.
        **options: fields of :class:`BuildOptions`.
    Returns:
        BuildSummary. Per-file failures are recorded in it and not raised.
    Raises:
        ValueError: invalid options, label table, missing salt or no input files.
        StoreError: ``out`` is not a compatible store, or another build has locked it.
    """
    started = time.perf_counter()
    settings = _parse_options(options)
    sources = [Path(source) for source in sources]
    out = Path(out)
    salt = privacy.resolve_salt(settings.salt)
    table = _load_table(labels_csv, label_column, settings)
    files, ignored = discover_sources(sources, exclude=[out])
    _check_inputs_found(files, ignored, sources)
    _check_salt_needed(salt, files, settings)
    _check_manifest_path(settings.manifest, out)
    config = IngestConfig(store=str(out), read=ReadOptions(
        voi=settings.voi, max_megapixels=settings.max_megapixels, h5_dataset=settings.h5_dataset,
        multiframe=settings.multiframe, salt=salt), layout=settings.layout(),
        min_size=settings.min_size, spacing_mm=settings.spacing_mm)

    with build_lock(out):
        prepare_store(out, settings.pixel_options())
        removed = remove_partial_images(out)
        if removed:
            log.info("removed %d partial images left by an interrupted build", removed)
        records = read_image_records(out)
        _check_salt_matches(records, salt, out)
        tasks = [_make_task(index, source, table, settings, salt)
                 for index, source in enumerate(files)]
        log.info("%d input files (%d ignored), %d images already in %s", len(files), ignored,
                 len(records), out)
        run = _BuildRun(out, records, settings, len(tasks), progress)
        complete = False
        try:
            _run_tasks(tasks, config, workers, run.add)
            complete = True
        finally:
            run.finish(files, settings.manifest, complete)

    summary = run.summary(ignored, table.unmatched_count() if table else 0)
    if table is not None:
        summary.unmatched_label_files = table.unmatched_files()[:UNMATCHED_SHOWN]
    summary.seconds = time.perf_counter() - started
    log.info("built %d, skipped %d, failed %d in %.1f s", summary.built, summary.skipped,
             len(summary.failed), summary.seconds)
    if summary.moved_split:
        log.warning("%d images already in %s changed split; retrain models trained before "
                    "this build", len(summary.moved_split), out)
    return summary


def _parse_options(options: dict[str, Any]) -> BuildOptions:
    """Return BuildOptions, turning unknown names into a ValueError that lists the valid ones."""
    names = {item.name for item in dataclasses.fields(BuildOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown build options {unknown}; valid: {sorted(names)}")
    settings = BuildOptions(**options)
    settings.fractions()
    settings.layout()
    if settings.spacing_mm is not None and not settings.spacing_mm > 0:
        raise ValueError(f"spacing_mm={settings.spacing_mm} is invalid; use a value > 0 (mm)")
    if settings.min_size < 1:
        raise ValueError(f"min_size={settings.min_size} is invalid; use 1 or more pixels")
    ReadOptions(voi=settings.voi, max_megapixels=settings.max_megapixels,
                multiframe=settings.multiframe)
    return settings


def _load_table(labels_csv: Path | None, label_column: str,
                settings: BuildOptions) -> LabelTable | None:
    """Read the label table, or return None without one."""
    if labels_csv is None:
        if settings.patient_column or settings.site_column:
            raise ValueError("--patient-column and --site-column need --labels")
        return None
    return LabelTable(Path(labels_csv), file_column=settings.file_column,
                      label_column=label_column, patient_column=settings.patient_column,
                      site_column=settings.site_column)


def _check_inputs_found(files: list[SourceFile], ignored: int, sources: list[Path]) -> None:
    """Raise ValueError when the sources contain no input file, before any store is created."""
    if files:
        return
    others = f" ({ignored} files of other types ignored)" if ignored else ""
    raise ValueError(f"no DICOM, PNG, JPEG, TIFF, HDF5 or slide files found in SOURCES "
                     f"{', '.join(str(source) for source in sources)}{others}; check the path")


def _check_salt_needed(salt: bytes | None, files: list[SourceFile],
                       settings: BuildOptions) -> None:
    """Raise ValueError when patient identifiers would be hashed without a salt."""
    if salt is not None:
        return
    if settings.patient_column:
        reason = "--patient-column holds patient identifiers"
    elif any(source.kind == "dicom" for source in files):
        reason = "DICOM inputs carry PatientID"
    else:
        return
    raise ValueError(f"{reason}, which are stored only as salted hashes: pass --salt TEXT or set "
                     f"{privacy.SALT_ENV_VAR} (keep the same salt for every build of a store)")


def _check_manifest_path(manifest: Path | None, out: Path) -> None:
    """Raise ValueError when the manifest would be written inside the store."""
    if manifest is None:
        return
    store, target = out.resolve(), Path(manifest).resolve()
    if target == store or store in target.parents:
        raise ValueError(f"--manifest {manifest} is inside the store {out}; the store must hold "
                         "no input paths, so write the manifest elsewhere")


def _check_salt_matches(records: dict[str, dict[str, Any]], salt: bytes | None, out: Path) -> None:
    """Raise StoreError when the store's image ids were made with another salt."""
    for image_id, record in records.items():
        expected = privacy.image_id(str(record.get("content_sha256")), int(record.get("frame", 0)),
                                    salt)
        if expected != image_id:
            raise StoreError(f"store {out} was built with another salt (image ids differ); pass "
                             f"the same --salt or {privacy.SALT_ENV_VAR}, or use a new --out")


def _make_task(index: int, source: SourceFile, table: LabelTable | None,
               settings: BuildOptions, salt: bytes | None) -> FileTask:
    """Return the task of one file with its label-table values (pseudonymised)."""
    label, site, patient = UNLABELED, None, None
    if table is not None:
        entry = table.lookup(source.path)
        if entry is None:
            return FileTask(index, str(source.path), source.relative, source.kind, label="",
                            site=None, table_patient_id=None)
        label = entry.label
        site = privacy.site_id(entry.site, salt) if entry.site else None
        patient = privacy.patient_id(entry.patient, "column", salt) if entry.patient else None
    return FileTask(index, str(source.path), source.relative, source.kind, label, site, patient)


def _ingest_or_reject(task: FileTask, config: IngestConfig) -> FileResult:
    """Ingest a file; fail it when the label table has no row for it or on an unexpected error.

    Unexpected exceptions (bugs, codec or file-system errors) fail only this file; their message
    is scrubbed of the path like reader errors.
    """
    kind = task.kind or "unknown"
    if not task.label:
        key = _file_key_for(task, config)
        reason = ("no row of the label table matches this file (by path relative to the "
                  "table's folder, or by file name)")
        return FileResult(task.index, key, kind, failures=[Failure(key, kind, reason)])
    try:
        return ingest_file(task, config)
    except Exception as error:  # noqa: BLE001 - one file must not stop the build
        key = _file_key_for(task, config)
        message = privacy.scrub_path(f"internal error ({type(error).__name__}: {error})",
                                     Path(task.path))
        log.debug("internal error on %s", key, exc_info=True)
        return FileResult(task.index, key, kind, failures=[Failure(key, kind, message)])


def _run_tasks(tasks: list[FileTask], config: IngestConfig, workers: int,
               on_result: Callable[[FileResult], None], work: Work | None = None) -> None:
    """Run all tasks in this process (workers=0) or in a pool, isolating crashing files.

    Args:
        work: the function run per task (``_ingest_or_reject``; tests pass one that crashes).
    """
    work = work or _ingest_or_reject
    if workers <= 0:
        with _one_thread_each():
            for task in tasks:
                on_result(work(task, config))
        return
    pending = list(tasks)
    while pending:
        pending, suspects = _run_pool(pending, config, workers, on_result, work)
        for task in suspects:
            _run_isolated(task, config, on_result, work)


def _run_pool(tasks: list[FileTask], config: IngestConfig, workers: int,
              on_result: Callable[[FileResult], None],
              work: Work) -> tuple[list[FileTask], list[FileTask]]:
    """Run tasks in a process pool until done or until a worker dies.

    Returns:
        (tasks to retry in a new pool, tasks that were running when a worker died).
    """
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=_context(),
                               initializer=_init_worker)
    try:
        futures = {pool.submit(work, task, config): task for task in tasks}
        outstanding: set[Future[FileResult]] = set(futures)
        while outstanding:
            running = {future for future in outstanding if future.running()}
            done, outstanding = wait(outstanding, return_when=FIRST_COMPLETED)
            running |= {future for future in outstanding if future.running()}
            broken = [future for future in done if _finish(future, on_result)]
            if broken:
                return _split_after_crash(futures, outstanding | set(broken), running)
        return [], []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finish(future: Future[FileResult], on_result: Callable[[FileResult], None]) -> bool:
    """Pass a finished future's result on; return True when its worker process died."""
    error = future.exception()
    if isinstance(error, BrokenProcessPool):
        return True
    if error is not None:
        raise error
    on_result(future.result())
    return False


def _split_after_crash(futures: dict[Future[FileResult], FileTask], unfinished: set[Future],
                       running: set[Future]) -> tuple[list[FileTask], list[FileTask]]:
    """Sort the unfinished tasks of a broken pool into (retry in a pool, retry one at a time)."""
    suspects = {futures[future].index for future in running}
    retry, alone = [], []
    for future in unfinished:
        task = futures[future]
        (alone if task.index in suspects or not suspects else retry).append(task)
    log.warning("a worker process died; retrying %d files one at a time", len(alone))
    return sorted(retry, key=lambda task: task.index), sorted(alone, key=lambda task: task.index)


def _run_isolated(task: FileTask, config: IngestConfig,
                  on_result: Callable[[FileResult], None], work: Work) -> None:
    """Run one task in its own process; a crash becomes the file's failure."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=_context(), initializer=_init_worker)
    try:
        future = pool.submit(work, task, config)
        if not _finish(future, on_result):
            return
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    key = _file_key_for(task, config)
    reason = "the decoding process died (decoder crash or out of memory)"
    on_result(FileResult(task.index, key, task.kind or "unknown",
                         failures=[Failure(key, task.kind or "unknown", reason)]))


def _file_key_for(task: FileTask, config: IngestConfig) -> str:
    """Return the file key of a task without decoding it."""
    try:
        return privacy.content_file_key(privacy.file_sha256(Path(task.path)))
    except OSError:
        return privacy.path_file_key(task.relative, config.salt)


def _context() -> multiprocessing.context.BaseContext:
    """Return the forkserver context, preloading the decoding modules once for all workers.

    forkserver rather than fork: a parent that already ran torch or zarr threads must not fork.
    Without the preload every worker imported torch itself, several seconds each.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


@contextlib.contextmanager
def _one_thread_each() -> Iterator[None]:
    """Run torch and Blosc on one thread while files are ingested in this process.

    The downsampling and compression calls are small; with several threads on a busy machine
    they spent more time waiting for each other than computing. The counts are restored after.
    """
    import numcodecs.blosc
    import torch

    previous_torch = torch.get_num_threads()
    previous_blosc = numcodecs.blosc.set_nthreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous_torch)
        numcodecs.blosc.set_nthreads(previous_blosc)


def _init_worker() -> None:
    """Use one thread per worker process: the pool provides the parallelism."""
    import numcodecs.blosc
    import torch

    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)


class _BuildRun:
    """Collects results of one build and writes catalog, failures and manifest."""

    def __init__(self, store: Path, records: dict[str, dict[str, Any]], settings: BuildOptions,
                 total: int, progress: Callable[[int, int], None] | None) -> None:
        self.store = store
        self.records = dict(records)
        self.settings = settings
        self.total = total
        self.progress = progress
        self.results: dict[int, FileResult] = {}
        self.owners: dict[str, int] = {}
        self.last_catalog = time.monotonic()
        # Splits before this build, to report images that change split.
        catalog = store / CATALOG_NAME
        self.previous_splits = {row.image_id: row.split for row in read_catalog(catalog)} \
            if catalog.is_file() else {}
        self.kept_patient_splits = read_kept_splits(store, settings.split_options())

    def add(self, result: FileResult) -> None:
        """Record one file's result, log its failures and write the catalog now and then."""
        self.results[result.index] = result
        for record in result.records:
            self._keep_record(record, result.index)
        for failure in result.failures:
            log.warning("failed %s (%s): %s", failure.file, failure.kind, failure.reason)
        if self.progress is not None:
            self.progress(len(self.results), self.total)
        if time.monotonic() - self.last_catalog > CATALOG_INTERVAL_S:
            self.write_catalog()

    def _keep_record(self, record: dict[str, Any], index: int) -> None:
        """Store a record; of files with identical content, the first in file order wins.

        Results arrive in any order from the workers, so the file order keeps the catalog the same
        from run to run.
        """
        image_id = record["image_id"]
        owner = self.owners.get(image_id)
        if owner is not None and owner != index and \
                self.records[image_id].get("label") != record.get("label"):
            log.warning("files with identical content (%s) have the labels %r and %r; the "
                        "catalog uses the first file's", image_id,
                        self.records[image_id].get("label"), record.get("label"))
        if owner is not None and owner < index:
            return
        self.owners[image_id] = index
        self.records[image_id] = record

    def catalog_rows(self) -> list[CatalogRow]:
        """Return catalog rows of all images, sorted by image id, with patient splits."""
        patient_labels: dict[str, list[str]] = {}
        for record in self.records.values():
            patient_labels.setdefault(record["patient_id"], []).append(
                record.get("label") or UNLABELED)
        new_patients = {patient: labels for patient, labels in patient_labels.items()
                        if patient not in self.kept_patient_splits}
        splits = assign_splits(new_patients, self.settings.fractions(), self.settings.split_seed)
        splits.update({patient: split for patient, split in self.kept_patient_splits.items()
                       if patient in patient_labels})
        return [row_from_record(self.records[image_id], splits[self.records[image_id]
                                                                ["patient_id"]])
                for image_id in sorted(self.records)]

    def write_catalog(self) -> None:
        """Rewrite catalog.csv atomically."""
        write_catalog(self.store / CATALOG_NAME, self.catalog_rows())
        self.last_catalog = time.monotonic()

    def failures(self) -> list[Failure]:
        """Return this build's failures sorted by file key."""
        items = [failure for result in self.results.values() for failure in result.failures]
        return sorted(items, key=lambda item: (item.file, item.reason))

    def finish(self, files: list[SourceFile], manifest: Path | None, complete: bool) -> None:
        """Write catalog.csv, failed.csv, the manifest and, when ``complete``, the splits."""
        rows = self.catalog_rows()
        write_catalog(self.store / CATALOG_NAME, rows)
        if complete:
            write_kept_splits(self.store, self.settings.split_options(), rows)
        write_failures(self.store / FAILED_NAME, self.failures())
        with contextlib.suppress(OSError):
            (self.store / PARTIAL_FOLDER).rmdir()  # only when empty: no worker is writing
        if manifest is not None:
            atomic_write_text(Path(manifest), _manifest_text(files, self.results))

    def summary(self, ignored: int, unmatched_rows: int) -> BuildSummary:
        """Return the build summary."""
        rows = self.catalog_rows()
        results = self.results.values()
        return BuildSummary(
            store=self.store, built=sum(len(result.built) for result in results),
            skipped=sum(len(result.skipped) for result in results), failed=self.failures(),
            ignored=ignored, unmatched_label_rows=unmatched_rows,
            split_counts={name: count for name, count in sorted(Counter(row.split for row in
                                                                        rows).items())},
            label_counts=dict(Counter(row.label for row in rows)),
            megapixels=sum(result.megapixels for result in results),
            moved_split=[(row.image_id, self.previous_splits[row.image_id], row.split)
                         for row in rows if self.previous_splits.get(row.image_id, row.split)
                         != row.split])


def read_kept_splits(store: Path, split_options: dict[str, Any]) -> dict[str, str]:
    """Return {patient id: split} of the last complete build when it used ``split_options``.

    Patients in it keep their split, so adding images never moves a training patient into
    val or test. Another --split or --split-seed (or no record) returns an empty mapping,
    and every patient is assigned again.
    """
    path = store / SPLITS_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s cannot be read; assigning every patient's split again", path)
        return {}
    if not isinstance(record, dict) or record.get("options") != split_options:
        return {}
    patients = record.get("patients")
    return dict(patients) if isinstance(patients, dict) else {}


def write_kept_splits(store: Path, split_options: dict[str, Any],
                      rows: list[CatalogRow]) -> None:
    """Write the split options and {patient id: split} of a complete build atomically."""
    record = {"options": split_options,
              "patients": {row.patient_id: row.split for row in rows}}
    atomic_write_text(store / SPLITS_NAME, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _manifest_text(files: list[SourceFile], results: dict[int, FileResult]) -> str:
    """Return the manifest CSV: one row per input file with its key, ids, status and path."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "kind", "status", "image_ids", "reason", "path"])
    for index, source in enumerate(files):
        result = results.get(index)
        if result is None:
            writer.writerow(["", source.kind or "", "not processed", "", "", str(source.path)])
            continue
        status = "failed" if result.failures and not result.records else (
            "built" if result.built else "skipped")
        image_ids = ";".join(record["image_id"] for record in result.records)
        reasons = "; ".join(failure.reason for failure in result.failures)
        writer.writerow([result.file_key, result.kind, status, image_ids, reasons,
                         str(source.path)])
    return buffer.getvalue()
