"""Radiograph ingestion: readers, intensity normalisation, OME-Zarr pyramids, catalog and splits.

Public API used by the other packages:

- ``preprocess.store.PyramidStore`` and ``CatalogRow``: read a store by image id, level and region.
- ``preprocess.build.build_store``: build or resume a store; returns ``BuildSummary``.
- ``preprocess.normalise.to_store_uint16`` / ``from_store_uint16``: float [0, 1] <-> uint16.
- ``preprocess.verify.verify_store`` and ``store_info``: check or describe a store.
"""
