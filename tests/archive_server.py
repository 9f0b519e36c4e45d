"""A real HTTP server on 127.0.0.1 and a small CIFAR-10 archive in the real layout, for the
tests of datasets fetched on first use (named to kdsearch as a mirror through KDSEARCH_ARCHIVES)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from kdsearch.train.fetch import CIFAR_FILES

FOLDER = "cifar-10-batches-py"
PER_CLASS = 2  # images of each class in each training batch: 10 of a class in all, so val carves 2 per class


def cifar10_archive() -> bytes:
    """A CIFAR-10 archive in the real layout (pickled batches, batches.meta), 100 training images
    (5 batches of 2 per class) and 20 test images."""
    rng = np.random.default_rng(0)
    files: dict[str, dict] = {}
    for name in [*CIFAR_FILES["cifar10"][0], *CIFAR_FILES["cifar10"][1]]:
        labels = [c for c in range(10) for _ in range(PER_CLASS)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        files[name] = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in labels]}
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, entry in files.items():
            blob = pickle.dumps(entry)
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out.getvalue()


ARCHIVE = cifar10_archive()
GARBAGE = b"\x1f\x8b not a tar, though it begins as gzip does"


class Server:
    """http.server on 127.0.0.1 in a thread: `files` by path, every GET counted by path; a GET
    answers once `gate` is set (set from the start unless a test holds it)."""

    def __init__(self, files: dict[str, bytes]):
        self.gets: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.gets[self.path] += 1
                outer.gate.wait(timeout=60)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def mirror(tmp_path: Path, url: str, md5: str) -> Path:
    """A KDSEARCH_ARCHIVES file naming `url` and `md5` for cifar10."""
    path = tmp_path / "archives.json"
    path.write_text(json.dumps({"cifar10": {"url": url, "md5": md5}}))
    return path


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()
