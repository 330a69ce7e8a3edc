"""The filesystem layer of run directories (``fcjax.store.fs``): URL resolution, what each
storage library is handed, and the same operations on a local path, a ``file://`` URL, an
in-memory object store (no rename, implicit directories, objects appear when their upload
closes) and pyarrow's ``_MockFileSystem``. Real gs:// and s3:// are not reachable here."""

import io
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import tensorstore as ts

from fcjax.store.fs import FsError, Location, kv_create_exclusive, location
from fcjax.store.hidden import HiddenStore, read_hidden
from fcjax.store.tables import read_table, update_columns, write_json_atomic, write_table_atomic


class MemoryObjectStore(pafs.FileSystemHandler):
    """An object store in memory, as GCS and S3 behave for the run directory: whole
    objects that appear when their upload is closed, no rename, directories only as
    prefixes of object names. Every upload and every attempted rename is recorded."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.moves: list[tuple[str, str]] = []

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "memory-objects"

    def normalize_path(self, path):
        return path

    def _info(self, path):
        if path in self.objects:
            return pafs.FileInfo(path, pafs.FileType.File, size=len(self.objects[path]))
        if any(k.startswith(path.rstrip("/") + "/") for k in self.objects):
            return pafs.FileInfo(path, pafs.FileType.Directory)
        return pafs.FileInfo(path, pafs.FileType.NotFound)

    def get_file_info(self, paths):
        return [self._info(p) for p in paths]

    def get_file_info_selector(self, selector):
        assert not selector.recursive
        base = selector.base_dir.rstrip("/") + "/"
        children = {}
        for key in self.objects:
            if key.startswith(base):
                head, _, rest = key[len(base) :].partition("/")
                children[base + head] = pafs.FileType.Directory if rest else pafs.FileType.File
        if not children and not selector.allow_not_found:
            raise FileNotFoundError(selector.base_dir)
        return [pafs.FileInfo(p, t) for p, t in sorted(children.items())]

    def create_dir(self, path, recursive):
        pass  # directories are implicit

    def delete_dir(self, path):
        for key in [k for k in self.objects if k.startswith(path.rstrip("/") + "/")]:
            del self.objects[key]

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.delete_dir(path)

    def delete_root_dir_contents(self):
        self.objects.clear()

    def delete_file(self, path):
        if path not in self.objects:
            raise FileNotFoundError(path)
        del self.objects[path]

    def move(self, src, dest):
        self.moves.append((src, dest))
        raise OSError("an object store has no rename")

    def copy_file(self, src, dest):
        self.objects[dest] = self.objects[src]

    def open_input_stream(self, path):
        if path not in self.objects:
            raise FileNotFoundError(path)
        return pa.BufferReader(self.objects[path])

    def open_input_file(self, path):
        return self.open_input_stream(path)

    def open_output_stream(self, path, metadata):
        store = self

        class Upload(io.BytesIO):
            def close(self):
                if not self.closed:
                    store.objects[path] = self.getvalue()
                    store.puts.append(path)
                super().close()

        return pa.PythonFile(Upload(), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


def object_store() -> tuple[Location, MemoryObjectStore]:
    store = MemoryObjectStore()
    return Location("bucket/run", scheme="mem", filesystem=pafs.PyFileSystem(store)), store


@pytest.fixture(params=["path", "file_url", "object_store", "mock"])
def root(request, tmp_path):
    if request.param == "path":
        return location(tmp_path / "run")
    if request.param == "file_url":
        return location((tmp_path / "run").as_uri())
    if request.param == "object_store":
        return object_store()[0]
    return Location("bucket/run", scheme="mock", filesystem=pafs._MockFileSystem())


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


def test_tensorstore_kvstore_specs(tmp_path):
    assert location("runs/x/states").kvstore() == {"driver": "file", "path": "runs/x/states"}
    assert location((tmp_path / "s").as_uri()).kvstore() == {
        "driver": "file",
        "path": str(tmp_path / "s"),
    }
    assert location("gs://bkt/study/run/hidden/states").kvstore() == {
        "driver": "gcs",
        "bucket": "bkt",
        "path": "study/run/hidden/states",
    }
    assert location("s3://bkt/run").kvstore() == {"driver": "s3", "bucket": "bkt", "path": "run"}
    for url in ("gs://bkt/study/run/hidden/states", "s3://bkt/study/run/hidden/states"):
        # TensorStore takes the spec (parsed only: no request is sent) as a directory
        spec = ts.Spec({"driver": "zarr3", "kvstore": location(url).kvstore()})
        assert spec.kvstore.to_json()["path"] == "study/run/hidden/states/"
    with pytest.raises(FsError, match="no kvstore"):
        object_store()[0].kvstore()


def test_arrow_and_orbax_forms(tmp_path, monkeypatch):
    import importlib.util

    rel = location("runs/demo")
    fs, path = rel.arrow()
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(Path("runs/demo").absolute())
    assert rel.orbax_path() == Path("runs/demo").absolute()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gcsfs" else find_spec(n, *a)
    )
    with pytest.raises(FsError, match="needs the gcsfs package"):
        location("gs://bkt/run").orbax_path()
    with pytest.raises(FsError, match="cannot be written to mem://"):
        object_store()[0].check_orbax()


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


def test_object_store_writes_are_single_uploads_never_renames():
    root, store = object_store()
    write_table_atomic(root / "steps.parquet", {"x": np.arange(4)})
    write_json_atomic(root / "stages" / "generate.done", {"wall_s": 1.0})
    (root / "plots" / "a.png").write_bytes(b"png")
    assert store.moves == []
    assert store.puts == [
        "bucket/run/steps.parquet",
        "bucket/run/stages/generate.done",
        "bucket/run/plots/a.png",
    ]
    assert sorted(store.objects) == sorted(store.puts)  # nothing else, no temporaries


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


def test_run_directory_on_an_object_store():
    """Lock, config, markers, resumable parts and invalidation with no rename and implicit
    directories: what a gs:// run directory sees."""
    import os
    import socket
    import subprocess
    import sys

    from experiments.config import STAGES
    from experiments.rundir import RunDir, RunError

    root, store = object_store()
    rd = RunDir(root)
    rd.lock()
    with pytest.raises(
        RunError, match=rf"is in use: lock mem://bucket/run/.lock .*pid {os.getpid()}"
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
    assert sorted(store.objects) == ["bucket/run/.lock", "bucket/run/config.json"]
    assert store.moves == []
