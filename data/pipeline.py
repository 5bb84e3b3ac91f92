"""The whole data chain for one rank: sources -> mixture -> encode -> M-RoPE ids -> pack -> micro-batches.

Each loader worker (or the trainer process itself with `num_workers=0`) runs its own complete chain over
its own slot of the shards (rank × worker split in data/shards.py) and yields whole micro-batches, each
with the chain's state right after it was made. The trainer takes micro-batches from the workers in a
fixed round-robin order (torch's DataLoader does that for iterable datasets), remembers the state that
came with the last micro-batch it took from each worker, and saves those: a restore rebuilds every chain
from its state, so the micro-batches after a restore equal those of an uninterrupted run, and nothing
already consumed is read again. Prefetched micro-batches that were never taken are simply made again.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch

from data import rope, shapes
from data.encode import EncoderConfig, build_encoder
from training.attention import VARLEN
from data.errors import BadSample
from data.mixture import Mixture
from data.pack import PackConfig, collate
from data.shards import MAX_MEMBER_BYTES, SourceConfig, decode_raw, encode_raw
from data.video import MAX_VIDEO_FRAMES


@dataclass
class DataConfig:
    """`data=`: where samples come from (the shapes cache or shards) and how the chain runs."""

    name: str = "shapes"  # shapes: the synthetic cache (generated on first use) | shards: `sources`
    sources: list = field(default_factory=list)  # shards: [{name, urls, weight, shuffle_buffer}]
    shapes: shapes.ShapesConfig = field(default_factory=shapes.ShapesConfig)
    split: str = "train"  # shapes: train | heldout
    seed: int = 0  # mixture RNG
    max_bad_fraction: float = 0.05
    min_pulls: int = 200
    num_workers: int = 0  # loader processes per rank; 0 = in the trainer process
    pack_buffer: int = 64  # samples held open by the packer
    overlong: str = "drop"  # drop | truncate (text-only samples)
    max_skips_in_row: int = 1000  # this many pulled samples in a row skipped or dropped, none packed: an error
    max_member_bytes: int = MAX_MEMBER_BYTES  # bigger tar members are skipped unread: BadSample member_too_large
    max_video_frames: int = MAX_VIDEO_FRAMES  # videos of more source frames are never decoded: video_too_long
    encoder: EncoderConfig = field(default_factory=EncoderConfig)


def source_configs(cfg: DataConfig, mixture: dict | None) -> list[SourceConfig]:
    """The configured sources, narrowed and re-weighted by the stage's mixture ({source: weight}) if it has one."""
    if cfg.name == "shapes":
        sh = copy.deepcopy(cfg.shapes)
        if mixture:
            unknown = sorted(set(mixture) - set(shapes.ALL_TASKS))
            if unknown:
                raise ValueError(f"stage.mixture names {unknown}, which are not shapes tasks {list(shapes.ALL_TASKS)}")
            sh.tasks = list(mixture)
        paths = shapes.ensure_cache(sh, split=cfg.split)
        srcs = [SourceConfig(name=t, urls=p, weight=float(sh.weights.get(t, 1.0)), shuffle_buffer=sh.shuffle_buffer,
                             seed=sh.seed) for t, p in paths.items()]
    elif cfg.name == "shards":
        srcs = [s if isinstance(s, SourceConfig) else _source_config(i, s) for i, s in enumerate(cfg.sources)]
        if not srcs:
            raise ValueError("data=shards needs data.sources: [{name: ..., urls: '/data/x-{0000..0099}.tar', "
                             "weight: 1}]")
    else:
        raise ValueError(f"data.name={cfg.name!r}; choose shapes or shards")
    if not mixture:
        return srcs
    known = {s.name: s for s in srcs}
    unknown = sorted(set(mixture) - set(known))
    if unknown:
        raise ValueError(f"stage.mixture names {unknown}, which are not data sources {sorted(known)}")
    return [SourceConfig(**{**known[n].__dict__, "weight": float(w)}) for n, w in mixture.items()]


