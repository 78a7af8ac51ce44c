"""Datasets as WebDataset shards: ``prepare`` writes them, the reader streams them anywhere."""
from .manifest import DatasetInfo, load_info, shards_for
from .prepare import prepare
from .reader import Stream, batches, denormalize, load_split, sample_per_class, stream
from .sources import SOURCES

__all__ = ["SOURCES", "prepare", "DatasetInfo", "Stream", "load_info", "stream", "shards_for", "load_split",
           "batches", "sample_per_class", "denormalize"]
