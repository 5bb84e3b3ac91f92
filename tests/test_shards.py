"""Shard reading: rank x worker split, brace and pipe: URLs, exact O(1) resume, bad tars and pickle members."""
from __future__ import annotations

import json
import os
import pickle
import tarfile

import pytest

from data.errors import BadSample
from data.shards import ShardSource, SourceConfig, expand_urls, write_tar


def make_shards(d, n_shards: int, per_shard: int, prefix: str = "s") -> list[str]:
    """n_shards tars of per_shard samples; sample i of shard j has key f"{prefix}{j}_{i}", a record and 1-2 media."""
    paths = []
    for j in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{prefix}{j}_{i}"
            members = {"json": json.dumps({"content": [{"type": "text", "text": key}]}).encode(),
                       "0.jpg": os.urandom(1 + (i * 97) % 700)}
            if i % 3 == 0:
                members["1.png"] = key.encode() * 5
            samples.append((key, members))
        paths.append(str(d / f"{prefix}-{j:04d}.tar"))
        write_tar(paths[-1], samples)
    return paths


def epoch_keys(src: ShardSource) -> list[str]:
    """The keys a slot reads in epoch 0 (no shuffle buffer)."""
    keys = []
    while True:
        s = next(src)
        if src.read_epoch > 0:
            return keys
        keys.append(s["key"])


def all_slot_keys(pattern: str, world: int, workers: int, **kw) -> list[list[str]]:
    cfg = SourceConfig(name="t", urls=pattern, **kw)
    return [epoch_keys(cfg.build(r, world, w, workers)) for r in range(world) for w in range(workers)]


@pytest.mark.parametrize("n_shards,world,workers", [(8, 2, 2), (7, 2, 2), (3, 2, 4), (1, 2, 3), (5, 1, 1)])
def test_split_over_ranks_and_workers_has_no_duplicates_or_gaps(tmp_path, n_shards, world, workers):
    make_shards(tmp_path, n_shards, 10)
    slots = all_slot_keys(str(tmp_path / f"s-{{0000..{n_shards - 1:04d}}}.tar"), world, workers, seed=3)
    flat = [k for keys in slots for k in keys]
    assert len(flat) == len(set(flat)) == n_shards * 10
    assert all(slots), "every slot gets samples"


