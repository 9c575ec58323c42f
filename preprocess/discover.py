"""Finding the input files of a build in the SRC arguments (files or folders, recursive)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from preprocess.readers import detect_kind


@dataclass(frozen=True)
class SourceFile:
    """One input file.

    Attributes:
        path: the file as reachable from the working directory (SRC joined with the relative part).
        relative: POSIX path relative to the SRC folder it was found in, or the file name for a file
            SRC. It is used only for the key of an unreadable file and never stored.
        kind: reader kind from ``detect_kind``; None for an unsupported file named directly.
    """

    path: Path
    relative: str
    kind: str | None


def discover_sources(sources: list[Path], exclude: list[Path]) -> tuple[list[SourceFile], int]:
    """List the input files of the SRC arguments in a stable order.

    Folders are walked recursively, skipping hidden entries, ``*.zarr`` folders and the ``exclude``
    folders (the output store). A file of unknown kind inside a folder is ignored. A file named
    directly is kept with kind None, so that the build reports it as a failure.

    Args:
        sources: SRC arguments.
        exclude: folders never to enter.
    Returns:
        (files sorted by SRC order then relative path, number of ignored files).
    Raises:
        FileNotFoundError: an SRC does not exist.
    """
    excluded = {path.resolve() for path in exclude}
    files: list[SourceFile] = []
    seen: set[Path] = set()
    ignored = 0
    for source in sources:
        if source.is_file():
            candidates = [(source, source.name)]
        elif source.is_dir():
            candidates = list(_walk(source, excluded))
        else:
            raise FileNotFoundError(f"SRC {source} not found; give existing files or folders")
        for path, relative in candidates:
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            kind = detect_kind(path)
            if kind is None and source.is_dir():
                ignored += 1
                continue
            files.append(SourceFile(path=path, relative=relative, kind=kind))
    return files, ignored


def _walk(folder: Path, excluded: set[Path]):
    """Yield (path, relative POSIX path) of every visible file below ``folder``, sorted."""
    for current, children, names in os.walk(folder):
        current_path = Path(current)
        children[:] = sorted(child for child in children
                             if not child.startswith(".") and not child.endswith(".zarr")
                             and (current_path / child).resolve() not in excluded)
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = current_path / name
            yield path, path.relative_to(folder).as_posix()
