"""Where runs live: a local or NFS path, or any URI pyarrow's filesystems open (s3://, gs://,
hdfs://, an S3-compatible endpoint through AWS_ENDPOINT_URL or the URI's query).

A `Storage` is a filesystem and a root inside it. Every run file goes through it, so a search
on a cluster needs no shared disk: the driver writes the tables, each worker uploads the
weights it trained, and `status`, `pareto`, `report`, `export` read a run from a bucket as
from a folder. Writes are whole or nothing: on a local filesystem to a temporary name, then
renamed; an object store's PUT is already atomic.

One service on every node. pyarrow opens an s3:// URI as the opening process's environment
says (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION, ...), and a Ray worker's environment
may say otherwise (an endpoint set only where the driver runs: MinIO, Ceph, R2). So `open` pins
what it resolved, as the S3 URI options pyarrow reads (`endpoint_override`, `scheme`,
`region`) that the user's URI left out: a Storage pickled to a Ray worker opens with them, and
the filesystem Ray Tune gets (and pickles with its options) was opened with them. Credentials
never travel: each node resolves its own (pyarrow pickles only keys given explicitly).

No folders and no buckets on an object store: a key needs no folder, so kdsearch never calls
`create_dir` there (pyarrow's S3 and GCS `create_dir` PUT a `key/` marker per level and create
a missing bucket where allowed), and a delete on S3 goes through S3's own DeleteObject when
botocore is installed (pyarrow's S3 `delete_file` PUTs the parent's `key/` marker back).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from kdsearch.errors import KdsearchError

# The S3 URI options that say how a process reached the service (pyarrow's from_uri reads them)
PINNED_OPTIONS = ("endpoint_override", "scheme", "region")
# pyarrow filesystems whose folders are key prefixes, not entries
OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})


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
    query: str = ""  # the options the user wrote in the URI's query (shown, and kept on every node)
    # How the opening process reached the service: the PINNED_OPTIONS `query` leaves out, as query
    # options. Never shown: an endpoint is where one machine reaches the service from (a port-forward on
    # a laptop, a service name inside a cluster), so a URI printed or given to `--resume`, `status` or
    # `export` is opened as the environment of whoever runs that command says, as the user wrote it.
    pinned: str = ""

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
        fs, root = _from_uri(text, text)
        pinned = _pins(fs, query)
        if pinned:  # the filesystem Ray Tune pickles to every node holds them as the workers' Storage does
            fs, root = _from_uri(_joined(base, query, pinned), text)
        return cls(base.rstrip("/"), root.rstrip("/"), fs, query, pinned)

    def __reduce__(self) -> tuple:
        return (_reopen, (self.base, self.query, self.pinned))

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
    def object_store(self) -> bool:
        """Whether folders are only key prefixes here (nothing to create before a PUT)."""
        return self.fs.type_name in OBJECT_STORES

    @property
    def parent(self) -> Storage:
        """The storage rooted at the folder above this one (a run's storage root)."""
        base, root = posixpath.dirname(self.base), posixpath.dirname(self.root)
        return Storage(base, root, self.fs, self.query, self.pinned)

    def child(self, *parts: str) -> Storage:
        """The storage rooted at a folder below this one."""
        rel = "/".join(parts)
        return Storage(f"{self.base}/{rel}", self.path(rel), self.fs, self.query, self.pinned)

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
            if not self.object_store:
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
            self._delete_path(self.path(rel))
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
        writes is found before anything trains, with one clear line (and never created)."""
        probe = f".kdsearch-write-check-{uuid.uuid4().hex[:8]}"
        try:
            if not self.object_store:
                self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(self.path(probe)) as f:
                f.write(b"ok")
            self._delete_path(self.path(probe))
        except Exception as e:  # noqa: BLE001 - every failure here means the same to the user
            raise KdsearchError(f"--storage {self.uri}: cannot write there ({first_line(e)})") from None

    # ---- internals ------------------------------------------------------------------

    def _delete_path(self, path: str) -> None:
        """Delete the file at `path`; on S3 through DeleteObject, which leaves no marker behind."""
        client = _s3_client(self.fs) if self.fs.type_name == "s3" else None
        if client is None:
            self.fs.delete_file(path)
            return
        bucket, _, key = path.partition("/")
        try:
            client.delete_object(Bucket=bucket, Key=key)  # a key already gone is no error (S3 answers 204)
        except Exception as e:  # botocore's ClientError, EndpointConnectionError, ...: the storage failed
            raise OSError(first_line(e)) from None

    def _info(self, rel: str) -> Any:
        try:
            return self.fs.get_file_info(self.path(rel))
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot reach the storage ({first_line(e)})") from None


def _from_uri(uri: str, shown: str) -> tuple[Any, str]:
    """pyarrow's filesystem and path for `uri`; a failure names `shown` (the URI as the user wrote it)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean the same to the user
        raise KdsearchError(f"{shown}: cannot open this storage ({first_line(e)})") from None


def _joined(base: str, *queries: str) -> str:
    query = "&".join(q for q in queries if q)
    return f"{base}?{query}" if query else base


def _s3_options(fs: Any) -> dict[str, Any]:
    """An S3FileSystem's options as it pickles them: the endpoint as resolved (from the URI, else
    AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL), keys only when given explicitly, region '' unless
    given (`fs.region` is the resolved one)."""
    return fs.__reduce__()[1][0]


def _pins(fs: Any, query: str) -> str:
    """The PINNED_OPTIONS `fs` resolved that `query` does not set, as query options ('' off S3).
    An endpoint resolved empty is pinned empty: a worker whose AWS_ENDPOINT_URL says otherwise
    still reaches AWS as the driver does."""
    if fs.type_name != "s3":
        return ""
    options = _s3_options(fs)
    resolved = dict(zip(PINNED_OPTIONS, (options["endpoint_override"], options["scheme"], fs.region), strict=True))
    written = {key for key, _ in parse_qsl(query, keep_blank_values=True)}
    return urlencode({k: v for k, v in resolved.items() if k not in written})


def _in_ray_worker() -> bool:
    """Whether this runs inside a Ray task or actor (a driver, or a process without Ray, does not:
    Ray's runtime context has a task id only there)."""
    ray = sys.modules.get("ray")  # NOTE: never imported here: a process that has not loaded Ray runs no Ray task
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None


def _reopen(base: str, query: str, pinned: str) -> Storage:
    """A pickled Storage opened again. In a Ray worker, with the options its driver resolved; in any
    other process (a driver restoring Tune's saved searcher and callbacks, maybe on another machine
    after --resume) as that process's own open of the URI would, so it and its workers agree."""
    if not pinned or not _in_ray_worker():
        return Storage.open(_joined(base, query))
    fs, root = _from_uri(_joined(base, query, pinned), _joined(base, query))
    return Storage(base, root.rstrip("/"), fs, query, pinned)


def _s3_client(fs: Any) -> Any | None:
    """A botocore S3 client reaching what `fs` reaches, or None without botocore."""
    options = _s3_options(fs)
    keys = tuple(options[k] or None for k in ("access_key", "secret_key", "session_token"))
    return _botocore_client(options["endpoint_override"], options["scheme"], fs.region, keys)


@functools.cache
def _botocore_client(endpoint: str, scheme: str, region: str, keys: tuple[str | None, ...]) -> Any | None:
    try:
        import botocore.config
        import botocore.session
    except ImportError:
        return None
    if endpoint and "://" not in endpoint:
        endpoint = f"{scheme}://{endpoint}"
    config = botocore.config.Config(
        s3={"addressing_style": "path" if endpoint else "virtual"},  # as pyarrow addresses buckets
        retries={"mode": "standard", "max_attempts": 3},
    )
    return botocore.session.get_session().create_client(
        "s3",
        region_name=region or None,
        endpoint_url=endpoint or None,
        use_ssl=scheme != "http",
        aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1],
        aws_session_token=keys[2],
        config=config,
    )


def first_line(e: BaseException) -> str:
    """The reason in `e`, in one short line. An OS error says its errno's own words: pyarrow
    puts them after the (long) path, which the caller already names, and a cut line lost them."""
    if isinstance(e, OSError) and e.errno:
        return f"[Errno {e.errno}] {os.strerror(e.errno)}"
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
