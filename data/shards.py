"""WebDataset shards -> RawSample dicts, split over data-parallel ranks and loader workers.

A sample is the run of consecutive tar members sharing a key (`<key>.json` + `<key>.0.jpg` ...), as in
WebDataset; the media name in the record is the part after the key (`"0.jpg"`). Media stay raw bytes (the
encoder decodes them) and nothing is ever unpickled: a sample with a pickle-style member is refused unread.
A member bigger than `max_member_bytes` is skipped unread too (its sample is a "member_too_large" BadSample),
so a crafted header cannot make a reader allocate an arbitrary amount.

Split rule. The `slots = world * num_workers` readers are numbered `s = rank * num_workers + worker`. Every
epoch all ranks draw the same seeded permutation of the shard list.
  - `n_shards >= slots`: slot s reads the permuted shards s, s + slots, s + 2 * slots, ... whole.
  - `n_shards < slots`: slot s reads permuted shard `s % n_shards` and keeps only its samples with
    `index % k == s // n_shards`, where k is the number of slots sharing that shard. Each of those slots reads
    the shard's headers (skipping the others' data unread), so prefer at least `slots` shards.
Either way each sample of an epoch goes to exactly one slot. Epochs never end: after its last shard a slot
starts the next epoch's permutation.

Resume is O(1): the state holds the shard position and, for uncompressed local tars, the byte offset of the
next unread sample's first header (a seek); for `pipe:` and compressed shards the number of members of the
current shard already consumed (skipped unread on restore). The shuffle buffer's samples are saved as JSON
with media in base64.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Optional, Union

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as _wds_expand
from webdataset.tariterators import base_plus_ext

from data.errors import BadSample, is_pickle_name

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_MEMBER_BYTES = 256 * 2**20  # default data.max_member_bytes


def expand_urls(urls: Union[str, list]) -> list[str]:
    """Brace patterns (`/d/x-{0000..0099}.tar`) and lists of them -> the flat list of shard URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for u in items:
        out.extend(_wds_expand(str(u)))
    return out


def _local_path(url: str) -> Optional[str]:
    """The file path of a local shard URL, None for `pipe:` and remote (`scheme://`) URLs."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return None
    return url[len("file://"):] if url.startswith("file://") else url[len("file:"):] if url.startswith("file:") else url


class _StrictTarInfo(tarfile.TarInfo):
    """Turns a short or missing header block into an error: tarfile's stream mode ends silently there, which
    would hide a tar cut at a member boundary. A complete tar ends with zero blocks, which still end cleanly."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"unexpected end of data: {len(buf)}-byte header block (no end-of-archive marker)")
        return super().frombuf(buf, encoding, errors)


