"""`data.*`: where the shards are and how the loader reads them (the schema holds every default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class DataConfig:
    # A dataset directory (.tar shards + sizes.json), a list of them, or [{path: ..., weight: ...}, ...]
    train: Any = None
    eval: Optional[str] = None  # held-out dataset directory for evaluation
    batch_size: int = 64  # per rank
    eval_batch_size: int = 128
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 1000  # samples
    resampled: bool = False  # draw shards with replacement, datasets mixed by weight, virtual epochs
    epoch_samples: int = 0  # resampled: samples per virtual epoch, all ranks (0 = the datasets' total)
    modality_dropout: Dict[str, float] = field(default_factory=dict)  # <modality>: drop probability
    max_bad_fraction: float = 0.05  # stop when more of the samples read so far were bad
    bad_check_after: int = 2000  # samples read before the bad fraction is checked
    # where shards are URLs (s3://, gs://, http(s)://, pipe:...; see contrastive.data.storage):
    train_num_samples: int = 0  # the training set's total, where no sizes.json counts its shards
    prefetch_mb: int = 64  # per loader worker and shard: remote bytes read ahead (2 shards at most held)
    max_member_mb: int = 1024  # a tar member claiming more makes its shard broken (never read, never allocated)
    # fsspec options per protocol, e.g. {s3: {endpoint_url: "http://127.0.0.1:9000"}}; no credentials
    storage_options: Dict[str, Any] = field(default_factory=dict)
