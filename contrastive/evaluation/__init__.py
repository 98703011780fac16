"""Evaluation the way the field computes it: zero-shot classification (top-1, top-5, mean per-class
recall), retrieval with several captions per item, the linear probe; on several sets in our layout or
CLIP_benchmark's, each embedded once per evaluation, across ranks."""

from contrastive.evaluation.embedding import embed_dataset
from contrastive.evaluation.probe import linear_probe, probe_metrics
from contrastive.evaluation.report import Evaluator, format_table, set_metrics
from contrastive.evaluation.retrieval import group_recall, retrieval_metrics
from contrastive.evaluation.sets import ResolvedSet, eval_sets, resolve_set
from contrastive.evaluation.settings import DEFAULT_PROMPTS, EvalConfig, EvalSet
from contrastive.evaluation.zeroshot import class_embeddings, zero_shot_metrics

__all__ = [
    "DEFAULT_PROMPTS",
    "EvalConfig",
    "EvalSet",
    "Evaluator",
    "ResolvedSet",
    "class_embeddings",
    "embed_dataset",
    "eval_sets",
    "format_table",
    "group_recall",
    "linear_probe",
    "probe_metrics",
    "resolve_set",
    "retrieval_metrics",
    "set_metrics",
    "zero_shot_metrics",
]