class _TooLarge:
    """Stands in for the data of a member over max_member_bytes, which is never read."""

    def __init__(self, size: int):
        self.size = size


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a named set of shards with its mixture weight."""

    name: str
    urls: Union[str, list]  # local paths, brace patterns, pipe: URLs (or a list of them)
    weight: float = 1.0
    shuffle_buffer: int = 0  # samples held for in-stream shuffling; 0 = off
    seed: int = 0
    shuffle_shards: bool = True  # a new seeded shard order every epoch
    max_member_bytes: Optional[int] = None  # bigger tar members are skipped unread; None: data.max_member_bytes

    def shards(self) -> list[str]:
        shards = expand_urls(self.urls)
        if not shards:
            raise ValueError(f"data.sources[{self.name}].urls={self.urls!r} matches no shard; give a path, "
                             f"a brace pattern like /d/x-{{0000..0099}}.tar or a pipe: URL")
        for url in shards:
            path = _local_path(url)
            if path is not None and not os.path.exists(path):
                raise ValueError(f"data.sources[{self.name}]: shard {path} does not exist; fix the path or the "
                                 f"brace range in urls={self.urls!r}")
        return shards

    def build(self, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1) -> "ShardSource":
        return ShardSource(self, rank, world, worker, num_workers)


class ShardSource:
    """Infinite iterator of RawSample dicts for one (rank, worker) slot; raises BadSample and stays usable."""

    def __init__(self, cfg: SourceConfig, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1):
        if not (0 <= rank < world and 0 <= worker < num_workers):
            raise ValueError(f"shard source {cfg.name}: rank={rank}/world={world}, worker={worker}/"
                             f"num_workers={num_workers} is not a valid slot")
        if cfg.shuffle_buffer < 0:
            raise ValueError(f"data.sources[{cfg.name}].shuffle_buffer={cfg.shuffle_buffer} must be >= 0")
        self.max_member_bytes = MAX_MEMBER_BYTES if cfg.max_member_bytes is None else cfg.max_member_bytes
        if isinstance(self.max_member_bytes, bool) or not isinstance(self.max_member_bytes, int) or \
                self.max_member_bytes <= 0:
            raise ValueError(f"data.sources[{cfg.name}].max_member_bytes={cfg.max_member_bytes} must be > 0 "
                             f"(bytes; data.max_member_bytes sets it for every source)")
        self.cfg, self.name = cfg, cfg.name
        self.rank, self.world, self.worker, self.num_workers = rank, world, worker, num_workers
        self.shards = cfg.shards()
        self.rng = random.Random(f"shuffle/{cfg.seed}/{rank}/{worker}")
        self.buffer: list[dict] = []
        # position: epoch, index into this slot's shard list of the epoch, and where in that shard
        self.epoch, self.shard_pos, self.sample_index, self.offset, self.members = 0, 0, 0, 0, 0
        self.read_epoch = 0  # epoch of the last sample read from a shard (before the shuffle buffer)
        self._plan()
        self._tar = self._file = self._key = None

    # ---- which shards this slot reads -------------------------------------------------------------
    def _plan(self) -> None:
        """This epoch's shard list for this slot, and the stride/phase of the samples it keeps in them."""
        n, slots = len(self.shards), self.world * self.num_workers
        s = self.rank * self.num_workers + self.worker
        order = list(range(n))
        if self.cfg.shuffle_shards:
            random.Random(f"shards/{self.cfg.seed}/{self.epoch}").shuffle(order)
        if n >= slots:
            self.plan, self.stride, self.phase = [self.shards[i] for i in order[s::slots]], 1, 0
        else:
            j = s % n
            self.plan, self.stride, self.phase = [self.shards[order[j]]], len(range(j, slots, n)), s // n

    # ---- reading one shard ----------------------------------------------------------------------
    def _open(self) -> None:
        url = self.plan[self.shard_pos]
        path = _local_path(url)
        self._seekable = path is not None and path.endswith(".tar")
        if self._seekable:
            self._file = open(path, "rb")
            self._file.seek(self.offset)
            self._base = self.offset
        else:
            self._file = gopen(url, "rb")
            self._base = 0
        self._tar = tarfile.open(fileobj=self._file, mode="r|" if self._seekable else "r|*", tarinfo=_StrictTarInfo)
        # a seek lands after the consumed members, so the count goes on from there (the state is then the same
        # as an uninterrupted reader's); a pipe starts at member 0 and skips them
        self._key, self._group, self._pending = None, self.sample_index - 1, None
        self._read_members = self.members if self._seekable else 0
        if not self._seekable:  # pipe/compressed: skip the consumed members unread
            while self._read_members < self.members:
                ti = self._tar.next()
                if ti is None:
                    break
                self._read_members += ti.isreg()

    def _close(self) -> None:
        tar, f, self._tar, self._file, self._key = self._tar, self._file, None, None, None
        for obj in (tar, f):
            try:
                if obj is not None:
                    obj.close()
            except Exception as e:  # a pipe that exited non-zero after we stopped reading it
                log.warning("data source %s: closing a shard: %s", self.name, e)

    def _next_member(self):
        """(key, name, data or None, header offset, members before it) of the next sample member, None at the end.

        Data is read only for this slot's samples and never for pickle-style members or ones over
        max_member_bytes (those get a _TooLarge); tarfile's stream mode skips unread data."""
        while True:
            ti = self._tar.next()
            if ti is None:
                return None
            if not ti.isreg():
                continue
            self._read_members += 1
            key, name = base_plus_ext(ti.name)
            if key is None or key.split("/")[-1].startswith("__"):
                continue  # no extension, or WebDataset metadata member: not part of a sample
            if key != self._key:
                self._key, self._group = key, self._group + 1
            mine = self._group % self.stride == self.phase
            if not mine or is_pickle_name(name):
                data = None
            elif ti.size > self.max_member_bytes:
                data = _TooLarge(ti.size)
            else:
                data = self._tar.extractfile(ti).read()
            return key, name, data, self._base + ti.offset, self._read_members - 1

    def _next_group(self):
        """(key, {name: data}, mine, shard ended) of the next sample of the current shard, None if there is none.

        Updates the resume point to the first header of the following sample."""
        first = self._pending or self._next_member()
        self._pending = None
        if first is None:
            return None
        key = first[0]
        mine = self._group % self.stride == self.phase
        members = {first[1]: first[2]}
        while True:
            m = self._next_member()
            if m is None or m[0] != key:
                self._pending = m
                break
            members[m[1]] = m[2]
        if self._pending is not None:
            self.offset, self.members, self.sample_index = self._pending[3], self._pending[4], self._group
        return key, members, mine, self._pending is None

    def _advance(self) -> None:
        """Moves the position to the start of the next shard of this slot (the next epoch after the last)."""
        self._close()
        self.shard_pos += 1
        self.offset = self.members = self.sample_index = 0
        if self.shard_pos >= len(self.plan):
            self.epoch, self.shard_pos = self.epoch + 1, 0
            self._plan()

    def _read(self) -> dict:
        """The next sample of this slot, before the shuffle buffer."""
        for _ in range(4 * len(self.shards) + 8):
            url, opened = self.plan[self.shard_pos], self._tar is not None
            try:
                if self._tar is None:
                    self._open()
                    opened = True
                while True:
                    group = self._next_group()
                    if group is None:
                        break
                    key, members, mine, ended = group
                    self.read_epoch = self.epoch  # the epoch this sample belongs to (before any advance)
                    if ended:  # the saved position is already the next shard's start
                        self._advance()
                    if mine:
                        return self._sample(key, members, url)
                    if ended:
                        break
            except (tarfile.TarError, EOFError, OSError) as e:
                last_key = self._key  # the sample being read when the shard broke
                self._advance()
                raise BadSample("truncated_tar" if opened else "unreadable_shard",
                                key=f"{url}:{last_key or '?'}", detail=str(e)) from None
            if self._tar is not None:
                self._advance()
        raise ValueError(f"data.sources[{self.name}]: slot rank={self.rank} worker={self.worker} found no sample "
                         f"in {4 * len(self.shards) + 8} shards in a row; check that the shards are not empty and "
                         f"that there are at least as many samples as ranks x workers")

    def _sample(self, key: str, members: dict, url: str) -> dict:
        pickles = sorted(n for n in members if is_pickle_name(n))
        if pickles:
            raise BadSample("pickle_member", key, f"{url}: members {pickles} are pickle-style; never decoded")
        big = {n: v.size for n, v in sorted(members.items()) if isinstance(v, _TooLarge)}
        if big:
            raise BadSample("member_too_large", key, f"{url}: members {big} (bytes) are over data.max_member_bytes="
                                                     f"{self.max_member_bytes}; skipped unread. Raise "
                                                     f"data.max_member_bytes (or this source's max_member_bytes) "
                                                     f"if they are meant to be read")
        if "json" not in members:
            raise BadSample("missing_json", key, f"{url}: members {sorted(members)}")
        try:
            record = json.loads(members.pop("json"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise BadSample("bad_json", key, f"{url}: {type(e).__name__}: {e}"[:500]) from None
        if not isinstance(record, dict):
            raise BadSample("bad_json", key, f"{url}: the record is a {type(record).__name__}, not an object")
        return dict(key=key, source=self.name, record=record, media=members)

    # ---- iterator with a shuffle buffer --------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        size = self.cfg.shuffle_buffer
        if not size:
            return self._read()
        while len(self.buffer) < size:
            self.buffer.append(self._read())  # a BadSample here leaves the buffer partly filled: fine
        i = self.rng.randrange(size)
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def close(self) -> None:
        self._close()

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = self.rng.getstate()
        return {"version": STATE_VERSION, "world": self.world, "num_workers": self.num_workers,
                "num_shards": len(self.shards), "epoch": self.epoch, "read_epoch": self.read_epoch,
                "shard_pos": self.shard_pos,
                "sample_index": self.sample_index, "offset": self.offset, "members": self.members,
                "rng": [st[0], list(st[1]), st[2]], "buffer": [encode_raw(s) for s in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        for k, mine in (("world", self.world), ("num_workers", self.num_workers)):
            if state[k] != mine:
                raise ValueError(f"data source {self.name}: the checkpoint was written with world={state['world']}, "
                                 f"num_workers={state['num_workers']} but this run has world={self.world}, "
                                 f"num_workers={self.num_workers}; resume with the same ranks and loader workers "
                                 f"or start a new output_dir")
        if state["num_shards"] != len(self.shards):
            raise ValueError(f"data source {self.name}: the checkpoint saw {state['num_shards']} shards but urls "
                             f"now expand to {len(self.shards)}; restore the original shard list")
        self._close()
        self.epoch, self.shard_pos = state["epoch"], state["shard_pos"]
        self.read_epoch = state.get("read_epoch", state["epoch"])  # states before epoch counters lack it
        self.sample_index, self.offset, self.members = state["sample_index"], state["offset"], state["members"]
        self._plan()
        r = state["rng"]
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        self.buffer = [decode_raw(s) for s in state["buffer"]]


def encode_raw(sample: dict) -> dict:
    """RawSample -> JSON-serialisable dict (media bytes as base64 strings); shard buffers and the packer save these."""
    media = {}
    for name, data in sample.get("media", {}).items():
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"sample {sample.get('key', '?')!r}: media {name!r} is {type(data).__name__}, not bytes; "
                             f"RawSample media must be the member's raw bytes (data/README.md)")
        media[name] = base64.b64encode(bytes(data)).decode("ascii")
    return {**sample, "media": media}


def decode_raw(sample: dict) -> dict:
    return {**sample, "media": {k: base64.b64decode(v) for k, v in sample.get("media", {}).items()}}


def write_tar(path: str, samples) -> int:
    """Writes `(key, {member_name: bytes})` samples as one WebDataset tar, deterministically (mtime 0, fixed owner).

    Returns the file size. Used by the converter, the shapes cache and the tests."""
    from webdataset.writer import TarWriter

    with open(path, "wb") as f:
        w = TarWriter(f, encoder=False, mtime=0, user="data", group="data")
        for key, members in samples:
            if "." in key.split("/")[-1]:
                raise ValueError(f"sample key {key!r} contains a dot; WebDataset splits member names at the first dot")
            w.write({"__key__": key, **members})
        w.close()
    return os.path.getsize(path)
