"""The filesystem layer of run directories (``fcjax.store.fs``): URL resolution, what each
storage library is handed, and the same operations on a local path, a ``file://`` URL, an
in-memory gs:// store (fsspec's memory filesystem standing in for gcsfs: no rename, implicit
directories). Real gs:// and s3:// are not reachable here."""

import json
import sys
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tensorstore as ts
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from fcjax.store.fs import FsError, kv_create_exclusive, location
from fcjax.store.hidden import HiddenStore, read_hidden
from fcjax.store.tables import read_table, update_columns, write_json_atomic, write_table_atomic


class FakeGcs(MemoryFileSystem):
    """gcsfs as the run directory sees it, in memory: whole objects written by one upload
    each (recorded in ``puts``), no rename (``moves`` records attempts), directories only as
    prefixes of object names. Registered for gs:// by the ``gcs`` fixture."""

    protocol = ("gs", "gcs")
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list] = [""]
    puts: ClassVar[list] = []
    moves: ClassVar[list] = []

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            FakeGcs.puts.append(path.removeprefix("gs://"))
        return super()._open(path, mode, **kwargs)

    def mv(self, path1, path2, **kwargs):
        FakeGcs.moves.append((path1, path2))
        raise OSError("an object store has no rename")

    rename = mv


def _fake_conditional_create(kvstore: str, key: str, data: bytes) -> bool:
    """TensorStore's conditional write (tested on a real kvstore below) on the fake store."""
    path = kvstore + key
    with _CREATE_LOCK:
        if path in FakeGcs.store:
            return False
        FakeGcs.puts.append(path.removeprefix("gs://"))
        with MemoryFileSystem.open(FakeGcs(), path, "wb") as f:
            f.write(data)
        return True


_CREATE_LOCK = threading.Lock()


@pytest.fixture
def gcs(monkeypatch):
    """gs:// served by ``FakeGcs`` (fresh and empty), with its conditional create."""
    import fsspec

    from fcjax.store import fs

    for scheme in FakeGcs.protocol:
        monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, scheme, FakeGcs)
    fsspec.AbstractFileSystem.clear_instance_cache()
    FakeGcs.store.clear()
    FakeGcs.pseudo_dirs[:] = [""]
    FakeGcs.puts.clear()
    FakeGcs.moves.clear()
    monkeypatch.setattr(fs, "kv_create_exclusive", _fake_conditional_create)
    return FakeGcs


@pytest.fixture(params=["path", "file_url", "gs"])
def root(request, tmp_path):
    if request.param == "path":
        return location(tmp_path / "run")
    if request.param == "file_url":
        return location((tmp_path / "run").as_uri())
    request.getfixturevalue("gcs")
    return location("gs://bucket/run")


# --- resolution -------------------------------------------------------------------------


def test_local_paths_and_file_urls_resolve_to_the_same_place(tmp_path):
    where = tmp_path / "a b%c" / "run"
    plain, url = location(where), location(where.as_uri())
    assert plain.is_local and url.is_local
    assert plain.local_path == url.local_path == where
    assert str(plain) == str(where) and str(url) == where.as_uri()
    assert location(str(url)) == url and location(url) is url
    assert str(location("runs/demo/")) == "runs/demo"  # as pathlib spells it, relative kept
    assert str(location("file://localhost/tmp/x")) == "file:///tmp/x"
    assert plain.as_uri() == url.as_uri() == where.as_uri()
    assert location("gs://bkt/run").as_uri() == "gs://bkt/run"


