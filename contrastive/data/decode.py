"""Raw samples -> dict batches: decoding, per-modality transforms, masks, and bad-input counters.

Bad input never stops a run and is never dropped silently: a modality that fails to decode is left
out of its sample (the rest of the sample is kept) and counted under `bad/<modality>`; a sample with
nothing usable left is counted under `bad/empty_sample`; slots a broken shard could not deliver are
counted under the shard error's name, and per shard under `broken_shard/<name>` (`broken_shards`
tells how many shards that is). The first few occurrences of each kind are logged with shard
and key. Counters travel with each batch, so the trainer sums exact totals from every worker.

What is the code's fault is not counted: a modality whose decode or preprocess has failed on its
first `CODE_ERROR_AFTER` samples without ever succeeding stops the loader at the end of that batch
with a ModalityError carrying the first failure's traceback (a bug in a new modality, not bad data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zlib
from collections import Counter
from contextlib import contextmanager
from typing import Any, Mapping

import torch

from contrastive.modalities.base import MODALITIES, Modality, ModalityError, Refused

log = logging.getLogger("contrastive.data")

# json: {"label": ..., "group": ...}; cls: a class index as text (CLIP_benchmark's WebDataset layout)
METADATA_EXTENSIONS = ("json", "cls")
BAD_SHARD = "bad_in_shard/"  # counter prefix: bad samples per shard (for the error that names them)
BROKEN_SHARD = "broken_shard/"  # counter prefix: slots a damaged shard could not deliver, per shard
PER_SHARD = (BAD_SHARD, BROKEN_SHARD)  # counters kept per shard name: summed up, never logged one by one
# Counted and logged, but the sample itself is still used: not part of the bad fraction.
NOT_LOST = ("bad/unknown_extension", "bad/json", "bad/sizes_mismatch")


def broken_shards(counts: Mapping[str, int]) -> list[str]:
    """The shards a damaged tar cost samples of, by name."""
    return sorted(k[len(BROKEN_SHARD) :] for k, v in counts.items() if k.startswith(BROKEN_SHARD) and v)


def lost(counts: Mapping[str, int]) -> int:
    """Bad-input events that cost a sample or one of its modalities."""
    return sum(v for k, v in counts.items() if k.startswith("bad/") and k not in NOT_LOST)


WARN_FIRST = 5  # warnings per kind of bad input and worker; the counters keep counting after that
MAX_JSON_BYTES = 1 << 20  # a sample's metadata beyond this is not parsed (counted, the sample kept)
CODE_ERROR_AFTER = 3  # failures of a modality that has never succeeded, before they count as a bug


@contextmanager
def seeded(seed: int):
    """Seeds torch's CPU generator and `random` for one sample's transforms, then restores both.
    (torch.manual_seed would also queue a CUDA seeding, which costs ~1 ms a call.)"""
    generator = torch.random.default_generator
    torch_state, py_state = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(py_state)


def label_id(label: str | None) -> int:
    """A stable non-negative int64 for a label string (the same on every rank and run); -1 for none."""
    if label is None:
        return -1
    return int.from_bytes(hashlib.blake2b(label.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def known_extensions() -> set[str]:
    """Every extension some registered modality (or the metadata) reads."""
    exts = set(METADATA_EXTENSIONS)
    for cls in MODALITIES.values():
        exts.update(cls.extensions)
    return exts


class BatchDecoder:
    """Turns a group of raw sample slots into one dict batch of fixed size.

    A slot is a raw sample (`__key__`, `__shard__`, extension -> bytes), an error slot
    (`__error__`: what went wrong reading the shard) or None (padding at the end of an epoch)."""

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        *,
        train: bool,
        seed: int = 0,
        epoch: int = 0,
        modality_dropout: Mapping[str, float] | None = None,
        eval_inputs: bool = False,
    ):
        self.modalities = dict(modalities)
        self.train = train
        # evaluation: a value holding alternatives (a caption per line) gives each an input of its own
        # (`extra`), and a value seen in several views (a long clip's windows) each view (`views`)
        self.eval_inputs = eval_inputs
        self.seed, self.epoch = seed, epoch
        self.modality_dropout = dict(modality_dropout or {})
        unknown = set(self.modality_dropout) - set(self.modalities)
        if unknown:
            raise ValueError(f"data.modality_dropout: {sorted(unknown)} are not enabled modalities")
        self.known = known_extensions()
        self.warned: Counter = Counter()
        self.succeeded: set[str] = set()  # modalities that decoded and preprocessed at least once
        self.failures: dict[str, tuple[int, BaseException]] = {}  # the others': (failures, first failure)

    def warn(self, kind: str, shard: str, key: str, reason: str) -> None:
        self.warned[kind] += 1
        if self.warned[kind] <= WARN_FIRST:
            more = " (further ones are counted, not logged)" if self.warned[kind] == WARN_FIRST else ""
            log.warning("skipped %s: shard %s, key %s: %s%s", kind, shard, key, reason, more)

    def decode_sample(
        self, sample: dict[str, Any], counts: Counter
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict[str, list[torch.Tensor]]]]:
        """(one input per modality, the metadata: label and group, further inputs with `eval_inputs`:
        {"extra": the alternatives beyond the first, "views": the views beyond the first} per modality)."""
        shard, key = sample.get("__shard__", "?"), sample.get("__key__", "?")
        unknown = sorted(ext for ext in sample if not ext.startswith("__") and ext not in self.known)
        if unknown:
            counts["bad/unknown_extension"] += 1
            self.warn("unknown_extension", shard, key, f"no modality reads {unknown}")
        meta: dict[str, Any] = {"label": None, "group": None}
        try:
            if "json" in sample:
                if len(sample["json"]) > MAX_JSON_BYTES:
                    counts["refused/json/too_large"] += 1
                    raise ValueError(f"metadata of {len(sample['json'])} bytes, over {MAX_JSON_BYTES}")
                fields = json.loads(bytes(sample["json"]).decode("utf-8"))
                if isinstance(fields, dict):
                    meta = {k: None if fields.get(k) is None else str(fields[k]) for k in ("label", "group")}
            if meta["label"] is None and "cls" in sample:  # a class index, named by the set's classnames
                meta["label"] = str(int(bytes(sample["cls"]).decode("utf-8").strip()))
        # RecursionError: nested deeper than Python's stack allows; OSError: a shard cut short since listed
        except (ValueError, RecursionError, OSError) as e:
            counts["bad/json"] += 1
            if isinstance(e, RecursionError):
                counts["refused/json/too_deep"] += 1
            self.warn("json", shard, key, repr(e))
        # Augmentation draws from its own generator seeded by (seed, epoch, key): a resumed run
        # repeats the interrupted run's crops exactly, and the caller's random state is untouched.
        seed = zlib.crc32(f"{self.seed}/{self.epoch}/{key}".encode())
        row: dict[str, torch.Tensor] = {}
        present = {name: next((e for e in m.extensions if e in sample), None) for name, m in self.modalities.items()}
        present = {name: ext for name, ext in present.items() if ext is not None}
        if self.modality_dropout:  # drop modalities at random, never the sample's last one
            drop_rng = random.Random(f"dropout/{seed}")
            for name in list(present):
                if len(present) > 1 and drop_rng.random() < self.modality_dropout.get(name, 0.0):
                    del present[name]
                    counts[f"dropped/{name}"] += 1
        further: dict[str, dict[str, list[torch.Tensor]]] = {"extra": {}, "views": {}}
        with seeded(seed):
            for name, ext in present.items():
                modality = self.modalities[name]
                try:
                    data = sample[ext] if modality.reads_spans else bytes(sample[ext])  # bytes(bytes) is no copy
                    value = modality.decode(data, ext)
                    values = modality.alternatives(value) if self.eval_inputs else [value]
                    views = modality.views(values[0]) if self.eval_inputs else values[:1]
                    row[name] = modality.preprocess(views[0], train=self.train)
                    for kind, more in (("extra", values[1:]), ("views", views[1:])):
                        if more:
                            further[kind][name] = [modality.preprocess(v, train=self.train) for v in more]
                    self.succeeded.add(name)
                except Exception as e:  # noqa: BLE001 - bad input, unless it never succeeds (check_code)
                    counts[f"bad/{name}"] += 1
                    if isinstance(e, Refused):  # over the sample's budget: counted by kind, never decoded
                        counts[f"refused/{name}/{e.kind}"] += 1
                        self.succeeded.add(name)  # the modality works; this value was too big for it
                    self.warn(name, shard, key, f"{ext}: {type(e).__name__}: {e}")
                    if name not in self.succeeded:
                        failed, first = self.failures.get(name, (0, e))
                        self.failures[name] = (failed + 1, first)
        if not row:
            counts["bad/empty_sample"] += 1
            self.warn("empty_sample", shard, key, "no usable modality")
        if "__extra__" in sample:
            counts["bad/sizes_mismatch"] += sample["__extra__"]
        return row, meta, further

    def check_code(self) -> None:
        """Raises ModalityError for a modality that failed on its first CODE_ERROR_AFTER samples and
        never succeeded: its decode or preprocess is broken, whatever the data."""
        for name, (failed, first) in self.failures.items():
            if name not in self.succeeded and failed >= CODE_ERROR_AFTER:
                cls = type(self.modalities[name])
                raise ModalityError(
                    f"the {name} modality ({cls.__module__}.{cls.__name__}) failed on each of the first "
                    f"{failed} samples that hold it and has never succeeded: a bug in its decode or "
                    f"preprocess (the traceback of its first failure is above), or data none of which is "
                    f"readable (`contrastive-data verify` tells which). First failure: "
                    f"{type(first).__name__}: {first}"
                ) from first

    def __call__(self, slots: list[dict[str, Any] | None]) -> dict[str, Any]:
        counts: Counter = Counter()
        rows, keys, metas = [], [], []
        further: dict[str, dict[str, list]] = {"extra": {}, "views": {}}
        for index, slot in enumerate(slots):
            row, key, meta = {}, "", {"label": None, "group": None}
            if slot is None:  # padding at the end of an epoch
                rows.append(row)
                keys.append(key)
                metas.append(meta)
                continue
            before = lost(counts)
            counts["retries"] += slot.get("__retries__", 0)  # of the remote reads that brought it
            counts["changed_shards"] += slot.get("__restarts__", 0)  # objects replaced while read: read again
            if "__error__" in slot:
                counts[f"bad/{slot['__error__']}"] += 1
                counts[f"{BROKEN_SHARD}{slot.get('__shard__', '?')}"] += 1
            else:
                row, meta, more = self.decode_sample(slot, counts)
                key = slot["__key__"]
                counts["samples"] += 1 if row else 0
                for kind, by_modality in more.items():
                    for name, inputs in by_modality.items():
                        further[kind].setdefault(name, []).extend((index, x) for x in inputs)
            counts["slots"] += 1
            if lost(counts) > before:
                counts["bad_samples"] += 1
                counts[f"{BAD_SHARD}{slot.get('__shard__', '?')}"] += 1
            rows.append(row)
            keys.append(key if row else "")
            metas.append(meta if row else {"label": None, "group": None})
        self.check_code()
        batch: dict[str, Any] = {"mask": {}}
        for name, modality in self.modalities.items():
            present = [name in row for row in rows]
            counts[f"present/{name}"] += sum(present)
            batch[name] = torch.stack([row[name] if name in row else modality.empty() for row in rows])
            batch["mask"][name] = torch.tensor(present, dtype=torch.bool)
        batch["__key__"] = keys
        batch["label"] = [m["label"] for m in metas]
        batch["group"] = [m["group"] for m in metas]
        batch["label_id"] = torch.tensor([label_id(m["label"]) for m in metas], dtype=torch.long)
        if self.eval_inputs:  # each modality's further inputs and the batch row each belongs to
            for kind, by_modality in further.items():
                batch[kind] = {
                    name: {
                        "inputs": torch.stack([x for _, x in items]),
                        "rows": torch.tensor([i for i, _ in items], dtype=torch.long),
                    }
                    for name, items in by_modality.items()
                }
        batch["counts"] = dict(counts)
        return batch
