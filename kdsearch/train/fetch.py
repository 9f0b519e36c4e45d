"""Public datasets fetched on first use, once per node.

A dataset with a public archive in the datasets table (CIFAR-10/100, with torchvision's URL and
md5) reads its files from `data.root`, or, when the space gives none, from the per-user cache
(`default_data_root()`: $KDSEARCH_DATA, else $XDG_CACHE_HOME/kdsearch/data, else
~/.cache/kdsearch/data). The first process on a node that finds the files missing fetches the
archive: downloaded with urllib (so through the proxies HTTP(S)_PROXY and NO_PROXY name) into a
temporary file in that folder, its md5 checked, extracted into a temporary folder there and
renamed into place, all under a file lock in that folder. So the trials and teacher-cache tasks
of one node fetch once and never read half a file: the extracted folder appears whole or not at
all, and a process that waited for the lock finds it and returns. An archive the user put in
the folder (the URL's file name) is checked and extracted instead of downloaded. A corrupt
archive, or a server that cannot be reached, is one KdsearchError line, and nothing
half-written stays.

Mirrors: KDSEARCH_ARCHIVES names a JSON (or YAML) file mapping a dataset name to
{"url": ..., "md5": ...}, which replaces the table's (a mirror for a cluster behind a firewall;
a test's server on 127.0.0.1, so the code path is the real one). It is an environment variable,
read by every process that fetches, for the reason urllib reads its proxies there: where an
archive comes from is a fact of a node's network, not of the experiment, so it stays out of the
space file, the DataSpec and every cache key (the same files from a mirror are the same data:
the md5 says so). Ray's workers inherit the environment of the process that started Ray on their
node (the driver, for the embedded Ray; `ray start`, on a cluster), as they inherit the proxies,
so nothing travels with a trial; a variable set after Ray started reaches no worker.

`read_cifar` reads CIFAR's python files as torchvision's CIFAR classes do, without their check of
each file against the official files' md5s: a fetched archive's md5 is checked whole (a
mirror's, or a test's, is its own), and a file that is not CIFAR's is one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdsearch.errors import KdsearchError
from kdsearch.space.datasets import DATASETS, Archive
from kdsearch.space.specs import DataSpec

DATA_ENV = "KDSEARCH_DATA"  # the per-user cache folder of fetched datasets, when set
ARCHIVES_ENV = "KDSEARCH_ARCHIVES"  # a file mapping dataset names to {url, md5}: a mirror
TIMEOUT_S = 60.0  # a connection, or one read of the download, that stalls longer fails
CHUNK = 1 << 20
# CIFAR's python files (torchvision's train_list and test_list names; a test holds them equal)
# and the key of their labels
CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": (["train"], ["test"], "fine_labels"),
}


def _to_stderr(line: str) -> None:
    print(f"kdsearch: {line}", file=sys.stderr, flush=True)


def default_data_root() -> Path:
    """The per-user folder of fetched datasets: $KDSEARCH_DATA, else $XDG_CACHE_HOME/kdsearch/data,
    else ~/.cache/kdsearch/data (evaluated in each process, so on each node)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "kdsearch" / "data"


def archive_of(name: str) -> Archive | None:
    """The public archive of dataset `name`: the table's, or the mirror KDSEARCH_ARCHIVES names.

    Raises:
        KdsearchError: KDSEARCH_ARCHIVES names a file that cannot be read or says something else
            than a mapping of known dataset names to {url, md5}.
    """
    archive = DATASETS[name].archive
    path = os.environ.get(ARCHIVES_ENV)
    if archive is None or not path:
        return archive
    mirrors = _mirrors(Path(path))
    if name not in mirrors:
        return archive
    return Archive(url=mirrors[name]["url"], md5=mirrors[name]["md5"], folder=archive.folder)