def test_bucket_urls_resolve_without_contacting_the_store():
    gs = location("gs://bucket//study/./run/")
    assert str(gs) == "gs://bucket/study/run" and not gs.is_local
    assert str(gs / "hidden" / "states") == "gs://bucket/study/run/hidden/states"
    assert gs.name == "run" and str(gs.parent) == "gs://bucket/study"
    assert (gs / "x.json").with_name("y.json") == location("gs://bucket/study/run/y.json")
    assert str(location("s3://b")) == "s3://b"
    with pytest.raises(FsError, match="local path"):
        _ = gs.local_path
    with pytest.raises(FsError, match="going up"):
        _ = gs / "../other"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("http://host/run", "unsupported scheme 'http'"),
        ("ftp://host/run", "unsupported scheme 'ftp'"),
        ("file://host/run", "names a local path"),
        ("gs:///run", "no bucket"),
        ("s3://bucket/run?region=x", "query and fragment"),
    ],
)
def test_bad_urls_are_refused_by_name(bad, message):
    with pytest.raises(FsError, match=message) as err:
        location(bad)
    assert bad in str(err.value)


# --- what each storage library is handed --------------------------------------------------


def test_tensorstore_kvstore_urls(tmp_path):
    assert location("runs/x/states").kvstore() == Path("runs/x/states").absolute().as_uri() + "/"
    assert location((tmp_path / "s").as_uri()).kvstore() == (tmp_path / "s").as_uri() + "/"
    assert location("gs://bkt/study/run/hidden/states").kvstore() == (
        "gs://bkt/study/run/hidden/states/"
    )
    assert location("s3://bkt/run").kvstore() == "s3://bkt/run/"
    # TensorStore parses the URL itself (no request is sent)
    spec = ts.Spec({"driver": "zarr3", "kvstore": location("gs://bkt/a/states").kvstore()})
    assert spec.kvstore.to_json() == {"driver": "gcs", "bucket": "bkt", "path": "a/states/"}
    spec = ts.Spec({"driver": "zarr3", "kvstore": location(tmp_path / "s").kvstore()})
    assert spec.kvstore.to_json() == {"driver": "file", "path": str(tmp_path / "s") + "/"}


def test_epath_forms(gcs):
    rel = location("runs/demo")
    assert rel.epath == epath.Path(Path("runs/demo").absolute())
    assert location("gs://bkt/run").epath == epath.Path("gs://bkt/run")


def test_a_missing_bucket_backend_is_named():
    with pytest.raises(FsError, match="needs the s3fs package"):
        _ = location("s3://bkt/run").epath
    with pytest.raises(FsError, match="needs the gcsfs package"):
        location("gs://bkt/run").check_backend()


# --- the operations, on every kind of store ------------------------------------------------


def test_round_trip_listing_and_removal(root):
    assert not root.exists() and root.glob("*") == []
    (root / "b.json").write_text('{"x": 1}')
    (root / "a.txt").write_bytes(b"\x00\x01")
    (root / "sub" / "part-000001.parquet").write_bytes(b"p1")
    (root / "sub" / "part-000000.parquet").write_bytes(b"p0")
    (root / "sub" / "size.json").write_bytes(b"{}")
    assert root.exists() and root.is_dir() and not root.is_file()
    assert (root / "a.txt").is_file() and (root / "a.txt").read_bytes() == b"\x00\x01"
    assert json.loads((root / "b.json").read_text()) == {"x": 1}
    assert [p.name for p in root.iterdir()] == ["a.txt", "b.json", "sub"]
    parts = (root / "sub").glob("part-*.parquet")
    assert [p.name for p in parts] == ["part-000000.parquet", "part-000001.parquet"]
    assert [p.read_bytes() for p in parts] == [b"p0", b"p1"]
    (root / "b.json").write_text("{}")  # replaces
    assert (root / "b.json").read_text() == "{}"
    (root / "a.txt").unlink()
    (root / "a.txt").unlink()  # missing is fine
    with pytest.raises(FileNotFoundError):
        (root / "a.txt").unlink(missing_ok=False)
    assert not (root / "a.txt").exists()
    (root / "sub").rmtree()
    (root / "sub").rmtree()  # missing is fine
    assert [p.name for p in root.iterdir()] == ["b.json"]


