"""A real S3-compatible server on 127.0.0.1 for tests (moto's server mode), started and
stopped by its pid; the environment a client (pyarrow, Ray workers) needs to reach it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
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


def list_keys(env: dict[str, str], uri: str) -> list[str]:
    """Every object below an s3:// URI, as paths relative to it."""
    import pyarrow.fs as pafs

    with environment(env):
        fs, root = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path.removeprefix(root).lstrip("/") for i in infos if i.type == pafs.FileType.File)
