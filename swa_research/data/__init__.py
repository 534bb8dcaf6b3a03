"""Data for the framework's runs: one transforms module for every path (:mod:`.transforms`),
data sets held in memory with batched tensor augmentation (:mod:`.memory`), image folders listed,
decoded and cached (:mod:`.folders`), streamed from disk in worker processes
(:mod:`.streaming`), where a data set comes from (:mod:`.sources`), and the run's sets from its
config (:mod:`.loading`). The modules import downwards only: transforms <- memory <- folders <-
sources, streaming <- loading.

The names below are what the rest of the project uses; import them from here."""

from swa_research.data.folders import (
    FolderListing,
    cache_dirs,
    eval_transform,
    list_image_folder,
    resolve_image_size,
    test_split_of,
)
from swa_research.data.loading import Limits, apply_limits, balanced_index, build_data
from swa_research.data.memory import (
    DataSplits,
    ImageSet,
    Preprocess,
    Shard,
    bn_pass_batches,
    eval_batches,
    split_train_val,
    synthetic_images,
    to_device_async,
    train_batches,
)
from swa_research.data.sources import load_datasets

__all__ = ["DataSplits", "FolderListing", "ImageSet", "Limits", "Preprocess", "Shard",
           "apply_limits", "balanced_index", "bn_pass_batches", "build_data", "cache_dirs",
           "eval_batches", "eval_transform", "list_image_folder", "load_datasets",
           "resolve_image_size", "split_train_val", "synthetic_images", "test_split_of",
           "to_device_async", "train_batches"]