def test_failed_write_leaves_the_old_file_and_nothing_else(root):
    target = root / "table.parquet"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new, but only the first half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        target.write_with(half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in root.iterdir()] == ["table.parquet"]  # no temporary left
    with pytest.raises(RuntimeError):
        (root / "new.parquet").write_with(half_then_fail)
    assert not (root / "new.parquet").exists()


def test_exclusive_create_refuses_a_second_creator(root):
    lock = root / ".lock"
    assert lock.create_exclusive(b"first")
    assert not lock.create_exclusive(b"second")
    assert lock.read_bytes() == b"first"
    lock.unlink()
    assert lock.create_exclusive(b"third") and lock.read_bytes() == b"third"


def test_object_store_writes_are_single_uploads_never_renames(gcs):
    root, store = location("gs://bucket/run"), gcs
    write_table_atomic(root / "steps.parquet", {"x": np.arange(4)})
    write_json_atomic(root / "stages" / "generate.done", {"wall_s": 1.0})
    (root / "plots" / "a.png").write_bytes(b"png")
    assert store.moves == []
    assert store.puts == [
        "bucket/run/steps.parquet",
        "bucket/run/stages/generate.done",
        "bucket/run/plots/a.png",
    ]
    assert sorted(store.store) == sorted(f"gs://{p}" for p in store.puts)  # no temporaries


def test_kvstore_exclusive_create_has_one_winner_among_racers(tmp_path):
    """The conditional write used for gs:// and s3:// locks, on TensorStore's file kvstore
    (its gcs driver sends the same condition as ifGenerationMatch=0)."""
    spec = {"driver": "file", "path": str(tmp_path) + "/"}
    results = {}

    def create(i):
        results[i] = kv_create_exclusive(spec, ".lock", f"racer {i}".encode())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert (tmp_path / ".lock").read_bytes() == f"racer {winners[0]}".encode()
    assert not kv_create_exclusive(spec, ".lock", b"late")


def test_local_exclusive_create_has_one_winner_among_racers(tmp_path):
    lock, results = location(tmp_path / ".lock"), {}

    def create(i):
        results[i] = lock.create_exclusive(f"racer {i}".encode())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results.values()) == 1


# --- the run directory's stores through the layer ------------------------------------------


def test_tables_round_trip(root):
    cols = {
        "example_id": ["a", "b", "c"],
        "step": np.arange(3, dtype=np.int64),
        "conf": np.array([0.5, np.nan, 1.0]),
        "ids": [[1, 2], [], [3]],
    }
    write_table_atomic(root / "steps.parquet", cols)
    update_columns(root / "steps.parquet", {"d": np.array([0.1, 0.2, 0.3])})
    back = read_table(root / "steps.parquet")
    assert back["example_id"] == cols["example_id"] and back["ids"] == cols["ids"]
    np.testing.assert_array_equal(back["step"], cols["step"])
    np.testing.assert_array_equal(back["conf"], cols["conf"])
    np.testing.assert_array_equal(back["d"], [0.1, 0.2, 0.3])
    assert read_table(root / "steps.parquet", ["step"]).keys() == {"step"}


def test_hidden_store_through_a_file_url_equals_a_path(tmp_path):
    rng = np.random.default_rng(0)
    states = {e: rng.normal(size=(n, 2, 8)).astype(np.float32) for e, n in (("a", 3), ("b", 5))}

    def fill(root):
        with HiddenStore(root, layers=(0, 2), width=8, dtype="float32") as store:
            for eid, x in states.items():
                store.write(eid, list(range(len(x))), x)
            store.finalize()

    fill(tmp_path / "plain")
    url = (tmp_path / "via url").as_uri()
    fill(url)
    (ia, xa), (ib, xb) = read_hidden(tmp_path / "plain"), read_hidden(url)
    assert ia["example_id"] == ib["example_id"] and ia["step"].tolist() == ib["step"].tolist()
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(read_hidden(tmp_path / "via url")[1], xa)  # same files
    assert (tmp_path / "via url" / "states" / "zarr.json").is_file()