def eval_source_configs(cfg: DataConfig, sources: list, generate: bool = True) -> list[SourceConfig]:
    """`stage.eval.sources` as SourceConfigs read in shard order with no shuffling: shapes task names (the
    held-out split, generated on first use unless `generate` is off: then only the names are checked) or, with
    data=shards, `{name, urls}` entries like data.sources' (weight ignored)."""
    if cfg.name == "shapes":
        bad = [s for s in sources if not isinstance(s, str) or s not in shapes.ALL_TASKS]
        if bad:
            raise ValueError(f"stage.eval.sources={list(sources)}: with data=shapes each entry is a shapes task, one "
                             f"of {list(shapes.ALL_TASKS)} (read from the held-out split); {bad} is not")
        if len(set(sources)) != len(sources):
            raise ValueError(f"stage.eval.sources={list(sources)} names a task twice")
        if not generate:
            return []
        sh = dataclasses.replace(cfg.shapes, tasks=list(sources))
        return [SourceConfig(name=t, urls=p, shuffle_shards=False) for t, p in
                shapes.ensure_cache(sh, split="heldout").items()]
    out = []
    for i, s in enumerate(sources):
        if not isinstance(s, dict):
            raise ValueError(f"stage.eval.sources[{i}]={s!r}: with data=shards each entry names held-out shards, "
                             f"like {SOURCE_EXAMPLE} (weight is ignored)")
        out.append(dataclasses.replace(_source_config(i, s, "stage.eval.sources"), shuffle_buffer=0, shuffle_shards=False))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"stage.eval.sources: names {names} repeat; give each held-out source its own name")
    return out


def eval_micro_batches(src: SourceConfig, cfg: DataConfig, bundle, layout: Layout, samples: int,
                       check_sample=None) -> tuple[list[dict], dict]:
    """The first `samples` samples of `src` in shard order (fewer if it has fewer), encoded and packed exactly as
    training's (the stage's seq_len, trainer.micro_batch_size rows per micro-batch), and the counts of samples
    skipped or dropped on the way. Every rank builds the same list; BadSample and too-long samples are skipped."""
    chain = Chain([src], cfg, bundle, dataclasses.replace(layout, rank=0, world=1, grad_accum=1), 0, 1)
    chain.check = check_sample
    source = chain.mixture.sources[src.name]
    rows, taken = [], 0
    try:
        while taken < samples:
            try:
                raw = next(source)
                if source.read_epoch > 0:  # wrapped around: the source has fewer samples than asked for
                    break
                taken += 1
                rows.extend(chain.packer.add(chain.encode({**raw, "source": src.name})))
            except BadSample as e:
                chain.mixture.count_bad(src.name, e)
                if source.read_epoch > 0 or source.epoch > 1:
                    break
        rows.extend(chain.packer.flush())
    finally:
        source.close()
    batches = [collate(rows[i:i + layout.micro_batch], chain.pack_cfg) for i in range(0, len(rows), layout.micro_batch)]
    return batches, chain.metrics()


SOURCE_EXAMPLE = "{name: docs, urls: '/data/docs-{0000..0099}.tar', weight: 1}"


def _source_config(i: int, entry, key: str = "data.sources") -> SourceConfig:
    """One `data.sources` (or `key`) entry as a SourceConfig; a misspelt or missing key or a wrong type names the
    entry."""
    fields = {f.name: f for f in dataclasses.fields(SourceConfig)}
    if not isinstance(entry, dict):
        raise ValueError(f"{key}[{i}]={entry!r} is not a mapping; each entry reads like {SOURCE_EXAMPLE}")
    where = f"{key}[{i}]" + (f" ({entry['name']})" if "name" in entry else "")
    unknown = sorted(set(entry) - set(fields))
    missing = [n for n, f in fields.items() if n not in entry
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        what = "; ".join(([f"unknown key(s) {unknown}"] if unknown else []) +
                         ([f"missing key(s) {missing}"] if missing else []))
        raise ValueError(f"{where}: {what}. Known keys: {list(fields)} (e.g. {SOURCE_EXAMPLE})")
    types = {"name": ((str,), "a string"), "urls": ((str, list), "a path/pattern string or a list of them"),
             "weight": ((int, float), "a number"), "shuffle_buffer": ((int,), "an integer"),
             "seed": ((int,), "an integer"), "shuffle_shards": ((bool,), "true or false"),
             "max_member_bytes": ((int, type(None)), "a byte count")}
    for key, value in entry.items():
        ok, need = types.get(key, ((object,), ""))
        if (not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok)
                or (key == "urls" and isinstance(value, list) and not all(isinstance(u, str) for u in value))):
            raise ValueError(f"{where}: {key}={value!r} must be {need}")
    if not entry.get("weight", 1.0) > 0:
        raise ValueError(f"{where}: weight={entry['weight']} must be > 0 (leave the source out instead)")
    return SourceConfig(**entry)


