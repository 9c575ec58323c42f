"""Exceptions of the preprocess package.

Messages of both classes are written to the store (``failed.csv``), to logs and to the terminal,
so they never contain an input path, a file name or a patient-identifying DICOM attribute.
"""

from __future__ import annotations


class IngestError(Exception):
    """One input file (or one frame of it) could not be turned into a pyramid.

    The build records the message as the failure reason and continues with the next file.
    """


class StoreError(Exception):
    """A store cannot be opened, read or extended as requested.

    Raised for Zarr v2 or mixed v2/v3 metadata, a missing catalog, build options that differ from
    the ones the store was built with, a different salt, or a concurrent build.
    """
