"""Weighted, seeded mixture of sources: each next() picks a source by weight, pulls one RawSample from it.

The pick RNG is seeded per (seed, rank, worker), so ranks and loader workers draw independent sequences and a
restart reproduces them. A source's BadSample is counted per (source, reason), logged once per key, and the
same source is pulled again, so the mix of *delivered* samples follows the weights. A source whose skipped
fraction passes `max_bad_fraction` (after `min_pulls` pulls of it) stops the run with a ValueError: a dataset
that is mostly broken should not silently train on its remainder.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from data.errors import BadSample
from data.shards import SourceConfig

log = logging.getLogger(__name__)
MAX_LOGGED_KEYS = 10_000  # bound on the "already logged" set of bad keys


@dataclass
class MixtureConfig:
    """`data.sources` with their weights plus the bad-data policy."""

    sources: list = field(default_factory=list)  # SourceConfig or dicts with its fields
    seed: int = 0
    max_bad_fraction: float = 0.05
    min_pulls: int = 200  # pulls of a source before its bad fraction is judged

    def source_configs(self) -> list[SourceConfig]:
        return [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]

    def build(self, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1) -> "Mixture":
        cfgs = self.source_configs()
        if not cfgs:
            raise ValueError("data.sources is empty; list at least one {name, urls, weight}")
        return Mixture({c.name: c.build(rank, world, worker, num_workers) for c in cfgs},
                       [c.weight for c in cfgs], self.seed, rank, worker,
                       max_bad_fraction=self.max_bad_fraction, min_pulls=self.min_pulls)


class Mixture:
    """Infinite iterator of RawSample dicts drawn from named sources in proportion to their weights."""

    def __init__(self, sources: Mapping[str, Iterator], weights: Sequence[float], seed: int = 0, rank: int = 0,
                 worker: int = 0, max_bad_fraction: float = 0.05, min_pulls: int = 200):
        self.names = list(sources)
        if len(weights) != len(self.names):
            raise ValueError(f"mixture: {len(self.names)} sources {self.names} but {len(weights)} weights")
        bad = [(n, w) for n, w in zip(self.names, weights) if not w > 0]
        if bad:
            raise ValueError(f"data.sources weights must be > 0; got {bad} (drop the source instead)")
        if not 0 <= max_bad_fraction < 1:
            raise ValueError(f"data.max_bad_fraction={max_bad_fraction} must be in [0, 1)")
        self.sources, self.weights = dict(sources), [float(w) for w in weights]
        self.cumulative = list(itertools.accumulate(self.weights))
        self.max_bad_fraction, self.min_pulls = max_bad_fraction, min_pulls
        self.rng = random.Random(f"mixture/{seed}/{rank}/{worker}")
        self.skipped: Counter = Counter()  # (source, reason) -> count
        self.pulls: Counter = Counter()  # source -> samples asked of it (delivered + skipped)
        self._logged: set = set()

    def __iter__(self):
        return self

    def _pick(self) -> str:
        x = self.rng.random() * self.cumulative[-1]
        return self.names[min(bisect.bisect_right(self.cumulative, x), len(self.names) - 1)]

    def __next__(self) -> dict:
        name = self._pick()
        while True:
            self.pulls[name] += 1
            try:
                raw = next(self.sources[name])
            except BadSample as e:
                self.count_bad(name, e)
                continue
            return {**raw, "source": name}

    def count_bad(self, source: str, e: BadSample) -> None:
        """Counts, logs once and checks the bad fraction of `source` (also for BadSamples of later steps)."""
        self.skipped[(source, e.reason)] += 1
        if (source, e.key, e.reason) not in self._logged and len(self._logged) < MAX_LOGGED_KEYS:
            self._logged.add((source, e.key, e.reason))
            log.warning("data source %s: skipped sample %s: %s%s", source, e.key, e.reason,
                        f" ({e.detail})" if e.detail else "")
        n_bad = sum(v for (s, _), v in self.skipped.items() if s == source)
        n = max(self.pulls[source], n_bad)
        if n >= self.min_pulls and n_bad / n > self.max_bad_fraction:
            reasons = {r: v for (s, r), v in self.skipped.items() if s == source}
            raise ValueError(f"data source {source}: {n_bad} of {n} samples skipped ({reasons}), more than "
                             f"data.max_bad_fraction={self.max_bad_fraction}; fix the data or raise the limit")

    def metrics(self) -> dict:
        """`skipped/<source>/<reason>` counters for the metrics log, and `epoch/<source>`: how often the source
        wrapped around to the start of its shards (0 in the first pass) where the source counts epochs."""
        out = {f"skipped/{s}/{r}": v for (s, r), v in sorted(self.skipped.items())}
        for n, s in self.sources.items():
            if hasattr(s, "read_epoch"):
                out[f"epoch/{n}"] = s.read_epoch
        return out

    def state_dict(self) -> dict:
        st = self.rng.getstate()
        return {"rng": [st[0], list(st[1]), st[2]], "sources": {n: s.state_dict() for n, s in self.sources.items()},
                "skipped": [[s, r, v] for (s, r), v in sorted(self.skipped.items())],
                "pulls": dict(self.pulls)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["sources"]) != sorted(self.names):
            raise ValueError(f"the checkpoint's data sources {sorted(state['sources'])} differ from data.sources "
                             f"{sorted(self.names)}; resume with the same sources or start a new output_dir")
        r = state["rng"]
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        for n, s in self.sources.items():
            s.load_state_dict(state["sources"][n])
        self.skipped = Counter({(s, r): v for s, r, v in state["skipped"]})
        self.pulls = Counter(state["pulls"])
