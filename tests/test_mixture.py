"""Mixture: frequencies follow the weights, per-rank/worker independence, exact restore, bad-sample policy."""
from __future__ import annotations

import json
import logging
import math
import os
import pickle

import pytest

from data.mixture import Mixture, MixtureConfig
from data.shards import SourceConfig, write_tar


def shards(d, name: str, n_shards: int = 2, per_shard: int = 5, bad_every: int = 0) -> str:
    """A brace pattern over small shards of source `name`; every bad_every-th sample has a pickle member."""
    for j in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{name}{j}_{i}"
            m = {"json": json.dumps({"content": [{"type": "text", "text": key}]}).encode(), "0.jpg": os.urandom(40)}
            if bad_every and i % bad_every == 0:
                m = {"json": m["json"], "0.pt": pickle.dumps([1])}
            samples.append((key, m))
        write_tar(str(d / f"{name}-{j:03d}.tar"), samples)
    return str(d / f"{name}-{{000..{n_shards - 1:03d}}}.tar")


def _cfg(tmp_path, weights=(1, 2, 5), **kw):
    names = ["a", "b", "c"][:len(weights)]
    return MixtureConfig(sources=[dict(name=n, urls=shards(tmp_path, n), weight=w, shuffle_buffer=3)
                                  for n, w in zip(names, weights)], seed=7, **kw)


def test_frequencies_follow_weights(tmp_path):
    weights = (1, 2, 5)
    mix = _cfg(tmp_path, weights).build()
    n = 4000
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(n):
        s = next(mix)
        assert s["key"].startswith(s["source"]), "sample tagged with its source name"
        counts[s["source"]] += 1
    for name, w in zip("abc", weights):
        p = w / sum(weights)
        std = math.sqrt(n * p * (1 - p))
        assert abs(counts[name] - n * p) < 4 * std, (name, counts, n * p, std)
    # the bound is tight enough to tell the weights apart: 1:2:5 vs uniform fails it by > 10 std
    assert abs(counts["c"] - n / 3) > 10 * math.sqrt(n * (1 / 3) * (2 / 3))


def test_ranks_and_workers_draw_independent_sequences(tmp_path):
    cfg = _cfg(tmp_path, (1, 1))
    seqs = {}
    for rank, worker in [(0, 0), (1, 0), (0, 1)]:
        mix = cfg.build(rank=rank, world=2, worker=worker, num_workers=2)
        seqs[(rank, worker)] = [next(mix)["source"] for _ in range(1000)]
    again = cfg.build(rank=1, world=2, worker=0, num_workers=2)
    assert [next(again)["source"] for _ in range(1000)] == seqs[(1, 0)], "seeded: same slot, same picks"
    n = 1000
    for other in [(1, 0), (0, 1)]:
        agree = sum(x == y for x, y in zip(seqs[(0, 0)], seqs[other]))
        # independent fair picks agree with probability 1/2: within 4 binomial std of n/2
        assert abs(agree - n / 2) < 4 * math.sqrt(n / 4), (other, agree)


def test_restore_is_exact(tmp_path):
    cfg = _cfg(tmp_path)
    ref = cfg.build(rank=1, world=2)
    expected = [next(ref) for _ in range(80)]
    for cut in (1, 17, 45):
        a = cfg.build(rank=1, world=2)
        got = [next(a) for _ in range(cut)]
        state = json.loads(json.dumps(a.state_dict()))
        b = cfg.build(rank=1, world=2)
        b.load_state_dict(state)
        got += [next(b) for _ in range(80 - cut)]
        assert got == expected, cut


def test_restore_with_other_sources_is_refused(tmp_path):
    state = _cfg(tmp_path).build().state_dict()
    with pytest.raises(ValueError, match=r"\['a', 'b', 'c'\] differ from data.sources \['a', 'b'\]"):
        _cfg(tmp_path, (1, 1)).build().load_state_dict(state)


def test_bad_samples_are_counted_logged_once_and_replaced(tmp_path, caplog):
    cfg = MixtureConfig(sources=[dict(name="good", urls=shards(tmp_path, "good")),
                                 dict(name="bad", urls=shards(tmp_path, "bad", bad_every=5))],  # 1 in 5 bad
                        seed=1, max_bad_fraction=0.5, min_pulls=10)
    mix = cfg.build()
    with caplog.at_level(logging.WARNING, logger="data.mixture"):
        out = [next(mix) for _ in range(200)]
    assert all(".pt" not in str(s["media"]) for s in out)
    assert {s["source"] for s in out} == {"good", "bad"}
    n_bad = mix.skipped[("bad", "pickle_member")]
    delivered_bad = sum(s["source"] == "bad" for s in out)
    assert n_bad > 0 and set(mix.skipped) == {("bad", "pickle_member")}
    assert mix.pulls["bad"] == delivered_bad + n_bad
    # 2 bad keys (bad0_0, bad1_0), each met once per epoch of 8 good samples: logged once each
    assert n_bad > 2 and len([r for r in caplog.records if "pickle_member" in r.getMessage()]) == 2
    assert {k: v for k, v in mix.metrics().items() if not k.startswith("epoch/")} == {"skipped/bad/pickle_member": n_bad}
    assert mix.metrics()["epoch/bad"] >= 2  # ~100 pulls of a 10-sample source: it wrapped around, counted
    state = json.loads(json.dumps(mix.state_dict()))
    restored = cfg.build()
    restored.load_state_dict(state)
    assert restored.skipped == mix.skipped and restored.pulls == mix.pulls


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path):
    cfg = MixtureConfig(sources=[dict(name="good", urls=shards(tmp_path, "good")),
                                 dict(name="bad", urls=shards(tmp_path, "bad", bad_every=2))],  # 3 in 5 bad
                        seed=1, max_bad_fraction=0.3, min_pulls=20)
    mix = cfg.build()
    with pytest.raises(ValueError, match=r"data source bad: \d+ of \d+ samples skipped .*pickle_member.*"
                                         r"max_bad_fraction=0.3"):
        for _ in range(500):
            next(mix)
    assert mix.pulls["bad"] >= 20


def test_config_errors():
    with pytest.raises(ValueError, match="weights must be > 0"):
        Mixture({"a": iter([]), "b": iter([])}, [1, 0])
    with pytest.raises(ValueError, match="max_bad_fraction=1"):
        Mixture({"a": iter([])}, [1], max_bad_fraction=1)
    with pytest.raises(ValueError, match="data.sources is empty"):
        MixtureConfig().build()
