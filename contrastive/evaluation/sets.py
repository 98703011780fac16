"""Evaluation sets as the run reads them: where the shards are, the class names, the templates and
the tasks, from `data.eval` and `eval.sets` (our layout or CLIP_benchmark's WebDataset layout)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from contrastive.data.shards import locate
from contrastive.data.storage import PIPE, exists, join, read_bytes
from contrastive.errors import ConfigError
from contrastive.evaluation.settings import TASK_ALIASES, TASKS, EvalConfig, EvalSet

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"


@dataclass(frozen=True)
class ResolvedSet:
    name: str  # "" for data.eval (its metrics keep their plain names)
    shards: str  # where the set's shards are (a directory, a URL, a brace list)
    tasks: tuple[str, ...]
    classnames: tuple[str, ...] | None  # from a file; None: the labels found in the data
    templates: tuple[str, ...] | None  # from a file; None: eval.prompts
    probe_train: str | None
    max_samples: int = 0

    @property
    def where(self) -> str:
        """The set's config key, for messages."""
        return f"eval.sets.{self.name}" if self.name else "data.eval"

    def key(self, metric: str) -> str:
        """The metric's name for this set: `<set>/<metric>`, or `<metric>` for data.eval."""
        return f"{self.name}/{metric}" if self.name else metric


def _lines(location: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in read_bytes(location).decode("utf-8").splitlines() if line.strip())


def _has_shards(location: str) -> bool:
    try:
        return bool(locate(location)[0])
    except OSError:
        return False


def _tasks(task: Any, where: str) -> tuple[str, ...] | None:
    """None for auto."""
    if task in (None, "auto"):
        return None
    names = task.split(",") if isinstance(task, str) else list(task)
    tasks = tuple(TASK_ALIASES.get(t, t) for t in names)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"{where}.task: {unknown} are no tasks; a set takes auto or any of {list(TASKS)}")
    return tasks


def resolve_set(name: str, settings: EvalSet | Mapping[str, Any], *, where: str | None = None) -> ResolvedSet:
    """One set's shards, class names, templates, probe split and tasks, from its settings and the files
    beside its shards."""
    where = where or f"eval.sets.{name}"
    if not isinstance(settings, EvalSet):
        known = {f.name for f in dataclasses.fields(EvalSet)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; a set takes {sorted(known)}")
        settings = EvalSet(**settings)
    if not settings.path:
        raise ConfigError(f"{where}.path: the set's directory is missing")
    root = str(settings.path)
    # a directory (local or a URL) may hold CLIP_benchmark's layout and its files; a brace list or a
    # pipe: command names shards only
    directory = "{" not in root and not root.startswith(PIPE)
    split_dir = join(root, settings.split)
    benchmark_layout = directory and _has_shards(split_dir)  # CLIP_benchmark's: <root>/<split>/*.tar
    shards = split_dir if benchmark_layout else root
    beside = (lambda name: join(root, name)) if directory else (lambda name: None)
    classnames_file = settings.classnames or beside(CLASSNAMES)
    templates_file = settings.templates or beside(TEMPLATES)
    for key, file, given in (
        ("classnames", classnames_file, settings.classnames),
        ("templates", templates_file, settings.templates),
    ):
        if given and not exists(file):
            raise ConfigError(f"{where}.{key}: {file} does not exist")
    classnames = _lines(classnames_file) if classnames_file and exists(classnames_file) else None
    templates = _lines(templates_file) if templates_file and exists(templates_file) else None
    probe_train = settings.probe_train
    train_dir = beside("train")
    if probe_train is None and benchmark_layout and settings.split != "train" and _has_shards(train_dir):
        probe_train = train_dir
    tasks = _tasks(settings.task, where)
    if tasks is None:
        kind_file = beside(DATASET_TYPE)
        kind = read_bytes(kind_file).decode().strip().lower() if kind_file and exists(kind_file) else ""
        tasks = ("retrieval",) if kind == "retrieval" else ("zeroshot_classification", "retrieval")
        if settings.probe_train:
            tasks += ("linear_probe",)
    if "linear_probe" in tasks and not probe_train:
        raise ConfigError(f"{where}.probe_train: the linear probe needs a training split (a directory of shards)")
    return ResolvedSet(
        name=name,
        shards=str(shards),
        tasks=tasks,
        classnames=classnames,
        templates=templates,
        probe_train=probe_train,
        max_samples=settings.max_samples,
    )


def eval_sets(settings: EvalConfig, data_eval: str | None = None) -> list[ResolvedSet]:
    """`data.eval` (unnamed; zero-shot and retrieval, as ever) and every `eval.sets.<name>`."""
    sets = []
    if data_eval:
        sets.append(resolve_set("", {"path": data_eval, "max_samples": settings.max_samples}, where="data.eval"))
    for name, fields in settings.sets.items():
        if not name or "/" in name:
            raise ConfigError(f"eval.sets: {name!r} cannot name a set (metric names use '<set>/...')")
        sets.append(resolve_set(name, fields))
    return sets
