"""Data: the shard format, the loader pipeline, and the decoding of raw samples into dict batches."""

from contrastive.data.pipeline import DataPosition, ShardDataset, batches, make_loader
from contrastive.data.shards import DataError, Shard, ShardWriter, list_shards
from contrastive.data.sources import Source, load_sources

__all__ = [
    "DataError",
    "DataPosition",
    "Shard",
    "ShardDataset",
    "ShardWriter",
    "Source",
    "batches",
    "list_shards",
    "load_sources",
    "make_loader",
]
