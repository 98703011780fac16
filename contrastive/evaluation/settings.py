"""`eval.*`: zero-shot prompts, the text modality, and the evaluation sets (`eval.sets.<name>`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Zero-shot class prompts when neither the config, an eval set nor an export names others.
DEFAULT_PROMPTS = ("a photo of {label}", "{label}")
# What an eval set can be scored by; CLIP_benchmark's name for retrieval is accepted too.
TASKS = ("zeroshot_classification", "retrieval", "linear_probe")
TASK_ALIASES = {"zeroshot_retrieval": "retrieval", "zeroshot": "zeroshot_classification", "probe": "linear_probe"}
# Inverse regularisation strengths (scikit-learn's C) the linear probe sweeps on a validation split.
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class EvalSet:
    """`eval.sets.<name>`: one evaluation set, in our layout or CLIP_benchmark's WebDataset layout
    (`<path>/<split>/*.tar`, `classnames.txt`, `zeroshot_classification_templates.txt`,
    `dataset_type.txt`, a `cls` per sample or a caption per line)."""

    path: str = ""
    # auto: zero-shot classification where there are labels, retrieval of every pair present, and the
    # linear probe when probe_train is given; or one of TASKS, or a list of them
    task: Any = "auto"
    split: str = "test"  # CLIP_benchmark layout: the subdirectory holding the shards
    classnames: Optional[str] = None  # a file, one class a line (default: <path>/classnames.txt)
    templates: Optional[str] = None  # a file, one template a line with {c} or {label} (default: the set's own)
    probe_train: Optional[str] = None  # the linear probe's training split (default: <path>/train in that layout)
    max_samples: int = 0  # 0: the whole set


@dataclass
class EvalConfig:
    """`eval.*`."""

    # Zero-shot class prompts; {label} (or {c}) is replaced by each class name.
    prompts: List[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    text_modality: str = "text"
    max_samples: int = 0  # data.eval: 0 = the whole set
    # <name>: the fields of EvalSet; each is reported under eval/<name>/..., beside data.eval's eval/...
    sets: Dict[str, Any] = field(default_factory=dict)
    probe_cs: List[float] = field(default_factory=lambda: list(PROBE_CS))
    # retrieval again with each modality embedded alone, as if a sample's others were absent: the
    # towers are independent, so nothing may change (missing_modality/max_change); costs a pass each
    missing_modality_check: bool = False
