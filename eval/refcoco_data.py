"""Moved to :mod:`eval.refcoco.data`; this module only re-exports it, so that
imports from ``eval.refcoco_data`` keep working."""

from eval.refcoco.data import (
    DATASETS,
    DEFAULT_SPLIT_BY,
    FORMATS,
    SPLITS,
    RefSample,
    default_images_dir,
    detect_format,
    images_folder,
    mdetr_path,
    parquet_files,
    read_mdetr,
    read_parquet,
    read_ref_samples,
    read_refer,
    read_regiontext,
    refer_root,
    samples_from_records,
)

__all__ = [
    "DATASETS",
    "DEFAULT_SPLIT_BY",
    "FORMATS",
    "SPLITS",
    "RefSample",
    "default_images_dir",
    "detect_format",
    "images_folder",
    "mdetr_path",
    "parquet_files",
    "read_mdetr",
    "read_parquet",
    "read_ref_samples",
    "read_refer",
    "read_regiontext",
    "refer_root",
    "samples_from_records",
]
