"""One filesystem layer for run directories: local paths, ``file://``, ``gs://`` and ``s3://``.

``location(where)`` resolves a run location into a ``Location``, a small pathlib-like handle
(``/``, ``name``, ``parent``, ``exists``, ``read_text``, ``write_text``, ``glob``, ...) that
every reader and writer of a run directory goes through, and that hands each storage
library its own form of the place: pyarrow a (filesystem, path) pair (``arrow``), TensorStore
a kvstore spec (``kvstore``), Orbax a path (``orbax_path``).

Two kinds of store:

* local (a path or a ``file://`` URL): Python's os calls. A write goes to a temporary file
  beside the target, is fsynced and renamed over it (``os.replace``), so a crash never
  leaves a torn file; ``create_exclusive`` is ``O_CREAT | O_EXCL``.
* object stores (``gs://``, ``s3://``; pyarrow's GcsFileSystem / S3FileSystem): there is no
  rename, and none is needed: one whole-object upload is atomic (an object appears only
  when its upload completes). A write builds the whole content in memory first, so a
  failure while producing it uploads nothing, then uploads it at once. Directories are
  implicit (``mkdir`` does nothing). ``create_exclusive`` is a conditional write through
  TensorStore's kvstore (pyarrow has no if-generation-match): on GCS it sends
  ``ifGenerationMatch=0`` and is atomic; on S3 it relies on the TensorStore s3 driver and
  the store honouring a conditional PUT (not verified here). Any other pyarrow filesystem
  (e.g. ``pyarrow.fs._MockFileSystem`` in tests) gets the same direct writes and a
  check-then-write ``create_exclusive`` that two simultaneous creators can both pass.

Only the local kind is tested against real storage here; gs:// and s3:// are exercised
through their spec mapping and the object-store code path on an in-memory filesystem.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit

import pyarrow.fs as pafs

# URL schemes ``location`` accepts (a plain path is local too)
SCHEMES = ("file", "gs", "s3")
# pyarrow filesystems whose directories are implicit prefixes of object names
_OBJECT_STORES = ("gcs", "s3")
# TensorStore kvstore drivers of the object stores
_KV_DRIVERS = {"gs": "gcs", "s3": "s3"}
# fsspec packages etils.epath (hence Orbax) needs for a scheme
_EPATH_BACKENDS = {"gs": "gcsfs", "s3": "s3fs"}


class FsError(ValueError):
    """A run location that cannot be used: unknown scheme, malformed URL, missing backend."""


PathLike = str | os.PathLike


def location(where: PathLike | Location) -> Location:
    """A local path, a ``file://`` URL, or a ``gs://bucket/path`` / ``s3://bucket/path`` URL."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "://" not in text:
        return Location(str(Path(text)))
    url = urlsplit(text)
    scheme = url.scheme.lower()
    if scheme not in SCHEMES:
        raise FsError(
            f"{text}: unsupported scheme {url.scheme!r}; use a local path or one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if url.query or url.fragment:
        raise FsError(
            f"{text}: query and fragment are not supported; configure the store through "
            f"its environment (credentials, AWS_ENDPOINT_URL, ...)"
        )
    if scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise FsError(f"{text}: a file:// URL names a local path (file:///abs/path)")
        path = unquote(url.path)
        if not path.startswith("/"):
            raise FsError(f"{text}: a file:// URL needs an absolute path (file:///abs/path)")
        return Location(posixpath.normpath(path), scheme="file")
    if not url.netloc:
        raise FsError(f"{text}: no bucket; expected {scheme}://BUCKET/PATH")
    key = posixpath.normpath("/" + unquote(url.path)).strip("/")
    return Location(f"{url.netloc}/{key}" if key else url.netloc, scheme=scheme)


@functools.cache
def _object_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """pyarrow's filesystem of a bucket, made on first use (S3 resolves the bucket's region)."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


class Location:
    """A file or directory in a run location (see the module docstring).

    ``scheme`` is ``""`` for a plain local path, ``"file"``, ``"gs"`` or ``"s3"`` for a
    URL, or any name for an explicit ``filesystem`` (then the object-store code path is
    used). ``path`` is the filesystem's own path: a local path (as given, normalised), or
    ``bucket/key`` on an object store."""

    __slots__ = ("_filesystem", "path", "scheme")

    def __init__(self, path: str, *, scheme: str = "", filesystem: pafs.FileSystem | None = None):
        self.path, self.scheme, self._filesystem = path, scheme, filesystem

    # --- naming -----------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.scheme in ("", "file")

    def __str__(self) -> str:
        if self.scheme == "":
            return self.path
        if self.scheme == "file":
            return "file://" + quote(self.path)  # as Path.as_uri(); ``location`` unquotes
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: Location) -> bool:
        return str(self) < str(other)

    def _with_path(self, path: str) -> Location:
        return Location(path, scheme=self.scheme, filesystem=self._filesystem)

    def __truediv__(self, name: str) -> Location:
        name = os.fspath(name)
        if self.is_local:
            return self._with_path(str(Path(self.path) / name))
        if name.startswith("/") or ".." in name.split("/"):
            raise FsError(f"{self}: cannot join {name!r} (absolute or going up)")
        return self._with_path(posixpath.join(self.path, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> Location:
        if self.is_local:
            return self._with_path(str(Path(self.path).parent))
        return self._with_path(posixpath.dirname(self.path) or self.path)

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def absolute(self) -> Location:
        return self._with_path(os.path.abspath(self.path)) if self.is_local else self

    def as_uri(self) -> str:
        """A URL of this location (``file:///abs/path`` for a local one)."""
        return Path(os.path.abspath(self.path)).as_uri() if self.is_local else str(self)

    @property
    def local_path(self) -> Path:
        """This location as a ``pathlib.Path``; only for local ones."""
        if not self.is_local:
            raise FsError(f"{self}: not a local path")
        return Path(self.path)

    # --- what each storage library takes ---------------------------------------------------
    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem holding this location."""
        if self._filesystem is None:
            if self.is_local:
                self._filesystem = pafs.LocalFileSystem()
            else:
                self._filesystem = _object_filesystem(self.scheme, self.path.split("/")[0])
        return self._filesystem

    def arrow(self) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, path)`` for pyarrow (``pq.read_table(path, filesystem=fs)``)."""
        path = os.path.abspath(self.path) if self.is_local else self.path
        return self.filesystem, path

    def kvstore(self) -> dict[str, Any]:
        """A TensorStore kvstore spec of this location (a directory of keys)."""
        if self.is_local:
            return {"driver": "file", "path": self.path}
        if self.scheme not in _KV_DRIVERS:
            raise FsError(f"{self}: TensorStore has no kvstore for scheme {self.scheme!r}")
        bucket, _, key = self.path.partition("/")
        return {"driver": _KV_DRIVERS[self.scheme], "bucket": bucket, "path": key}

    def orbax_path(self):
        """The path Orbax takes: a ``pathlib.Path`` (absolute) locally, else an
        ``etils.epath.Path`` of the URL (etils reaches gs:// through gcsfs, s3:// through
        s3fs; a clear error when that package is missing)."""
        if self.is_local:
            return Path(os.path.abspath(self.path))
        self.check_orbax()
        from etils import epath

        return epath.Path(str(self))

    def check_orbax(self) -> None:
        """Raises FsError when Orbax (through etils.epath) cannot reach this location."""
        if self.is_local:
            return
        import importlib.util

        package = _EPATH_BACKENDS.get(self.scheme)
        if package is None:
            raise FsError(f"{self}: Orbax checkpoints cannot be written to {self.scheme}://")
        if importlib.util.find_spec(package) is None:
            raise FsError(
                f"{self}: Orbax reaches {self.scheme}:// through etils.epath, which needs the "
                f"{package} package (pip install {package})"
            )

    # --- queries ----------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        if self.is_local:
            return os.path.exists(self.path)
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        if self.is_local:
            return os.path.isdir(self.path)
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        if self.is_local:
            return os.path.isfile(self.path)
        return self._info().type == pafs.FileType.File

    def iterdir(self) -> Iterator[Location]:
        """The entries of this directory, sorted by name (none if it does not exist)."""
        if self.is_local:
            names = sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        else:
            selector = pafs.FileSelector(self.path, allow_not_found=True)
            infos = self.filesystem.get_file_info(selector)
            names = sorted(posixpath.basename(i.path) for i in infos)
        return iter([self / n for n in names])

    def glob(self, pattern: str) -> list[Location]:
        """Entries of this directory whose name matches ``pattern`` (one level, fnmatch)."""
        if "/" in pattern:
            raise FsError(f"{self}: glob takes one path component, got {pattern!r}")
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    # --- reading ----------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        if self.is_local:
            return Path(self.path).read_bytes()
        with self.filesystem.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # --- writing ----------------------------------------------------------------------
    def mkdir(self) -> None:
        """Makes this directory and its parents (a no-op on object stores)."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
        elif self.filesystem.type_name not in _OBJECT_STORES:
            self.filesystem.create_dir(self.path, recursive=True)

    def write_with(self, write: Callable[[IO[bytes]], Any]) -> None:
        """Replaces this file with what ``write(binary_file)`` writes, atomically: locally
        through a temporary file, fsync and rename; on an object store as one upload of the
        whole content, after ``write`` returned. On a failure the old file is untouched."""
        self.parent.mkdir()
        if self.is_local:
            _write_local_atomic(Path(self.path), write)
            return
        buffer = io.BytesIO()
        write(buffer)
        with self.filesystem.open_output_stream(self.path) as out:
            out.write(buffer.getvalue())

    def write_bytes(self, data: bytes) -> None:
        self.write_with(lambda f: f.write(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def create_exclusive(self, data: bytes) -> bool:
        """Creates this file holding ``data`` unless it exists; False if it did. Atomic
        locally (O_EXCL) and on GCS (a conditional write); see the module docstring for
        S3 and other filesystems."""
        self.parent.mkdir()
        if self.is_local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.scheme in _KV_DRIVERS:
            spec = self.parent.kvstore()
            spec["path"] = spec["path"] + "/" if spec["path"] else ""
            return kv_create_exclusive(spec, self.name, data)
        if self.exists():  # not atomic: see the module docstring
            return False
        self.write_bytes(data)
        return True

    def unlink(self, missing_ok: bool = True) -> None:
        if self.is_local:
            Path(self.path).unlink(missing_ok=missing_ok)
            return
        if missing_ok and not self.is_file():
            return
        self.filesystem.delete_file(self.path)

    def rmtree(self) -> None:
        """Removes this directory and everything under it; nothing if it does not exist."""
        if self.is_local:
            import shutil

            if os.path.isdir(self.path):  # other failures raise: a stale part must not stay
                shutil.rmtree(self.path)
        elif self.is_dir():
            self.filesystem.delete_dir(self.path)


def kv_create_exclusive(spec: dict[str, Any], key: str, data: bytes) -> bool:
    """Writes ``key`` in the TensorStore kvstore ``spec`` only if it is absent (a write
    conditioned on the generation read while it was missing); False if it exists or another
    writer created it first."""
    import tensorstore as ts

    store = ts.KvStore.open(spec).result()
    found = store.read(key).result()
    if found.state != "missing":
        return False
    written = store.write(key, data, if_equal=found.stamp.generation).result()
    return bool(written.generation)  # empty: the condition failed, nothing was written


def _write_local_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(file)`` into a temp file beside ``path``, fsync, rename over ``path``, fsync
    the directory; on any failure the temp file is removed and ``path`` is untouched."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
