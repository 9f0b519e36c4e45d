"""A real S3-compatible server on 127.0.0.1 for tests (moto's server mode), started and
stopped by its pid; the environment a client (pyarrow, Ray workers) needs to reach it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import stop_session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(log: Path) -> Iterator[dict[str, str]]:
    """Start moto's S3 server; yield the environment variables that point clients at it."""
    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        stop_session(proc)
        out.close()


def make_bucket(env: dict[str, str], bucket: str) -> None:
    import pyarrow.fs as pafs

    host = env["AWS_ENDPOINT_URL"].removeprefix("http://")
    fs = pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_REGION"],
        allow_bucket_creation=True,
    )
    fs.create_dir(bucket)


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """These variables set in this process for the block, the old values back after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(env: dict[str, str]) -> Any:
    """A boto3 S3 client for the server in `env` (boto3 comes with moto): what S3 itself says, where
    pyarrow would show a `key/` marker as a folder."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def raw_keys(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    """Every key in `bucket` under `prefix` as S3 lists it, folder markers (`key/`) included."""
    pages = client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def bucket_names(env: dict[str, str]) -> list[str]:
    return sorted(b["Name"] for b in client(env).list_buckets()["Buckets"])


def list_keys(env: dict[str, str], uri: str) -> list[str]:
    """Every object below an s3:// URI, as paths relative to it."""
    import pyarrow.fs as pafs

    with environment(env):
        fs, root = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path.removeprefix(root).lstrip("/") for i in infos if i.type == pafs.FileType.File)


class TcpProxy:
    """A TCP forwarder from a port of its own on 127.0.0.1 to `target`'s, which a test stops
    (connections refused, the open ones cut: the storage endpoint unreachable while the
    server behind it keeps its objects) and starts again on the same port."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