def _mirrors(path: Path) -> dict[str, dict[str, str]]:
    """KDSEARCH_ARCHIVES's file, checked: {dataset: {"url": str, "md5": 32 hex digits}}."""
    import yaml

    where = f"{ARCHIVES_ENV}={path}"
    try:
        table = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KdsearchError(f"{where}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(table, dict):
        raise KdsearchError(f"{where}: must map dataset names to {{url, md5}}")
    with_archive = [n for n, d in DATASETS.items() if d.archive is not None]
    for name, entry in table.items():
        if name not in with_archive:
            raise KdsearchError(
                f"{where}: {name!r} is not a dataset with an archive; those are {', '.join(with_archive)}"
            )
        ok = isinstance(entry, dict) and isinstance(entry.get("url"), str) and isinstance(entry.get("md5"), str)
        if not ok or len(entry["md5"]) != 32 or set(entry["md5"].lower()) - set("0123456789abcdef"):
            raise KdsearchError(f"{where}: {name} must be {{url: ..., md5: <32 hex digits>}}")
    return table


def dataset_root(spec: DataSpec, log: Callable[[str], None] = _to_stderr) -> Path:
    """The folder holding the files of `spec`'s dataset: `spec.root`, else the per-user cache.
    A dataset with a public archive is fetched and extracted there first when its folder is
    missing, once per node (under a file lock in that folder); the cache folder is created, a
    `spec.root` must exist.

    Args:
        spec: the data a space names.
        log: where the one-line progress of a fetch goes (stderr by default).

    Returns:
        The folder (for CIFAR, the one holding cifar-10-batches-py/ or cifar-100-python/).

    Raises:
        KdsearchError: a dataset without an archive whose root is not a folder; an archive that
            cannot be fetched (the line says which folder to fill, and how) or is corrupt.
    """
    info = DATASETS[spec.name]
    archive = archive_of(spec.name)
    if archive is None:
        root = Path(spec.root or "")
        if not spec.root or not root.is_dir():
            raise KdsearchError(f"data.root: {spec.root} is not a folder; {info.root_holds} must be there")
        return root
    root = Path(spec.root).expanduser() if spec.root else default_data_root()
    if (root / archive.folder).is_dir():  # renamed into place whole: present means complete
        return root
    if spec.root and not root.is_dir():  # a root the space names is never created: a typo fetches nothing
        raise KdsearchError(
            f"data.root: {root} is not a folder; make it ({info.root_holds}) "
            f"or leave data.root out for the per-user cache ({default_data_root()})"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdsearchError(f"data.root: cannot create {root} ({e.strerror or e}); set data.root to a folder") from None
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / f".{archive.folder}.lock"))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f"{spec.name}: waiting for another process fetching it into {root}")
            lock.acquire()
    except OSError as e:  # a folder this user cannot write in
        raise KdsearchError(
            f"data.root: cannot write in {root} ({e.strerror or e}); put {archive.folder}/ there or set data.root"
        ) from None
    try:
        if not (root / archive.folder).is_dir():  # a process that held the lock before may have fetched it
            _fetch(spec.name, archive, root, log)
    finally:
        lock.release()
    return root


def _fetch(name: str, archive: Archive, root: Path, log: Callable[[str], None]) -> None:
    """Download (unless the user put the archive in `root`), check and extract `archive` into
    `root`; temporary files and folders are gone afterwards, whatever happened."""
    placed = root / archive.filename
    download = None
    try:
        if placed.is_file():
            log(f"{name}: extracting {placed} (found there) into {root}")
            path = placed
        else:
            download = path = _download(name, archive, root, log)
        got = _md5(path)
        if got != archive.md5:
            kept = f"remove {placed} or replace it" if path == placed else f"nothing half-written was kept in {root}"
            raise KdsearchError(
                f"{name}: the archive from {archive.url if path != placed else placed} has md5 {got}, "
                f"not {archive.md5} (corrupt or truncated); {kept}"
            )
        _extract(name, archive, path, root)
    finally:
        if download is not None:
            download.unlink(missing_ok=True)


def _download(name: str, archive: Archive, root: Path, log: Callable[[str], None]) -> Path:
    """`archive.url` into a temporary file in `root` (removed here if the download fails)."""
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{archive.filename}.", suffix=".part")
    t0, size = time.perf_counter(), 0
    log(f"{name}: fetching {archive.url} into {root} (once per node)")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(archive.url, timeout=TIMEOUT_S) as response:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise KdsearchError(
            f"{name}: cannot fetch {archive.url} ({reason}); put {archive.folder}/ in {root}, or the archive "
            f"{archive.filename} there, or set data.root to a folder holding one (or {ARCHIVES_ENV} to a mirror)"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log(f"{name}: fetched {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    return Path(tmp)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(name: str, archive: Archive, path: Path, root: Path) -> None:
    """Extract `path` into a temporary folder in `root`, then rename its `archive.folder` into place."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{archive.folder}."))
    try:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(staging, filter="data")  # no member may land outside the staging folder
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise KdsearchError(
                f"{name}: {archive.url}'s archive does not extract ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); nothing half-written was kept in {root}"
            ) from None
        if not (staging / archive.folder).is_dir():
            raise KdsearchError(
                f"{name}: {archive.url}'s archive holds no {archive.folder}/; nothing half-written was kept in {root}"
            )
        try:
            os.rename(staging / archive.folder, root / archive.folder)
        except OSError:
            # NOTE: a folder in place is a complete one (renamed whole), so another node that
            # fetched into a shared folder whose file locks do not reach across nodes has won
            if not (root / archive.folder).is_dir():
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)


def read_cifar(root: Path, name: str, train: bool) -> tuple[np.ndarray, list[int]]:
    """CIFAR's training (or test) images under `root` as torchvision's CIFAR classes hold them.

    Args:
        root: the folder holding cifar-10-batches-py/ or cifar-100-python/ (`dataset_root`).
        name: cifar10 or cifar100.
        train: the training batches, else the test batch.

    Returns:
        `(images, labels)`: uint8 (N, 32, 32, 3) and N class indices.

    Raises:
        KdsearchError: a file is missing or is not one of CIFAR's python files.
    """
    import pickle

    archive = DATASETS[name].archive
    assert archive is not None, name
    train_files, test_files, key = CIFAR_FILES[name]
    images, labels = [], []
    for file in train_files if train else test_files:
        path = root / archive.folder / file
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(y) for y in entry[key])
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise KdsearchError(
                f"data.root: {path} is not one of {name}'s python files ({type(e).__name__}: {e}); "
                f"remove {root / archive.folder}/ to fetch it again"
            ) from None
    return np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)), labels