def test_shared_hidden_store_through_a_file_url(tmp_path):
    """Process 0 pre-sizes, two writers fill their row ranges, process 0 merges: by URL."""
    url = (tmp_path / "hidden").as_uri()
    x = np.arange(70 * 1 * 4, dtype=np.float32).reshape(70, 1, 4)
    HiddenStore.create_shared(url, layers=(1,), width=4, total_rows=128, dtype="float32")
    for offset, (eid, rows) in zip((0, 64), (("a", x[:64]), ("b", x[64:])), strict=True):
        store = HiddenStore(url, (1,), 4, "float32", row_offset=offset, num_rows=64)
        store.write(eid, list(range(len(rows))), rows)
        store.finalize()
    assert HiddenStore.finalize_shared(url, 2) == 70
    index, states = read_hidden(tmp_path / "hidden")
    np.testing.assert_array_equal(states, x)
    assert index["example_id"] == ["a"] * 64 + ["b"] * 6


def test_probe_checkpoint_through_a_file_url(tmp_path):
    from probes.checkpoint import Probe, ProbeParams, load_probe, save_probe
    from probes.trainer import Standardizer

    rng = np.random.default_rng(1)
    probe = Probe(
        ProbeParams(rng.normal(size=(3, 6)).astype(np.float32), np.zeros(3, np.float32)),
        Standardizer(np.ones((3, 6), np.float32), np.full((3, 6), 2.0, np.float32)),
        layer=1,
        layers=(2, 4, 6),
        calibration=np.array([[1.0, 0.0], [0.5, 0.1], [2.0, -1.0]], np.float32),
    )
    url = (tmp_path / "ck").as_uri()
    saved = save_probe(url, probe)
    assert str(saved) == url
    for where in (url, tmp_path / "ck"):
        back = load_probe(where)
        np.testing.assert_array_equal(back.params.w, probe.params.w)
        np.testing.assert_array_equal(back.stats.std, probe.stats.std)
        np.testing.assert_array_equal(back.calibration, probe.calibration)
        assert (back.layer, back.layers) == (1, (2, 4, 6))


# --- the run directory on an object store ---------------------------------------------------


def test_run_directory_on_an_object_store(gcs):
    """Lock, config, markers, resumable parts and invalidation with no rename and implicit
    directories: what a gs:// run directory sees."""
    import os
    import socket
    import subprocess
    import sys

    from experiments.config import STAGES
    from experiments.rundir import RunDir, RunError

    root, store = location("gs://bucket/run"), gcs
    rd = RunDir(root)
    rd.lock()
    with pytest.raises(
        RunError, match=rf"is in use: lock gs://bucket/run/.lock .*pid {os.getpid()}"
    ):
        RunDir(root).lock()
    rd.unlock()
    assert not (root / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    RunDir(root).lock()  # a dead process's lock on this host is taken over
    assert json.loads((root / ".lock").read_text())["pid"] == os.getpid()

    assert rd.check_config({"k": 2}, None) is None
    rd.save_config({"k": 2})
    assert json.loads((root / "config.json").read_text()) == {"k": 2}
    rd.write_part("generate", 1, {"example_id": ["c"], "n": np.array([3])})
    rd.write_part("generate", 0, {"example_id": ["a", "b"], "n": np.array([1, 2])})
    assert rd.part_done("generate", 0) and not rd.part_done("generate", 2)
    assert rd.read_parts("generate") == {"example_id": ["a", "b", "c"], "n": [1, 2, 3]}
    assert rd.started("generate") and not rd.done("generate")
    rd.mark("generate", {"wall_s": 1.5})
    assert rd.done("generate") and rd.info("generate") == {"wall_s": 1.5}
    write_json_atomic(root / "hidden" / "meta.json", {})
    rd.mark("hidden", {})
    rd.invalidate_from(STAGES[0])
    assert not any(rd.done(s) or rd.started(s) for s in STAGES)
    assert sorted(store.store) == ["gs://bucket/run/.lock", "gs://bucket/run/config.json"]
    assert store.moves == []
