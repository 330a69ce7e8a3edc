"""Run-directory locations: local paths, ``file://``, ``gs://`` and ``s3://``, over ``etils.epath``.

``location(where)`` checks a run location and returns a ``Location``: an ``etils.epath.Path``
(which reaches gs:// through gcsfs and s3:// through s3fs, as Orbax does) plus the two things
epath lacks, an atomic local write and a conditional create. Each storage library gets the
place in its own form: pyarrow an open file (``open``), TensorStore a kvstore URL
(``kvstore``: it opens ``file://``, ``gs://`` and ``s3://`` itself), Orbax the epath path.

* local (a path or a ``file://`` URL): a write goes to a temporary file beside the target, is
  fsynced and renamed over it, so a crash never leaves a torn file; ``create_exclusive`` is
  ``O_CREAT | O_EXCL``.
* object stores: there is no rename, and none is needed: one whole-object upload is atomic
  (an object appears only when its upload completes). A write builds the whole content in
  memory first, so a failure while producing it uploads nothing, then uploads it at once.
  Directories are implicit (``mkdir`` does nothing). ``create_exclusive`` is a conditional
  write through TensorStore's kvstore: on GCS ``ifGenerationMatch=0``, atomic; on S3 it relies
  on the store honouring a conditional PUT (not verified here).

Only the local kind is tested against real storage here; the object-store path is exercised
on an in-memory fsspec filesystem standing in for gcsfs.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit

from etils import epath

# URL schemes ``location`` accepts (a plain path is local too)
SCHEMES = ("file", "gs", "s3")
# fsspec packages etils.epath (hence Orbax and the object-store reads) needs for a scheme
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


class Location:
    """A file or directory in a run location (see the module docstring).

    ``scheme`` is ``""`` for a plain local path, ``"file"`` for a ``file://`` URL, ``"gs"``
    or ``"s3"`` for a bucket; ``path`` is a local path (as given, normalised) or
    ``bucket/key``."""

    __slots__ = ("path", "scheme")

    def __init__(self, path: str, *, scheme: str = ""):
        self.path, self.scheme = path, scheme

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
        return Location(path, scheme=self.scheme)

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
    def epath(self) -> epath.Path:
        """This location as an ``etils.epath.Path`` (what Orbax takes); for a bucket, a clear
        error when the fsspec package epath needs is missing."""
        if self.is_local:
            return epath.Path(os.path.abspath(self.path))
        self.check_backend()
        return epath.Path(str(self))

    def kvstore(self) -> str:
        """This location as a TensorStore kvstore URL (a directory of keys)."""
        return self.as_uri().rstrip("/") + "/"

    def check_backend(self) -> None:
        """Raises FsError when etils.epath (hence Orbax) cannot reach this location."""
        if self.is_local:
            return
        import fsspec

        try:
            fsspec.get_filesystem_class(self.scheme)
        except ImportError:
            package = _EPATH_BACKENDS[self.scheme]
            raise FsError(
                f"{self}: {self.scheme}:// is reached through etils.epath, which needs the "
                f"{package} package (pip install {package})"
            ) from None

    # --- queries ----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.epath.exists()

    def is_dir(self) -> bool:
        return self.epath.is_dir()

    def is_file(self) -> bool:
        return self.epath.is_file()

    def iterdir(self) -> Iterator[Location]:
        """The entries of this directory, sorted by name (none if it does not exist)."""
        p = self.epath
        names = sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        return iter([self / n for n in names])

    def glob(self, pattern: str) -> list[Location]:
        """Entries of this directory whose name matches ``pattern`` (one level, fnmatch)."""
        if "/" in pattern:
            raise FsError(f"{self}: glob takes one path component, got {pattern!r}")
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    # --- reading ----------------------------------------------------------------------
    def open(self) -> IO[bytes]:
        """This file opened for binary reading (pyarrow reads parquet from it)."""
        return self.epath.open("rb")

    def read_bytes(self) -> bytes:
        return self.epath.read_bytes()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # --- writing ----------------------------------------------------------------------
    def mkdir(self) -> None:
        """Makes this directory and its parents (a no-op on object stores)."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)

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
        self.epath.write_bytes(buffer.getvalue())

    def write_bytes(self, data: bytes) -> None:
        self.write_with(lambda f: f.write(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def create_exclusive(self, data: bytes) -> bool:
        """Creates this file holding ``data`` unless it exists; False if it did. Atomic
        locally (O_EXCL) and on GCS (a conditional write); see the module docstring."""
        self.parent.mkdir()
        if self.is_local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        return kv_create_exclusive(self.parent.kvstore(), self.name, data)

    def unlink(self, missing_ok: bool = True) -> None:
        if self.is_local:
            Path(self.path).unlink(missing_ok=missing_ok)
        elif not (missing_ok and not self.is_file()):
            self.epath.unlink()

    def rmtree(self) -> None:
        """Removes this directory and everything under it; nothing if it does not exist."""
        if self.is_local:
            if os.path.isdir(self.path):  # other failures raise: a stale part must not stay
                shutil.rmtree(self.path)
        elif self.is_dir():
            self.epath.rmtree()


def kv_create_exclusive(kvstore: str | dict[str, Any], key: str, data: bytes) -> bool:
    """Writes ``key`` in the TensorStore kvstore (a URL or spec) only if it is absent (a write
    conditioned on the generation read while it was missing); False if it exists or another
    writer created it first."""
    import tensorstore as ts

    store = ts.KvStore.open(kvstore).result()
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
