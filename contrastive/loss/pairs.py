"""Which modality pairs a loss covers: `all`, a binding modality (`anchor:<name>`), or a list."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from contrastive.errors import ConfigError

Pair = tuple[str, str]


def pair_name(pair: Pair) -> str:
    return f"{pair[0]}-{pair[1]}"


def resolve_pairs(spec: Any, modalities: Sequence[str]) -> list[Pair]:
    """`all` | `anchor:<name>` | a list of [a, b] -> the list of pairs, checked against `modalities`.

    `all` pairs every two modalities; `anchor:image` pairs every modality with image (ImageBind's
    binding modality)."""
    names = list(modalities)
    if spec == "all":
        pairs = list(itertools.combinations(names, 2))
    elif isinstance(spec, str) and spec.startswith("anchor:"):
        anchor = spec.split(":", 1)[1]
        if anchor not in names:
            raise ConfigError(f"loss.pairs: anchor {anchor!r} is not among modalities {names}")
        pairs = [(anchor, m) for m in names if m != anchor]
    elif isinstance(spec, str):
        raise ConfigError(f"loss.pairs: expected 'all', 'anchor:<modality>' or a list of pairs, got {spec!r}")
    else:
        pairs = [tuple(p) for p in spec]
        for p in pairs:
            if len(p) != 2 or p[0] == p[1] or any(m not in names for m in p):
                raise ConfigError(f"loss.pairs: {list(p)} is not a pair of two of the modalities {names}")
        if len({frozenset(p) for p in pairs}) != len(pairs):
            raise ConfigError(f"loss.pairs: {spec!r} lists a pair twice")
    if not pairs:
        raise ConfigError(f"loss.pairs: {spec!r} gives no pair for modalities {names}")
    return pairs
