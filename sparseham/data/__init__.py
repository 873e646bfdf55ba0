"""Data sets and loaders for the training application: files on disk (``files``), fetching them
without a network download where possible (``fetch``), seeded resumable loaders (``loaders``), and
the data sets by name (``datasets``)."""

from sparseham.data.datasets import (
    DATASETS,
    Data,
    DataError,
    DatasetInfo,
    build_data,
    make_synthetic,
    split_indices,
)

__all__ = ["DATASETS", "Data", "DataError", "DatasetInfo", "build_data", "make_synthetic", "split_indices"]
