"""A GCS emulator on 127.0.0.1 for tests (gcp-storage-emulator's server, in memory, in a process of
its own stopped by its pid) and what pyarrow's GcsFileSystem needs to reach it.

pyarrow opens a gs:// URI with the endpoint and scheme from its query (`endpoint_override`,
`scheme`) and Google's application default credentials from the environment; its URI takes no
`anonymous` option, and without credentials it asks the GCE metadata server (which does not
answer here). So the same process also serves an OAuth token endpoint that hands out a fake
token, and the environment points GOOGLE_APPLICATION_CREDENTIALS at an `authorized_user` file
whose `token_uri` is that endpoint: pyarrow's own credential code runs, and the emulator
ignores the token. Ray workers started after the environment is set reach it the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.s3 import free_port

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def gcs_server(folder: Path, bucket: str) -> Iterator[tuple[dict[str, str], str]]:
    """Start the emulator with `bucket` in it; yield the environment a client needs and the
    query (`endpoint_override=...&scheme=http`) a gs:// URI carries to reach it."""
    from tests.helpers import stop_session  # here: the emulator's own process (`-m tests.gcs`) needs none of it

    port, token_port = free_port(), free_port()
    credentials = folder / "credentials.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "kdsearch-test",
                "client_secret": "kdsearch-test",
                "refresh_token": "kdsearch-test",
                "token_uri": f"http://127.0.0.1:{token_port}/token",
            }
        )
    )
    log = folder / "gcs.log"
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs", str(port), str(token_port), bucket],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", timeout=1).read()
                urllib.request.urlopen(f"http://127.0.0.1:{token_port}/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the GCS emulator did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield {"GOOGLE_APPLICATION_CREDENTIALS": str(credentials)}, f"endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        stop_session(proc)
        out.close()


def serve(port: int, token_port: int, bucket: str) -> None:
    """The emulator on `port` with `bucket`, and the token endpoint on `token_port`, until killed."""
    import http.server
    import threading

    from gcp_storage_emulator.server import create_server

    class Token(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # readiness
            self.answer({})

        def do_POST(self) -> None:  # an OAuth refresh: a fake token, good for an hour
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.answer({"access_token": "kdsearch-test", "token_type": "Bearer", "expires_in": 3600})

        def answer(self, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    tokens = http.server.ThreadingHTTPServer(("127.0.0.1", token_port), Token)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    print(f"serving GCS on {port}, tokens on {token_port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os._exit(0)  # the servers' threads die with the process


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
