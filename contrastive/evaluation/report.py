"""Evaluation sets run and reported: each set is embedded once per evaluation (across ranks), then
scored by its tasks; the metrics of a named set carry its name (`<set>/zero_shot/...`).

A set that cannot be read or scored (a path gone, a broken task) never ends a training run: its error
is logged with the set's name and the traceback, its metrics are left out, the other sets are
reported, and `Evaluator.failed` names it (contrastive-eval exits non-zero on it). A set that cannot
be opened at the start is tried again at each evaluation."""

from __future__ import annotations

import logging
import traceback
from typing import Any, Mapping, Sequence

import torch

from contrastive.data.settings import DataConfig
from contrastive.data.shards import DataError
from contrastive.data.storage import redact
from contrastive.evaluation.embedding import embed_dataset
from contrastive.evaluation.probe import probe_metrics
from contrastive.evaluation.retrieval import retrieval_metrics
from contrastive.evaluation.sets import ResolvedSet
from contrastive.evaluation.settings import EvalConfig
from contrastive.evaluation.zeroshot import zero_shot_metrics
from contrastive.modalities.base import Modality
from contrastive.model import ContrastiveModel

log = logging.getLogger("contrastive")


def set_metrics(
    model: ContrastiveModel,
    embedded: dict[str, Any],
    eval_set: ResolvedSet,
    settings: EvalConfig,
    probe_train: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One set's metrics from its embeddings (and, for the probe, its training split's), unprefixed."""
    metrics: dict[str, float] = {}
    if "zeroshot_classification" in eval_set.tasks:
        metrics.update(
            zero_shot_metrics(
                model,
                embedded,
                templates=eval_set.templates or settings.prompts,
                classnames=eval_set.classnames,
                text_modality=settings.text_modality,
            )
        )
    if "retrieval" in eval_set.tasks:
        metrics.update(retrieval_metrics(embedded, text_modality=settings.text_modality))
    if "linear_probe" in eval_set.tasks and probe_train is not None:
        metrics.update(probe_metrics(probe_train, embedded, cs=settings.probe_cs, text_modality=settings.text_modality))
    return metrics


class Evaluator:
    """Every eval set of a run: its loaders built once (the preflight checks them at the start), each set
    embedded once per evaluation, shared by its tasks."""

    def __init__(
        self,
        sets: Sequence[ResolvedSet],
        modalities: Mapping[str, Modality],
        settings: EvalConfig,
        data: DataConfig,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.sets, self.settings = list(sets), settings
        self._build = dict(modalities=modalities, settings=data, seed=seed, rank=rank, world_size=world_size)
        self.datasets: dict[str, Any] = {}
        self.probe_datasets: dict[str, Any] = {}
        self.failed: dict[str, str] = {}  # set -> its error, at the last evaluation (or the start)
        for s in self.sets:
            self._guarded(s, lambda s=s: self._open(s))

    def _open(self, s: ResolvedSet) -> None:
        from contrastive.builders import build_dataset

        if s.name not in self.datasets:
            self.datasets[s.name] = build_dataset(s.shards, train=False, what=s.where, **self._build)
        if "linear_probe" in s.tasks and s.name not in self.probe_datasets:
            what = f"{s.where}.probe_train"
            self.probe_datasets[s.name] = build_dataset(s.probe_train, train=False, what=what, **self._build)

    def _guarded(self, s: ResolvedSet, work: Any) -> Any:
        """work() for set `s`; an error there is logged with the set's name and traceback, recorded in
        `failed`, and returns None. Every rank reaches the same verdict (one all-reduce)."""
        from contrastive.distributed import all_reduce_sum

        result, error = None, None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - an eval set's failure is reported, never fatal to training
            error = f"{type(e).__name__}: {e}"
            log.error("evaluation set %s failed; its metrics are left out:\n%s", s.where, traceback.format_exc())
        failed_somewhere = float(all_reduce_sum(torch.tensor([float(error is not None)])))
        if failed_somewhere:
            self.failed[s.name or "data.eval"] = error or "failed on another rank"
            return None
        return result

    def __call__(
        self, model: ContrastiveModel, device: torch.device, autocast: Any = None
    ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """(every set's metrics, named `<set>/...`; every set's embeddings, by set name)."""
        metrics: dict[str, float] = {}
        embedded: dict[str, dict[str, Any]] = {}
        self.failed = {}
        for eval_set in self.sets:

            def evaluate(s: ResolvedSet = eval_set) -> tuple[dict[str, float], dict[str, Any]]:
                self._open(s)  # a set that could not be opened at the start is tried again
                found = embed_dataset(
                    model, self.datasets[s.name], device=device, max_samples=s.max_samples, autocast=autocast
                )
                if not found["keys"]:  # every shard broken or gone: no figure would mean anything
                    raise DataError(
                        f"{s.where}: no sample of {redact(s.shards)} could be read (the warnings above say why)"
                    )
                probe_train = None
                if s.name in self.probe_datasets:
                    probe_train = embed_dataset(model, self.probe_datasets[s.name], device=device, autocast=autocast)
                metrics = set_metrics(model, found, s, self.settings, probe_train)
                if self.settings.missing_modality_check and "retrieval" in s.tasks:
                    metrics.update(self.missing_modality_check(model, s, found, device, autocast))
                return metrics, found

            done = self._guarded(eval_set, evaluate)
            if done is not None:
                metrics.update({eval_set.key(k): v for k, v in done[0].items()})
                embedded[eval_set.name] = done[1]
        return metrics, embedded

    def missing_modality_check(self, model, s, found, device, autocast) -> dict[str, float]:
        return _alone(self, model, s, found, device, autocast)


def _alone(evaluator: "Evaluator", model, s, found, device, autocast) -> dict[str, float]:
    """Each modality embedded with the others absent: the largest change of any embedding, and the
    retrieval R@1 of every pair from those embeddings (equal to the joint ones for independent towers)."""
    names = list(found["embeddings"])
    alone = {
        m: embed_dataset(
            model,
            evaluator.datasets[s.name],
            device=device,
            max_samples=s.max_samples,
            autocast=autocast,
            modalities=[m],
        )["embeddings"][m]
        for m in names
    }
    change = max(float((alone[m] - found["embeddings"][m]).abs().max()) if len(alone[m]) else 0.0 for m in names)
    again = retrieval_metrics({**found, "embeddings": alone}, text_modality=evaluator.settings.text_modality)
    out = {"missing_modality/max_change": change}
    out.update({f"missing_modality/{k}": v for k, v in again.items() if k.endswith("/R@1")})
    return out


def format_table(metrics: Mapping[str, float]) -> str:
    """Readable tables of the metrics, a section per named set, with chance levels beside the figures."""
    names = sorted({k.split("/", 1)[0] for k in metrics if k.split("/", 1)[0] not in SECTIONS + CHECKS})
    blocks = [_table({k: v for k, v in metrics.items() if k.split("/", 1)[0] in SECTIONS + CHECKS})]
    for name in names:
        blocks.append(
            ("== the weights' average (trainer.ema) ==\n" if name == "ema" else f"== eval set {name} ==\n")
            + _table({k[len(name) + 1 :]: v for k, v in metrics.items() if k.startswith(name + "/")})
        )
    return "\n".join(b for b in blocks if b.strip())


SECTIONS = ("zero_shot", "retrieval", "linear_probe")
CHECKS = ("geometry", "missing_modality")  # the held-out set's geometry, the missing-modality check


def _pct(value: float | None) -> str:
    return f"{value:6.1%}" if value is not None else "     -"


def _table(metrics: Mapping[str, float]) -> str:
    lines = []
    classes = metrics.get("zero_shot/classes")
    zs = sorted({k.split("/")[1] for k in metrics if k.startswith("zero_shot/") and k.endswith("/acc")})
    if zs:
        title = f"zero-shot classification ({int(classes)} classes, chance {1 / classes:.1%})"
        lines.append(f"{title:<52} top-1   top-5  mean per-class recall")
        for p in zs:
            got = [metrics.get(f"zero_shot/{p}/{k}") for k in ("acc", "top5", "mean_per_class_recall")]
            lines.append(f"  {p:<50} " + "  ".join(_pct(v) for v in got))
    probes = sorted({k.split("/")[1] for k in metrics if k.startswith("linear_probe/")})
    if probes:
        lines.append(f"{'linear probe (logistic regression)':<52} top-1   top-5  mean per-class recall       C")
        for m in probes:
            got = [metrics.get(f"linear_probe/{m}/{k}") for k in ("acc", "top5", "mean_per_class_recall")]
            lines.append(f"  {m:<50} " + "  ".join(_pct(v) for v in got) + f"  {metrics[f'linear_probe/{m}/C']:14g}")
    pairs = sorted({k.split("/")[1] for k in metrics if k.startswith("retrieval/") and "->" in k})
    if pairs:
        lines.append("retrieval                 R@1    R@5   R@10  median rank  label R@1      n  (chance R@1)")
        for p in pairs:
            a, b = p.split("->")
            n = int(metrics.get(f"retrieval/{a}-{b}/n", metrics.get(f"retrieval/{b}-{a}/n", 0)))
            r = [metrics[f"retrieval/{p}/{k}"] for k in ("R@1", "R@5", "R@10", "median_rank")]
            label = _pct(metrics.get(f"retrieval/{p}/label_R@1"))
            lines.append(
                f"  {p:<22} {r[0]:6.1%} {r[1]:6.1%} {r[2]:6.1%}  {r[3]:8.1f}     {label}  {n:5d}  ({1 / max(n, 1):.2%})"
            )
    worst = {
        k.split("/")[1]: v
        for k, v in metrics.items()
        if k.startswith("zero_shot/") and k.endswith("/worst_class_recall")
    }
    if worst:
        lines.append("  worst class recall: " + ", ".join(f"{p} {_pct(v).strip()}" for p, v in sorted(worst.items())))
    if "missing_modality/max_change" in metrics:
        lines.append(f"missing-modality check: largest embedding change {metrics['missing_modality/max_change']:.2e}")
    gaps = {k.split("/")[2]: v for k, v in metrics.items() if k.startswith("geometry/gap/")}
    if gaps:
        lines.append("geometry (held-out): gap " + ", ".join(f"{p} {v:.3f}" for p, v in sorted(gaps.items())))
    return "\n".join(lines)
