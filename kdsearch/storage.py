"""Where runs live: a local or NFS path, or any URI pyarrow's filesystems open (s3://, gs://,
hdfs://, an S3-compatible endpoint through AWS_ENDPOINT_URL or the URI's query).

A `Storage` is a filesystem and a root inside it. Every run file goes through it, so a search
on a cluster needs no shared disk: the driver writes the tables, each worker uploads the
weights it trained, and `status`, `pareto`, `report`, `export` read a run from a bucket as
from a folder. Writes are whole or nothing: on a local filesystem to a temporary name, then
renamed; an object store's PUT is already atomic.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdsearch.errors import KdsearchError


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


class StorageError(KdsearchError):
    """The storage failed under a run (a full disk, a read-only folder, an endpoint that does not
    answer): one line saying what, where and why. A search stops on it (kdsearch.search.run)."""


@dataclass(frozen=True)
class Storage:
    """A pyarrow filesystem and a root path in it; paths below are relative, with '/'.

    Pickled as its location (a worker opens it again with its own credentials), never with
    the filesystem object and whatever keys that holds.
    """

    base: str  # the location without its query: an absolute local path or scheme://bucket/path
    root: str  # the root as the filesystem names it (no scheme)
    fs: Any = field(repr=False, compare=False)
    query: str = ""  # an URI's options (e.g. endpoint_override=host:port), kept for every child

    @classmethod
    def open(cls, location: str | os.PathLike) -> Storage:
        """The storage at `location`; one clear error when pyarrow cannot open it."""
        import pyarrow.fs as pafs

        text = str(location)
        if "\0" in text:
            raise KdsearchError(f"{text!r}: a path or URI cannot hold a NUL character")
        if not is_uri(text):
            root = str(Path(text).expanduser().resolve())
            return cls(root, root, pafs.LocalFileSystem())
        base, _, query = text.partition("?")
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean the same to the user
            raise KdsearchError(f"{text}: cannot open this storage ({first_line(e)})") from None
        return cls(base.rstrip("/"), root.rstrip("/"), fs, query)

    def __reduce__(self) -> tuple:
        return (Storage.open, (self.uri,))

    @property
    def uri(self) -> str:
        return self.uri_of()

    @property
    def name(self) -> str:
        return posixpath.basename(self.root)

    @property
    def local(self) -> bool:
        return type(self.fs).__name__ == "LocalFileSystem"

    @property
    def parent(self) -> Storage:
        """The storage rooted at the folder above this one (a run's storage root)."""
        return Storage(posixpath.dirname(self.base), posixpath.dirname(self.root), self.fs, self.query)

    def child(self, *parts: str) -> Storage:
        """The storage rooted at a folder below this one."""
        rel = "/".join(parts)
        return Storage(f"{self.base}/{rel}", self.path(rel), self.fs, self.query)

    def path(self, rel: str = "") -> str:
        """`rel` as the filesystem names it."""
        return posixpath.join(self.root, rel) if rel else self.root

    def uri_of(self, rel: str = "") -> str:
        """`rel` as a location a user, Ray Tune or pyarrow can open."""
        where = f"{self.base}/{rel}" if rel else self.base
        return f"{where}?{self.query}" if self.query else where

    def local_path(self, rel: str = "") -> Path | None:
        """`rel` as a local path, or None when the storage is remote."""
        return Path(self.path(rel)) if self.local else None

    # ---- reading --------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.Directory

    def files(self, rel: str = "") -> list[str]:
        """The names of the files directly in folder `rel` (none when it does not exist)."""
        import pyarrow.fs as pafs

        attempts = 0
        while True:
            try:
                infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
                return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
            except OSError as e:
                # a file (or the folder) deleted while it was listed, as a compaction does: list again
                attempts += 1
                if e.errno != errno.ENOENT or attempts == 10:
                    raise StorageError(f"{self.uri_of(rel)}: cannot reach the storage ({first_line(e)})") from None
                time.sleep(0.001 * attempts)

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot read ({first_line(e)})") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def download(self, rel: str, local: str | os.PathLike) -> Path:
        """Copy a file of the storage to a local path (callers that can read a local storage in
        place use `local_path` first)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.read_bytes(rel))
        return local

    # ---- writing --------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file whole: beside it and renamed on a local filesystem, one PUT elsewhere."""
        target = self.path(rel)
        try:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            if not self.local:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
                return
            tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{os.getpid()}.tmp")
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(tmp)  # a partial copy, never left behind
                raise
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot write ({first_line(e)})") from None

    def delete(self, rel: str) -> None:
        """Delete a file; one already gone is fine (a reader or another merge took it first)."""
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot delete ({first_line(e)})") from None

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def upload(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local file into the storage, whole."""
        self.write_bytes(rel, Path(local).read_bytes())

    def check_writable(self) -> None:
        """Write and delete a small object at the root: a bucket that does not exist or refuses
        writes is found before anything trains, with one clear line."""
        probe = f".kdsearch-write-check-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(self.path(probe)) as f:
                f.write(b"ok")
            self.fs.delete_file(self.path(probe))
        except Exception as e:  # noqa: BLE001 - every failure here means the same to the user
            raise KdsearchError(f"--storage {self.uri}: cannot write there ({first_line(e)})") from None

    # ---- internals ------------------------------------------------------------------

    def _info(self, rel: str) -> Any:
        try:
            return self.fs.get_file_info(self.path(rel))
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot reach the storage ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    """The reason in `e`, in one short line. An OS error says its errno's own words: pyarrow
    puts them after the (long) path, which the caller already names, and a cut line lost them."""
    if isinstance(e, OSError) and e.errno:
        return f"[Errno {e.errno}] {os.strerror(e.errno)}"
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