def test_epochs_reshuffle_shard_order_and_continue(tmp_path):
    make_shards(tmp_path, 6, 2)
    src = SourceConfig(name="t", urls=str(tmp_path / "s-{0000..0005}.tar"), seed=1).build()
    keys = [next(src)["key"] for _ in range(36)]
    epochs = [keys[i:i + 12] for i in range(0, 36, 12)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and len(set(epochs[0])) == 12
    assert len({tuple(e) for e in epochs}) > 1, "shard order differs between epochs"


def test_brace_list_and_pipe_urls_read_the_same_samples(tmp_path):
    paths = make_shards(tmp_path, 3, 4)
    assert expand_urls(str(tmp_path / "s-{0000..0002}.tar")) == paths
    assert expand_urls([paths[0], str(tmp_path / "s-{0001..0002}.tar")]) == paths

    def read(urls):
        src = SourceConfig(name="t", urls=urls, shuffle_shards=False).build()
        return [next(src) for _ in range(12)]

    local = read(str(tmp_path / "s-{0000..0002}.tar"))
    piped = read([f"pipe:cat {p}" for p in paths])
    assert [s["key"] for s in local] == [f"s{j}_{i}" for j in range(3) for i in range(4)]
    assert local == piped
    s = local[3]
    assert s["source"] == "t" and s["record"]["content"][0]["text"] == "s0_3"
    assert set(s["media"]) == {"0.jpg", "1.png"} and s["media"]["1.png"] == b"s0_3" * 5


def test_missing_shard_file_is_a_config_error(tmp_path):
    make_shards(tmp_path, 2, 1)
    with pytest.raises(ValueError, match="s-0002.tar does not exist"):
        SourceConfig(name="t", urls=str(tmp_path / "s-{0000..0002}.tar")).build()


def _roundtrip(state):
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("pipe", [False, True])
@pytest.mark.parametrize("buffer", [0, 7])
def test_resume_mid_shard_is_exact(tmp_path, pipe, buffer):
    paths = make_shards(tmp_path, 5, 9)
    urls = [f"pipe:cat {p}" for p in paths] if pipe else paths
    cfg = SourceConfig(name="t", urls=urls, shuffle_buffer=buffer, seed=5)
    ref = cfg.build(1, 2, 0, 1)
    expected, states = [], []
    for _ in range(60):  # crosses epochs: slot has 2-3 shards of 9 per epoch
        expected.append(next(ref))
        states.append(_roundtrip(ref.state_dict()))
    for cut in (4, 13, 31):
        a = cfg.build(1, 2, 0, 1)
        got = [next(a) for _ in range(cut)]
        state = _roundtrip(a.state_dict())
        b = cfg.build(1, 2, 0, 1)
        b.load_state_dict(state)
        for i in range(cut, 60):
            got.append(next(b))
            # the restored reader's own state matches too (so a second resume is exact)
            assert _roundtrip(b.state_dict()) == states[i], f"state {i} after the cut at {cut}"
        assert got == expected, f"cut at {cut}"
    if buffer:
        assert [s["key"] for s in expected[:20]] != sorted(s["key"] for s in expected[:20])


def test_local_resume_seeks_instead_of_rereading(tmp_path):
    """After saving mid-shard, garbage over the consumed part of the shard must not matter: restore seeks."""
    (path,) = make_shards(tmp_path, 1, 12)
    cfg = SourceConfig(name="t", urls=path)
    a = cfg.build()
    [next(a) for _ in range(7)]
    state = a.state_dict()
    assert state["offset"] > 0
    expected = [next(a)["key"] for _ in range(5)]
    with open(path, "r+b") as f:
        f.write(b"\xff" * state["offset"])
    b = cfg.build()
    b.load_state_dict(state)
    assert [next(b)["key"] for _ in range(5)] == expected


def test_restore_with_other_layout_is_refused(tmp_path):
    make_shards(tmp_path, 4, 2)
    cfg = SourceConfig(name="docs", urls=str(tmp_path / "s-{0000..0003}.tar"))
    state = cfg.build(0, 2, 0, 2).state_dict()
    with pytest.raises(ValueError, match=r"world=2, num_workers=2 but this run has world=4, num_workers=2"):
        cfg.build(0, 4, 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_workers=2 but this run has world=2, num_workers=1"):
        cfg.build(0, 2, 0, 1).load_state_dict(state)


def _member_offsets(path):
    with tarfile.open(path) as t:
        return [(m.offset, m.offset_data, m.size) for m in t.getmembers()]


@pytest.mark.parametrize("where", ["data", "header", "boundary"])
@pytest.mark.parametrize("pipe", [False, True])
def test_truncated_tar_raises_once_and_the_source_goes_on(tmp_path, where, pipe):
    paths = make_shards(tmp_path, 3, 6)
    header, data, size = _member_offsets(paths[1])[7]
    cut = {"data": data + size // 2, "header": header + 100, "boundary": header}[where]
    with open(paths[1], "r+b") as f:
        f.truncate(cut)
    urls = [f"pipe:cat {p}" for p in paths] if pipe else paths
    src = SourceConfig(name="t", urls=urls, shuffle_shards=False).build()
    keys, bad = [], []
    while len(keys) + len(bad) < 18 and not (keys and keys[-1] == "s2_5"):
        try:
            keys.append(next(src)["key"])
        except BadSample as e:
            bad.append(e)
    assert [e.reason for e in bad] == ["truncated_tar"] and "s-0001.tar" in bad[0].key
    assert keys[:6] == [f"s0_{i}" for i in range(6)] and keys[-6:] == [f"s2_{i}" for i in range(6)]
    assert 0 < len(keys) - 12 < 6, "the samples before the cut in shard 1 are delivered"


class _Payload:
    """Unpickling this creates a directory: proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickle_members_are_refused_unread(tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    samples = [("a", {"json": b'{"content": []}', "0.jpg": b"img"}),
               ("b", {"json": b'{"content": []}', "0.pth": pickle.dumps(_Payload(marker))}),
               ("c", {"json": b'{"content": []}', "w.pkl": pickle.dumps(_Payload(marker))}),
               ("d", {"json": b'{"content": []}'})]
    path = str(tmp_path / "p.tar")
    write_tar(path, samples)
    src = SourceConfig(name="t", urls=path).build()
    out = []
    for _ in range(4):
        try:
            out.append(next(src)["key"])
        except BadSample as e:
            out.append(e.reason)
            assert "0.pth" in e.detail or "w.pkl" in e.detail
    assert out == ["a", "pickle_member", "pickle_member", "d"]
    assert not os.path.exists(marker)



def _spy_reads(monkeypatch) -> list[str]:
    """Names of the tar members whose data the reader opens (tarfile.extractfile), to prove others stay unread."""
    read: list[str] = []
    real = tarfile.TarFile.extractfile

    def extractfile(self, member):
        read.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    return read


def _outcomes(src, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(src)["key"])
        except BadSample as e:
            out.append((e.reason, e.key, e.detail))
    return out


def test_bare_and_dotted_pickle_members_are_refused_unread(tmp_path, monkeypatch):
    """WebDataset names `b.pyd` "pyd" (no dot left) and `c.0.pickle` "0.pickle": both are pickle-style."""
    payload = pickle.dumps(_Payload(str(tmp_path / "UNPICKLED")))
    samples = [("a", {"json": b'{"content": []}'}), ("b", {"json": b'{"content": []}', "pyd": payload}),
               ("c", {"json": b'{"content": []}', "0.pickle": payload}),
               ("d", {"json": b'{"content": []}', "PT": payload}), ("e", {"json": b'{"content": []}', "x.PKL": payload}),
               ("f", {"json": b'{"content": []}', "0.jpg": b"img"})]
    path = str(tmp_path / "p.tar")
    write_tar(path, samples)
    read = _spy_reads(monkeypatch)
    out = _outcomes(SourceConfig(name="t", urls=path).build(), 6)
    assert [o if isinstance(o, str) else o[:2] for o in out] == \
        ["a", ("pickle_member", "b"), ("pickle_member", "c"), ("pickle_member", "d"), ("pickle_member", "e"), "f"]
    assert [o[2].split(": ", 1)[1] for o in out[1:5]] == [
        f"members [{n!r}] are pickle-style; never decoded" for n in ("pyd", "0.pickle", "PT", "x.PKL")]
    assert sorted(read) == sorted(["a.json", "b.json", "c.json", "d.json", "e.json", "f.json", "f.0.jpg"])


@pytest.mark.parametrize("pipe", [False, True])
def test_a_member_over_max_member_bytes_is_skipped_unread_and_counted(tmp_path, monkeypatch, pipe):
    path, big_json = str(tmp_path / "big.tar"), b'{"content": [], "pad": "' + b"x" * 2000 + b'"}'
    write_tar(path, [("a", {"json": b'{"content": []}', "0.mp4": b"v" * 5000}),
                     ("b", {"json": b'{"content": []}', "0.jpg": b"i" * 999}), ("c", {"json": big_json})])
    read = _spy_reads(monkeypatch)
    src = SourceConfig(name="t", urls=f"pipe:cat {path}" if pipe else path, max_member_bytes=1000).build()
    out = _outcomes(src, 4)
    assert [o if isinstance(o, str) else o[:2] for o in out] == \
        [("member_too_large", "a"), "b", ("member_too_large", "c"), ("member_too_large", "a")]
    assert "'0.mp4': 5000" in out[0][2] and "data.max_member_bytes=1000" in out[0][2]
    assert f"'json': {len(big_json)}" in out[2][2]
    assert "a.0.mp4" not in read and "c.json" not in read and "b.0.jpg" in read
    for bad in (0, "256MB"):
        with pytest.raises(ValueError, match="max_member_bytes"):
            SourceConfig(name="t", urls=path, max_member_bytes=bad).build()

def test_failing_pipe_is_an_unreadable_shard_and_the_source_goes_on(tmp_path):
    (path,) = make_shards(tmp_path, 1, 2)
    src = SourceConfig(name="t", urls=["pipe:exit 3", path], shuffle_shards=False).build()
    out = []
    for _ in range(6):
        try:
            out.append(next(src)["key"])
        except BadSample as e:
            out.append((e.reason, e.key))
    assert out == [("unreadable_shard", "pipe:exit 3:?"), "s0_0", "s0_1"] * 2


def test_missing_and_bad_json(tmp_path):
    path = str(tmp_path / "j.tar")
    deep = b'{"content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # json.loads: RecursionError
    write_tar(path, [("a", {"0.jpg": b"x"}), ("b", {"json": b"{not json"}), ("c", {"json": b"[1, 2]"}),
                     ("e", {"json": deep}), ("d", {"json": b'{"content": []}'})])
    src = SourceConfig(name="t", urls=path).build()
    reasons = []
    for _ in range(5):
        try:
            reasons.append(next(src)["key"])
        except BadSample as e:
            reasons.append((e.reason, e.key))
    assert reasons == [("missing_json", "a"), ("bad_json", "b"), ("bad_json", "c"), ("bad_json", "e"), "d"]


def test_metadata_and_non_regular_members_are_ignored(tmp_path):
    path = str(tmp_path / "m.tar")
    write_tar(path, [("a", {"json": b'{"x": 1}'})])
    with tarfile.open(path, "a") as t:  # append a directory entry and a __meta__ member
        t.addfile(tarfile.TarInfo("dir"))
        ti = tarfile.TarInfo("__meta__.json")
        ti.size = 2
        import io
        t.addfile(ti, io.BytesIO(b"{}"))
    src = SourceConfig(name="t", urls=path).build()
    assert [next(src)["key"] for _ in range(3)] == ["a", "a", "a"]


# ---- real two-process run on gloo ----------------------------------------------------------------
def _gloo_worker(rank, world, pattern, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = SourceConfig(name="t", urls=pattern, seed=11)
        mine = []
        for worker in range(2):
            src = cfg.build(rank, world, worker, 2)
            # read a third of an epoch, save, restore into a fresh reader, finish the epoch from there
            first = [next(src)["key"] for _ in range(3)]
            state = json.loads(json.dumps(src.state_dict()))
            src2 = cfg.build(rank, world, worker, 2)
            src2.load_state_dict(state)
            mine.append(first + epoch_keys(src2))
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_split_without_duplicates_or_gaps(tmp_path):
    import socket

    import torch.multiprocessing as mp

    make_shards(tmp_path, 6, 8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "keys.json")
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "s-{0000..0005}.tar"), port, out), nprocs=2)
    gathered = json.load(open(out))
    flat = [k for rank in gathered for worker in rank for k in worker]
    assert len(gathered) == 2 and all(len(r) == 2 for r in gathered)
    assert sorted(flat) == sorted(f"s{j}_{i}" for j in range(6) for i in range(8))