@dataclass
class Layout:
    """Who this process is and how a step is split; passed in, never read from the environment."""

    rank: int
    world: int
    micro_batch: int  # packed rows per micro-batch
    grad_accum: int
    seq_len: int


class Chain:
    """One worker's chain, from RawSamples to collated micro-batches, with its state."""

    def __init__(self, sources: list[SourceConfig], cfg: DataConfig, bundle, layout: Layout, worker: int,
                 num_workers: int):
        sources = [s if s.max_member_bytes is not None else  # a source's own limit, else data.max_member_bytes
                   dataclasses.replace(s, max_member_bytes=cfg.max_member_bytes) for s in sources]
        self.mixture = Mixture({s.name: s.build(layout.rank, layout.world, worker, num_workers) for s in sources},
                               [s.weight for s in sources], cfg.seed, layout.rank, worker,
                               max_bad_fraction=cfg.max_bad_fraction, min_pulls=cfg.min_pulls)
        self.max_skips_in_row, self.skips_in_row = cfg.max_skips_in_row, 0
        self.encoder = build_encoder(cfg.encoder, bundle, max_video_frames=cfg.max_video_frames)
        self.spec = rope.RopeSpec.from_config(bundle.model.config)
        varlen = getattr(bundle.model.config, "_attn_implementation", None) in VARLEN  # else the dense 4D mask
        self.pack_cfg = PackConfig(seq_len=layout.seq_len, buffer_size=cfg.pack_buffer, overlong=cfg.overlong,
                                   pad_id=bundle.tokenizer.pad_token_id, attention="varlen" if varlen else "dense")
        self.packer = self.pack_cfg.build()
        self.rows: list = []  # finished rows not yet in a micro-batch
        self.micro_batch = layout.micro_batch

    check = None  # the objective's per-sample check (raises BadSample), set by Pipeline

    def encode(self, raw: dict) -> list[dict]:
        samples = self.encoder.encode(raw)
        if self.check is not None:
            for s in samples:
                self.check(s)
        return [rope.attach(self.spec, s) for s in samples]

    def next_micro_batch(self) -> dict:
        while len(self.rows) < self.micro_batch:
            raw = next(self.mixture)
            packed = self.packer.stats["units"]
            try:
                self.rows.extend(self.packer.add(self.encode(raw)))
            except BadSample as e:
                self.mixture.count_bad(raw["source"], e)
            self._check_progress(self.packer.stats["units"] > packed)
        rows, self.rows = self.rows[:self.micro_batch], self.rows[self.micro_batch:]
        return collate(rows, self.pack_cfg)

    def _check_progress(self, packed: bool) -> None:
        """Samples dropped as too long are counted, not judged by max_bad_fraction: without this guard a seq_len
        below what most samples need (the start-up probe reads only the first few) would spin here for ever."""
        self.skips_in_row = 0 if packed else self.skips_in_row + 1
        if self.max_skips_in_row and self.skips_in_row >= self.max_skips_in_row:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.metrics().items())) or "none"
            raise RuntimeError(
                f"the last {self.skips_in_row} samples pulled were all skipped or dropped, none packed (seq_len "
                f"{self.pack_cfg.seq_len}, data.overlong={self.pack_cfg.overlong}); counts so far: {counts}. Raise "
                f"stage.seq_len, set data.overlong=truncate (text-only samples), or fix the data; "
                f"data.max_skips_in_row={self.max_skips_in_row} sets this limit (0: off)")

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict(), "packer": self.packer.state_dict(),
                "rows": [[encode_raw(s["raw"]) for s in _units(row)] for row in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.packer.load_state_dict(state["packer"], self.encode)
        self.rows = [[s for raw in row for s in self.encode(decode_raw(raw))] for row in state["rows"]]

    def metrics(self) -> dict:
        """Skipped samples per source and reason (bad data, too long for seq_len); `epoch/<source>`."""
        out = dict(self.mixture.metrics())
        for what in ("dropped", "truncated"):
            for src, reasons in self.packer.stats[what].items():
                for reason, n in reasons.items():
                    out[f"{what}/{src}/{reason}"] = n
        return out


def _units(row: list[dict]) -> list[dict]:
    """The first sample of each unit (samples of one raw record share its `raw`)."""
    out, seen = [], set()
    for s in row:
        if id(s["raw"]) not in seen:
            seen.add(id(s["raw"]))
            out.append(s)
    return out


def _with_check(chain: Chain, check_sample) -> Chain:
    chain.check = check_sample
    return chain


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers share the trainer's process group (and its Slurm job), so a TERM/USR1/INT sent to all of
    them (scancel, Slurm preemption, the pipeline runner, Ctrl-C) reaches the workers too; dying there would fail
    the trainer's step before it can checkpoint. The trainer alone handles those signals and then shuts its
    workers down itself: a SIGTERM from the trainer (DataLoader's terminate, multiprocessing's exit clean-up)
    still ends a worker, one from anyone else is ignored. The sender is only known to `sigwaitinfo`, so SIGTERM
    is blocked and waited for in a thread."""
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-trainer", daemon=True).start()


class _Stream(torch.utils.data.IterableDataset):
    """What a DataLoader worker runs: its chain, from the state it is given, forever."""

    def __init__(self, make_chain, states: list, rotate: int, num_workers: int):
        self.make_chain, self.states, self.rotate, self.num_workers = make_chain, states, rotate, num_workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # physical worker w plays logical slot (w + rotate): round-robin resumes at the right worker
        slot = ((info.id if info else 0) + self.rotate) % self.num_workers
        chain = self.make_chain(slot)
        if self.states[slot] is not None:
            chain.load_state_dict(self.states[slot])
        while True:
            batch = chain.next_micro_batch()
            yield slot, batch, chain.state_dict(), chain.metrics()


class Pipeline:
    """`next_step()` gives this rank's micro-batches of one optimizer step; `state_dict()` resumes exactly."""

    def __init__(self, cfg: DataConfig, mixture: dict | None, bundle, layout: Layout, check_sample=None):
        self.cfg, self.layout = cfg, layout
        self.sources = source_configs(cfg, mixture)
        self.n = max(1, cfg.num_workers)
        self.states: list[Optional[dict]] = [None] * self.n
        self.consumed = 0  # micro-batches taken; the next one comes from logical worker consumed % n
        self._metrics: list[dict] = [{} for _ in range(self.n)]
        self._make = lambda slot: _with_check(Chain(self.sources, cfg, bundle, layout, slot, self.n), check_sample)
        self._chain = self._make(0) if cfg.num_workers == 0 else None
        self._it = None

    def _iterator(self):
        if self._it is None:
            ds = _Stream(self._make, self.states, self.consumed % self.n, self.n)
            self._it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                                        worker_init_fn=_ignore_stop_signals,
                                                        persistent_workers=False, prefetch_factor=2))
        return self._it

    def _next(self) -> dict:
        if self._chain is not None:
            batch = self._chain.next_micro_batch()
            self._metrics[0] = self._chain.metrics()
        else:
            slot, batch, state, metrics = next(self._iterator())
            assert slot == self.consumed % self.n, "round-robin order broken"
            self.states[slot], self._metrics[slot] = state, metrics
        self.consumed += 1
        return batch

    def close(self) -> None:
        """Stops the loader workers (they ignore stop signals, so the trainer ends them after its checkpoint)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def next_step(self) -> list[dict]:
        return [self._next() for _ in range(self.layout.grad_accum)]

    def metrics(self) -> dict:
        """The workers' counters summed; `epoch/<source>` is the furthest worker's."""
        out: dict = {}
        for m in self._metrics:
            for k, v in m.items():
                out[k] = max(out.get(k, 0), v) if k.startswith("epoch/") else out.get(k, 0) + v
        return out

    def state_dict(self) -> dict:
        states = [self._chain.state_dict()] if self._chain is not None else self.states
        return {"world": self.layout.world, "num_workers": self.cfg.num_workers, "consumed": self.consumed,
                "micro_batch": self.layout.micro_batch, "seq_len": self.layout.seq_len, "workers": states}

    def load_state_dict(self, state: dict) -> None:
        for key, have in (("world", self.layout.world), ("num_workers", self.cfg.num_workers),
                          ("micro_batch", self.layout.micro_batch), ("seq_len", self.layout.seq_len)):
            if state.get(key) != have:
                name = {"world": "the data-parallel size", "num_workers": "data.num_workers",
                        "micro_batch": "trainer.micro_batch_size", "seq_len": "stage.seq_len"}[key]
                raise ValueError(f"the checkpoint's data state was written with {name}={state.get(key)} but this run "
                                 f"has {have}; each rank/worker resumes its own shard slot exactly, so resume with "
                                 f"the same value or start a new output_dir")
        self.consumed = state["consumed"]
        if self._chain is not None:
            self._chain.load_state_dict(state["workers"][0])
        else:
            self.states = list(state["workers"])
            self._it = None
